"""How far each approximate attention rewrite moves a real sentence encoder's embeddings.

all-MiniLM-L6-v2 (pretrained, offline; tests/models/minilm.py) is rewritten once per
setting, captured on an example batch of real sentences padded together (so the padding
mask is carried into the replacement), and then encodes all sentences of
benchmarks/data/sentences.txt. Each row compares those embeddings with the original
model's: the mean and minimum cosine similarity of each sentence's embedding to its
original, and the Spearman rank correlation between the two pairwise-similarity matrices
(upper triangle), i.e. whether the rewritten encoder still ranks sentence pairs alike.
The identity row (attention=None: exact rewrites only) must reproduce the embeddings.

    python benchmarks/minilm_fidelity.py                     # all settings, all sentences
    python benchmarks/minilm_fidelity.py --only identity,linear-elu --limit 16 --out /tmp/r

Writes benchmarks/results/minilm_fidelity-<machine>.json (DESIGN.md, "Benchmarks") and
the same table as markdown beside it (.md).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.models.minilm lives in the repository, not the package
    sys.path.insert(0, str(ROOT))

import rewriter  # noqa: E402
from tests.models.minilm import encode, load_minilm, load_sentences  # noqa: E402

NAME = "minilm_fidelity"
RESULTS = ROOT / "benchmarks" / "results"

# name -> (attention, options). Sliding windows are bidirectional here (|i - j| <= W // 2);
# sinks=1 is the [CLS] token.
SETTINGS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "identity": (None, {}),
    "linear-elu": ("linear", {"feature_map": "elu"}),
    "linear-relu": ("linear", {"feature_map": "relu"}),
    "linear-focused": ("linear", {"feature_map": "focused"}),
    "linear-elu-output_norm": ("linear", {"feature_map": "elu", "normalize": "output_norm"}),
    "agent-4": ("agent", {"num_agents": 4}),
    "agent-8": ("agent", {"num_agents": 8}),
    "agent-16": ("agent", {"num_agents": 16}),
    "sliding-4": ("sliding_window", {"window": 4, "sinks": 1}),
    "sliding-8": ("sliding_window", {"window": 8, "sinks": 1}),
    "sliding-16": ("sliding_window", {"window": 16, "sinks": 1}),
    "sliding-8-global": ("sliding_window", {"window": 8, "sinks": 1, "global_sinks": True}),
    "linear-elu-keep_last2": ("linear", {"feature_map": "elu", "keep_last": 2}),
    "linear-elu-alternate2": ("linear", {"feature_map": "elu", "alternate": 2}),
}


# ---------------------------------------------------------------------------- machine

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_slug(cpu: str | None = None, cores: int | None = None) -> str:
    """e.g. 'AMD EPYC 9B14' on 2 cores -> 'cpu-epyc-9b14-2c'."""
    name = (cpu or cpu_name()).lower()
    name = re.sub(r"\(r\)|\(tm\)|@.*$|\b\d+-core\b|\bprocessor\b|\bcpu\b|\bamd\b|\bintel\b", " ", name)
    words = re.findall(r"[a-z0-9]+", name)
    return "cpu-" + "-".join(words or ["unknown"]) + f"-{cores or core_count()}c"


def triton_version() -> str | None:
    from importlib import metadata

    try:  # not imported: the version is all we need
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------- measures

def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank (as scipy's rankdata)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # last 1-based rank of each group of ties
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = avg[inverse]
    return ranks


def spearman_torch(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return spearman_torch(a, b)
    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def compare(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per-sentence cosine to the original, and rank agreement of all pairwise similarities."""
    cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=1)
    iu = torch.triu_indices(len(ref), len(ref), offset=1)

    def pairwise(e):
        e = torch.nn.functional.normalize(e.double(), dim=1)
        return (e @ e.T)[iu[0], iu[1]]

    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "spearman": spearman(pairwise(emb), pairwise(ref))}


def site_summary(report: dict, attention: str | None) -> dict[str, Any]:
    """Attention sites rewritten and their mean error on the example batch, from the report.

    With an approximate form these are its applied sites; for the identity (attention=None)
    they are the exact canonical-attention rewrites. The rest are listed with their reason.
    """
    sites = [s for s in report["sites"] if s["kind"] == "attention"]
    if attention:
        sites = [s for s in sites if s["pass_name"].startswith("approximate:")]
    done = [s for s in sites if s["status"] == "applied"]
    errors = [s["error"]["rel_l2"] for s in done if "rel_l2" in s.get("error", {})]
    cosines = [s["error"]["cosine"] for s in done if "cosine" in s.get("error", {})]
    ver = report.get("verification", {})
    out = ver.get("approximate_output" if attention else "output", {})
    return {
        "sites_rewritten": len(done),
        "mean_site_rel_l2": sum(errors) / len(errors) if errors else None,
        "mean_site_cosine": sum(cosines) / len(cosines) if cosines else None,
        "sites_not_rewritten": [{"location": s["location"], "status": s["status"], "reason": s["reason"]}
                                for s in sites if s["status"] != "applied"],
        "example_output_rel_l2": out.get("rel_l2"),
    }


# ---------------------------------------------------------------------------- benchmark

