"""Triton rms_norm / crms_norm / layer_norm kernels (forward and backward) against naive.py.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py before the kernel modules are imported) on tiny CPU shapes; with CUDA the same tests run
compiled on the GPU, and the `gpu`-marked ones add large shapes.
"""
import importlib
import inspect
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
except Exception as exc:  # not installed, or no usable backend on this platform
    pytest.skip(f"triton cannot be imported ({exc!r}); the Triton kernels are untested here", allow_module_level=True)

from rewriter.autotune.space import space
from rewriter.kernels import triton_impl
from rewriter.kernels.layer_norm import naive as ln_naive
from rewriter.kernels.rms_norm import naive as rms_naive
from tests.helpers import assert_close

rms_triton = importlib.import_module("rewriter.kernels.rms_norm.triton")
ln_triton = importlib.import_module("rewriter.kernels.layer_norm.triton")
if not CUDA and type(rms_triton._rms_norm_fwd_kernel).__name__ != "InterpretedFunction":
    # imported (by another test module in this process) before the interpreter was switched on
    rms_triton = importlib.reload(rms_triton)
    ln_triton = importlib.reload(ln_triton)

DEVICE = "cuda" if CUDA else "cpu"
EPS = {"rms_norm": 1e-6, "crms_norm": 1e-6, "layer_norm": 1e-5}
# (name, weight_offset) for each case; crms_norm and layer_norm take no offset
OPS = [("rms_norm", 0.0), ("rms_norm", 1.0), ("crms_norm", 0.0), ("layer_norm", 0.0)]
OP_IDS = ["rms_norm", "rms_norm-offset1", "crms_norm", "layer_norm"]


def _module(op):
    return ln_triton if op == "layer_norm" else rms_triton


def _extra(op, offset):
    return (EPS[op], offset) if op == "rms_norm" else (EPS[op],)


def forward(op, x, w, b, offset=0.0, config=None):
    return getattr(_module(op), op)(x, w, b, *_extra(op, offset), config=config)


def backward(op, g, x, w, b, offset=0.0, config=None):
    return getattr(_module(op), f"{op}_backward")(g, x, w, b, *_extra(op, offset), config=config)


def reference(op, x, w, b, g, offset=0.0):
    """Output and (dx, dw, db) by autograd through naive.py, in the inputs' dtype."""
    fn = ln_naive.layer_norm if op == "layer_norm" else getattr(rms_naive, op)
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    out = fn(*leaves, *_extra(op, offset))
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, g))
    return out.detach(), tuple(None if t is None else next(grads) for t in leaves)


