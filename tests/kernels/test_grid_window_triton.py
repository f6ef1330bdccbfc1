"""The 2-D grid attention Triton kernels (Swin windows, NAT/DiNAT neighbourhoods) against
their references (window_attention/naive.py).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is imported) on tiny shapes: grids that are no multiple of the tiles, windows that
do not divide the grid, shifts, dilations, prefix tokens, padding keys, GQA, Dv != D. With
one, the same tests run compiled on CUDA, and the `gpu`-marked tests add model-sized
shapes (`pytest -m gpu`).
"""

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need Triton")  # interpreted without a GPU: conftest.py

from rewriter.autotune.space import Space  # noqa: E402
from rewriter.kernels.window_attention import grid_triton as gt  # noqa: E402
from rewriter.kernels.window_attention.grid_config import SPACES  # noqa: E402
from rewriter.kernels.window_attention.naive import neighborhood_attention_2d as na_reference  # noqa: E402
from rewriter.kernels.window_attention.naive import window_attention_2d as swin_reference  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWIN, NA = "window_attention_2d", "neighborhood_attention_2d"


def make(grid, prefix, B=2, H=2, Hk=1, D=16, Dv=24, dtype=torch.float32, masked=True, seed=0, device=DEVICE):
    """q, k, v, key_mask for a grid; the mask pads the last third of batch 1 and hides a fifth
    of the keys of batch 0, token 0 among them (a prefix token where there is one)."""
    N = prefix + grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, Hk, N, D, generator=g)
    v = torch.randn(B, Hk, N, Dv, generator=g)
    mask = None
    if masked:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0, torch.randperm(N, generator=g)[: N // 5]] = False
        mask[0, 0] = False
        mask[-1, N - N // 3:] = False
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, (None if mask is None else mask.to(device))


def swin(q, k, v, mask, grid, window, shift, prefix, scale=None, config=None):
    return gt.window_attention_2d(q, k, v, mask, list(grid), list(window), list(shift), prefix, scale, config=config)


def swin_ref(q, k, v, mask, grid, window, shift, prefix, scale=None):
    return swin_reference(q, k, v, grid=tuple(grid), window=tuple(window), shift=tuple(shift), prefix=prefix,
                          scale=scale, key_mask=mask)


def na(q, k, v, mask, grid, kernel, dilation, prefix, scale=None, config=None):
    return gt.neighborhood_attention_2d(q, k, v, mask, list(grid), _pair(kernel), _pair(dilation), prefix, scale,
                                        config=config)


def na_ref(q, k, v, mask, grid, kernel, dilation, prefix, scale=None):
    return na_reference(q, k, v, grid=tuple(grid), kernel_size=kernel, dilation=dilation, prefix=prefix, scale=scale,
                        key_mask=mask)


def _pair(x):
    return [x, x] if isinstance(x, int) else list(x)


def distinct(configs):
    """The configs, less those that differ only in launch options the interpreter ignores."""
    if torch.cuda.is_available():
        return configs
    seen = {}
    for config in configs:
        seen.setdefault(tuple((n, c) for n, c in config.items() if n not in ("num_warps", "num_stages")), config)
    return list(seen.values())


# ---------------------------------------------------------------------------- Swin

SWIN_CASES = [
    # grid, window, shift, prefix, masked
    ((5, 7), (3, 4), (1, 2), 1, True),  # neither axis divisible, shifted
    ((6, 9), (4, 4), (0, 0), 0, False),  # no shift: padded windows, no region mask
    ((6, 9), (7, 5), (3, 2), 2, True),  # a window taller than the grid
    ((8, 8), (4, 4), (2, 2), 0, True),  # Swin's own case: divisible, shift = window // 2
]


@pytest.mark.parametrize("grid,window,shift,prefix,masked", SWIN_CASES)
def test_swin_fp32(grid, window, shift, prefix, masked):
    q, k, v, mask = make(grid, prefix, masked=masked)
    out = swin(q, k, v, mask, grid, window, shift, prefix)
    assert out.shape == (2, 2, q.shape[2], 24) and out.dtype == torch.float32
    assert_close(out, swin_ref(q, k, v, mask, grid, window, shift, prefix))


# ---------------------------------------------------------------------------- neighbourhood

NA_CASES = [
    # grid, kernel_size, dilation, prefix, masked
    ((5, 7), 3, 1, 1, True),
    ((6, 9), 3, 2, 0, False),
    ((6, 9), (3, 4), (2, 2), 2, True),  # per-axis kernel (one even), dilation on both axes
    ((11, 10), 5, 2, 1, True),  # dilation groups of unequal length
    ((9, 13), 5, 1, 0, False),  # several patches per axis, border clamping inside them
    ((5, 7), (5, 7), 1, 0, True),  # the neighbourhood is the whole grid
]


@pytest.mark.parametrize("grid,kernel,dilation,prefix,masked", NA_CASES)
def test_na_fp32(grid, kernel, dilation, prefix, masked):
    q, k, v, mask = make(grid, prefix, masked=masked)
    out = na(q, k, v, mask, grid, kernel, dilation, prefix)
    assert out.shape == (2, 2, q.shape[2], 24) and out.dtype == torch.float32
    assert_close(out, na_ref(q, k, v, mask, grid, kernel, dilation, prefix))


# ---------------------------------------------------------------------------- dtypes, heads, layout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    grid, prefix = (6, 7), 1
    q, k, v, mask = make(grid, prefix, H=4, Hk=2, D=32, Dv=16, dtype=dtype)
    out = swin(q, k, v, mask, grid, (4, 4), (2, 2), prefix, scale=0.3)
    assert out.dtype == dtype
    assert_close(out, swin_ref(q, k, v, mask, grid, (4, 4), (2, 2), prefix, scale=0.3), dtype=dtype)
    out = na(q, k, v, mask, grid, 3, (2, 1), prefix)
    assert out.dtype == dtype
    assert_close(out, na_ref(q, k, v, mask, grid, 3, (2, 1), prefix), dtype=dtype)


def test_mha_scale_and_strided_inputs():
    """H == Hk, an explicit scale, and q/k/v that are [B, N, H, D] memory seen as [B, H, N, D]."""
    grid, prefix = (5, 6), 2
    q, k, v, mask = make(grid, prefix, H=2, Hk=2, D=8, Dv=8)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    assert_close(swin(q, k, v, mask, grid, (3, 3), (1, 1), prefix, scale=0.5),
                 swin_ref(q, k, v, mask, grid, (3, 3), (1, 1), prefix, scale=0.5))
    assert_close(na(q, k, v, mask, grid, 3, 1, prefix, scale=0.5), na_ref(q, k, v, mask, grid, 3, 1, prefix, scale=0.5))


def test_more_prefix_tokens_than_one_tile():
    """17 prefix tokens (CLS + registers): a 32-row prefix key tile and a 32-row prefix launch."""
    grid, prefix = (4, 5), 17
    q, k, v, mask = make(grid, prefix, B=1)
    assert_close(swin(q, k, v, mask, grid, (2, 3), (1, 1), prefix),
                 swin_ref(q, k, v, mask, grid, (2, 3), (1, 1), prefix))
    want = na_ref(q, k, v, mask, grid, 3, 1, prefix)
    assert_close(na(q, k, v, mask, grid, 3, 1, prefix), want)
    split = {"BLOCK_QH": 4, "BLOCK_QW": 4, "BLOCK_N": 16, "SPLIT": 4, "num_warps": 2, "num_stages": 1}
    assert_close(na(q, k, v, mask, grid, 3, 1, prefix, config=split), want)  # two prefix tiles, merged splits


def test_queries_that_see_no_key_return_zeros():
    grid, prefix = (5, 6), 1
    q, k, v, mask = make(grid, prefix, B=2)
    mask[1] = False  # batch 1: every key is padding
    swin_args, na_args = (grid, (3, 3), (1, 1), prefix), (grid, 3, 1, prefix)
    for out, want in ((swin(q, k, v, mask, *swin_args), swin_ref(q, k, v, mask, *swin_args)),
                      (na(q, k, v, mask, *na_args), na_ref(q, k, v, mask, *na_args))):
        assert torch.all(out[1] == 0) and out[0].abs().sum() > 0
        assert_close(out, want)


def test_unsupported_inputs_run_the_reference():
    grid = (4, 5)
    q, k, v, mask = make(grid, 1, dtype=torch.float64)
    torch.testing.assert_close(swin(q, k, v, mask, grid, (2, 2), (1, 1), 1),
                               swin_ref(q, k, v, mask, grid, (2, 2), (1, 1), 1), rtol=0, atol=0)
    torch.testing.assert_close(na(q, k, v, mask, grid, 3, 1, 1), na_ref(q, k, v, mask, grid, 3, 1, 1), rtol=0, atol=0)
    q, k, v, mask = make(grid, 0, B=1, D=gt.MAX_HEAD_DIM + 8, Dv=4)  # too wide a head
    torch.testing.assert_close(na(q, k, v, mask, grid, 3, 1, 0), na_ref(q, k, v, mask, grid, 3, 1, 0), rtol=0, atol=0)


# ---------------------------------------------------------------------------- configs

SWIN_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "SPLIT": 4, "num_warps": 2, "num_stages": 1},  # window split over programs
    {"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT": 1, "num_warps": 4, "num_stages": 2},
]
NA_CONFIGS = [
    {"BLOCK_QH": 2, "BLOCK_QW": 8, "BLOCK_N": 16, "SPLIT": 4, "num_warps": 2, "num_stages": 1},
    {"BLOCK_QH": 4, "BLOCK_QW": 4, "BLOCK_N": 32, "SPLIT": 1, "num_warps": 4, "num_stages": 2},
]


