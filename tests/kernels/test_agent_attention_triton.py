"""The agent-attention Triton kernels (forward) against the reference (naive.py).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is imported) on tiny shapes, few programs each (the interpreter pays per program);
with one, the same tests run compiled on CUDA, and the `gpu`-marked tests add model-sized
shapes (`pytest -m gpu`).
"""
import ast
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need Triton")  # interpreted without a GPU: conftest.py

from rewriter.autotune.space import space  # noqa: E402
from rewriter.kernels import triton_impl  # noqa: E402
from rewriter.kernels.agent_attention import triton as aa  # noqa: E402
from rewriter.kernels.agent_attention import config as config_module  # noqa: E402
from rewriter.kernels.agent_attention.config import shape_of  # noqa: E402
from rewriter.kernels.attention_ops import _agent_ref  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# a small-tile config that splits the key loop (and so runs the combine kernel), and a larger one
CONFIGS = [
    {"BLOCK_N": 16, "BLOCK_A": 16, "SPLIT": 2, "BLOCK_M": 16, "num_warps": 2, "num_stages": 1},
    {"BLOCK_N": 32, "BLOCK_A": 32, "SPLIT": 1, "BLOCK_M": 32, "num_warps": 4, "num_stages": 2},
]


def make(B=2, H=2, Hk=1, Nq=45, Nk=45, D=16, Dv=24, dtype=torch.float32, masked=True, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hk, Nk, D, generator=g)
    v = torch.randn(B, Hk, Nk, Dv, generator=g)
    mask = None
    if masked:  # right padding of different lengths, plus a hole
        lengths = torch.tensor([Nk, max(1, Nk - 13)])[:B]
        mask = torch.arange(Nk)[None, :] < lengths[:, None]
        mask[0, Nk // 3] = False
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, (None if mask is None else mask.to(device))


def ref(q, k, v, mask, num_agents=4, scale=None, grid=(), prefix=0):
    """The op's reference, in fp32 for fp16/bf16 inputs (the kernels' output is compared with it)."""
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return _agent_ref(q.to(acc), k.to(acc), v.to(acc), mask, num_agents, scale, list(grid), prefix)


def run(q, k, v, mask, num_agents=4, scale=None, grid=(), prefix=0, config=None):
    return aa.agent_attention(q, k, v, mask, num_agents, scale, list(grid), prefix, config=config)


# ---------------------------------------------------------------------------- forward

# (Nq, Nk, options): 1-D and 2-D pooling, prefix 0 and 1; tokens not a multiple of any block
CASES = {
    "1d": (45, 45, dict(num_agents=4)),
    "1d-prefix-scale": (45, 37, dict(num_agents=5, prefix=1, scale=0.3)),
    "2d": (5 * 7, 45, dict(num_agents=4, grid=(5, 7))),
    "2d-prefix": (1 + 5 * 7, 45, dict(num_agents=9, grid=(5, 7), prefix=1)),
    "2d-narrow-grid": (2 * 9, 20, dict(num_agents=9, grid=(2, 9))),  # grid shorter than 3: 2×3 agents
    "fewer-tokens-than-agents": (12, 45, dict(num_agents=49, prefix=3)),  # 9 agents, one per token
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_fp32(case):
    Nq, Nk, opts = CASES[case]
    q, k, v, mask = make(Nq=Nq, Nk=Nk)
    out = run(q, k, v, mask, **opts)
    assert out.shape == (2, 2, Nq, 24) and out.dtype == torch.float32
    assert_close(out, ref(q, k, v, mask, **opts))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["1d", "2d-prefix"])
def test_forward_half(case, dtype):
    Nq, Nk, opts = CASES[case]
    q, k, v, mask = make(Nq=Nq, Nk=Nk, dtype=dtype)
    out = run(q, k, v, mask, **opts)
    assert out.dtype == dtype
    assert_close(out, ref(q, k, v, mask, **opts), dtype=dtype)


def test_mha_no_mask_equal_head_dims():
    """H == Hk (no grouping), no key mask, D == Dv, one batch."""
    q, k, v, _ = make(B=1, H=2, Hk=2, Nq=30, Nk=45, Dv=16, masked=False)
    assert_close(run(q, k, v, None, num_agents=3), ref(q, k, v, None, num_agents=3))


@pytest.mark.parametrize("config", CONFIGS, ids=["small-split", "large"])
@pytest.mark.parametrize("case", ["1d-prefix-scale", "2d-prefix"])
def test_configs(config, case):
    Nq, Nk, opts = CASES[case]
    q, k, v, mask = make(Nq=Nq, Nk=Nk)
    assert_close(run(q, k, v, mask, config=config, **opts), ref(q, k, v, mask, **opts))


def test_every_config_of_the_space():
    """Every config the space keeps for a tiny shape runs and agrees (incl. SPLIT > 1)."""
    q, k, v, mask = make(B=1, H=1, Hk=1, Nq=20, Nk=20, D=16, Dv=16)
    sp = space("agent_attention")
    shape = shape_of(q, k, v, mask, 2, None, [], 0)
    configs = sp.configs(shape)
    assert len(configs) > 1 and any(c["SPLIT"] > 1 for c in configs)
    want = ref(q, k, v, mask, num_agents=2)
    for config in configs:
        assert_close(run(q, k, v, mask, num_agents=2, config=config), want)


def test_transposed_layouts_are_read_through_strides():
    """q, k, v as [B, N, H, D] memory transposed to [B, H, N, D]: the same result, no copy needed."""
    q, k, v, mask = (t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 4 else t for t in make())
    assert not q.is_contiguous()
    assert_close(run(q, k, v, mask), ref(q, k, v, mask))


def test_fully_masked_batch_gives_zeros():
    q, k, v, mask = make(Nq=20, Nk=20)
    mask[1] = False
    for config in CONFIGS:
        out = run(q, k, v, mask, config=config)
        assert torch.all(out[1] == 0) and torch.isfinite(out).all()
        assert_close(out, ref(q, k, v, mask))


def test_padded_keys_are_never_read():
    """Whatever padded keys hold (huge values, NaN), the output does not change."""
    q, k, v, mask = make(Nq=20, Nk=20)
    out = run(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, ~mask[1]], v2[1, :, ~mask[1]] = 1e4, float("nan")
    torch.testing.assert_close(run(q, k2, v2, mask), out, rtol=0, atol=0)


def test_gradients_run_the_reference_backward():
    q, k, v, mask = make(Nq=20, Nk=20)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = run(*leaves, mask)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad((ref(*ref_leaves, mask) * w).sum(), ref_leaves)
    assert_close(out, ref(q, k, v, mask))
    for a, e in zip(got, expected):
        assert_close(a, e)


def test_unsupported_inputs_run_the_reference():
    q, k, v, mask = make(Nq=20, Nk=20, dtype=torch.float64)
    out = run(q, k, v, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref(q, k, v, mask), rtol=0, atol=0)
    q, k, v, mask = make(B=1, Nq=300, Nk=20, D=128, Dv=128, masked=False)  # 300 agents beside 128-wide heads
    assert not aa._runs_here(q, k, v, shape_of(q, k, v, None, 300, None, [], 0))


@pytest.mark.parametrize("change,message", [
    (dict(BLOCK_N=8), r"config\['BLOCK_N'\] must be a power of two >= 16"),
    (dict(BLOCK_A=48), r"config\['BLOCK_A'\] must be a power of two >= 16"),
    (dict(BLOCK_M=True), r"config\['BLOCK_M'\] must be a power of two >= 16"),
    (dict(SPLIT=0), r"config\['SPLIT'\] must be a positive int"),
    (dict(num_warps=3), r"config\['num_warps'\] must be a power of two"),
    (dict(num_stages=0), r"config\['num_stages'\] must be a positive int"),
])
def test_invalid_configs_raise(change, message):
    q, k, v, mask = make(Nq=20, Nk=20)
    with pytest.raises(ValueError, match=message):
        run(q, k, v, mask, config={**CONFIGS[0], **change})


def test_incomplete_config_and_bad_arguments_raise():
    q, k, v, mask = make(Nq=20, Nk=20)
    with pytest.raises(ValueError, match="lacks"):
        run(q, k, v, mask, config={"BLOCK_N": 16})
    with pytest.raises(ValueError, match="must be a dict"):
        run(q, k, v, mask, config=[16, 16])
    with pytest.raises(ValueError, match="lacks"):  # checked even where the reference runs (fp64)
        run(q.double(), k.double(), v.double(), mask, config={"BLOCK_N": 16})
    with pytest.raises(ValueError, match="covers 35 tokens but q has 20"):
        run(q, k, v, mask, grid=(5, 7))
    with pytest.raises(ValueError, match="num_agents must be a positive int"):
        run(q, k, v, mask, num_agents=0)


# ---------------------------------------------------------------------------- wiring


def test_dispatch_finds_the_forward_and_no_backward():
    assert triton_impl("agent_attention") is aa.agent_attention
    assert triton_impl("agent_attention", "_backward") is None  # autograd differentiates the reference
    assert not hasattr(aa, "agent_attention_backward")


def test_config_module_imports_no_triton():
    """The search space is read without Triton (`import rewriter` never loads it: tests/test_optimize.py)."""
    tree = ast.parse(Path(config_module.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not any(name.split(".")[0] == "triton" for name in imported)


def test_space_default_is_kept():
    sp = space("agent_attention")
    for b, h, hk, nq, nk, d, dv, n in ((2, 2, 1, 45, 45, 16, 24, 4), (1, 16, 16, 16384, 16384, 64, 64, 49),
                                       (8, 12, 12, 197, 197, 64, 64, 49), (1, 32, 8, 4096, 4096, 128, 128, 64),
                                       (1, 8, 8, 1, 1, 16, 16, 1), (1, 16, 4, 16384, 16384, 64, 64, 256)):
        shape = {"b": b, "h": h, "hk": hk, "nq": nq, "nk": nk, "d": d, "dv": dv, "agents": n, "masked": False,
                 "dtype": "bfloat16"}
        default = sp.default(shape)
        assert set(default) == set(sp.params)
        assert all(default[name] in choices for name, choices in sp.params.items())
        assert sp.keep(default, shape), (shape, default)
        assert default in sp.configs(shape)
    q, k, v, mask = make(Nq=1 + 5 * 7)
    assert sp.shape_of(q, k, v, mask, 9, 0.5, [5, 7], 1) == {
        "b": 2, "h": 2, "hk": 1, "nq": 36, "nk": 45, "d": 16, "dv": 24, "agents": 9, "masked": True,
        "dtype": "float32"}
    assert sp.shape_of(q, k, v, None, 49, None, [], 0)["agents"] == 36


# ---------------------------------------------------------------------------- GPU-sized


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("grid,prefix,masked", [((128, 128), 0, False), ((), 1, True)], ids=["2d", "1d-prefix-mask"])
def test_gpu_forward_bf16(grid, prefix, masked):
    """N = 16384 tokens, 49 agents, bf16, through the op (so the dispatch picks the kernels)."""
    q, k, v, mask = make(B=1, H=16, Hk=16, Nq=16384 + prefix, Nk=16384 + prefix, D=64, Dv=64,
                         dtype=torch.bfloat16, masked=masked, device="cuda")
    out = torch.ops.rewriter.agent_attention(q, k, v, mask, 49, 64**-0.5, list(grid), prefix)
    assert_close(out, ref(q, k, v, mask, 49, 64**-0.5, grid, prefix), dtype=torch.bfloat16)
    again = torch.ops.rewriter.agent_attention(q, k, v, mask, 49, 64**-0.5, list(grid), prefix)
    assert torch.equal(out, again)  # the split partials merge in a fixed order


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_forward_precision_gqa(dtype):
    """fp32 takes exact dots, fp16 TF32 ones: both within their dtype's tolerance (GQA, Dv != D, padding)."""
    q, k, v, mask = make(B=2, H=16, Hk=4, Nq=4096, Nk=4096, D=64, Dv=128, dtype=dtype, device="cuda")
    for config in (None, *CONFIGS):
        out = run(q, k, v, mask, num_agents=49, config=config)
        assert_close(out, ref(q, k, v, mask, num_agents=49), dtype=dtype)
