"""Generated transformer-like models for property-based tests of the exact rewrites.

A `Spec` describes one model: depth, width, heads (GQA where the K/V heads are fewer),
per layer a residual arrangement (Pre-LN, Post-LN, parallel GPT-J block), a norm
(LayerNorm, or RMSNorm decomposed in the styles of `own.RMSNormStyles`) and an
attention written in one of the styles of `own.AttentionStyles`, or as
`F.scaled_dot_product_attention`, or `nn.MultiheadAttention`; masks (causal, padding),
class tokens, tied and shared parameters, a head reading the raw residual stream, fp32
or bf16. `build(spec)` gives the model, its example inputs and a second set of inputs
(same shapes, other values) on which an exact rewrite must hold as well.

`specs()` is the hypothesis strategy that draws them. The model code avoids unpacking
`x.shape` so that torch.fx.symbolic_trace can trace it too (`Spec.capture == "fx"` makes
torch.export fail on purpose, so the symbolic_trace fallback is exercised).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tests.models.own import AttentionStyles, RMSNormStyles, rms_norm_written

__all__ = ["LayerSpec", "Spec", "Generated", "build", "specs", "with_", "ATTENTION", "NORMS", "ARCHS"]

# hand-written styles (own.AttentionStyles), then library forms
ATTENTION = AttentionStyles.STYLES + ("sdpa", "sdpa_gqa", "mha", "mha_weights")
NORMS = ("ln", "ln_nobias", "ln_noaffine") + tuple(f"rms:{s}" for s in RMSNormStyles.STYLES)
ARCHS = ("pre", "post", "parallel")
MASK_OPS = ("add", "add_min", "fill", "where", "where_min")  # how a hand-written attention applies a mask
SOFTMAX = ("plain", "upcast_out", "upcast_in")
VOCAB, FEATURES = 37, 7


@dataclass(frozen=True)
class LayerSpec:
    arch: str = "pre"  # "pre", "post" or "parallel" (attention and MLP read the same norm)
    norm: str = "ln"  # one of NORMS
    attn: str = "matmul_mul"  # one of ATTENTION
    mask_op: str = "add"  # one of MASK_OPS (hand-written styles with a mask)
    softmax: str = "plain"  # one of SOFTMAX (hand-written styles)
    gqa_repeat: str = "expand"  # how K/V heads are repeated: "expand" (Llama repeat_kv) or "interleave"
    shared_norm: bool = False  # one norm module read twice in the block (pre / post)
    branch_scale: str = "none"  # "none", "scalar" (x + 0.5·f(x)) or "layerscale" (x + γ⊙f(x), CaiT)


@dataclass(frozen=True)
class Spec:
    layers: tuple[LayerSpec, ...] = (LayerSpec(),)
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 12
    mask: str = "none"  # "none", "causal", "padding", "causal_padding"
    input: str = "tokens"  # "tokens" (embedding) or "features" (a linear patch embedding)
    cls_token: bool = False
    pos: str = "learned"  # "none", "learned" (a parameter), "embedding" (nn.Embedding of arange)
    final_norm: str = "ln"  # "none" or one of NORMS
    tie: bool = False  # LM head tied to the token embedding
    reuse_block: bool = False  # the first block is applied again after the last (a module used twice)
    side: str = "none"  # "none", "output" (the raw stream is an output), "linear" (a head reads it)
    dtype: str = "float32"  # "float32" or "bfloat16"
    batch: int = 2
    seq: int = 7
    mlp: str = "gelu"  # "gelu", "relu", "swiglu"
    capture: str = "export"  # "export", or "fx" (export fails on purpose: symbolic_trace fallback)
    rope: bool = False  # rotary position embedding on q and k (partial when the head dim is odd)
    embed_scale: bool = False  # embeddings scaled by √d (Gemma)
    seed: int = 0

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens(self) -> int:
        return self.seq + (1 if self.cls_token else 0)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def short(self) -> str:
        """The spec as Python (paste it into a test to reproduce a failure)."""
        return repr(self)


# ------------------------------------------------------------------------------ norms


class RMSNorm(nn.Module):
    """RMSNorm in one of `own.RMSNormStyles`' spellings (no projection in front)."""

    def __init__(self, style: str, d: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.style = style
        self.half = dtype if dtype != torch.float32 else None  # T5 casts back to a half-precision gain's dtype
        self.weight = nn.Parameter(torch.randn(d) * 0.1 + (0.0 if style in ("gemma", "x_transformers_unit_offset") else 1.0))
        self.norm = nn.RMSNorm(d, eps=1e-6) if style == "nn_rmsnorm" else None

    def forward(self, x):
        return rms_norm_written(self.style, x, self.weight, self.norm, self.half)


def make_norm(kind: str, d: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    if kind == "ln":
        return nn.LayerNorm(d)
    if kind == "ln_nobias":
        return nn.LayerNorm(d, bias=False)
    if kind == "ln_noaffine":
        return nn.LayerNorm(d, elementwise_affine=False)
    return RMSNorm(kind.split(":", 1)[1], d, dtype)


# ------------------------------------------------------------------------------ attention


def _sizes(x, static: tuple) -> tuple:
    """x's first two sizes; under symbolic_trace the model's fixed sizes `static`, as Python
    ints (a traced size is a Proxy, which cannot slice a real tensor or steer control flow)."""
    if isinstance(x, torch.fx.Proxy):
        return static
    return x.shape[0], x.shape[1]


def _repeat_kv(x, n_rep: int, how: str):
    if n_rep == 1:
        return x
    if how == "interleave":
        return x.repeat_interleave(n_rep, dim=1)
    b, h, s, d = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Attention(nn.Module):
    """Softmax attention written in one of `ATTENTION`'s styles, masked by `keep`
    ([B|1, 1, T, T] booleans, True = attend) when the model has a mask."""

    def __init__(self, spec: Spec, layer: LayerSpec):
        super().__init__()
        self.spec, self.layer = spec, layer
        self.dtype = spec.torch_dtype  # torch.finfo needs a real dtype (a traced `s.dtype` is a Proxy under fx)
        self.h, self.kv, self.dh, self.d = spec.heads, spec.kv_heads, spec.head_dim, spec.width
        if layer.attn.startswith("mha"):
            self.mha = nn.MultiheadAttention(self.d, self.h, batch_first=True)
            return
        self.q = nn.Linear(self.d, self.d)
        self.kv_proj = nn.Linear(self.d, 2 * self.kv * self.dh)
        self.o = nn.Linear(self.d, self.d)
        if layer.attn in ("baddbmm_bias", "einsum_free_permute", "bias_then_mask"):
            self.rel_bias = nn.Parameter(torch.randn(self.h, spec.tokens, spec.tokens) * 0.1)
        if spec.rope:  # GPT-NeoX style rotate-half on the first (even) part of each head
            d = self.dh - self.dh % 2
            inv = 1.0 / (10000 ** (torch.arange(d // 2, dtype=torch.float32) / max(d // 2, 1)))
            ang = torch.arange(spec.tokens, dtype=torch.float32)[:, None] * inv[None, :]
            self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1), persistent=False)
            self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1), persistent=False)

    def _rope(self, x, T):
        d = self.cos.shape[-1]
        x1, x2, rest = x[..., : d // 2], x[..., d // 2 : d], x[..., d:]
        rotated = torch.cat([-x2, x1], dim=-1)
        return torch.cat([x[..., :d] * self.cos[:T] + rotated * self.sin[:T], rest], dim=-1)

    def forward(self, x, keep):
        a = self.layer.attn
        B, T = _sizes(x, (self.spec.batch, self.spec.tokens))
        if a.startswith("mha"):
            return self._mha(x, keep)
        H, Dh = self.h, self.dh
        q = self.q(x).view(B, T, H, Dh).transpose(1, 2)
        k, v = self.kv_proj(x).split(self.kv * Dh, dim=-1)
        k = k.reshape(B, T, self.kv, Dh).transpose(1, 2)
        v = v.reshape(B, T, self.kv, Dh).transpose(1, 2)
        if self.spec.rope:
            q, k = self._rope(q, T), self._rope(k, T)
        if a == "sdpa_gqa":  # the library's own GQA: K/V heads stay few
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=self.kv != H)
        else:
            k = _repeat_kv(k, H // self.kv, self.layer.gqa_repeat)
            v = _repeat_kv(v, H // self.kv, self.layer.gqa_repeat)
            if a == "sdpa":
                causal_only = self.spec.mask == "causal"
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal_only else keep, is_causal=causal_only)
            else:
                y = self._hand_written(q, k, v, keep, B, T)
        return self.o(y.transpose(1, 2).reshape(B, T, self.d))

    def _mha(self, x, keep):
        kw = {}
        if self.spec.mask in ("causal", "causal_padding"):
            T = _sizes(x, (self.spec.batch, self.spec.tokens))[1]
            kw["attn_mask"] = ~torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            kw["is_causal"] = self.spec.mask == "causal"
        if self.spec.mask in ("padding", "causal_padding"):
            kw["key_padding_mask"] = ~keep[:, 0, -1, :]  # the last row sees every valid key
        if self.spec.mask == "causal_padding":  # MHA cannot combine a causal hint with a padding mask
            kw.pop("is_causal")
        y, _ = self.mha(x, x, x, need_weights=self.layer.attn == "mha_weights", **kw)
        return y

    def _mask(self, s, keep):
        """Apply the boolean mask to the scores `s` as the layer's `mask_op` says."""
        op = self.layer.mask_op
        if self.layer.attn == "additive_mask":
            op = "add"
        elif self.layer.attn == "where_mask":
            op = "where"
        elif self.layer.attn == "upcast_fp32":
            op = "where_min"
        if self.layer.attn in ("bmm_3d", "baddbmm_bias"):  # scores are [B·H, T, T]
            BH, T = _sizes(s, (self.spec.batch * self.h, self.spec.tokens))
            keep = keep.expand(BH // self.h, self.h, T, T).reshape(BH, T, T)
        if op == "add":
            return s + torch.zeros(keep.shape, dtype=s.dtype, device=s.device).masked_fill(~keep, float("-inf"))
        if op == "add_min":  # HF style: (1 - mask) * finfo.min
            return s + (1.0 - keep.to(s.dtype)) * torch.finfo(self.dtype).min
        if op == "fill":
            return s.masked_fill(~keep, float("-inf"))
        if op == "where":
            return torch.where(keep, s, torch.full([], float("-inf"), dtype=s.dtype))
        return torch.where(keep, s, torch.finfo(self.dtype).min)

    def _softmax(self, s, v):
        how = "upcast_out" if self.layer.attn == "upcast_fp32" else self.layer.softmax
        if self.layer.attn == "tensor_scale":
            return torch.softmax(s, -1).type(v.dtype)
        if how == "upcast_out":
            return F.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
        if how == "upcast_in":
            return torch.softmax(s.float(), -1).to(v.dtype)
        return F.softmax(s, dim=-1)

    def _hand_written(self, q, k, v, keep, B, T):
        s, H, Dh = self.layer.attn, self.h, self.dh
        if s in ("bmm_3d", "baddbmm_bias"):
            q3, k3, v3 = (t.reshape(B * H, T, Dh) for t in (q, k, v))
            if s == "bmm_3d":
                w = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(Dh)
            else:
                bias = self.rel_bias[:, :T, :T].to(q.dtype).repeat(B, 1, 1)
                if keep is not None:  # the mask goes into baddbmm's input, as HF's bloom does
                    bias = self._mask(bias, keep)
                w = torch.baddbmm(bias, q3 * Dh ** -0.5, k3.transpose(1, 2))
            if keep is not None and s == "bmm_3d":
                w = self._mask(w, keep)
            return torch.bmm(self._softmax(w, v3), v3).view(B, H, T, Dh)
        if s in ("matmul_mul", "upcast_fp32"):
            w = torch.matmul(q, k.transpose(2, 3)) * Dh ** -0.5
        elif s == "div_sqrt":
            w = q @ k.transpose(-1, -2) / math.sqrt(Dh)
        elif s == "einsum_free_permute":
            w = q @ k.permute(0, 1, 3, 2) * Dh ** -0.5 + self.rel_bias[:, :T, :T].to(q.dtype)
        elif s == "pre_scaled_qk":
            c = Dh ** -0.25
            w = (q * c) @ (k * c).transpose(-2, -1)
        elif s == "tensor_scale":
            w = q @ k.transpose(-1, -2)
            w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
        elif s == "bias_then_mask":  # T5: unscaled scores plus a position bias, the mask added after
            w = q @ k.transpose(-1, -2) + self.rel_bias[:, :T, :T].to(q.dtype)
        else:  # additive_mask, where_mask: matmul, scale by mul
            w = q @ k.transpose(-2, -1) * Dh ** -0.5
        if keep is not None:
            w = self._mask(w, keep)
        return self._softmax(w, v) @ v


# ------------------------------------------------------------------------------ blocks


class MLP(nn.Module):
    def __init__(self, d: int, kind: str):
        super().__init__()
        f = 2 * d + 1  # odd hidden width
        self.kind = kind
        self.up = nn.Linear(d, f)
        self.gate = nn.Linear(d, f, bias=False) if kind == "swiglu" else None
        self.down = nn.Linear(f, d)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.relu(self.up(x)) if self.kind == "relu" else F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, spec: Spec, layer: LayerSpec):
        super().__init__()
        d = spec.width
        self.arch = layer.arch
        self.norm1 = make_norm(layer.norm, d, spec.torch_dtype)
        self.attn = Attention(spec, layer)
        self.norm2 = self.norm1 if (layer.shared_norm or layer.arch == "parallel") else make_norm(layer.norm, d, spec.torch_dtype)
        self.mlp = MLP(d, spec.mlp)
        self.scale = layer.branch_scale
        if layer.branch_scale == "layerscale":
            self.gamma1 = nn.Parameter(0.5 + 0.1 * torch.randn(d))
            self.gamma2 = nn.Parameter(0.5 + 0.1 * torch.randn(d))

    def _scaled(self, y, which: int):
        if self.scale == "scalar":
            return 0.5 * y
        if self.scale == "layerscale":
            return (self.gamma1 if which == 1 else self.gamma2) * y
        return y

    def forward(self, x, keep):
        if self.arch == "pre":
            x = x + self._scaled(self.attn(self.norm1(x), keep), 1)
            return x + self._scaled(self.mlp(self.norm2(x)), 2)
        if self.arch == "post":
            x = self.norm1(x + self._scaled(self.attn(x, keep), 1))
            return self.norm2(x + self._scaled(self.mlp(x), 2))
        h = self.norm1(x)  # parallel (GPT-J): both branches read one norm
        return x + self._scaled(self.attn(h, keep), 1) + self._scaled(self.mlp(h), 2)


@torch.fx.wrap
def _fx_only(x):
    """Opaque to symbolic_trace, fatal to torch.export (data-dependent control flow)."""
    return x if bool(x.sum() != 12345) else x + 1


class Generated(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        d, n = spec.width, spec.tokens
        if spec.input == "tokens":
            self.embed = nn.Embedding(VOCAB, d)
        else:
            self.embed = nn.Linear(FEATURES, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.5 + 0.3) if spec.cls_token else None
        if spec.pos == "learned":
            self.pos = nn.Parameter(torch.randn(1, n, d) * 0.5 + 0.1)
        elif spec.pos == "embedding":
            self.pos = nn.Embedding(n, d)
        else:
            self.pos = None
        self.blocks = nn.ModuleList(Block(spec, layer) for layer in spec.layers)
        self.norm = None if spec.final_norm == "none" else make_norm(spec.final_norm, d, spec.torch_dtype)
        out = VOCAB if spec.input == "tokens" and not spec.cls_token else 5
        self.head = nn.Linear(d, out, bias=out != VOCAB)
        if spec.tie and out == VOCAB:
            self.head.weight = self.embed.weight
        self.side = nn.Linear(d, 3) if spec.side == "linear" else None
        if spec.mask in ("causal", "causal_padding"):
            self.register_buffer("causal", torch.tril(torch.ones(n, n, dtype=torch.bool)))

    def forward(self, x):
        return self._forward(x, None)

    def _forward(self, x, pad):
        s = self.spec
        if s.capture == "fx":
            x = _fx_only(x)
        x = self.embed(x)
        if s.embed_scale:
            x = x * s.width ** 0.5
        B = _sizes(x, (s.batch, s.tokens))[0]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)
            if pad is not None:
                pad = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=pad.device), pad], dim=1)
        T = _sizes(x, (s.batch, s.tokens))[1]
        if s.pos == "learned":
            x = x + self.pos[:, :T]
        elif s.pos == "embedding":
            x = x + self.pos(torch.arange(T, device=x.device))
        keep = None
        if s.mask in ("causal", "causal_padding"):
            keep = self.causal[:T, :T][None, None]
        if pad is not None:
            p = pad[:, None, None, :]
            keep = p if keep is None else keep & p
        side = None
        blocks = list(self.blocks) + ([self.blocks[0]] if s.reuse_block else [])
        for i, blk in enumerate(blocks):
            x = blk(x, keep)
            if i == 0 and s.side != "none":
                side = x  # the raw residual stream, read outside any norm
        if self.norm is not None:
            x = self.norm(x)
        y = self.head(x[:, 0] if s.cls_token else x)
        if side is None:
            return y
        return y, (side.sum(-1) if s.side == "output" else self.side(side))


