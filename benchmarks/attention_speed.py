"""CPU speed of the approximate-attention rewrites on a ViT-S-sized encoder.

Side by side in one process, interleaved (each variant once per round, medians over the
rounds), at 1024 / 4096 / 16384 image tokens (+1 CLS token):

  original        the eager model (hand-written timm-style attention)
  exact           rewriter.optimize(model, (x,), verify=False): exact passes only
  linear          attention="linear", feature_map="elu"
  agent           attention="agent", num_agents=49
  sliding_window  attention="sliding_window", window=256, sinks=4
  window2d        attention="window2d", window=8, shift="alternate"
  neighborhood    attention="neighborhood", kernel_size=7
  attention_free  the eager model with softmax(q kᵀ)v replaced by v (a model flag): the limit

Each row has the median time, the speedup over the original and the fraction of the
attention-free limit's saving that the variant gets, (t_orig − t) / (t_orig − t_free).
At the smallest size each variant's output error (relative L2 of the final features of
every token against the original) is read from rewriter.optimize(..., verify=True)'s report
(--quick takes it from the timed graphs' warm-up outputs instead: the same quantity, free).

    python benchmarks/attention_speed.py                 # full run (tens of minutes on 2 cores)
    python benchmarks/attention_speed.py --quick         # smoke test: 256 tokens, 1 round
    python benchmarks/attention_speed.py --sizes 1024 4096 --rounds 3

Writes benchmarks/results/attention_speed-<machine>.json (format: DESIGN.md, "Benchmarks").
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

import rewriter  # noqa: E402

# ---------------------------------------------------------------- the model (ViT-S/16)

DIM, DEPTH, HEADS, MLP, PATCH = 384, 12, 6, 1536, 16


class Attention(nn.Module):
    """timm's Attention (the non-fused path), with an attention-free switch."""

    def __init__(self, dim: int, heads: int, attention_free: bool = False):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_free = attention_free

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.attention_free:  # the limit: no token mixing at all, the rest of the block unchanged
            x = v
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, hidden: int, attention_free: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attention_free)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-S/16 encoder: conv patch embedding, 1 CLS token, learned position embedding,
    12 Pre-LN blocks, final LayerNorm. Returns the final features of every token [B, N+1, D]."""

    def __init__(self, img: int, patch: int = PATCH, dim: int = DIM, depth: int = DEPTH, heads: int = HEADS,
                 hidden: int = MLP, attention_free: bool = False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, attention_free) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build(tokens: int, attention_free: bool = False, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model for `tokens` image tokens (a square grid) and its input image, batch 1."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"token count must be a square (a square image), got {tokens}")
    img = side * PATCH
    torch.manual_seed(seed)
    model = ViT(img, attention_free=attention_free).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 3, img, img, generator=gen)
    return model, x


# ---------------------------------------------------------------- variants

# name -> optimize() keyword arguments (None: not a rewriter variant)
REWRITES = {
    "exact": {},
    "linear": {"attention": "linear", "feature_map": "elu"},
    "agent": {"attention": "agent", "num_agents": 49},
    "sliding_window": {"attention": "sliding_window", "window": 256, "sinks": 4},
    "window2d": {"attention": "window2d", "window": 8, "shift": "alternate"},
    "neighborhood": {"attention": "neighborhood", "kernel_size": 7},
}
VARIANTS = ["original", *REWRITES, "attention_free"]
DEFAULT_SIZES = [1024, 4096, 16384]
DEFAULT_ROUNDS = {1024: 5, 4096: 3, 16384: 2}
QUICK_SIZES = [256]


def _applied(report) -> tuple[int, int, list[str]]:
    """(approximate sites applied, approximate sites found, distinct reasons for the others)."""
    sites = [s for s in report.sites if s.pass_name.startswith("approximate:")]
    applied = sum(1 for s in sites if s.status == "applied")
    reasons = sorted({f"{s.status}: {s.reason}" for s in sites if s.status != "applied"})
    return applied, len(sites), reasons


def _rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm()).item()


def _prepare(tokens: int, log) -> tuple[dict, dict, torch.Tensor, nn.Module]:
    """The callables to time (name -> fn) and per-variant info (rewrite status, failures)."""
    model, x = build(tokens)
    free, _ = build(tokens, attention_free=True)
    free.load_state_dict(model.state_dict())
    fns, info = {"original": model}, {v: {} for v in VARIANTS}
    for name, kw in REWRITES.items():
        t0 = time.perf_counter()
        try:
            opt = rewriter.optimize(model, (x,), verify=False, **kw)
        except Exception as exc:  # a rewrite that fails is a result: report it, time the rest
            info[name]["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {name}: optimize failed: {info[name]['error']}")
            continue
        info[name]["optimize_s"] = round(time.perf_counter() - t0, 3)
        if kw.get("attention"):
            applied, found, reasons = _applied(opt.report)
            info[name]["sites_applied"] = f"{applied}/{found}"
            if reasons:
                info[name]["not_applied"] = reasons
            if applied == 0:
                info[name]["error"] = f"no attention site rewritten: {reasons}"
                log(f"  {name}: {info[name]['error']}")
            info[name]["params"] = _layer_params(opt.report)
        fns[name] = opt
    fns["attention_free"] = free
    return fns, info, x, model


def _layer_params(report) -> dict | None:
    """The parameters the first approximate site used (plus those that vary per layer)."""
    sites = [s for s in report.sites if s.pass_name.startswith("approximate:") and s.status == "applied"]
    if not sites:
        return None
    first = dict(sites[0].params)
    first.pop("scale", None)
    for key in list(first):
        values = [s.params.get(key) for s in sites]
        if any(v != values[0] for v in values):
            first[key] = values
    return first


def _errors(tokens: int, log) -> dict[str, float | None]:
    """Output error of every rewrite against the original, from optimize(verify=True)'s report."""
    model, x = build(tokens)
    errs = {}
    for name, kw in REWRITES.items():
        try:
            opt = rewriter.optimize(model, (x,), verify=True, **kw)
        except Exception as exc:
            log(f"  {name}: optimize(verify=True) failed: {type(exc).__name__}: {exc}")
            errs[name] = None
            continue
        key = "approximate_output" if kw.get("attention") else "output"
        errs[name] = opt.report.verification.get(key, {}).get("rel_l2")
        if errs[name] is None:
            log(f"  {name}: no rel_l2 in the report: {opt.report.verification}")
    return errs


