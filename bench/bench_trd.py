"""TRD loss microbenchmarks: fused Triton kernels vs blockwise PyTorch vs naive PyTorch vs torch.compile(naive).

    python bench/bench_trd.py --device cuda --json bench/results/h100-2026-01-01.json --plot bench/results/h100.png
    python bench/bench_trd.py --device cpu --quick

Every configuration is first checked against a float64 computation; then each implementation is timed (GPU:
triton.testing.do_bench medians over rotating input sets; CPU: wall-clock medians) and its peak memory beyond
the inputs measured. One JSON row per measurement; the table is printed last.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from videorepa.kernels import count_pairs, trd_loss  # noqa: E402
from videorepa.memory import PeakMemory  # noqa: E402

# impl -> (trd_loss backend, schedule)
IMPLS = {"two-pass": ("triton", "two-pass"), "fused": ("triton", "fused"), "torch": ("torch", "auto"),
         "naive": ("naive", "auto"), "compiled": ("naive", "auto")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    student_dim: int
    teacher_dim: int
    tokens_per_frame: int


# The paper's grid: 24 frames × 10×15 tokens; CogVideoX-2B's full grid at 49×480×720: 24 × 30×45 tokens.
PAPER = Shape("paper", 4, 3600, 768, 768, 150)
FULL_RES = Shape("full-res", 1, 32400, 768, 768, 1350)
WIDE = Shape("student-1920", 4, 3600, 1920, 768, 150)


def sweep(sizes, dim=768):
    # Frames of 1024 tokens (a quarter of the clip when shorter): spatial mode's O(N·T·D) cost shows against full.
    return [Shape(f"sweep-{n}" if dim == 768 else f"sweep-{n}-d{dim}", 1, n, dim, dim, min(1024, max(1, n // 4)))
            for n in sizes]


def default_shapes(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [PAPER] + sweep([1024, 4096])
        return [PAPER, FULL_RES, WIDE] + sweep([1024, 2048, 4096, 8192, 16384, 32768, 65536])
    if quick:
        return sweep([512, 1024], dim=64)
    return [Shape("paper-b1", 1, 3600, 768, 768, 150)] + sweep([1024, 2048, 4096, 6144])


def flops(shape: Shape, mode: str, backward: bool) -> float:
    """Useful work: 2·pairs·(Ds + Dt) for the two Grams, plus 2·pairs·Ds for the student gradient."""
    pairs = shape.batch * count_pairs(shape.tokens, shape.tokens_per_frame, mode)
    return 2.0 * pairs * (shape.student_dim + shape.teacher_dim + (shape.student_dim if backward else 0))


def make_inputs(shape: Shape, dtype, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(shape.batch, shape.tokens, shape.student_dim, generator=gen, device=device, dtype=dtype)
    t = torch.randn(shape.batch, shape.tokens, shape.teacher_dim, generator=gen, device=device, dtype=dtype)
    return s.requires_grad_(), t


def make_step(impl: str, mode: str, shape: Shape, backward: bool):
    """The timed callable: one loss (and its student gradient) on given inputs."""
    frame = None if mode == "full" else shape.tokens_per_frame

    def loss_fn(s, t):
        backend, schedule = IMPLS[impl]
        return trd_loss(s, t, 0.1, mode, frame, backend=backend, schedule=schedule)

    if impl == "compiled":
        torch._dynamo.reset()  # a fresh compile per measurement, clear of the recompile limit
        loss_fn = torch.compile(loss_fn, dynamic=False)

    def step(s, t):
        if not backward:  # the loss alone (validation, logging): no gradient work in any implementation
            with torch.no_grad():
                return loss_fn(s, t)
        loss = loss_fn(s, t)
        loss.backward()
        return loss

    return step


def float64_reference(s, t, mode, shape):
    """Loss and student gradient from the blockwise engine in float64: the yardstick every implementation meets."""
    frame = None if mode == "full" else shape.tokens_per_frame
    s64 = s.detach().double().requires_grad_()
    loss = trd_loss(s64, t.double(), 0.1, mode, frame, backend="torch")
    loss.backward()
    return loss.item(), s64.grad


def relative_error(step, s, t, reference, backward) -> float:
    """Largest relative error of the loss and (with backward) the student gradient."""
    ref_loss, ref_grad = reference
    s.grad = None
    loss = step(s, t)
    errors = [abs(loss.item() - ref_loss) / max(abs(ref_loss), 1e-12)]
    if backward:
        errors.append(((s.grad.double() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)).item())
    s.grad = None
    return max(errors)


def time_ms(step, input_sets, device, backward, repeats):
    """(median, p20, p80) milliseconds, cycling through the input sets so no call reuses the last one's caches."""
    calls = iter(range(10**9))

    def run():
        s, t = input_sets[next(calls) % len(input_sets)]
        step(s, t)
        s.grad = None

    run()  # warm-up outside the timing: autotuning, compilation, the allocator's first blocks
    if device == "cuda":
        import triton

        return tuple(triton.testing.do_bench(run, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    return wall_clock_ms(run, repeats)


def wall_clock_ms(fn, repeats: int):
    """(median, p20, p80) wall-clock milliseconds of `repeats` calls (fn must synchronise its device itself)."""
    times = [_wall_ms(fn) for _ in range(repeats)]
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def peak_mib(step, s, t, device, impl):
    if device == "cpu" and impl == "compiled":
        return None  # inductor's CPU code allocates outside the dispatcher that PeakMemory counts on CPU
    step(s, t)  # warm: autotuning and compilation buffers are not the loss's memory
    s.grad = None
    with PeakMemory(device) as mem:
        step(s, t)
    s.grad = None
    return round(mem.peak_mib, 2)


def matmul_tflops(device: str, dtype) -> float:
    """The chip's measured dense matmul rate for `dtype`: the yardstick for the fused kernels."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device == "cuda":
        import triton

        ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200)
    else:
        a @ b
        ms = min(_wall_ms(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / ms / 1e9


def _wall_ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "date": datetime.date.today().isoformat()}


def is_oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_benchmarks(args) -> list[dict]:
    device = args.device
    env = environment(device)
    rows = []
    rates = {}
    for dtype_name in args.dtypes:
        rates[dtype_name] = matmul_tflops(device, DTYPES[dtype_name])
        print(f"measured {dtype_name} matmul rate: {rates[dtype_name]:.1f} TFLOP/s", flush=True)
    for shape in args.shapes:
        for mode in args.modes:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                try:
                    input_sets = [make_inputs(shape, dtype, device, seed) for seed in range(args.input_sets)]
                except Exception as err:  # noqa: BLE001  an input set that does not fit is recorded, not fatal
                    if not is_oom(err):
                        raise
                    rows.append(dict(impl="inputs", shape=shape.name, mode=mode, dtype=dtype_name, oom=True, **env))
                    continue
                check = shape.tokens <= args.check_max_tokens
                reference = float64_reference(*input_sets[0], mode, shape) if check else None
                for impl in args.impls:
                    for pass_name in args.passes:
                        backward = pass_name == "fwd+bwd"
                        row = dict(impl=impl, **{"pass": pass_name}, mode=mode, shape=shape.name, B=shape.batch,
                                   N=shape.tokens, Ds=shape.student_dim, Dt=shape.teacher_dim,
                                   tokens_per_frame=shape.tokens_per_frame, dtype=dtype_name, **env)
                        step = make_step(impl, mode, shape, backward)
                        try:
                            if check:
                                row["max_rel_err"] = relative_error(step, *input_sets[0], reference, backward)
                            ms, p20, p80 = time_ms(step, input_sets, device, backward, args.repeats)
                            row.update(ms=ms, ms_p20=p20, ms_p80=p80, peak_mib=peak_mib(step, *input_sets[0], device, impl))
                        except Exception as err:  # noqa: BLE001
                            if not is_oom(err):
                                raise
                            row.update(oom=True, ms=None, peak_mib=None)
                            if device == "cuda":
                                torch.cuda.empty_cache()
                        if row.get("ms"):
                            row["tflops"] = flops(shape, mode, backward) / row["ms"] / 1e9
                            row["matmul_tflops"] = rates[dtype_name]
                            row["frac_of_matmul"] = row["tflops"] / rates[dtype_name]
                        rows.append(row)
                        print(format_row(row), flush=True)
                del input_sets, reference
    return rows


COLUMNS = ["shape", "mode", "dtype", "pass", "impl", "ms", "peak_mib", "tflops", "frac_of_matmul", "max_rel_err"]


def format_row(row: dict) -> str:
    def cell(key):
        value = row.get(key)
        if key == "ms" and row.get("oom"):
            return "OOM"
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if key in ("max_rel_err",) else f"{value:.2f}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    return "  ".join(f"{cell(k):>14}" for k in COLUMNS)


def print_table(rows):
    print("\n" + "  ".join(f"{k:>14}" for k in COLUMNS))
    for row in rows:
        if row["impl"] != "inputs":
            print(format_row(row))


def plot(rows, path):
    """Time and extra memory against N for the B = 1 sweep (fwd+bwd), log-log: one colour per implementation and
    dtype, one line style per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_rows = [r for r in rows if r["shape"].startswith("sweep-") and r.get("ms") and r["pass"] == "fwd+bwd"]
    styles = {"full": "-", "spatial": ":", "temporal": "--"}
    series = sorted({(r["impl"], r["dtype"]) for r in sweep_rows})
    colors = {key: f"C{i}" for i, key in enumerate(series)}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (impl, dtype), color in colors.items():
        for mode, style in styles.items():
            pts = sorted((r["N"], r["ms"], r["peak_mib"]) for r in sweep_rows
                         if (r["impl"], r["dtype"], r["mode"]) == (impl, dtype, mode))
            if not pts:
                continue
            label = f"{impl} {dtype} {mode}"
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker="o", label=label)
            mem = [p for p in pts if p[2]]
            ax_m.plot([p[0] for p in mem], [p[2] for p in mem], style, color=color, marker="o", label=label)
    device = rows[0]["device"] if rows else ""
    for ax, title, unit in ((ax_t, "time", "ms (median)"), (ax_m, "extra memory", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N (B = 1)")
        ax.set_ylabel(unit)
        ax.set_title(f"TRD loss fwd+bwd {title} — {device}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few small shapes: a smoke run in a minute")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), help="default: all (the fused ones only on cuda)")
    p.add_argument("--modes", nargs="+", choices=["full", "spatial", "temporal"], default=["full", "spatial", "temporal"])
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 and fp32 on cuda, fp32 on cpu")
    p.add_argument("--shapes", nargs="+", metavar="NAME",
                   help="only these default shapes (paper, full-res, student-1920, paper-b1, sweep-N), e.g. to run a "
                        "long benchmark in pieces and merge them with --from-json")
    p.add_argument("--sweep", nargs="+", type=int, metavar="N",
                   help="token counts for a B=1 sweep (replaces the default shapes; adds to --shapes)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement on cpu (cuda uses do_bench)")
    p.add_argument("--input-sets", type=int, default=2, help="input sets rotated between timed calls")
    p.add_argument("--check-max-tokens", type=int, default=10**9,
                   help="check against float64 only up to this N (default: every shape; the blockwise float64 "
                        "check costs O(N²·D) time and O(N·D) memory)")
    p.add_argument("--json", metavar="PATH", help="write the rows here (a list of objects)")
    p.add_argument("--plot", metavar="PATH", help="write a time/memory vs N plot (PNG) here")
    p.add_argument("--from-json", nargs="+", metavar="PATH",
                   help="measure nothing: reprint and replot the rows of earlier runs, merged (--json writes them)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.impls = args.impls or [i for i in IMPLS if args.device == "cuda" or IMPLS[i][0] != "triton"]
    args.dtypes = args.dtypes or (["bf16", "fp32"] if args.device == "cuda" else ["fp32"])
    args.shapes = select_shapes(args, p)
    return args


def select_shapes(args, parser) -> list[Shape]:
    if not (args.shapes or args.sweep):
        return default_shapes(args.device, args.quick)
    known = {s.name: s for quick in (False, True) for s in default_shapes(args.device, quick)}
    unknown = [name for name in args.shapes or [] if name not in known]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; the {args.device} shapes are {sorted(known)}")
    return [known[name] for name in args.shapes or []] + (sweep(args.sweep) if args.sweep else [])


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        rows = []
        for path in args.from_json:
            with open(path) as f:
                rows += json.load(f)
    else:
        rows = run_benchmarks(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