def make(op, shape, dtype, affine="wb", seed=0):
    """x [*shape], weight/bias [D] (or None), grad_out [..., D]; D = shape[-1] (+1 for crms_norm)."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1] + (op == "crms_norm")

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=gen) * scale + shift).to(dtype=dtype, device=DEVICE)

    x = rand(*shape, shift=0.5 if op == "layer_norm" else 0.0)  # a mean for layer_norm to remove
    w = rand(d, scale=0.5, shift=1.0) if "w" in affine else None
    b = rand(d, scale=0.5) if "b" in affine else None
    g = rand(*shape[:-1], d)
    return x, w, b, g


def check(op, shape, dtype, affine="wb", offset=0.0, config=None, seed=0):
    x, w, b, g = make(op, shape, dtype, affine, seed)
    y = forward(op, x, w, b, offset, config)
    grads = backward(op, g, x, w, b, offset, config)
    want_y, want_grads = reference(op, x, w, b, g, offset)
    assert y.shape == want_y.shape and y.dtype == dtype
    assert_close(y, want_y, dtype=dtype)
    for name, got, want in zip(("dx", "dw", "db"), grads, want_grads):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_close(got, want, dtype=dtype)


def cfg(block_d, block_m=1, rows_per_program=1, num_warps=1):
    return {"BLOCK_D": block_d, "BLOCK_M": block_m, "ROWS_PER_PROGRAM": rows_per_program, "num_warps": num_warps}


# ---------------------------------------------------------------------------- small shapes

CASES = [(torch.float32, a) for a in ("wb", "w", "b", "none")] + [(torch.float16, "wb"), (torch.bfloat16, "wb")]


@pytest.mark.parametrize("dtype,affine", CASES, ids=[f"{str(d)[6:]}-{a}" for d, a in CASES])
@pytest.mark.parametrize("shape", [(3, 123), (7, 257), (2, 3, 40)], ids=str)
@pytest.mark.parametrize("op,offset", OPS, ids=OP_IDS)
def test_matches_reference(op, offset, shape, dtype, affine):
    """Default config: rows in one block, several rows per tile, a last tile part-filled."""
    check(op, shape, dtype, affine, offset)


# rows walked in column blocks (the last one partial), tiles of 1, 2 or 4 rows, partial last tiles
MULTI = [
    ((5, 1100), torch.float32, "wb", cfg(256, block_m=4, rows_per_program=4)),
    ((3, 1100), torch.bfloat16, "wb", cfg(256, block_m=4, rows_per_program=4)),
    ((2, 3, 300), torch.float16, "w", cfg(256, block_m=2, rows_per_program=4)),
    ((3, 300), torch.float32, "none", cfg(128, block_m=1, rows_per_program=2)),
]


@pytest.mark.parametrize("shape,dtype,affine,config", MULTI, ids=[f"{s}-{str(d)[6:]}-{a}" for s, d, a, _ in MULTI])
@pytest.mark.parametrize("op,offset", OPS, ids=OP_IDS)
def test_rows_wider_than_the_block(op, offset, shape, dtype, affine, config):
    check(op, shape, dtype, affine, offset, config=config)


@pytest.mark.parametrize("width", [255, 256, 257])
def test_crms_norm_last_channel_at_block_edges(width):
    """crms rows of width+1: exactly one block, one column past it, or a partial second block."""
    check("crms_norm", (3, width), torch.float32, config=cfg(256, rows_per_program=2))


@pytest.mark.parametrize("config", [None, cfg(256, block_m=2, rows_per_program=2)], ids=["one-block", "blocks"])
def test_layer_norm_variance_survives_offset_and_outlier(config):
    """A large common offset and an outlying first channel, against an fp64 reference."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1100, generator=gen) * 0.1 + 300.0
    x[:, 0] = -3000.0
    w, b, g = torch.randn(1100, generator=gen), torch.randn(1100, generator=gen), torch.randn(3, 1100, generator=gen)
    x, w, b, g = (t.to(DEVICE) for t in (x, w, b, g))
    got = (ln_triton.layer_norm(x, w, b, 1e-5, config=config),
           *ln_triton.layer_norm_backward(g, x, w, b, 1e-5, config=config))
    want_y, want_grads = reference("layer_norm", x.double(), w.double(), b.double(), g.double())
    for a, e in zip(got, (want_y, *want_grads)):
        assert_close(a, e.float(), dtype=torch.float32)


@pytest.mark.parametrize("op,offset", OPS, ids=OP_IDS)
def test_config_changes_the_launch(op, offset, monkeypatch):
    """Two configs from the space give two different launches, and both match."""
    module = _module(op)
    kernel_name = "_layer_norm_fwd_kernel" if op == "layer_norm" else "_rms_norm_fwd_kernel"
    calls = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                calls.append((grid, kwargs))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(module, kernel_name, Spy(getattr(module, kernel_name)))
    shape = {"rows": 3, "d": 70, "dtype": "float32"}
    sp = space(op)
    one, two = sp.default(shape), cfg(64, block_m=2, rows_per_program=2, num_warps=2)
    assert one != two and sp.keep(one, shape) and sp.keep(two, shape)
    for config in (one, two):
        check(op, (3, 70), torch.float32, "wb", offset, config=config)
    (grid1, kw1), (grid2, kw2) = calls
    assert grid1 != grid2
    for key in ("BLOCK_D", "BLOCK_M", "ROWS_PER_PROGRAM", "num_warps"):
        assert (kw1[key], kw2[key]) == (one[key], two[key])
    assert kw1["ONE_BLOCK"] and not kw2["ONE_BLOCK"]


@pytest.mark.parametrize("op", ["rms_norm", "crms_norm", "layer_norm"])
def test_every_config_of_the_space_runs(op):
    """Every config the space offers for a small shape (one block and column blocks)."""
    shape = {"rows": 2, "d": 40, "dtype": "float32"}
    configs = space(op).configs(shape)
    assert len({c["BLOCK_D"] for c in configs}) >= 2 and len(configs) >= 10
    if not CUDA:  # the interpreter ignores num_warps: one run per distinct launch
        configs = list({tuple((k, v) for k, v in c.items() if k != "num_warps"): c for c in configs}.values())
    offset = 1.0 if op == "rms_norm" else 0.0
    for config in configs:
        check(op, (2, 40), torch.float32, "wb", offset, config=config)


@pytest.mark.parametrize("op", ["rms_norm", "crms_norm", "layer_norm"])
def test_defaults_are_in_the_space(op):
    sp = space(op)
    for d in (1, 7, 40, 123, 257, 1100, 4096, 8191, 8192, 8193, 65536):
        for rows in (1, 3, 100, 8192, 10**6):
            shape = {"rows": rows, "d": d, "dtype": "bfloat16"}
            config = sp.default(shape)
            assert set(config) == set(sp.params), config
            assert all(config[k] in sp.params[k] for k in config), config
            assert sp.keep(config, shape), (shape, config)


