"""The one-page summary of a gpu_evidence.py run, and the issue's targets checked against its rows.

Targets (bf16, fwd+bwd, one run side by side): at the paper shape the Triton kernels are ≥ 4× naive, ≥ 2×
torch.compile(naive), faster than the blockwise torch engine, with extra memory ≤ 5 % of naive's; at N = 32,400
they reach ≥ 60 % of the measured bf16 matmul rate counting useful FLOPs. The rate they are held to is the
larger of the two measured next to them: the Gram-shaped GEMM at that shape and the square 8192³ GEMM.
"""

import statistics

from bench_trd import IMPLS

TRITON_IMPLS = [i for i, (backend, _) in IMPLS.items() if backend == "triton"]
IMPL_ORDER = list(IMPLS)


def _row(rows, shape, impl, pass_name="fwd+bwd", mode="full", inputs="correlated"):
    for r in rows:
        if (r.get("kind") == "trd" and r["shape"] == shape and r["impl"] == impl and r["pass"] == pass_name
                and r["mode"] == mode and r.get("inputs") == inputs):
            return r
    return None


def _timed(row) -> bool:
    return bool(row and row.get("ms"))


def _why_missing(row) -> str:
    if row is None:
        return "not in this run"
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    return "out of memory" if row.get("oom") else f"error: {row['error']}" if row.get("error") else "not timed"


def _matmul_rate(row):
    rates = [r for r in (row.get("matmul_tflops"), row.get("peak_matmul_tflops")) if r]
    return max(rates) if rates else None


def targets(results: dict) -> list[dict]:
    """One entry per (target, Triton implementation): {target, impl, value, met} (met None: not measured)."""
    rows, roles = results.get("rows", []), results["plan"]["roles"]
    impls = [i for i in TRITON_IMPLS if any(r.get("impl") == i for r in rows)]
    checks = []
    if not impls:
        for name in ("paper: ≥ 4× naive", "paper: ≥ 2× compiled", "paper: faster than torch",
                     "paper: extra memory ≤ 5 % of naive's", "N = 32,400: ≥ 60 % of the bf16 matmul rate"):
            checks.append(dict(target=name, impl="-", value="not measured: no Triton rows in this run", met=None))
        return checks
    for impl in impls:
        mine = _row(rows, roles["paper"], impl)
        for other, factor, name in (("naive", 4.0, "paper: ≥ 4× naive"),
                                    ("compiled", 2.0, "paper: ≥ 2× compiled"),
                                    ("torch", 1.0, "paper: faster than torch")):
            theirs = _row(rows, roles["paper"], other)
            if _timed(mine) and _timed(theirs):
                ratio = theirs["ms"] / mine["ms"]
                met = ratio >= factor if factor > 1 else ratio > 1
                checks.append(dict(target=name, impl=impl, value=f"{ratio:.2f}×", met=met))
            else:
                missing = mine if not _timed(mine) else theirs
                checks.append(dict(target=name, impl=impl, value=_why_missing(missing), met=None))
        naive = _row(rows, roles["paper"], "naive")
        if mine and naive and mine.get("peak_mib") is not None and naive.get("peak_mib"):
            share = mine["peak_mib"] / naive["peak_mib"]
            checks.append(dict(target="paper: extra memory ≤ 5 % of naive's", impl=impl,
                               value=f"{100 * share:.1f} % ({mine['peak_mib']:.0f} / {naive['peak_mib']:.0f} MiB)",
                               met=share <= 0.05))
        else:
            checks.append(dict(target="paper: extra memory ≤ 5 % of naive's", impl=impl,
                               value=_why_missing(naive if mine and mine.get("peak_mib") is not None else mine),
                               met=None))
        big = _row(rows, roles["full_res"], impl)
        rate = _matmul_rate(big) if _timed(big) else None
        if rate:
            share = big["tflops"] / rate
            checks.append(dict(target="N = 32,400: ≥ 60 % of the bf16 matmul rate", impl=impl,
                               value=f"{100 * share:.0f} % ({big['tflops']:.0f} of {rate:.0f} TFLOP/s)",
                               met=share >= 0.6))
        else:
            checks.append(dict(target="N = 32,400: ≥ 60 % of the bf16 matmul rate", impl=impl,
                               value=_why_missing(big), met=None))
    return checks


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def _ratio(a, b):
    return f"{a['ms'] / b['ms']:.2f}×" if _timed(a) and _timed(b) else "–"


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return out