def _time_size(tokens: int, rounds: int, log, errors: str | None, warmup: int = 1) -> list[dict]:
    """Time every variant at `tokens`; errors: None (not measured), "verify" (optimize(verify=True)'s
    report) or "direct" (each timed graph's first output against the original's)."""
    fns, info, x, _ = _prepare(tokens, log)
    names = [v for v in VARIANTS if v in fns]  # "original" first: its output is the reference
    samples: dict[str, list[float]] = {v: [] for v in names}
    direct: dict[str, float] = {}
    ref = None

    def first_output(name, out):
        nonlocal ref
        if name not in direct:
            ref = out if name == "original" else ref
            direct[name] = _rel_l2(out, ref)

    with torch.no_grad():
        for _ in range(warmup):  # warm-up: one call each
            for name in names:
                t0 = time.perf_counter()
                first_output(name, fns[name](x))
                log(f"  warm-up {name:15s} {time.perf_counter() - t0:9.3f} s")
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate: no variant always first
            for name in order:
                gc.collect()
                t0 = time.perf_counter()
                out = fns[name](x)
                samples[name].append(time.perf_counter() - t0)
                first_output(name, out)
                del out
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1]:.3f}" for n in names))
    ref = None
    del fns
    gc.collect()
    errs = {}
    if errors == "verify":
        errs = _errors(tokens, log)
        for name, e in errs.items():
            if e is not None and name in direct and abs(e - direct[name]) > 1e-3 * max(e, 1e-6) + 1e-9:
                log(f"  {name}: rel_l2 {e:.3e} from verify=True, {direct[name]:.3e} from the timed graph")
    if errors:  # the original and the attention-free model are not rewrites: measured directly
        errs = {**{k: v for k, v in direct.items() if k in ("original", "attention_free") or errors == "direct"}, **errs}
    med = {n: statistics.median(s) for n, s in samples.items()}
    t_orig, t_free = med.get("original"), med.get("attention_free")
    rows = []
    for name in VARIANTS:
        t = med.get(name)
        row = {"tokens": tokens, "seq_len": tokens + 1, "image": math.isqrt(tokens) * PATCH, "variant": name,
               "median_s": t,
               "speedup": (t_orig / t) if t else None,
               "fraction_of_attention_free_limit": ((t_orig - t) / (t_orig - t_free)) if t and t_orig > t_free else None,
               "rel_l2": errs.get(name),
               "rel_l2_source": ("verify" if name in REWRITES and errors == "verify" else "direct")
                                if name in errs else None,
               "rounds": len(samples.get(name, [])),
               "samples_s": [round(s, 4) for s in samples.get(name, [])]}
        row.update(info.get(name, {}))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- machine, output