def test_no_rows_and_other_dtypes():
    x = torch.randn(0, 16, device=DEVICE)
    w, b = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    assert rms_triton.rms_norm(x, w, b, 1e-6).shape == (0, 16)
    dx, dw, db = rms_triton.rms_norm_backward(x, x, w, b, 1e-6)
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))
    x64 = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)  # fp64 runs the reference
    assert_close(ln_triton.layer_norm(x64, None, None, 1e-5), ln_naive.layer_norm(x64, None, None, 1e-5),
                 dtype=torch.float64)
    g64 = torch.ones(3, 6, dtype=torch.float64, device=DEVICE)
    dx64, _, _ = rms_triton.crms_norm_backward(g64, x64, None, None, 1e-6)
    assert dx64.dtype == torch.float64 and dx64.shape == x64.shape


def test_bad_input_is_refused_with_a_reason():
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_triton.rms_norm(x, torch.ones(15, device=DEVICE), None, 1e-6)
    with pytest.raises(ValueError, match=r"shape \(17,\)"):
        rms_triton.crms_norm(x, torch.ones(16, device=DEVICE), None, 1e-6)
    with pytest.raises(ValueError, match="lacks"):
        ln_triton.layer_norm(x, None, None, 1e-5, config={"BLOCK_D": 16})
    with pytest.raises(ValueError, match="multiple of BLOCK_M"):
        ln_triton.layer_norm(x, None, None, 1e-5, config=cfg(16, block_m=4, rows_per_program=2))
    with pytest.raises(ValueError, match="power of two"):
        rms_triton.rms_norm(x, None, None, 1e-6, config=cfg(24))


@pytest.mark.parametrize("op", ["rms_norm", "crms_norm", "layer_norm"])
def test_triton_impl_finds_the_public_functions(op):
    """`triton_impl(op)` is the public function, with the custom op's positional signature."""
    fast = triton_impl(op)
    assert fast is not None and fast.__name__ == op and fast.__module__ == _module(op).__name__
    custom = getattr(torch.ops.rewriter, op).default._schema.arguments
    params = [p for p in inspect.signature(fast).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in params] == [a.name for a in custom]
    assert inspect.signature(fast).parameters["config"].kind is inspect.Parameter.KEYWORD_ONLY
    bwd = inspect.signature(getattr(_module(op), f"{op}_backward")).parameters
    assert list(bwd)[:len(params) + 1] == ["grad_out"] + [p.name for p in params]


# ---------------------------------------------------------------------------- GPU sizes

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")

LARGE = [((8192, 4096), torch.bfloat16), ((16, 65536), torch.bfloat16), ((8, 65536), torch.float32),
         ((4, 2, 8191), torch.float16)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape,dtype", LARGE, ids=[f"{s}-{str(d)[6:]}" for s, d in LARGE])
@pytest.mark.parametrize("op,offset", OPS, ids=OP_IDS)
def test_gpu_large(op, offset, shape, dtype):
    check(op, shape, dtype, "wb", offset)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op,offset", OPS, ids=OP_IDS)
def test_gpu_wide_rows_in_one_block_and_in_blocks(op, offset):
    for config in (cfg(16384, rows_per_program=4, num_warps=16), cfg(1024, block_m=2, rows_per_program=8, num_warps=4)):
        check(op, (64, 16000), torch.bfloat16, "wb", offset, config=config)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", ["rms_norm", "crms_norm", "layer_norm"])
def test_gpu_configs_of_the_space_run(op):
    """A fixed sample of the space at a mid-sized shape (all of it would take minutes to compile)."""
    shape = {"rows": 100, "d": 3000, "dtype": "bfloat16"}
    configs = space(op).configs(shape)
    for config in random.Random(0).sample(configs, 12) + [space(op).default(shape)]:
        check(op, (100, 3000), torch.bfloat16, "wb", config=config)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op,offset", [
    ("rms_norm", 0.0),
    ("rms_norm", 1.0),
    ("crms_norm", 0.0),
    ("layer_norm", 0.0),
], ids=OP_IDS)
def test_gpu_custom_op_dispatches_to_triton(op, offset):
    assert triton_impl(op) is not None
    x, w, b, _ = make(op, (4, 512, 1024), torch.bfloat16)
    fn = ln_naive.layer_norm if op == "layer_norm" else getattr(rms_naive, op)
    got = getattr(torch.ops.rewriter, op)(x, w, b, *_extra(op, offset))
    assert_close(got, fn(x, w, b, *_extra(op, offset)), dtype=torch.bfloat16)