def _headline(rows, shape, pass_name):
    naive, compiled, torch_row = (_row(rows, shape, i, pass_name) for i in ("naive", "compiled", "torch"))
    lines = []
    for impl in IMPL_ORDER:
        r = _row(rows, shape, impl, pass_name)
        if r is None:
            continue
        if not _timed(r):
            lines.append([impl, _why_missing(r)] + [""] * 8)
            continue
        memory = (f"{100 * r['peak_mib'] / naive['peak_mib']:.1f} %" if r.get("peak_mib") is not None and naive
                  and naive.get("peak_mib") else "–")
        lines.append([impl, _fmt(r["ms"]), _fmt(r.get("kernel_ms")), _fmt(r.get("peak_mib")), _ratio(naive, r),
                      _ratio(compiled, r), _ratio(torch_row, r), memory, _fmt(r.get("active_share"), 2),
                      _fmt(r.get("sm_clock_mhz"), 4)])
    return _table(["impl", "ms", "kernel ms", "extra MiB", "× naive", "× compiled", "× torch", "memory vs naive",
                   "active", "SM MHz"], lines)


def _rate_table(rows, shape):
    lines = []
    for impl in IMPL_ORDER:
        r = _row(rows, shape, impl)
        if r is None:
            continue
        if not _timed(r):
            lines.append([impl, _why_missing(r), "", "", "", ""])
            continue
        rate = _matmul_rate(r)
        pct = (lambda x: f"{100 * x / rate:.0f} %" if x and rate else "–")
        lines.append([impl, _fmt(r["ms"]), _fmt(r.get("kernel_ms")), _fmt(r.get("tflops")), pct(r.get("tflops")),
                      pct(r.get("kernel_tflops"))])
    return _table(["impl", "ms", "kernel ms", "useful TFLOP/s", "% of matmul (end to end)", "% of matmul (kernels)"],
                  lines)


def _sensitivity(rows, shape):
    lines = []
    for impl in IMPL_ORDER:
        real, randn = _row(rows, shape, impl), _row(rows, shape, impl, inputs="randn")
        if not (_timed(real) and _timed(randn)):
            continue
        lines.append([impl, f"{_fmt(real['ms'])} / {_fmt(randn['ms'])}", _ratio(real, randn),
                      f"{100 * real['active_share']:.1f} / {100 * randn['active_share']:.1f} %",
                      f"{_fmt(real.get('sm_clock_mhz'), 4)} / {_fmt(randn.get('sm_clock_mhz'), 4)}",
                      f"{_fmt(real.get('power_w'), 3)} / {_fmt(randn.get('power_w'), 3)}"])
    return _table(["impl", "ms correlated / randn", "randn speed-up", "active", "SM MHz", "power W"], lines)


def _modes(rows, shape):
    lines = []
    for mode in ("spatial", "temporal"):
        for impl in IMPL_ORDER:
            r = _row(rows, shape, impl, mode=mode)
            if r is not None:
                lines.append([mode, impl, _fmt(r.get("ms")) if _timed(r) else _why_missing(r),
                              _fmt(r.get("peak_mib"))])
    return _table(["mode", "impl", "ms", "extra MiB"], lines)


