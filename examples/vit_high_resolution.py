"""A Vision Transformer at high resolution: neighbourhood and Swin-window attention.

A ViT attends from every image patch to every other, so its cost grows with the square of
the token count: a 1024×1024 image in 16-pixel patches is 4096 tokens and 16.8 M attention
scores per head per layer. Two well-known ideas keep attention local on the patch grid:

* Neighbourhood attention (NAT, Hassani et al. 2023; dilated: DiNAT): every patch attends
  to the k×k patches around it, a sliding window in 2-D (clamped at the image borders).
* Window attention (Swin, Liu et al. 2021): the grid is cut into w×w windows that attend
  within themselves; every other layer shifts the windows by w/2 so information crosses
  window borders.

`rewriter.optimize(model, (image,), attention="neighborhood" | "window2d")` finds the
model's attention however it is written (here timm-style `q @ k.T → softmax → @ v`), reads
the patch grid and the CLS token from the patch-embedding convolution, and replaces each
site with a `rewriter::` op. This script builds a ViT-S-wide encoder (width 384, 6 heads;
the model of benchmarks/attention_speed.py, loaded from that file) at 1024 px, times the
original, the exact rewrite and the local-attention rewrites side by side, and measures
how far the approximations move the output.

The weights are random, so the output error says how much the attention pattern changed,
not how much accuracy a trained model would lose: local attention is a modelling choice
that NAT and Swin make at training time (or recover by fine-tuning).

    python examples/vit_high_resolution.py              # 1024 px (4096 tokens), 4 layers
    python examples/vit_high_resolution.py --image 768 --depth 12 --rounds 3
    python examples/vit_high_resolution.py --small      # 256 px, 2 layers: a smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402


def load_vit_builder():
    """benchmarks/attention_speed.py as a module (its ViT class), without copying it here."""
    spec = importlib.util.spec_from_file_location("attention_speed", ROOT / "benchmarks" / "attention_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """rel-L2 of the whole output, and the mean cosine of each token's feature vector."""
    out, ref = out.double(), ref.double()
    rel_l2 = ((out - ref).norm() / ref.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item()
    return {"rel_l2": rel_l2, "cosine": cosine}


def side_by_side(fns: dict, x: torch.Tensor, rounds: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One warm-up call of each variant (its output is kept to measure the error), then
    `rounds` rounds calling every variant once, the order rotated each round so that no
    variant always runs first. Returns the median seconds and the warm-up outputs."""
    names = list(fns)
    outputs, samples = {}, {n: [] for n in names}
    with torch.inference_mode():
        for name in names:
            outputs[name] = fns[name](x)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[name](x)
                samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}, outputs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=int, default=1024, help="image side in pixels (16-px patches); default 1024")
    p.add_argument("--depth", type=int, default=4, help="transformer layers (ViT-S has 12); default 4")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up; default 2")
    p.add_argument("--small", action="store_true", help="256 px, 2 layers, 1 round (a smoke test)")
    args = p.parse_args(argv)
    if args.small:
        args.image, args.depth, args.rounds = 256, 2, 1
    started, cpu_started = time.perf_counter(), time.process_time()

    # The model: a ViT-S-wide encoder (width 384, 6 heads, MLP 1536), 16-px patches, one CLS
    # token, Pre-LN blocks whose attention materialises the full N×N score matrix.
    vit = load_vit_builder()
    torch.manual_seed(0)
    model = vit.ViT(args.image, depth=args.depth).eval()
    image = torch.randn(1, 3, args.image, args.image, generator=torch.Generator().manual_seed(1))
    grid = args.image // vit.PATCH
    print(f"ViT: {args.depth} layers, width {vit.DIM}, {vit.HEADS} heads; {args.image}x{args.image} image "
          f"-> {grid}x{grid} = {grid * grid} patch tokens + 1 CLS token")

    # The variants. `verify=False` skips the numerical checks optimize() runs by default
    # (each exact pass is checked against the graph before it, and an approximate rewrite's
    # per-site errors are measured): at 4096 tokens those checks cost several forward passes,
    # and we measure the end-to-end error of every variant ourselves below. Run with the
    # default verify=True when you adopt a rewrite: the report then carries every error.
    window = 8 if grid % 8 == 0 else 7
    variants = {
        "exact": {},  # attention → scaled_dot_product_attention, LayerNorm → RMSNorm: same outputs
        "neighborhood k=7": {"attention": "neighborhood", "kernel_size": 7},
        "neighborhood k=13": {"attention": "neighborhood", "kernel_size": 13},
        f"window2d w={window}, shifted": {"attention": "window2d", "window": window, "shift": "alternate"},
    }
    fns = {"original": model}
    sites = {}
    for name, options in variants.items():
        t0 = time.perf_counter()
        opt = rewriter.optimize(model, (image,), verify=False, **options)
        fns[name] = opt
        if options:
            rewritten = [s for s in opt.report.select(kind="attention", status="applied")
                         if s.pass_name.startswith("approximate:")]
            sites[name] = rewritten
            print(f"  {name:28s} optimized in {time.perf_counter() - t0:4.1f} s: {len(rewritten)}/{args.depth} "
                  f"attention sites -> {rewritten[0].action if rewritten else 'none'}")
        else:
            print(f"  {name:28s} optimized in {time.perf_counter() - t0:4.1f} s: {opt.report.summary()}")
    # The 2-D forms read the token layout from the patch-embedding conv; the report keeps it.
    first = next(iter(sites.values()))[0]
    print(f"  read from the graph: grid {first.params['grid']}, prefix tokens (CLS) {first.params['prefix']}")
    shifts = [s.params["shift"] for s in sites[f"window2d w={window}, shifted"]]
    print(f"  Swin shifts per layer: {shifts}")

    # Time every variant side by side (interleaved in this one process), then compare each
    # output with the original's: rel-L2 of the final features of all tokens, and the mean
    # cosine similarity of each token's feature vector.
    print(f"\ntiming: 1 warm-up call + {args.rounds} interleaved round(s) per variant, median")
    seconds, outputs = side_by_side(fns, image, args.rounds)
    ref = outputs["original"]
    rows = []
    head = f"{'variant':28s} {'median s':>9} {'vs original':>12} {'vs exact':>9} {'rel-L2':>9} {'cosine':>8}"
    print(head + "\n" + "-" * len(head))
    for name in fns:
        e = errors(outputs[name], ref)
        row = {"variant": name, "seconds": seconds[name], "speedup_vs_original": seconds["original"] / seconds[name],
               "speedup_vs_exact": seconds["exact"] / seconds[name], **e}
        rows.append(row)
        print(f"{name:28s} {row['seconds']:9.3f} {row['speedup_vs_original']:11.2f}x {row['speedup_vs_exact']:8.2f}x "
              f"{row['rel_l2']:9.2e} {row['cosine']:8.4f}")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\nexact: same outputs (rel-L2 {rows[1]['rel_l2']:.1e}); the local forms skip most of the "
          f"{(grid * grid + 1) ** 2 / 1e6:.1f} M scores per head and layer.")
    print("Errors are against the original on random weights: they show how much the attention")
    print("pattern moved, not the accuracy a trained (or fine-tuned) local-attention model would reach.")
    print(f"done in {wall:.0f} s wall, {cpu:.0f} s CPU ({torch.get_num_threads()} threads)")
    return {"tokens": grid * grid, "rows": rows, "wall_s": wall, "cpu_s": cpu,
            "sites": {k: len(v) for k, v in sites.items()}, "depth": args.depth,
            "grid": first.params["grid"], "prefix": first.params["prefix"]}


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's LeafSpec deprecation, per capture
    logging.getLogger("torch._export.non_strict_utils").setLevel(logging.ERROR)  # "batch dim specialized" (batch 1)
    main()
