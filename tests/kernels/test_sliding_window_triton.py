"""The sliding-window attention Triton kernel against the reference (window_attention/naive.py).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is imported) on tiny shapes (N not a multiple of any block); with one, the same
tests run compiled on CUDA, and the `gpu`-marked tests add model-sized shapes
(`pytest -m gpu`). Forward only: the op's autograd differentiates the reference.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need Triton")  # interpreted without a GPU: conftest.py

from rewriter.kernels.window_attention import sliding_triton as st  # noqa: E402
from rewriter.kernels.window_attention.naive import sliding_window_attention as reference  # noqa: E402
from rewriter.kernels.window_attention.sliding_config import SPACE, shape_of  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# two explicit configs: 16 x 16 tiles (windows span several key blocks), and taller query blocks
CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
    {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 2},
]


def make(B=2, H=2, Hk=1, N=45, D=16, Dv=24, dtype=torch.float32, masked=False, seed=0, device=DEVICE):
    """q, k, v (GQA, D != Dv by default) and a key mask: batch 0 has holes and padded first
    keys (its first queries see no real key), batch 1 is padding throughout."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, Hk, N, D, generator=g)
    v = torch.randn(B, Hk, N, Dv, generator=g)
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[0, :3] = False
        mask[1:] = False
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, (None if mask is None else mask.to(device))


def ref(q, k, v, mask, window, causal, dilation, sinks, global_sinks, scale=None):
    return reference(q, k, v, window=window, causal=causal, dilation=dilation, sinks=sinks,
                     global_sinks=global_sinks, scale=scale, key_mask=mask)


# N, window, causal, dilation, sinks, global_sinks, masked
CASES = [
    (37, 5, True, 1, 0, False, False),  # window inside one block
    (45, 23, True, 1, 2, False, True),  # window spanning blocks, sinks, padding
    (45, 7, True, 3, 2, False, True),  # dilation 3: groups of 15
    (37, 500, True, 2, 3, False, False),  # window longer than the sequence
    (45, 1, False, 1, 0, False, False),  # each query sees itself only
    (37, 20, False, 1, 2, False, True),  # bidirectional, sinks
    (37, 8, False, 2, 2, True, True),  # Longformer: global sink rows, dilation 2, padding
    (45, 13, False, 3, 4, True, False),
    (37, 6, False, 1, 50, True, False),  # sinks > N: every row global (the band launch is skipped)
]
IDS = [f"n{c[0]}-w{c[1]}-{'causal' if c[2] else 'bidir'}-d{c[3]}-s{c[4]}{'-global' if c[5] else ''}"
       f"{'-masked' if c[6] else ''}" for c in CASES]


def check(case, config=None, dtype=torch.float32, scale=None, **make_kw):
    n, window, causal, dilation, sinks, global_sinks, masked = case
    q, k, v, mask = make(N=n, dtype=dtype, masked=masked, **make_kw)
    assert st._runs_here(q, k, v, dilation)  # the kernels, not the reference fallback
    out = st.sliding_window_attention(q, k, v, mask, window, causal, dilation, sinks, global_sinks, scale,
                                      config=config)
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == dtype
    assert_close(out, ref(q, k, v, mask, window, causal, dilation, sinks, global_sinks, scale), dtype=dtype)
    if masked:  # batch 1 is all padding: exact zeros, global rows included
        assert out[1].abs().max() == 0
    return out


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_fp32_default_config(case):
    check(case)


