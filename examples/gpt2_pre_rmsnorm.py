"""Pre-LN → Pre-RMSNorm on GPT-2: the same outputs with cheaper normalisation.

Jiang et al. (NeurIPS 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers") observed that in
a Pre-LN transformer every LayerNorm reads the residual stream, and LayerNorm discards the
stream's mean anyway: LayerNorm(x) = RMSNorm(x − mean(x)). If everything that *writes*
into the stream (token and position embeddings, each block's output projection) is made
to produce zero-mean vectors, the stream stays zero-mean, and every LayerNorm can become
an RMSNorm (no mean to subtract) with exactly the same outputs. Pre-CRMSNorm goes one step
further: a zero-mean vector of D numbers is fully described by D−1 of them, so the stream
can be stored compressed.

`rewriter.optimize(model, inputs)` does this by default (`norm="auto"`) wherever it can
prove it exact from the graph, re-centring copies of the writers' weights (so GPT-2's tied
LM head is untouched); `norm="crms"` gives Pre-CRMSNorm; `norm="keep"` keeps LayerNorms.
This script applies each to a small GPT-2 built from a Hugging Face config (random
weights, no download), prints the report, checks the outputs on a fresh input, and times
the variants side by side.

    python examples/gpt2_pre_rmsnorm.py                # 4 × 512 tokens, width 512, 2 layers
    python examples/gpt2_pre_rmsnorm.py --small        # a smoke test
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402


class Logits(nn.Module):
    """HF models return a ModelOutput; the graph we capture returns the logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, return_dict=True).logits


def build_gpt2(width: int, layers: int, positions: int) -> nn.Module:
    """GPT-2 (Pre-LN, learned positions, tied LM head) from a config: random weights.
    HF's `sdpa` attention, so that the original already uses fused attention and the
    timings below compare the normalisation, not the attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1000, n_positions=positions, n_embd=width, n_layer=layers, n_head=width // 64,
                     bos_token_id=999, eos_token_id=999, use_cache=False, attn_implementation="sdpa")
    return Logits(GPT2LMHeadModel(cfg)).eval().float()


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.double(), ref.double()
    return {"max_abs": (out - ref).abs().max().item(), "rel_l2": ((out - ref).norm() / ref.norm()).item()}


def side_by_side(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """A warm-up call each, then `rounds` rounds calling every variant once in rotating order."""
    names = list(fns)
    samples = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:
            fns[name](x)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[name](x)
                samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--width", type=int, default=512, help="model width (heads of 64); default 512")
    p.add_argument("--layers", type=int, default=2, help="blocks: 2 blocks have 5 LayerNorms; default 2")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up; default 5")
    p.add_argument("--small", action="store_true", help="2 × 64 tokens, width 128, 1 round (a smoke test)")
    args = p.parse_args(argv)
    if args.small:
        args.batch, args.tokens, args.width, args.rounds = 2, 64, 128, 1
    started, cpu_started = time.perf_counter(), time.process_time()

    model = build_gpt2(args.width, args.layers, args.tokens)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (args.batch, args.tokens), generator=gen)
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    print(f"GPT-2 (random weights): {args.layers} blocks, width {args.width}, {n_ln} LayerNorms; "
          f"input {args.batch} x {args.tokens} tokens")

    # 1. The rewrite and its report. Each site says what it was, what it became and its
    # measured error on the example input; the residual stream row says the conversion was
    # proved (or why not: try a Post-LN model such as BERT, examples/minilm_fidelity.py).
    t0 = time.perf_counter()
    rms = rewriter.optimize(model, (ids,))  # norm="auto" is the default
    print(f"\nrewriter.optimize(model, (ids,))  [{time.perf_counter() - t0:.1f} s]")
    print(rms.report)
    converted = rms.report.count(kind="layer_norm", action="rewriter.rms_norm")
    streams = rms.report.count(kind="residual_stream", action="pre_rmsnorm")

    crms = rewriter.optimize(model, (ids,), norm="crms")
    keep = rewriter.optimize(model, (ids,), norm="keep")
    print(f"norm='crms': {crms.report.summary()}")
    print(f"norm='keep': {keep.report.summary()}")

    # 2. Same outputs, also on an input the rewrite never saw (another batch size and
    # length: the captured graph keeps batch and sequence dynamic).
    fresh = torch.randint(0, 1000, (max(1, args.batch // 2) + 1, args.tokens // 2 + 3), generator=gen)
    print(f"\noutputs vs the original (logits), on the example input and on a fresh {tuple(fresh.shape)} input:")
    checks = {}
    with torch.inference_mode():
        for name, opt in (("Pre-RMSNorm", rms), ("Pre-CRMSNorm", crms), ("LayerNorm kept", keep)):
            checks[name] = {"example": compare(opt(ids), model(ids)), "fresh": compare(opt(fresh), model(fresh))}
            e, f = checks[name]["example"], checks[name]["fresh"]
            print(f"  {name:15s} example: max abs {e['max_abs']:.1e}, rel-L2 {e['rel_l2']:.1e}   "
                  f"fresh: max abs {f['max_abs']:.1e}, rel-L2 {f['rel_l2']:.1e}")

    # 3. Time, side by side in this process. RMSNorm skips LayerNorm's mean, but the norms are
    # a small share of a transformer's time next to its matmuls, and the re-centred writers
    # cost nothing extra (their weights were re-centred once). "LayerNorm kept" isolates the
    # norm change from the rest of the rewrite (attention canonicalised, graph re-exported).
    # On a CPU the rewriter:: norm ops run their plain-PyTorch references: RMSNorm there is a
    # few elementwise kernels, while PyTorch's LayerNorm is one fused kernel, so do not expect
    # a saving on this path; the saving is the fused Triton kernels' on a GPU.
    fns = {"original": model, "LayerNorm kept": keep, "Pre-RMSNorm": rms, "Pre-CRMSNorm": crms}
    print(f"\ntiming: 1 warm-up call + {args.rounds} interleaved rounds per variant, median")
    seconds = side_by_side(fns, ids, args.rounds)
    rows = []
    for name, s in seconds.items():
        row = {"variant": name, "seconds": s, "vs_original": seconds["original"] / s,
               "vs_layernorm_kept": seconds["LayerNorm kept"] / s}
        rows.append(row)
        print(f"  {name:15s} {1e3 * s:9.1f} ms   {row['vs_original']:5.2f}x vs original   "
              f"{row['vs_layernorm_kept']:5.2f}x vs LayerNorm kept")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\n{converted} LayerNorms became RMSNorms ({streams} residual stream re-centred); ratios above "
          "1 mean faster.")
    print(f"done in {wall:.0f} s wall, {cpu:.0f} s CPU ({torch.get_num_threads()} threads)")
    return {"layer_norms": n_ln, "converted": converted, "streams": streams,
            "crms_converted": crms.report.count(kind="layer_norm", action="rewriter.crms_norm"),
            "checks": checks, "rows": rows, "report": rms.report.to_dict(), "wall_s": wall, "cpu_s": cpu}


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's LeafSpec deprecation, per capture
    logging.getLogger("torch._export.non_strict_utils").setLevel(logging.ERROR)
    main()