@pytest.mark.parametrize("config", SWIN_CONFIGS + [None], ids=["small-split", "large", "default"])
def test_swin_configs(config):
    grid, window, shift, prefix = (6, 9), (5, 6), (2, 3), 2
    q, k, v, mask = make(grid, prefix, B=1)
    out = swin(q, k, v, mask, grid, window, shift, prefix, config=config)
    assert_close(out, swin_ref(q, k, v, mask, grid, window, shift, prefix))


@pytest.mark.parametrize("config", NA_CONFIGS + [None], ids=["small-split", "large", "default"])
def test_na_configs(config):
    grid, kernel, dilation, prefix = (11, 10), 3, 2, 2
    q, k, v, mask = make(grid, prefix, B=1)
    out = na(q, k, v, mask, grid, kernel, dilation, prefix, config=config)
    assert_close(out, na_ref(q, k, v, mask, grid, kernel, dilation, prefix))


def test_every_swin_config_on_a_tiny_shape():
    grid, window, shift, prefix = (6, 9), (5, 6), (2, 3), 1
    q, k, v, mask = make(grid, prefix, B=1, H=1, D=8, Dv=8)
    sp = SPACES[SWIN]
    configs = sp.configs(sp.shape_of(q, k, v, mask, list(grid), list(window), list(shift), prefix, None))
    assert len(configs) >= 6 and sp.default(sp.shape_of(q, k, v, mask, grid, window, shift, prefix, None)) in configs
    want = swin_ref(q, k, v, mask, grid, window, shift, prefix)
    for config in distinct(configs):
        assert_close(swin(q, k, v, mask, grid, window, shift, prefix, config=config), want)