def machine() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not cpu:
        import platform

        cpu = platform.processor() or platform.machine()
    try:
        from importlib.metadata import version

        triton = version("triton")
    except Exception:
        triton = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "triton": triton}


def slug(m: dict) -> str:
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", " ", m["cpu"].lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu-{name}-{m['cores']}c"


def table(rows: list[dict]) -> str:
    head = f"{'tokens':>6} {'variant':15s} {'median s':>10} {'speedup':>8} {'of limit':>9} {'rel_l2':>9}  note"
    out = [head, "-" * len(head)]
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else format("-", ">" + fmt.split(".")[0])
        note = r.get("error") or (f"sites {r['sites_applied']}" if "sites_applied" in r else "")
        frac = f"{100 * r['fraction_of_attention_free_limit']:.0f}%" if r["fraction_of_attention_free_limit"] is not None else "-"
        out.append(f"{r['tokens']:>6} {r['variant']:15s} {f(r['median_s'], '10.3f')} {f(r['speedup'], '7.2f')}x "
                   f"{frac:>9} {f(r['rel_l2'], '9.2e')}  {note}")
    return "\n".join(out)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="image token counts (squares); default 1024 4096 16384")
    p.add_argument("--rounds", type=int, nargs="+",
                   help="rounds per size: one value for all, or one per size (default 5 / 3 / 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 256 tokens, 1 round, no warm-up, errors from the timed graphs "
                        "(no verify=True runs)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per variant (default 1; --quick 0)")
    p.add_argument("--errors", choices=["verify", "direct", "none"], default=None,
                   help="output error at the smallest size: from rewriter.optimize(verify=True)'s report "
                        "(default), from the timed graphs' warm-up outputs (--quick's default), or not at all")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    return p.parse_args(argv)


def rounds_per_size(args, sizes: list[int], defaults: dict[int, int]) -> list[int]:
    """--rounds: one value for every size, or one per size; else the defaults (1 with --quick)."""
    if args.rounds is None:
        return [1 if args.quick else defaults.get(s, 3) for s in sizes]
    if len(args.rounds) == 1:
        return args.rounds * len(sizes)
    if len(args.rounds) == len(sizes):
        return args.rounds
    raise SystemExit("--rounds takes one value or one per size")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rounds = rounds_per_size(args, sizes, DEFAULT_ROUNDS)
    errors = args.errors or ("direct" if args.quick else "verify")
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    m = machine()
    torch.set_num_threads(args.threads or m["cores"])

    def log(msg):
        print(msg, flush=True)

    smallest = min(sizes)
    log(f"attention_speed on {m['cpu']} ({m['cores']} cores, {torch.get_num_threads()} threads), torch {m['torch']}")
    rows = []
    for size, n in zip(sizes, rounds):
        log(f"{size} tokens ({math.isqrt(size) * PATCH}px image), {n} rounds")
        t0 = time.perf_counter()
        rows += _time_size(size, n, log, errors=errors if size == smallest and errors != "none" else None,
                           warmup=warmup)
        log(f"  {size} tokens done in {time.perf_counter() - t0:.0f} s")
    result = {
        "benchmark": "attention_speed",
        "command": shlex.join(["python", "benchmarks/attention_speed.py", *argv]),
        "date": datetime.date.today().isoformat(),
        "machine": m,
        "threads": torch.get_num_threads(),
        "warmup_calls": warmup,
        "model": f"ViT-S/16 encoder: {DEPTH} layers, width {DIM}, {HEADS} heads, MLP {MLP}, Pre-LN, 1 CLS token; "
                 "random init (seed 0), eval, fp32, batch 1",
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"attention_speed-{slug(m)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(table(rows))
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