def example_batch(tok, sentences: list[str], size: int):
    """`size` sentences spread over the list (different topics), padded together."""
    size = max(1, min(size, len(sentences)))
    idx = sorted({round(i * (len(sentences) - 1) / max(size - 1, 1)) for i in range(size)})
    batch = tok([sentences[i] for i in idx], padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def run_benchmark(names: list[str] | None = None, limit: int | None = None, example_size: int = 8,
                  batch_size: int = 32, out_dir: str | Path = RESULTS, command: str | None = None,
                  log=print) -> dict[str, Any]:
    """Measure each named setting; write <out_dir>/minilm_fidelity-<machine>.{json,md}; return the result."""
    names = list(SETTINGS) if names is None else list(names)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    cpu, cores = cpu_name(), core_count()
    machine = machine_slug(cpu, cores)
    model, tok = load_minilm("eager")
    sentences = load_sentences()[:limit] if limit else load_sentences()
    ids, mask = example_batch(tok, sentences, example_size)
    log(f"{len(sentences)} sentences; example batch {tuple(ids.shape)}, "
        f"{int((mask == 0).sum())} padding positions; machine {machine}")
    t0 = time.perf_counter()
    ref = encode(model, tok, sentences, batch_size=batch_size)
    log(f"original: encoded in {time.perf_counter() - t0:.1f}s")
    rows = []
    for name in names:
        attention, options = SETTINGS[name]
        row: dict[str, Any] = {"setting": name, "attention": attention, "options": dict(options)}
        t0 = time.perf_counter()
        try:
            opt = rewriter.optimize(model, (ids, mask), attention=attention, **options)
            t1 = time.perf_counter()
            emb = encode(opt, tok, sentences, batch_size=batch_size)
            row.update(compare(emb, ref))
            row.update(site_summary(opt.report.to_dict(), attention))
            row["seconds"] = {"optimize": round(t1 - t0, 2), "encode": round(time.perf_counter() - t1, 2)}
            del opt
        except Exception as exc:  # recorded, not hidden: the row says what failed and how
            row.update({"mean_cosine": None, "min_cosine": None, "spearman": None, "sites_rewritten": None,
                        "mean_site_rel_l2": None, "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()})
            log(f"{name}: FAILED\n{row['traceback']}")
        gc.collect()
        rows.append(row)
        if "error" not in row:
            log(f"{name}: mean cos {row['mean_cosine']:.5f}, min {row['min_cosine']:.4f}, "
                f"spearman {row['spearman']:.4f}, {row['sites_rewritten']} sites "
                f"({time.perf_counter() - t0:.1f}s)")
    result = {
        "benchmark": NAME,
        "command": command or f"python benchmarks/{NAME}.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cores": cores, "torch": torch.__version__, "triton": triton_version()},
        "rows": rows,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}-{machine}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = markdown(result, n_sentences=len(sentences), example_shape=tuple(ids.shape))
    (out / f"{NAME}-{machine}.md").write_text(md, encoding="utf-8")
    log(md)
    return result


# ---------------------------------------------------------------------------- table

def _fmt_options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "—"


def _num(x, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(result: dict, n_sentences: int, example_shape: tuple) -> str:
    m = result["machine"]
    lines = [
        f"# {result['benchmark']}",
        "",
        f"all-MiniLM-L6-v2 (pretrained, eager attention, fp32). {n_sentences} sentences encoded by the "
        f"rewritten model vs the original; each setting captured once on an example batch of "
        f"{example_shape[0]} sentences padded to {example_shape[1]} tokens.",
        "cosine: each sentence's embedding vs the original's; spearman: rank correlation of the "
        "pairwise-similarity matrices (upper triangle); site rel_l2: mean relative L2 error of the "
        "rewritten attention sites on the example batch, from the report (over the real tokens' "
        "query rows; padding rows never reach the embedding); site cosine likewise.",
        "",
        f"`{result['command']}` — {result['date']} — {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"triton {m['triton']}",
        "",
        "| attention | options | mean cosine | min cosine | spearman | sites rewritten | mean site rel_l2 | mean site cosine | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            notes = f"FAILED: {r['error']}"
        else:
            kept = r.get("sites_not_rewritten") or []
            notes = "; ".join(f"{s['location'].replace('bert.encoder.', '').replace('.attention.self', '')}: "
                              f"{s['status']} ({s['reason']})" for s in kept)
            if r["attention"] is None:
                notes = "exact rewrites only (sites = canonical attention)" + (f"; {notes}" if notes else "")
        lines.append(
            f"| {r['attention'] or 'None'} | {_fmt_options(r['options'])} | {_num(r['mean_cosine'], '.5f')} | "
            f"{_num(r['min_cosine'], '.4f')} | {_num(r['spearman'], '.4f')} | {_num(r['sites_rewritten'], 'd')} | "
            f"{_num(r['mean_site_rel_l2'], '.3g')} | {_num(r.get('mean_site_cosine'), '.3f')} | {notes.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated settings (default all): {','.join(SETTINGS)}")
    p.add_argument("--limit", type=int, help="encode only the first N sentences")
    p.add_argument("--example-size", type=int, default=8, help="sentences in the capture batch (default 8)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", f"benchmarks/{NAME}.py", *given])
    result = run_benchmark(names, args.limit, args.example_size, args.batch_size, args.out, command)
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's LeafSpec deprecation, per capture
    sys.exit(main())
