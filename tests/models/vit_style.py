"""Vision transformers written the way vit-pytorch writes them (our own code, in its style).

vit-pytorch itself does not install on the CPU torch: its package imports torchvision,
whose registry wheel fails to load against the CPU build (`operator torchvision::nms does
not exist`). These reproduce the forms it uses: einops `rearrange`, `nn.Softmax` modules,
einsum attention (CaiT, with talking heads between the matmuls), `x += pos` straight after
a patch embedding that ends in a LayerNorm (SimpleViT), and layer-scale residuals (CaiT).
Factories return (model, example_inputs), so `rewriter optimize file.py:factory` takes them.
"""
from __future__ import annotations

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

DIM, HEADS, DEPTH, IMAGE, PATCH = 32, 4, 2, 16, 4


def _posemb_sincos_2d(h, w, dim, temperature: int = 10000):
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = 1.0 / (temperature ** (torch.arange(dim // 4) / (dim // 4 - 1)))
    y, x = y.flatten()[:, None] * omega[None, :], x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """SimpleViT's: matmul scores, an `nn.Softmax` module, heads split with rearrange."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        x = self.norm(x)
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), self.to_qkv(x).chunk(3, dim=-1))
        attn = self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)
        return self.to_out(rearrange(torch.matmul(attn, v), "b h n d -> b n (h d)"))


class SimpleViT(nn.Module):
    def __init__(self):
        super().__init__()
        patch_dim = 3 * PATCH * PATCH
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=PATCH, p2=PATCH),
            nn.LayerNorm(patch_dim), nn.Linear(patch_dim, DIM), nn.LayerNorm(DIM))
        self.register_buffer("pos_embedding", _posemb_sincos_2d(IMAGE // PATCH, IMAGE // PATCH, DIM))
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(DIM, HEADS, DIM // HEADS), FeedForward(DIM, 2 * DIM)]) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 10)

    def forward(self, img):
        x = self.to_patch_embedding(img)
        x += self.pos_embedding.to(x.device, dtype=x.dtype)  # in place, on the LayerNorm's output
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.norm(x).mean(dim=1))


class TalkingHeadsAttention(nn.Module):
    """CaiT's: einsum scores, a head-mixing einsum before and after the softmax."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.attend = nn.Softmax(dim=-1)
        self.mix_heads_pre_attn = nn.Parameter(torch.randn(heads, heads))
        self.mix_heads_post_attn = nn.Parameter(torch.randn(heads, heads))
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x, context=None):
        x = self.norm(x)
        context = x if context is None else torch.cat((x, context), dim=1)
        qkv = (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), qkv)
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        dots = torch.einsum("b h i j, h g -> b g i j", dots, self.mix_heads_pre_attn)
        attn = self.attend(dots)
        attn = torch.einsum("b h i j, h g -> b g i j", attn, self.mix_heads_post_attn)
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class LayerScale(nn.Module):
    def __init__(self, dim, fn, init=1e-1):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, 1, dim), init))
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) * self.scale


class CaiT(nn.Module):
    """Patch layers with talking heads, then class-attention layers (the class token attends
    to itself and the patches: keys and values are a concatenation)."""

    def __init__(self):
        super().__init__()
        patch_dim = 3 * PATCH * PATCH
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=PATCH, p2=PATCH),
            nn.LayerNorm(patch_dim), nn.Linear(patch_dim, DIM), nn.LayerNorm(DIM))
        self.pos_embedding = nn.Parameter(torch.randn(1, (IMAGE // PATCH) ** 2, DIM))
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.patch_layers = nn.ModuleList(
            nn.ModuleList([LayerScale(DIM, TalkingHeadsAttention(DIM, HEADS, DIM // HEADS)),
                           LayerScale(DIM, FeedForward(DIM, 2 * DIM))]) for _ in range(DEPTH))
        self.cls_layers = nn.ModuleList(
            nn.ModuleList([LayerScale(DIM, TalkingHeadsAttention(DIM, HEADS, DIM // HEADS)),
                           LayerScale(DIM, FeedForward(DIM, 2 * DIM))]) for _ in range(1))
        self.head = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 10))

    def forward(self, img):
        x = self.to_patch_embedding(img)
        x += self.pos_embedding  # in place, on the LayerNorm's output
        for attn, ff in self.patch_layers:
            x = attn(x) + x
            x = ff(x) + x
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for attn, ff in self.cls_layers:
            cls = attn(cls, context=x) + cls
            cls = ff(cls) + cls
        return self.head(cls[:, 0])


def _image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def simple_vit():
    torch.manual_seed(0)
    return SimpleViT().eval(), (_image(),)


def cait():
    torch.manual_seed(0)
    return CaiT().eval(), (_image(),)