def test_every_na_config_on_a_tiny_shape():
    grid, kernel, dilation, prefix = (4, 5), 3, 1, 0
    q, k, v, mask = make(grid, prefix, B=1, H=1, D=8, Dv=8)
    sp = SPACES[NA]
    configs = sp.configs(sp.shape_of(q, k, v, mask, list(grid), [3, 3], [1, 1], prefix, None))
    assert len(configs) >= 6
    want = na_ref(q, k, v, mask, grid, kernel, dilation, prefix)
    for config in distinct(configs):
        assert_close(na(q, k, v, mask, grid, kernel, dilation, prefix, config=config), want)


@pytest.mark.parametrize("fn,base", [(swin, SWIN_CONFIGS[0]), (na, NA_CONFIGS[0])], ids=["swin", "na"])
def test_invalid_configs_raise(fn, base):
    grid = (4, 5)
    q, k, v, mask = make(grid, 0, B=1, H=1)
    args = (q, k, v, mask, grid, (2, 2), (1, 1), 0) if fn is swin else (q, k, v, mask, grid, 3, 1, 0)
    name = "BLOCK_M" if fn is swin else "BLOCK_QW"
    bad = [
        ({k_: v_ for k_, v_ in base.items() if k_ != "BLOCK_N"}, "lacks"),
        ({**base, "BLOCK_K": 16}, "unknown"),
        ({**base, "BLOCK_N": 24}, "power of two"),
        ({**base, "BLOCK_N": 8}, "under 16"),
        ({**base, name: 2}, "under 16"),
        ({**base, "SPLIT": 0}, "positive int"),
        ({**base, "num_warps": 3}, "power of two"),
        ([16, 16], "must be a dict"),
    ]
    for config, match in bad:
        with pytest.raises(ValueError, match=match):
            fn(*args, config=config)


def test_invalid_arguments_raise_like_the_reference():
    q, k, v, mask = make((4, 5), 0, B=1)
    with pytest.raises(ValueError, match="shift must"):
        swin(q, k, v, mask, (4, 5), (2, 2), (2, 0), 0)
    with pytest.raises(ValueError, match="the grid must be the last"):
        swin(q, k, v, mask, (4, 4), (2, 2), (0, 0), 0)
    with pytest.raises(ValueError, match="needs at least 6"):
        na(q, k, v, mask, (4, 5), 3, 2, 0)
    with pytest.raises(ValueError, match="kernel_size must be"):
        na(q, k, v, mask, (4, 5), 0, 1, 0)