class GeneratedPadded(Generated):
    """The same model taking a key-padding mask [B, T] (True = a real token)."""

    def forward(self, x, pad):
        return self._forward(x, pad)


# ------------------------------------------------------------------------------ build


@dataclass
class Built:
    model: nn.Module
    inputs: tuple
    fresh: tuple  # same shapes, other values (and other padding)
    attention_sites: int  # attention calls in one forward
    norm_sites: int  # norm calls in one forward (LayerNorm and RMSNorm)
    spec: Spec = field(default_factory=Spec)


def _inputs(spec: Spec, g: torch.Generator) -> tuple:
    B, T = spec.batch, spec.seq
    if spec.input == "tokens":
        x = torch.randint(0, VOCAB, (B, T), generator=g)
    else:
        x = torch.randn(B, T, FEATURES, generator=g).to(spec.torch_dtype)
    if spec.mask not in ("padding", "causal_padding"):
        return (x,)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T if B > 1 else lengths[0]  # one full row, one (usually) padded
    pad = torch.arange(T)[None, :] < lengths[:, None]  # right padding: key 0 always valid
    return (x, pad)


def _randomize(model: nn.Module, g: torch.Generator) -> None:
    """Norm gains and biases away from 1 and 0, and a stream far from zero-mean, so a
    conversion that drops or mis-centres anything shows."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                if mod.weight is not None:
                    mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                if mod.bias is not None:
                    mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, nn.MultiheadAttention):
                mod.in_proj_bias.copy_(0.1 * torch.randn(mod.in_proj_bias.shape, generator=g))
                mod.out_proj.bias.copy_(0.1 * torch.randn(mod.out_proj.bias.shape, generator=g))
        offset = 0.5 + 0.3 * torch.randn(model.spec.width, generator=g)  # a stream far from zero-mean
        if isinstance(model.embed, nn.Embedding):
            model.embed.weight.add_(offset)
        else:
            model.embed.bias.add_(offset)


def build(spec: Spec) -> Built:
    torch.manual_seed(spec.seed)
    cls = GeneratedPadded if spec.mask in ("padding", "causal_padding") else Generated
    model = cls(spec).eval()
    g = torch.Generator().manual_seed(spec.seed + 1)
    _randomize(model, g)
    model = model.to(spec.torch_dtype)
    inputs = _inputs(spec, g)
    fresh = _inputs(spec, g)
    n_blocks = len(spec.layers) + (1 if spec.reuse_block else 0)
    layers = list(spec.layers) + ([spec.layers[0]] if spec.reuse_block else [])
    norms = sum(1 if l.arch == "parallel" else 2 for l in layers) + (0 if spec.final_norm == "none" else 1)
    return Built(model, inputs, fresh, n_blocks, norms, spec)


# ------------------------------------------------------------------------------ strategy


def specs(*, dtypes=("float32", "bfloat16"), depths=(1, 1, 1, 1, 1, 2, 2, 3), captures=("export",) * 7 + ("fx",)):
    """Hypothesis strategy over `Spec`s (imported lazily: hypothesis is a test dependency)."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw_) -> Spec:
        heads = draw_(st.sampled_from([1, 2, 3, 4]))
        kv = draw_(st.sampled_from([k for k in (1, 2, 3, 4) if heads % k == 0]))
        lo = max(3, -(-24 // heads))  # width 24..72 (odd widths from odd heads × odd head dims)
        head_dim = draw_(st.integers(lo, max(lo, 72 // heads)))
        depth = draw_(st.sampled_from(list(depths)))
        mixed = draw_(st.booleans())
        one_arch = draw_(st.sampled_from(ARCHS))
        one_norm = draw_(st.sampled_from(NORMS))

        def layer() -> LayerSpec:
            return LayerSpec(
                arch=draw_(st.sampled_from(ARCHS)) if mixed else one_arch,
                norm=draw_(st.sampled_from(NORMS)) if mixed else one_norm,
                attn=draw_(st.sampled_from(ATTENTION)),
                mask_op=draw_(st.sampled_from(MASK_OPS)),
                softmax=draw_(st.sampled_from(SOFTMAX)),
                gqa_repeat=draw_(st.sampled_from(["expand", "interleave"])),
                shared_norm=draw_(st.booleans()) and draw_(st.booleans()),
                branch_scale=draw_(st.sampled_from(["none", "none", "none", "scalar", "layerscale"])),
            )

        layers = tuple(layer() for _ in range(depth))
        inp = draw_(st.sampled_from(["tokens", "features"]))
        return Spec(
            layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim,
            mask=draw_(st.sampled_from(["none", "causal", "padding", "causal_padding"])),
            input=inp,
            cls_token=draw_(st.booleans()) and draw_(st.booleans()),
            pos=draw_(st.sampled_from(["none", "learned", "embedding"])),
            final_norm=draw_(st.sampled_from(("none",) + NORMS)),
            tie=inp == "tokens" and draw_(st.booleans()),
            reuse_block=draw_(st.sampled_from([False] * 5 + [True])),
            side=draw_(st.sampled_from(["none", "none", "output", "linear"])),
            dtype=draw_(st.sampled_from(list(dtypes))),
            batch=draw_(st.integers(1, 2)),
            seq=draw_(st.integers(5, 17)),
            mlp=draw_(st.sampled_from(["gelu", "relu", "swiglu"])),
            capture=draw_(st.sampled_from(list(captures))),
            rope=draw_(st.booleans()),
            embed_scale=draw_(st.booleans()) and draw_(st.booleans()),
            seed=draw_(st.integers(0, 2**16)),
        )

    return draw()


def with_(spec: Spec, **changes) -> Spec:
    return replace(spec, **changes)