def _sweep(rows):
    sweep_rows = [r for r in rows if r.get("kind") == "trd" and r["shape"].startswith("sweep-")]
    sizes = sorted({r["N"] for r in sweep_rows})
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sweep_rows)]
    lines = []
    for n in sizes:
        cells = []
        for impl in impls:
            r = next((r for r in sweep_rows if r["N"] == n and r["impl"] == impl), None)
            cells.append(_fmt(r["ms"]) if _timed(r) else "skipped" if r and r.get("skipped") else "–")
        lines.append([n] + cells)
    return _table(["N"] + [f"{i} ms" for i in impls], lines)


def _telemetry(rows):
    timed = [r for r in rows if r.get("telemetry_samples")]
    if not timed:
        return "none (no NVML or nvidia-smi on this machine)"
    clocks = [r["sm_clock_mhz"] for r in timed]
    return (f"SM clock {min(r['sm_clock_min_mhz'] for r in timed):.0f}–{max(clocks):.0f} MHz "
            f"(median of rows {statistics.median(clocks):.0f}), "
            f"temperature ≤ {max(r['temp_c'] for r in timed):.0f} °C, "
            f"power ≤ {max(r['power_max_w'] for r in timed):.0f} W")


def _references(rows):
    peaks = {r["dtype"]: r["tflops"] for r in rows if r.get("what") == "gemm-peak"}
    copies = [r["GBps"] for r in rows if r.get("what") == "copy"]
    if not peaks:
        return "none measured"
    gemm = ", ".join(f"{d} {v:.1f}" for d, v in peaks.items())
    copy = f"{min(copies):.0f}–{max(copies):.0f} GB/s" if copies else "–"
    return f"square GEMM {gemm} TFLOP/s; device copy {copy} (read + write, measured next to each shape)"


def _profile(profile: dict, rows) -> list[str]:
    """kernel_profile.py's rows: device ms and executed rate per kernel and variant, against the square bf16 GEMM."""
    peak = next((r["tflops"] for r in rows if r.get("what") == "gemm-peak" and r.get("dtype") == "bf16"), None)
    lines = []
    for r in profile["kernels"]:
        rate = r.get("tflops")
        lines.append(["B{} N{} D{}".format(*r["shape"]), r["variant"], r["kernel"], _fmt(r["ms"]), _fmt(rate),
                      f"{100 * rate / peak:.0f} %" if rate and peak else "–"])
    out = _table(["shape", "variant", "kernel", "device ms", "executed TFLOP/s", "of the square bf16 GEMM"], lines)
    replays = profile.get("graph_replay_ms", {})
    if replays:
        out += ["", "Paper shape fwd+bwd replayed as a CUDA graph: "
                + ", ".join(f"{impl} {_fmt(ms)} ms" for impl, ms in replays.items())
                + "; host time per call in log.txt (host_overhead.py)."]
    return out


def _step_time(step: dict) -> str:
    if step.get("ms"):
        return _fmt(step["ms"], 4)
    if step.get("error"):
        return f"error: {step['error'][:120]}"
    return step.get("skipped", "out of memory" if step.get("oom") else "–")