@pytest.mark.parametrize("config", CONFIGS, ids=["bm16-bn16", "bm32-bn16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=[IDS[1], IDS[2], IDS[6]])
def test_forward_explicit_configs(case, config):
    check(case, config=config)


def test_causal_queries_without_real_keys_are_zero():
    q, k, v, mask = make(N=37, masked=True)
    out = st.sliding_window_attention(q, k, v, mask, 4, True, 1, 0, False, None, config=CONFIGS[0])
    assert out[0, :, :3].abs().max() == 0  # queries 0..2 of batch 0 see only padding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=[IDS[2], IDS[6]])
def test_forward_half(case, dtype):
    check(case, dtype=dtype, scale=0.3)


def test_equal_heads_and_wide_values():
    """Hk == H, and a value dim wider than one 32 block with a head dim under 16."""
    check((45, 9, False, 2, 1, False, True), H=2, Hk=2, D=8, Dv=40)


def test_strided_inputs_are_read_in_place():
    """[B, N, H, D] memory, as a projection then a transpose gives: no copy needed."""
    q, k, v, mask = (t.transpose(1, 2).contiguous().transpose(1, 2) if t is not None and t.dim() == 4 else t
                     for t in make(N=37, masked=True))
    assert not q.is_contiguous()
    out = st.sliding_window_attention(q, k, v, mask, 6, False, 1, 2, True, None, config=CONFIGS[1])
    assert_close(out, ref(q, k, v, mask, 6, False, 1, 2, True))


def test_global_rows_split_across_programs(monkeypatch):
    """The global rows' keys shared by several programs, their partial softmaxes combined."""
    monkeypatch.setattr(st, "_MIN_BLOCKS_PER_SPLIT", 1)
    assert st._global_split(45, 4, 4, 16, 16) == (2, 32)  # (programs per row block, keys each)
    check((45, 8, False, 2, 4, True, True), config=CONFIGS[0])


def test_every_config_of_the_space():
    case = (20, 4, True, 2, 1, False, True)
    q, k, v, mask = make(B=1, H=2, Hk=1, N=20, D=16, Dv=16, masked=True)
    shape = shape_of(q, k, v, mask, *case[1:6], None)
    configs = SPACE.configs(shape)
    assert SPACE.default(shape) in configs and len(configs) >= 8
    expected = ref(q, k, v, mask, *case[1:6])
    for config in configs:
        out = st.sliding_window_attention(q, k, v, mask, *case[1:6], None, config=config)
        assert_close(out, expected)


# ---------------------------------------------------------------------------- what runs the reference


def _no_kernel(*args, **kwargs):
    raise AssertionError("the kernels ran where the reference should have")


@pytest.mark.parametrize("what", ["fp64", "wide-head", "cpu-without-interpreter", "empty"])
def test_reference_fallbacks(what, monkeypatch):
    monkeypatch.setattr(st, "sliding_window_attention_fwd", _no_kernel)
    dtype, D, N = torch.float32, 16, 20
    if what == "fp64":
        dtype = torch.float64
    elif what == "wide-head":
        D = st.MAX_HEAD_DIM + 16
    elif what == "cpu-without-interpreter":
        if DEVICE == "cuda":
            pytest.skip("CPU tensors only")
        monkeypatch.setattr(st, "_interpreting", lambda: False)
    else:
        N = 0
    q, k, v, mask = make(N=N, D=D, dtype=dtype)
    out = st.sliding_window_attention(q, k, v, mask, 5, False, 2, 1, True, None)
    assert out.dtype == dtype and out.shape == (2, 2, N, 24)
    assert torch.equal(out, ref(q, k, v, mask, 5, False, 2, 1, True))


# ---------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("config,match", [
    ({"BLOCK_M": 16}, "lacks"),
    ({**CONFIGS[0], "BLOCK_K": 16}, "unknown keys"),
    ({**CONFIGS[0], "BLOCK_M": 8}, r"BLOCK_M.*power of two >= 16"),
    ({**CONFIGS[0], "BLOCK_N": 48}, r"BLOCK_N.*power of two >= 16"),
    ({**CONFIGS[0], "num_warps": 3}, "num_warps"),
    ({**CONFIGS[0], "num_stages": 0}, "num_stages"),
    ([16, 16, 2, 1], "must be a dict"),
])
def test_invalid_config_raises(config, match):
    q, k, v, mask = make(N=20)
    with pytest.raises(ValueError, match=match):
        st.sliding_window_attention(q, k, v, mask, 4, True, 1, 0, False, None, config=config)