# ---------------------------------------------------------------------------- search spaces


def test_spaces_are_data_with_kept_defaults():
    assert set(SPACES) == {SWIN, NA} and all(isinstance(sp, Space) and sp.kernel == name for name, sp in SPACES.items())
    cases = [  # grid, window, kernel, dilation, prefix, D
        ((56, 56), (7, 7), 13, 1, 0, 32), ((128, 128), (8, 8), 7, 4, 1, 64), ((14, 14), (12, 12), 5, 2, 5, 128),
        ((4, 5), (2, 2), 3, 1, 1, 256), ((2, 40), (1, 16), (1, 9), (1, 3), 0, 16),
    ]
    for grid, window, kernel, dilation, prefix, d in cases:
        q = torch.empty(2, 8, prefix + grid[0] * grid[1], d, device="meta")
        k, v = torch.empty(2, 2, q.shape[2], d, device="meta"), torch.empty(2, 2, q.shape[2], 48, device="meta")
        for name, extra in ((SWIN, (list(window), [w // 2 for w in window])), (NA, (_pair(kernel), _pair(dilation)))):
            sp = SPACES[name]
            shape = sp.shape_of(q, k, v, None, list(grid), *extra, prefix, None)
            assert all(isinstance(x, (int, bool, str)) for x in shape.values()), shape
            default = sp.default(shape)
            assert set(default) == set(sp.params) and sp.keep(default, shape), (name, shape, default)
            assert all(default[n] in choices for n, choices in sp.params.items())


# ---------------------------------------------------------------------------- GPU-sized

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dilation,prefix", [(1, 0), (2, 1), (4, 4)])
def test_gpu_na_bf16(dilation, prefix):
    grid = (128, 128)
    q, k, v, mask = make(grid, prefix, B=1, H=8, Hk=2, D=64, Dv=64, dtype=torch.bfloat16, device="cuda")
    out = na(q, k, v, mask, grid, 13, dilation, prefix)
    assert_close(out, na_ref(q, k, v, mask, grid, 13, dilation, prefix), dtype=torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shift,prefix", [((0, 0), 0), ((3, 3), 1)])
def test_gpu_swin_bf16(shift, prefix):
    grid = (56, 56)
    q, k, v, mask = make(grid, prefix, B=8, H=4, Hk=4, D=32, Dv=32, dtype=torch.bfloat16, device="cuda")
    out = swin(q, k, v, mask, grid, (7, 7), shift, prefix)
    assert_close(out, swin_ref(q, k, v, mask, grid, (7, 7), shift, prefix), dtype=torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_precision(dtype):
    """fp32 takes exact dots, fp16 half-precision p·v: both within their dtype's tolerance."""
    grid = (64, 64)
    q, k, v, mask = make(grid, 1, B=2, H=4, Hk=1, D=64, Dv=128, dtype=dtype, device="cuda")
    assert_close(na(q, k, v, mask, grid, 7, 2, 1), na_ref(q, k, v, mask, grid, 7, 2, 1), dtype=dtype)
    assert_close(swin(q, k, v, mask, grid, (12, 12), (6, 6), 1), swin_ref(q, k, v, mask, grid, (12, 12), (6, 6), 1),
                 dtype=dtype)


@pytest.mark.gpu
@gpu
def test_gpu_default_and_large_configs():
    grid = (96, 80)
    q, k, v, mask = make(grid, 2, B=2, H=4, Hk=2, D=64, Dv=64, dtype=torch.bfloat16, device="cuda")
    want = na_ref(q, k, v, mask, grid, 9, 1, 2)
    for config in (None, {"BLOCK_QH": 8, "BLOCK_QW": 16, "BLOCK_N": 64, "SPLIT": 16, "num_warps": 8,
                          "num_stages": 3}):
        assert_close(na(q, k, v, mask, grid, 9, 1, 2, config=config), want, dtype=torch.bfloat16)
    want = swin_ref(q, k, v, mask, grid, (8, 8), (4, 4), 2)
    for config in (None, {"BLOCK_M": 64, "BLOCK_N": 32, "SPLIT": 64, "num_warps": 8, "num_stages": 3}):
        assert_close(swin(q, k, v, mask, grid, (8, 8), (4, 4), 2, config=config), want, dtype=torch.bfloat16)
