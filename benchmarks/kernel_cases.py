"""The cases of benchmarks/kernel_speed.py: the norms (forward, forward+backward, against
torch's own and the copy bandwidth) and the attention kernels (against SDPA, FlexAttention
with the equivalent mask and the compiled reference), each measured into one row."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from kernel_harness import CUDA, DTYPE, Run, check, describe_error, finish, free_memory, new_row, ratio, rounded

NORM_EPS = {"rms_norm": 1e-6, "layer_norm": 1e-5}


# ---------------------------------------------------------------- norms


def bench_norms(run: Run, shapes) -> None:
    for i, (R, D) in enumerate(shapes):
        if not run.over_budget(f"norms {R}x{D}"):
            _norm_shape(run, R, D, first=i == 0)  # a function: its tensors are freed on return
            free_memory()


def _norm_shape(run: Run, R: int, D: int, first: bool) -> None:
    rms, ln = run.mods["rms"], run.mods["ln"]
    from rewriter.kernels.layer_norm import naive as ln_naive
    from rewriter.kernels.rms_norm import naive as rms_naive

    torch.manual_seed(0)
    dev = run.device
    x = torch.randn(R, D, device=dev, dtype=DTYPE)
    dy = torch.randn(R, D, device=dev, dtype=DTYPE)
    w = (1 + 0.1 * torch.randn(D, device=dev)).to(DTYPE)
    b = (0.1 * torch.randn(D, device=dev)).to(DTYPE)
    nbytes = x.numel() * x.element_size()
    t_copy = run.copy_ms(nbytes, "norms")
    copy_gbps = 2 * nbytes / t_copy / 1e6 if t_copy else None
    for op in ("rms_norm", "layer_norm"):
        eps = NORM_EPS[op]
        if op == "rms_norm":
            params = (w,)
            ours_fwd = lambda: rms.rms_norm(x, w, None, eps)  # noqa: E731
            ours_bwd = lambda: rms.rms_norm_backward(dy, x, w, None, eps)[:2]  # noqa: E731
            reference = lambda x_, w_: rms_naive.rms_norm(x_, w_, None, eps)  # noqa: E731
            torch_fn = lambda x_, w_: F.rms_norm(x_, (D,), w_, eps)  # noqa: E731
            supported = lambda: rms._supported(x)  # noqa: E731
        else:
            params = (w, b)
            ours_fwd = lambda: ln.layer_norm(x, w, b, eps)  # noqa: E731
            ours_bwd = lambda: ln.layer_norm_backward(dy, x, w, b, eps)  # noqa: E731
            reference = lambda x_, w_, b_: ln_naive.layer_norm(x_, w_, b_, eps)  # noqa: E731
            torch_fn = lambda x_, w_, b_: F.layer_norm(x_, (D,), w_, b_, eps)  # noqa: E731
            supported = lambda: x.dtype in ln.DTYPES  # noqa: E731

        # fp32 expectations: y, then grads of (x, *params) for dy
        leaves = [t.detach().float().requires_grad_() for t in (x, *params)]
        with torch.enable_grad():
            y32 = reference(*leaves)
            grads32 = torch.autograd.grad(y32, leaves, dy.float())
        y32 = y32.detach()

        def autograd_step(f):
            xr = x.detach().requires_grad_()
            pr = [p.detach().requires_grad_() for p in params]

            def step():
                with torch.enable_grad():
                    y = f(xr, *pr)
                    return (y, *torch.autograd.grad(y, (xr, *pr), dy))
            return step

        for pas in ("fwd", "fwd+bwd"):
            case = f"{op} {pas} {R}x{D}"
            run.log(f"  {case}")
            row = new_row("norms", case, op=op, **{"pass": pas}, rows=R, d=D, bytes=nbytes)
            traffic = (2 if pas == "fwd" else 5) * nbytes  # fwd: x in, y out; bwd: x, dy in, dx out
            row["traffic_bytes"] = traffic
            row["kernel_path"] = run.attempt(row, "kernel_path", lambda: "triton" if supported()
                                             else "reference fallback (dtype)")
            expected = (y32,) if pas == "fwd" else (y32, *grads32)
            ours = ours_fwd if pas == "fwd" else (lambda: (ours_fwd(), *ours_bwd()))
            t0 = time.perf_counter()
            out = run.attempt(row, "ours", ours)  # the first call JIT-compiles the kernels
            row["ours_first_call_s"] = round(time.perf_counter() - t0, 3)
            if out is not None:
                check(row, "ours", out, expected)
            del out
            run.measure(row, "ours", ours, traffic_bytes=traffic)
            if pas == "fwd":  # the tuner tunes the forward launcher (the backward takes its own config)
                fwd = rms.rms_norm if op == "rms_norm" else ln.layer_norm
                op_args = (x, w, None, eps, 0.0) if op == "rms_norm" else (x, w, b, eps)
                run.tuned(row, op, op_args, lambda config: fwd(*op_args, config=config), expected,
                          traffic_bytes=traffic)
            if pas == "fwd+bwd":
                # the backward launcher alone: 3 x bytes of traffic
                t_b = run.measure(row, "ours_bwd", ours_bwd, traffic_bytes=3 * nbytes)
                row["bwd_fraction_of_copy"] = ratio(3 * nbytes / t_b / 1e6 if t_b else None, copy_gbps)
            if pas == "fwd+bwd" and run.timer.graph:
                # a failed capture of an autograd step broke the CUDA RNG state for the rest of the run (H200)
                row["skipped"]["torch"] = row["skipped"]["compiled_reference"] = (
                    "--cuda-graph: autograd steps are not captured in a CUDA graph")
                tfn = None
            else:
                tfn = (lambda: torch_fn(x, *params)) if pas == "fwd" else autograd_step(torch_fn)
            out = None if tfn is None else run.attempt(row, "torch", tfn)
            if out is not None:
                check(row, "torch", out, expected)
                run.measure(row, "torch", tfn, traffic_bytes=traffic)
            del out
            if tfn is None:
                pass
            elif run.compile and not CUDA and not first:
                row["skipped"]["compiled_reference"] = "CPU smoke mode: dynamo ran at the first shape only"
            elif run.compile:
                cref = run.attempt(row, "compiled_reference", lambda: run.compiled(reference, row))
                if cref is not None:
                    cfn = (lambda: cref(x, *params)) if pas == "fwd" else autograd_step(cref)
                    out = run.attempt(row, "compiled_reference", cfn)  # compiles
                    if out is not None:
                        check(row, "compiled_reference", out, expected)
                        run.measure(row, "compiled_reference", cfn, traffic_bytes=traffic)
                    del out
            else:
                row["skipped"]["compiled_reference"] = "--no-compile"
            if t_copy:
                row["ms"]["copy"] = rounded(t_copy)
                row["gbps"]["copy"] = rounded(copy_gbps, 4)
            row["fraction_of_copy"] = ratio(row["gbps"].get("ours"), copy_gbps)
            if "ours_tuned" in row["gbps"]:
                row["tuned_fraction_of_copy"] = ratio(row["gbps"]["ours_tuned"], copy_gbps)
            row["speedup_vs_torch"] = ratio(row["ms"].get("torch"), row["ms"].get("ours"))
            row["speedup_vs_compiled_reference"] = ratio(row["ms"].get("compiled_reference"),
                                                         row["ms"].get("ours"))
            run.emit(finish(row))
            free_memory()


# ---------------------------------------------------------------- attention cases


def _sliding_pairs(n: int, window: int, causal: bool) -> int:
    """(query, key) pairs a 1-D band holds."""
    if causal:
        w = min(window, n)
        return w * (w + 1) // 2 + (n - w) * w
    half = window // 2
    return sum(min(n - 1, i + half) - max(0, i - half) + 1 for i in range(n))


# The mask helpers below touch no module global (only their closures and tensor methods):
# dynamo inlines them into FlexAttention, and a global of a file loaded by path (as the tests
# load benchmarks) cannot be guarded.


def _na_axis(length: int, kernel: int):
    """NATTEN's neighbourhood along one axis, as fn(query coords, key coords) -> bool tensor:
    the key is in the query's window, clamped inside [0, length) (so always `kernel` keys)."""
    def axis(qc, kc):
        start = (qc - kernel // 2).clamp(0, length - kernel)
        return (kc >= start) & (kc < start + kernel)
    return axis


def _swin_axis(length: int, window: int, shift: int):
    """Swin along one axis, as fn(query coords, key coords) -> bool tensor: the same window of the
    grid rolled by -shift and, with a shift, the same region (naive.window_attention_2d)."""
    def region(r):
        return (r >= length - window).int() + (r >= length - shift).int()

    def axis(qc, kc):
        rq, rk = (qc + (length - shift)) % length, (kc + (length - shift)) % length
        same = (rq // window) == (rk // window)
        if shift:
            same = same & (region(rq) == region(rk))
        return same
    return axis


def _grid_mask_mod(fy, fx, wg: int):
    """FlexAttention mask_mod of a row-major grid of width wg from per-axis rules."""
    def mask_mod(b, h, q_idx, kv_idx):
        return fy(q_idx // wg, kv_idx // wg) & fx(q_idx % wg, kv_idx % wg)
    return mask_mod


def _band_mask_mod(window: int, causal: bool):
    """FlexAttention mask_mod of the 1-D band (naive.sliding_window_attention, no dilation/sinks)."""
    half = window // 2

    def causal_band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    def band(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx <= half) & (q_idx - kv_idx <= half)
    return causal_band if causal else band


def _axis_pairs(fn, length: int) -> int:
    c = torch.arange(length)
    return int(fn(c[:, None], c[None, :]).sum())


def attention_case(group: str, p: dict, mods: dict, ref_knobs: dict) -> dict:
    """Everything one attention case needs: inputs, our call, the reference, the mask_mod
    for FlexAttention, SDPA's causality, the FLOP counts and where our path ran."""
    from rewriter.kernels.agent_attention import naive as agent_naive
    from rewriter.kernels.linear_attention import naive as linear_naive
    from rewriter.kernels.window_attention import naive as window_naive

    B, H, D = p["B"], p["H"], p["D"]
    Dv = p.get("Dv", D)
    c: dict = {"B": B, "H": H, "D": D, "Dv": Dv}
    if group == "sliding_window":
        N, W, causal = p["N"], p["window"], p["causal"]
        sw = mods["sliding"]
        c.update(N=N, shape=dict(B=B, H=H, N=N, D=D, window=W, causal=causal),
                 case=f"sliding window N={N} window={W} {'causal' if causal else 'bidirectional'} H={H} D={D}",
                 op=(sw.sliding_window_attention, lambda q, k, v: (q, k, v, None, W, causal, 1, 0, False, None)),
                 reference=lambda q, k, v: window_naive.sliding_window_attention(
                     q, k, v, window=W, causal=causal, **ref_knobs),
                 runs_here=lambda q, k, v: sw._runs_here(q, k, v, 1),
                 sdpa_causal=causal, pairs=_sliding_pairs(N, W, causal), knobs=ref_knobs)
        c["mask_mod"] = _band_mask_mod(W, causal)
    elif group in ("neighborhood", "swin"):
        (hg, wg) = p["grid"]
        N = hg * wg
        gt = mods["grid"]
        if group == "neighborhood":
            K = p["kernel"]
            fy, fx = _na_axis(hg, K), _na_axis(wg, K)
            c.update(shape=dict(B=B, H=H, grid=[hg, wg], D=D, kernel=K),
                     case=f"neighborhood {hg}x{wg} kernel={K} H={H} D={D}",
                     op=(gt.neighborhood_attention_2d,
                         lambda q, k, v: (q, k, v, None, [hg, wg], [K, K], [1, 1], 0, None)),
                     reference=lambda q, k, v: window_naive.neighborhood_attention_2d(
                         q, k, v, grid=(hg, wg), kernel_size=K, **ref_knobs))
        else:
            Wn, S = p["window"], p["shift"]
            fy, fx = _swin_axis(hg, Wn, S), _swin_axis(wg, Wn, S)
            c.update(shape=dict(B=B, H=H, grid=[hg, wg], D=D, window=Wn, shift=S),
                     case=f"swin {hg}x{wg} window={Wn} shift={S} H={H} D={D}",
                     op=(gt.window_attention_2d, lambda q, k, v: (q, k, v, None, [hg, wg], [Wn, Wn], [S, S], 0, None)),
                     reference=lambda q, k, v: window_naive.window_attention_2d(
                         q, k, v, grid=(hg, wg), window=(Wn, Wn), shift=(S, S), **ref_knobs))
        c.update(N=N, runs_here=lambda q, k, v: gt._runs_here(q, k, v), sdpa_causal=False, knobs=ref_knobs,
                 pairs=_axis_pairs(fy, hg) * _axis_pairs(fx, wg),
                 mask_mod=_grid_mask_mod(fy, fx, wg))
    elif group == "linear_attention":
        N, fm = p["N"], p["feature_map"]
        la = mods["linear"]
        c.update(N=N, shape=dict(B=B, H=H, N=N, D=D, Dv=Dv, feature_map=fm, causal=False),
                 case=f"linear attention N={N} {fm} H={H} D={D} Dv={Dv}",
                 op=(la.linear_attention, lambda q, k, v: (q, k, v, None, fm, False, "denominator", 3.0, 1e-6)),
                 reference=lambda q, k, v: linear_naive.linear_attention(q, k, v, feature_map=fm),
                 runs_here=lambda q, k, v: la._runs_here(q, k, v), sdpa_causal=False, mask_mod=None,
                 flops=4 * B * H * N * D * (Dv + 1))
    elif group == "agent_attention":
        (hg, wg), n = p["grid"], p["agents"]
        N = hg * wg
        ag = mods["agent"]
        a = max(1, round(math.sqrt(n)))
        n_real = min(a, hg) * min(a, wg)
        c.update(N=N, shape=dict(B=B, H=H, grid=[hg, wg], D=D, agents=n),
                 case=f"agent attention {hg}x{wg} agents={n} H={H} D={D}",
                 op=(ag.agent_attention, lambda q, k, v: (q, k, v, None, n, None, [hg, wg], 0)),
                 reference=lambda q, k, v: agent_naive.agent_attention(q, k, v, num_agents=n, grid=(hg, wg)),
                 runs_here=lambda q, k, v: ag._runs_here(q, k, v, ag.shape_of(q, k, v, None, n, None, [hg, wg], 0)),
                 sdpa_causal=False, mask_mod=None, flops=2 * B * H * N * n_real * (2 * D + 2 * Dv))
    else:
        raise ValueError(group)
    fn, op_args = c["op"]
    c["ours"] = lambda q, k, v, config=None: fn(*op_args(q, k, v), config=config)
    N = c["N"]
    sdpa_pairs = N * (N + 1) // 2 if c["sdpa_causal"] else N * N
    c["sdpa_flops"] = 2 * B * H * sdpa_pairs * (D + Dv)
    if "pairs" in c:
        c["flops"] = 2 * B * H * c["pairs"] * (D + Dv)
    return c


def _sdpa(run: Run, row: dict, q, k, v, causal: bool, flops: float):
    """Time full SDPA, on the flash backend where it takes the call (else the default)."""
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fn()
            row["sdpa_backend"] = "flash"
            run.measure(row, "sdpa", fn, flops=flops)
            return
    except Exception as exc:  # noqa: BLE001 - flash refused (or no sdpa_kernel): the default dispatch
        row["sdpa_backend"] = f"default (flash: {describe_error(exc)})"
        free_memory()
    run.measure(row, "sdpa", fn, flops=flops)


def _flex(run: Run, row: dict, c: dict, q, k, v, expected, flops: float):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t0 = time.perf_counter()
    block_mask = create_block_mask(c["mask_mod"], 1, 1, c["N"], c["N"], device=run.device)
    row["flex_block_mask_s"] = round(time.perf_counter() - t0, 3)
    try:
        sparsity = float(block_mask.sparsity())  # % of blocks skipped (odd below one block: not kept)
        if 0 <= sparsity <= 100:
            row["flex_block_sparsity_pct"] = rounded(sparsity, 4)
    except Exception:  # noqa: BLE001 - informational only
        pass
    if run.flex_compiled:
        flex = run.compiled(flex_attention)
        key = "flex"
    else:
        flex = flex_attention
        key = "flex_eager"
        row["skipped"]["flex"] = ("CPU smoke mode: compiled FlexAttention not run; eager (unfused) flex_attention "
                                  "checked the mask_mod and is timed as flex_eager")
    fn = lambda: flex(q, k, v, block_mask=block_mask)  # noqa: E731
    t0 = time.perf_counter()
    out = fn()  # compiles
    row["flex_first_call_s"] = round(time.perf_counter() - t0, 3)
    check(row, "flex", out, expected)
    del out
    run.measure(row, key, fn, flops=flops)


def bench_attention(run: Run, group: str, params: list[dict]) -> None:
    for p in params:
        c = attention_case(group, p, run.mods, run.ref_knobs)
        if not run.over_budget(c["case"]):
            _attention_row(run, group, c)  # a function: its tensors are freed on return
            free_memory()


def _attention_row(run: Run, group: str, c: dict) -> None:
    B, H, N, D, Dv = c["B"], c["H"], c["N"], c["D"], c["Dv"]
    run.log(f"  {c['case']}")
    row = new_row(group, c["case"], shape=c["shape"])
    if c.get("knobs"):
        row["reference_knobs"] = c["knobs"]
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device=run.device, dtype=DTYPE)
    k = torch.randn(B, H, N, D, device=run.device, dtype=DTYPE)
    v = torch.randn(B, H, N, Dv, device=run.device, dtype=DTYPE)
    flops, sdpa_flops = c["flops"], c["sdpa_flops"]
    row["flops"] = {"ours": flops, "sdpa": sdpa_flops}
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v)) + B * H * N * Dv * q.element_size()
    row["io_bytes"] = io_bytes
    row["kernel_path"] = run.attempt(row, "kernel_path", lambda: "triton" if c["runs_here"](q, k, v)
                                     else "reference fallback")
    expected = run.attempt(row, "reference_fp32", lambda: c["reference"](q.float(), k.float(), v.float()))
    t0 = time.perf_counter()
    out = run.attempt(row, "ours", lambda: c["ours"](q, k, v))  # the first call JIT-compiles the kernels
    row["ours_first_call_s"] = round(time.perf_counter() - t0, 3)
    if out is not None and expected is not None:
        check(row, "ours", out, expected)
    del out
    ours = lambda: c["ours"](q, k, v)  # noqa: E731
    run.measure(row, "ours", ours, traffic_bytes=io_bytes, flops=flops)
    run.tuned(row, c["op"][0].__name__, c["op"][1](q, k, v), lambda config: c["ours"](q, k, v, config), expected,
              traffic_bytes=io_bytes, flops=flops)
    if run.timer.graph:
        row["skipped"]["reference"] = "--cuda-graph: the eager references synchronise with the host (not capturable)"
    else:
        run.measure(row, "reference", lambda: c["reference"](q, k, v), flops=flops)
    _sdpa(run, row, q, k, v, c["sdpa_causal"], sdpa_flops)
    if c["mask_mod"] is None:
        row["skipped"]["flex"] = "no block mask: this op is not masked softmax attention"
    elif not run.flex:
        row["skipped"]["flex"] = "--no-flex"
    elif expected is None:
        row["skipped"]["flex"] = "no fp32 reference to check FlexAttention's output against"
    else:
        run.attempt(row, "flex", lambda: _flex(run, row, c, q, k, v, expected, flops))
    if run.compile:
        cref = run.attempt(row, "compiled_reference", lambda: run.compiled(c["reference"], row))
        out = None if cref is None else run.attempt(row, "compiled_reference", lambda: cref(q, k, v))
        if out is not None:
            if expected is not None:
                check(row, "compiled_reference", out, expected)
            out = None
            run.measure(row, "compiled_reference", lambda: cref(q, k, v), flops=flops)
        cref = None
        torch._dynamo.reset()
    else:
        row["skipped"]["compiled_reference"] = "--no-compile"
    ms = row["ms"]
    t_copy = None
    if group == "linear_attention":
        t_copy = run.copy_ms(io_bytes // 2, group)  # the copy moves io_bytes: the bound's time
        if t_copy:
            row["ms"]["memory_bound"] = rounded(t_copy)
            row["gbps"]["copy"] = rounded(io_bytes / t_copy / 1e6, 4)
    for prefix, key in (("", "ours"), ("tuned_", "ours_tuned")):
        t = ms.get(key)
        if t is None:
            continue
        row[prefix + "speedup_vs_sdpa"] = ratio(ms.get("sdpa"), t)
        row[prefix + "speedup_vs_flex"] = ratio(ms.get("flex"), t)
        row[prefix + "speedup_vs_compiled_reference"] = ratio(ms.get("compiled_reference"), t)
        row[prefix + "speedup_vs_reference"] = ratio(ms.get("reference"), t)
        if "pairs" in c:
            bound = sdpa_flops / flops
            row["flop_reduction_bound"] = rounded(bound, 4)
            row[prefix + "share_of_bound"] = ratio(row[prefix + "speedup_vs_sdpa"], bound)
        if group == "linear_attention":
            row[prefix + "fraction_of_memory_bound"] = ratio(t_copy, t)
    run.emit(finish(row))
