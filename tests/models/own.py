"""Own small models for pass tests: the shapes real users write, in a few lines each."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- nanoGPT-style causal LM
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, h: int, block: int):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(0.1)
        self.resid_dropout = nn.Dropout(0.1)
        self.h = h
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.h, C // self.h).transpose(1, 2)
        k = k.view(B, T, self.h, C // self.h).transpose(1, 2)
        v = v.view(B, T, self.h, C // self.h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, h: int, block: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, h, block)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Pre-LN causal LM with tied token embedding / LM head."""

    def __init__(self, vocab=97, block=32, d=48, h=4, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(Block(d, h, block) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def nanogpt(seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = NanoGPT(**kw).eval()
    _randomize_norms(m)
    return m, (torch.randint(0, 97, (2, 11)),)


# ---------------------------------------------------------------- ViT-style encoder with CLS
class ViTAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.h = h
        self.scale = (d // h) ** -0.5

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # timm style: q scaled first
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = ViTAttention(d, h)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Pre-LN ViT: conv patch embedding, CLS token, learned position embedding."""

    def __init__(self, img=32, patch=8, d=48, h=4, layers=2, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5 + 0.3)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.5 + 0.1)
        self.blocks = nn.ModuleList(ViTBlock(d, h) for _ in range(layers))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


def tiny_vit(seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = TinyViT(**kw).eval()
    _randomize_norms(m)
    return m, (torch.randn(2, 3, 32, 32),)


# ---------------------------------------------------------------- Post-LN encoder (BERT-like)
class PostLNLayer(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x, pad_mask=None):
        a, _ = self.attn(x, x, x, key_padding_mask=pad_mask)
        x = self.ln1(x + a)
        return self.ln2(x + self.ff(x))


class PostLNEncoder(nn.Module):
    def __init__(self, vocab=97, d=48, h=4, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(PostLNLayer(d, h) for _ in range(layers))

    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return x


def post_ln_encoder(seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = PostLNEncoder(**kw).eval()
    _randomize_norms(m)
    return m, (torch.randint(0, 97, (2, 9)),)


# ---------------------------------------------------------------- hand-written attention styles
class AttentionStyles(nn.Module):
    """One projection, many ways of writing the same softmax attention.

    Each style below is a way we have seen attention written in real code.
    """

    STYLES = ("matmul_mul", "div_sqrt", "bmm_3d", "baddbmm_bias", "upcast_fp32", "additive_mask",
              "where_mask", "einsum_free_permute", "pre_scaled_qk", "tensor_scale", "bias_then_mask",
              # third-party spellings: einsum (vit-pytorch, x-transformers, timm), softmax by hand, sink tokens
              "einsum", "einsum_heads_in_subscript", "einsum_keys_transposed", "einsum_ellipsis", "einsum_3d",
              "hand_softmax", "hand_softmax_no_max", "hand_softmax_max_detached", "sinks_concat",
              "parameter_scale", "buffer_scale_on_q")

    def __init__(self, style: str, d=32, h=4, T=10):
        super().__init__()
        if style not in self.STYLES:
            raise ValueError(style)
        self.style, self.h, self.d = style, h, d
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.rel_bias = nn.Parameter(torch.randn(h, T, T) * 0.1)
        self.register_buffer("causal", torch.tril(torch.ones(T, T, dtype=torch.bool)))
        self.sink_kv = nn.Parameter(torch.randn(2, h, 2, d // h))  # two learned sink tokens per head (StreamingLLM)
        self.temperature = nn.Parameter(torch.tensor((d // h) ** -0.5))  # a learned scale (e.g. XCiT, cosine attention)
        self.register_buffer("q_scale", torch.tensor((d // h) ** -0.5))

    def forward(self, x):
        B, T, C = x.shape
        H, Dh = self.h, C // self.h
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, H, Dh).transpose(1, 2) for t in (q, k, v))
        s = self.style
        if s == "matmul_mul":
            p = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * Dh ** -0.5, dim=-1)
            y = torch.matmul(p, v)
        elif s == "div_sqrt":
            p = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).softmax(-1)
            y = p @ v
        elif s == "bmm_3d":
            q3, k3, v3 = (t.reshape(B * H, T, Dh) for t in (q, k, v))
            p = F.softmax(torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(Dh), dim=-1)
            y = torch.bmm(p, v3).view(B, H, T, Dh)
        elif s == "baddbmm_bias":
            q3, k3, v3 = (t.reshape(B * H, T, Dh) for t in (q, k, v))
            bias = self.rel_bias[:, :T, :T].repeat(B, 1, 1)
            p = F.softmax(torch.baddbmm(bias, q3 * Dh ** -0.5, k3.transpose(1, 2)), dim=-1)
            y = torch.bmm(p, v3).view(B, H, T, Dh)
        elif s == "upcast_fp32":
            w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(Dh)
            w = torch.where(self.causal[:T, :T], w, torch.finfo(w.dtype).min)
            p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            y = p @ v
        elif s == "additive_mask":
            mask = torch.zeros(T, T).masked_fill(~self.causal[:T, :T], float("-inf"))
            p = F.softmax(q @ k.transpose(-2, -1) * Dh ** -0.5 + mask, dim=-1)
            y = p @ v
        elif s == "where_mask":
            w = q @ k.transpose(-2, -1) * Dh ** -0.5
            w = torch.where(self.causal[:T, :T], w, torch.full([], float("-inf")))
            y = w.softmax(-1) @ v
        elif s == "einsum_free_permute":
            kt = k.permute(0, 1, 3, 2)
            y = torch.softmax(q @ kt * Dh ** -0.5 + self.rel_bias[:, :T, :T], -1) @ v
        elif s == "pre_scaled_qk":
            c = Dh ** -0.25
            y = torch.softmax((q * c) @ (k * c).transpose(-2, -1), -1) @ v
        elif s == "bias_then_mask":  # T5: unscaled scores, a position bias, then the additive mask
            mask = torch.zeros(T, T).masked_fill(~self.causal[:T, :T], torch.finfo(x.dtype).min)
            y = torch.softmax((q @ k.transpose(-1, -2)).float() + self.rel_bias[:, :T, :T] + mask, -1).type_as(q) @ v
        elif s == "einsum":  # vit-pytorch / x-transformers
            y = torch.einsum("b h i j, b h j d -> b h i d", (torch.einsum("b h i d, b h j d -> b h i j", q, k) * Dh ** -0.5)
                             .softmax(dim=-1), v)
        elif s == "einsum_heads_in_subscript":  # heads split in the subscripts, [B, T, H, Dh] layout
            qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
            w = torch.einsum("bnhd,bmhd->bhnm", qs, ks) / math.sqrt(Dh)
            y = torch.einsum("bhnm,bmhd->bnhd", w.softmax(-1), vs).transpose(1, 2)
        elif s == "einsum_keys_transposed":  # kᵀ made before the einsum
            y = torch.einsum("bhij,bhjd->bhid", torch.softmax(torch.einsum("bhid,bhdj->bhij", q, k.transpose(-1, -2))
                                                              * Dh ** -0.5, -1), v)
        elif s == "einsum_ellipsis":
            y = torch.einsum("...ij,...jd->...id", torch.einsum("...id,...jd->...ij", q * Dh ** -0.5, k).softmax(-1), v)
        elif s == "einsum_3d":  # heads merged into the batch
            q3, k3, v3 = (t.reshape(B * H, T, Dh) for t in (q, k, v))
            y = torch.einsum("bij,bjd->bid", F.softmax(torch.einsum("bid,bjd->bij", q3, k3) * Dh ** -0.5, dim=-1), v3)
            y = y.view(B, H, T, Dh)
        elif s.startswith("hand_softmax"):  # exp(s - max) / sum, written out
            w = q @ k.transpose(-1, -2) * Dh ** -0.5
            if s == "hand_softmax":
                w = w - w.amax(dim=-1, keepdim=True)
            elif s == "hand_softmax_max_detached":
                w = w - w.max(dim=-1, keepdim=True).values.detach()
            e = torch.exp(w)
            y = (e / e.sum(dim=-1, keepdim=True)) @ v
        elif s == "parameter_scale":
            y = torch.softmax(q @ k.transpose(-1, -2) * self.temperature, -1) @ v
        elif s == "buffer_scale_on_q":
            y = torch.softmax((q * self.q_scale) @ k.transpose(-1, -2), -1) @ v
        elif s == "sinks_concat":  # sink tokens concatenated in front of the keys and values
            sk, sv = (t.expand(B, -1, -1, -1) for t in self.sink_kv)
            k2, v2 = torch.cat([sk, k], dim=-2), torch.cat([sv, v], dim=-2)
            y = torch.softmax(q @ k2.transpose(-1, -2) * Dh ** -0.5, -1) @ v2
        else:  # tensor_scale: GPT-2 style division by a 0-d tensor
            w = q @ k.transpose(-1, -2)
            w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
            y = torch.softmax(w, -1).type(v.dtype) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, C))


def attention_style(style: str, seed: int = 0):
    torch.manual_seed(seed)
    return AttentionStyles(style).eval(), (torch.randn(2, 10, 32),)


class RMSNormStyles(nn.Module):
    """Decomposed RMSNorm as written in Llama, Gemma, T5 and by hand."""

    STYLES = ("llama", "gemma", "t5", "by_hand_div", "nn_rmsnorm", "rsqrt_first",
              "x_transformers", "x_transformers_unit_offset", "norm_div")

    def __init__(self, style: str, d=32):
        super().__init__()
        self.style = style
        self.weight = nn.Parameter(torch.randn(d) * 0.1 + (0.0 if style in ("gemma", "x_transformers_unit_offset") else 1.0))
        self.lin = nn.Linear(d, d)
        self.norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, x):
        return rms_norm_written(self.style, self.lin(x), self.weight, self.norm)


def rms_norm_written(style: str, x, weight, norm=None, half=None, eps: float = 1e-6):
    """RMSNorm of `x` spelled in `style` (one of RMSNormStyles.STYLES); T5 casts to `half` if given."""
    s = style
    if s == "llama":
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dt)
    if s == "gemma":
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return (out * (1.0 + weight.float())).type_as(x)
    if s == "t5":
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = x * torch.rsqrt(var + eps)
        return weight * (h.to(half) if half is not None else h)
    if s == "by_hand_div":
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight
    if s == "rsqrt_first":
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * x * weight
    if s.startswith("x_transformers"):  # x-transformers' RMSNorm: F.normalize · sqrt(d) · (g + unit offset)
        return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5 * (weight + float(s.endswith("unit_offset")))
    if s == "norm_div":
        return x / x.norm(dim=-1, keepdim=True) * math.sqrt(x.shape[-1]) * weight
    return norm(x)


def rms_norm_style(style: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return RMSNormStyles(style).eval().to(dtype), (torch.randn(2, 7, 32, dtype=dtype),)


class LayerNormStyles(nn.Module):
    """LayerNorm written out by hand, as model code outside torch.nn writes it."""

    STYLES = ("var_rsqrt", "centred_pow_div", "centred_mul_w_first", "scale_only", "no_affine")
    # (x - mean) / (std + eps): epsilon outside the root; the unbiased variance; an L2 norm without sqrt(d)
    NOT_A_LAYER_NORM = ("annotated_transformer", "unbiased_var", "normalize_no_scale")

    def __init__(self, style: str, d=32):
        super().__init__()
        self.style = style
        self.lin = nn.Linear(d, d)
        self.w = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.b = nn.Parameter(0.2 * torch.randn(d))

    def forward(self, x):
        x, s, eps = self.lin(x), self.style, 1e-5
        mean = x.mean(-1, keepdim=True)
        if s == "var_rsqrt":
            return (x - mean) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * self.w + self.b
        if s == "centred_pow_div":
            c = x - mean
            return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps) * self.w + self.b
        if s == "centred_mul_w_first":
            c = x - mean
            return self.w * (c * torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)) + self.b
        if s == "scale_only":
            return (x - mean) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * self.w
        if s == "no_affine":
            return (x - mean) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
        if s == "unbiased_var":
            return (x - mean) * torch.rsqrt(x.var(-1, keepdim=True) + eps) * self.w + self.b
        if s == "normalize_no_scale":  # cosine-style: the gain absorbs no sqrt(d)
            return F.normalize(x, dim=-1) * self.w
        return self.w * (x - mean) / (x.std(-1, keepdim=True) + eps) + self.b  # annotated_transformer


def layer_norm_style(style: str, seed: int = 0):
    torch.manual_seed(seed)
    return LayerNormStyles(style).eval(), (torch.randn(2, 7, 32),)


def _randomize_norms(m: nn.Module) -> None:
    """Non-trivial norm gains and biases, so a conversion that drops them shows."""
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            with torch.no_grad():
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))


class PositionBiases(nn.Module):
    """Softmax attention with an additive position bias, in the ways known models compute it."""

    KINDS = ("t5_buckets", "swin_table", "sam_decomposed", "alibi")

    def __init__(self, kind: str, d=32, h=4, n=9):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(kind)
        self.kind, self.h, self.n = kind, h, n
        self.qkv = nn.Linear(d, 3 * d)
        i = torch.arange(n)
        rel = i[None, :] - i[:, None]
        if kind == "t5_buckets":
            self.bias = nn.Embedding(8, h)
            self.register_buffer("buckets", rel.clamp(-4, 3) + 4)
        elif kind == "swin_table":
            self.table = nn.Parameter(torch.randn(2 * n - 1, h) * 0.1)
            self.register_buffer("index", (rel + n - 1).flatten())
        elif kind == "sam_decomposed":
            self.rel_pos = nn.Parameter(torch.randn(n, n, d // h) * 0.1)
        else:  # ALiBi: a fixed slope per head times the key-query distance
            slopes = torch.tensor([2.0 ** (-8 * (k + 1) / h) for k in range(h)])
            self.register_buffer("alibi", -slopes[:, None, None] * rel.abs()[None].float())

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (t.reshape(B, N, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if self.kind == "t5_buckets":
            s = s + self.bias(self.buckets).permute(2, 0, 1)
        elif self.kind == "swin_table":
            s = s + self.table[self.index].view(N, N, -1).permute(2, 0, 1)
        elif self.kind == "sam_decomposed":
            s = s + torch.einsum("bhic,ijc->bhij", q, self.rel_pos)
        else:
            s = s + self.alibi
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)


def position_bias(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return PositionBiases(kind).eval(), (torch.randn(2, 9, 32),)