def summarize(results: dict) -> str:
    env, rows, roles = results["environment"], results.get("rows", []), results["plan"]["roles"]
    dtype = results["plan"]["dtype"]
    trd = [r for r in rows if r.get("kind") == "trd"]
    shares = [r["active_share"] for r in trd if r.get("inputs") == "correlated" and r.get("active_share") is not None]
    target = next((r["active_share_target"] for r in trd if r.get("inputs") == "correlated"), None)
    out = [f"# TRD loss evidence — {env['device']} — {env['date']}", "",
           f"commit `{env['commit'] or 'unknown'}` · torch {env['torch']} · triton {env['triton']} · started "
           f"{results['started']} · {results['seconds']:.0f} s in all"
           + (" · quick mode" if results["quick"] else ""),
           "",
           f"- Inputs: student correlated with the teacher for {100 * target:.0f} % active pairs (|Δ| > margin; "
           f"measured {100 * min(shares):.1f}–{100 * max(shares):.1f} % across rows)" if shares else
           "- Inputs: no correlated rows", f"- References: {_references(rows)}", f"- Telemetry: {_telemetry(rows)}",
           "", "## Parts", ""]
    lines = []
    for name, part in results["parts"].items():
        outcome = ""
        if name == "tests" and results.get("tests"):
            t = results["tests"]
            outcome = (f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped"
                       + (f" of {t['selected']} selected" if t.get("selected") is not None else "")
                       + (f" (-k {t['filter']!r})" if t.get("filter") else ""))
        elif name == "bench":
            measured = sum(1 for r in trd if _timed(r))
            skipped = sum(1 for r in trd if r.get("skipped"))
            oom, errors = sum(1 for r in trd if r.get("oom")), sum(1 for r in trd if r.get("error"))
            outcome = f"{measured} rows timed, {skipped} skipped, {oom} out of memory, {errors} errors"
        elif name == "train":
            steps = results.get("train_rows", [])
            outcome = f"{sum(1 for r in steps if r.get('ms'))} of {len(steps)} measurements timed"
        elif name == "profile" and results.get("profile"):
            outcome = f"{len(results['profile']['kernels'])} kernel rows"
        lines.append([name, _fmt(part["budget_s"], 4), _fmt(part.get("seconds"), 4), part["status"], outcome])
    out += _table(["part", "budget s", "used s", "status", "outcome"], lines)
    failing = (results.get("tests") or {}).get("failing", [])
    if failing:
        out += ["", "Failing tests: " + ", ".join(f"`{t}`" for t in failing[:10])
                + (f" and {len(failing) - 10} more" if len(failing) > 10 else "")]
    errors = sorted({f"{r['impl']}: {r['error']}" for r in trd if r.get("error")})
    if errors:
        out += ["", "Benchmark errors (tracebacks in log.txt): " + "; ".join(f"`{e[:200]}`" for e in errors[:5])
                + (f" and {len(errors) - 5} more" if len(errors) > 5 else "")]
    out += ["", "## Targets (bf16, fwd+bwd)" if dtype == "bf16" else f"## Targets (this run: {dtype})", ""]
    out += _table(["target", "impl", "measured", "met"],
                  [[c["target"], c["impl"], c["value"], {True: "yes", False: "**no**", None: "–"}[c["met"]]]
                   for c in results["targets"]])
    for pass_name in ("fwd+bwd", "fwd"):
        out += ["", f"## Paper shape ({roles['paper']}), {dtype}, full, {pass_name}", ""]
        out += _headline(rows, roles["paper"], pass_name)
    out += ["", f"## Full grid ({roles['full_res']}), {dtype}, fwd+bwd: share of the matmul rate", ""]
    out += _rate_table(rows, roles["full_res"])
    out += ["", f"## Student width 1920 ({roles['wide']}), {dtype}, fwd+bwd", ""]
    out += _headline(rows, roles["wide"], "fwd+bwd")
    out += ["", "## Input sensitivity: paper shape, correlated vs independent randn inputs", ""]
    out += _sensitivity(rows, roles["paper"])
    out += ["", "## Paper shape, other modes (fwd+bwd)", ""] + _modes(rows, roles["paper"])
    out += ["", "## Sweep, B = 1, fwd+bwd (plot.png)", ""] + _sweep(rows)
    if results.get("profile"):
        out += ["", "## Per kernel: two-pass fwd+bwd, bf16, student gradient (profile part)", ""]
        out += _profile(results["profile"], rows)
    steps = results.get("train_rows", [])
    if steps:
        out += ["", f"## Training step ({steps[0]['model']}, B = {steps[0]['B']})", ""]
        out += _table(["relation grid", "N", "TRD backend", "ms", "peak MiB", "TRD loss"],
                      [[s["relation_grid"], s["N"], s["trd_backend"], _step_time(s), _fmt(s.get("peak_mib"), 5),
                        _fmt(s.get("loss_trd"), 4)] for s in steps])
    out += ["", "Every row, reference and test outcome: results.json; output of every part: log.txt.", ""]
    return "\n".join(out)