@pytest.mark.parametrize("args,match", [
    ((4, True, 1, 2, True), "causal=False"),
    ((0, True, 1, 0, False), "window must be a positive int"),
    ((4, False, 0, 0, False), "dilation must be a positive"),
    ((4, False, 1, -1, False), "sinks must be an int >= 0"),
])
def test_invalid_arguments_raise_like_the_reference(args, match):
    q, k, v, mask = make(N=20)
    with pytest.raises(ValueError, match=match):
        st.sliding_window_attention(q, k, v, mask, *args, None)
    with pytest.raises(ValueError, match=match):
        ref(q, k, v, mask, *args)


# ---------------------------------------------------------------------------- search space


def test_space_default_is_kept():
    for n, d, dv in ((45, 16, 24), (32768, 64, 64), (32768, 128, 128), (4096, 256, 256), (1, 16, 16)):
        for window, causal, dilation in ((2048, True, 1), (4096, False, 1), (64, True, 3), (1, False, 1)):
            for dtype in ("bfloat16", "float32"):
                shape = {"b": 1, "h": 16, "hk": 4, "n": n, "d": d, "dv": dv, "window": window, "causal": causal,
                         "dilation": dilation, "sinks": 4, "global_sinks": False, "masked": False, "dtype": dtype}
                config = SPACE.default(shape)
                assert set(config) == set(SPACE.params)
                assert all(config[name] in choices for name, choices in SPACE.params.items())
                assert SPACE.keep(config, shape), (shape, config)
                assert config in SPACE.configs(shape)


def test_shape_of_is_plain_data():
    q, k, v, mask = make(N=20, masked=True)
    shape = SPACE.shape_of(q, k, v, mask, 6, False, 2, 30, True, 0.5)
    assert shape == {"b": 2, "h": 2, "hk": 1, "n": 20, "d": 16, "dv": 24, "window": 6, "causal": False,
                     "dilation": 2, "sinks": 20, "global_sinks": True, "masked": True, "dtype": "float32"}
    assert SPACE.kernel == "sliding_window_attention"


# ---------------------------------------------------------------------------- GPU-sized


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window,causal,dilation,sinks,global_sinks", [
    (2048, True, 1, 0, False),  # Mistral
    (2048, True, 1, 4, False),  # StreamingLLM sinks
    (1024, False, 2, 0, False),  # dilated, bidirectional
    (512, False, 1, 2, True),  # Longformer global tokens
])
def test_gpu_32k_bf16(window, causal, dilation, sinks, global_sinks):
    q, k, v, mask = make(B=1, H=16, Hk=4, N=32768, D=64, Dv=64, dtype=torch.bfloat16, masked=False)
    out = st.sliding_window_attention(q, k, v, mask, window, causal, dilation, sinks, global_sinks, None)
    assert_close(out, ref(q, k, v, mask, window, causal, dilation, sinks, global_sinks), dtype=torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_padded_batch_head_dim_128(dtype):
    n = 8192
    q, k, v, _ = make(B=2, H=8, Hk=2, N=n, D=128, Dv=128, dtype=dtype)
    mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
    mask[1, n - 1000:] = False
    out = st.sliding_window_attention(q, k, v, mask, 1024, True, 1, 4, False, None)
    assert_close(out, ref(q, k, v, mask, 1024, True, 1, 4, False), dtype=dtype)


@pytest.mark.gpu
@gpu
def test_gpu_every_kept_tile_compiles():
    """Every tile shape the space keeps, at its deepest kept pipeline, compiles and is right."""
    q, k, v, _ = make(B=1, H=4, Hk=2, N=4096, D=64, Dv=64, dtype=torch.bfloat16)
    args = (None, 512, True, 1, 4, False, None)
    expected = ref(q, k, v, *args[:-1])
    deepest = {}
    for config in SPACE.configs(shape_of(q, k, v, *args)):
        deepest[config["BLOCK_M"], config["BLOCK_N"], config["num_warps"]] = config  # stages ascend
    assert len(deepest) >= 8
    for config in deepest.values():
        out = st.sliding_window_attention(q, k, v, *args, config=config)
        assert_close(out, expected, dtype=torch.bfloat16)
