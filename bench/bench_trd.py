"""TRD loss microbenchmarks: Triton kernels (two-pass and fused schedules) vs blockwise PyTorch vs naive PyTorch vs
torch.compile(naive).

    python bench/bench_trd.py --device cuda --json bench/results/h100-2026-01-01.json --plot bench/results/h100.png
    python bench/bench_trd.py --device cpu --quick

Inputs: the student is correlated with the teacher so that --active-share of the pairs are active (|Δ| > margin),
as in training; `--active-share randn` gives independent randn tokens (~5 % active at D = 768). Every
configuration is first checked against a float64 computation; then each implementation is timed end to end (CUDA
events after an L2 flush, or wall clock on CPU; at least --min-samples samples, more to fill --sample-ms) and in
its kernels alone (torch.profiler), and its peak memory beyond the inputs is measured. Next to each shape the
harness measures the chip's copy bandwidth and matmul rate in every dtype; each row carries the SM clock,
temperature and power sampled while it was timed. Rows that would not fit in memory or take too long are
recorded as skipped, with the estimate. One JSON row per measurement, rewritten after each row; the table is
printed last.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from correlated_inputs import DEFAULT_ACTIVE_SHARE, active_share, calibrate_mixing, correlated_pair  # noqa: E402
from measure import copy_gbps, gemm_tflops, kernel_time, synchronize, time_samples  # noqa: E402
from telemetry import Telemetry, gpu_reader  # noqa: E402
from videorepa.files import atomic_path  # noqa: E402
from videorepa.kernels import count_pairs, trd_loss  # noqa: E402
from videorepa.memory import PeakMemory  # noqa: E402

# impl -> (trd_loss backend, triton schedule)
IMPLS = {"two-pass": ("triton", "two-pass"), "fused": ("triton", "fused"), "torch": ("torch", None),
         "naive": ("naive", None), "compiled": ("naive", None)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MARGIN = 0.1


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
SWEEP_TOKENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def sweep(sizes, dim=768):
    # Frames of 1024 tokens (a quarter of the clip when shorter): spatial mode's O(N·T·D) cost shows against full.
    return [Shape(f"sweep-{n}" if dim == 768 else f"sweep-{n}-d{dim}", 1, n, dim, dim, min(1024, max(1, n // 4)))
            for n in sizes]


def default_shapes(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [PAPER] + sweep([1024, 4096])
        return [PAPER, FULL_RES, WIDE] + sweep(SWEEP_TOKENS)
    if quick:
        return sweep([512, 1024], dim=128)
    return [Shape("paper-b1", 1, 3600, 768, 768, 150)] + sweep([1024, 2048, 4096, 6144])


@dataclass
class Group:
    """Every combination of these shapes, modes, dtypes, implementations and passes, on one kind of input."""

    shapes: list
    modes: list
    dtypes: list
    impls: list
    passes: list
    active_share: Optional[float] = DEFAULT_ACTIVE_SHARE  # None: independent randn


def write_json(path: str, data):
    """Write `data` to `path` whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)


@dataclass
class Options:
    device: str
    min_samples: int
    sample_ms: float
    input_sets: int = 2
    check_max_tokens: int = 10**9
    profile_calls: int = 3
    memory_limit_gib: Optional[float] = None  # default: the device's free memory (CUDA), no limit (CPU)
    max_row_s: float = 60.0
    deadline: Optional[float] = None  # time.monotonic() after which measurements are skipped
    json_path: Optional[str] = None
    rows: list = field(default_factory=list)

    def add(self, row: dict):
        """Keep `row` and rewrite the JSON file, so a run cut short still leaves every finished row."""
        self.rows.append(row)
        if self.json_path:
            write_json(self.json_path, self.rows)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def flops(shape: Shape, mode: str, backward: bool) -> float:
    """Useful work: 2·pairs·(Ds + Dt) for the two Grams, plus 2·pairs·Ds for the student gradient."""
    pairs = shape.batch * count_pairs(shape.tokens, shape.tokens_per_frame, mode)
    return 2.0 * pairs * (shape.student_dim + shape.teacher_dim + (shape.student_dim if backward else 0))


def make_inputs(shape: Shape, dtype, device, seed: int, share: Optional[float]):
    """(student requiring grad, teacher) in `dtype`: correlated to give `share` active pairs, or independent randn."""
    if share is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        s = torch.randn(shape.batch, shape.tokens, shape.student_dim, generator=gen, device=device)
        t = torch.randn(shape.batch, shape.tokens, shape.teacher_dim, generator=gen, device=device)
    else:
        mixing = calibrate_mixing(share, shape.student_dim, shape.teacher_dim, device, MARGIN)
        s, t = correlated_pair(shape.batch, shape.tokens, shape.student_dim, shape.teacher_dim, mixing, device, seed)
    return s.to(dtype).requires_grad_(), t.to(dtype)


def loss_kwargs(impl: str) -> dict:
    backend, schedule = IMPLS[impl]
    return {"backend": backend} if schedule is None else {"backend": backend, "schedule": schedule}


def make_step(impl: str, mode: str, shape: Shape, backward: bool):
    """The timed callable: one loss (and its student gradient) on given inputs."""
    frame = None if mode == "full" else shape.tokens_per_frame
    kwargs = loss_kwargs(impl)

    def loss_fn(s, t):
        return trd_loss(s, t, MARGIN, mode, frame, **kwargs)

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
    loss = trd_loss(s64, t.double(), MARGIN, mode, frame, backend="torch")
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


def estimated_extra_bytes(impl: str, shape: Shape, dtype, backward: bool) -> Optional[int]:
    """Peak memory beyond the inputs of the implementations that hold N×N matrices, from the CPU measurement of
    naive (bench/NOTES.md): per pair ~(4·itemsize + 0.5) bytes for fwd+bwd and (1.25·itemsize + 4) for the loss
    alone. Bounded above by (4·itemsize + 4) and (2·itemsize + 4), plus a quarter for the allocator. None for
    the O(N·D) implementations."""
    if IMPLS[impl][0] != "naive":
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_pair = (4 if backward else 2) * itemsize + 4
    return int(1.25 * shape.batch * shape.tokens**2 * per_pair)


def skip_reason(impl: str, shape: Shape, dtype, backward: bool, options: Options, free_bytes: Optional[int],
                copy_rate_gbps: Optional[float]) -> Optional[str]:
    """Why this measurement is not attempted, decided up front from estimates; None to measure it."""
    if options.out_of_time():
        return "time budget reached"
    extra = estimated_extra_bytes(impl, shape, dtype, backward)
    if extra is None:
        return None
    limit = options.memory_limit_gib * 2**30 if options.memory_limit_gib is not None else free_bytes
    if limit is not None and extra > limit:
        return f"needs ~{extra / 2**30:.1f} GiB (estimated from its N×N buffers), {limit / 2**30:.1f} GiB available"
    if copy_rate_gbps:
        # Each N×N buffer is written once and read about twice: a lower bound on one call's time.
        call_s = 3 * extra / (copy_rate_gbps * 1e9)
        calls = options.min_samples + options.profile_calls + 4
        if calls * call_s > options.max_row_s:
            return (f"~{call_s:.1f} s per call (its N×N buffers at the measured copy bandwidth) × {calls} calls "
                    f"> {options.max_row_s:.0f} s per row")
    return None


def launch_configs(impl: str, s, t, mode: str, frame, backward: bool) -> dict:
    """The tile configurations the kernels' rule picks for this call (the same in every process)."""
    from videorepa.kernels import triton_fused, triton_two_pass
    from videorepa.kernels.validation import validate

    problem = validate(s, t, MARGIN, mode, frame)
    if impl == "fused" and backward:
        return {"fused": triton_fused.select_config(problem).launch_kwargs()}
    pass1, pass2, group = triton_two_pass.select_configs(problem, backward, False)  # the loss alone: pass 1
    return {"pass1": {**pass1.launch_kwargs(), "GROUP": group}, **({"pass2": pass2.launch_kwargs()} if backward else {})}


def environment(device: str) -> dict:
    """Device, versions, commit (VIDEOREPA_COMMIT where set, for a copy of the tree without .git) and UTC date."""
    commit = os.environ.get("VIDEOREPA_COMMIT")
    if not commit:
        try:
            # "-dirty" when tracked files differ from the commit: the figures are then not that commit's
            commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                                    text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"device": props.name, "sms": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda, **env}
    return {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", **env}


def cuda_available_bytes() -> int:
    """Free device memory plus what PyTorch's allocator holds cached but unused."""
    return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def is_oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def reference_rows(shape: Optional[Shape], options: Options, reader, env: dict) -> list[dict]:
    """The chip's yardsticks, measured now. With a shape: copy bandwidth, and the matmul rate in every dtype for a
    Gram-shaped product (B·N × Ds) @ (Ds × min(N, 8192)), the kernels' own proportions. Without: the matmul rate
    of the square 8192³ (CUDA) or 1024³ (CPU) product, the usual peak figure."""
    device, cuda = options.device, options.device == "cuda"
    target_ms = min(options.sample_ms, 100.0)  # steady kernels: a tenth of a second of samples each
    rows = []
    with Telemetry(reader) as tm:
        if shape is not None:
            nbytes = 2**30 if cuda else 2**26
            rows.append(dict(kind="reference", what="copy", shape=shape.name, bytes=nbytes,
                             GBps=copy_gbps(device, nbytes, options.min_samples, target_ms)))
        for dtype_name, dtype in DTYPES.items():
            if shape is None:
                m = k = n = 8192 if cuda else 1024
            else:
                m, k, n = shape.batch * shape.tokens, shape.student_dim, min(shape.tokens, 8192)
            rows.append(dict(kind="reference", what="gemm" if shape else "gemm-peak", dtype=dtype_name,
                             shape=shape.name if shape else None, m=m, k=k, n=n,
                             tflops=gemm_tflops(device, dtype, m, k, n, options.min_samples, target_ms)))
    for row in rows:
        row.update(tm.summary(), **env)
    return rows


def measure_row(row: dict, impl: str, mode: str, shape: Shape, backward: bool, input_sets, reference,
                options: Options, reader):
    """Fill `row` with one implementation's error, times, memory and telemetry on these inputs."""
    device = options.device
    step = make_step(impl, mode, shape, backward)
    calls = iter(range(10**9))

    def run():
        s, t = input_sets[next(calls) % len(input_sets)]  # rotate: no call reuses the last one's inputs
        step(s, t)
        s.grad = None

    if reference is not None:
        row["max_rel_err"] = relative_error(step, *input_sets[0], reference, backward)
    run()  # warm-up outside the timing: autotuning, compilation, the allocator's first blocks
    synchronize(device)
    with Telemetry(reader) as tm:
        row.update(time_samples(run, device, options.min_samples, options.sample_ms))
    row.update(tm.summary())
    if options.profile_calls:
        try:
            row.update(kernel_time(run, device, options.profile_calls))
        except Exception as err:  # noqa: BLE001  a profiler that will not start costs this column, not the row
            row["kernel_error"] = f"{type(err).__name__}: {err}"
    row["peak_mib"] = None
    if not (device == "cpu" and impl == "compiled"):  # inductor's CPU code allocates where PeakMemory can't see
        s, t = input_sets[0]
        with PeakMemory(device) as mem:
            step(s, t)
        s.grad = None
        row["peak_mib"] = round(mem.peak_mib, 2)
    if IMPLS[impl][0] == "triton":
        row["configs"] = launch_configs(impl, *input_sets[0], mode, None if mode == "full" else shape.tokens_per_frame,
                                        backward)


def run_group(group: Group, options: Options, reader, env: dict, peaks: dict):
    device = options.device
    for shape in group.shapes:
        refs = {}
        if not options.out_of_time():
            for row in reference_rows(shape, options, reader, env):
                options.add(row)
                refs[row.get("dtype", "copy")] = row
        for dtype_name in group.dtypes:
            dtype = DTYPES[dtype_name]
            for mode in group.modes:
                base = dict(kind="trd", mode=mode, shape=shape.name, B=shape.batch, N=shape.tokens,
                            Ds=shape.student_dim, Dt=shape.teacher_dim, tokens_per_frame=shape.tokens_per_frame,
                            dtype=dtype_name, inputs="randn" if group.active_share is None else "correlated",
                            active_share_target=group.active_share, **env)
                input_sets, reference, free, inputs_skipped = None, None, None, None
                if options.out_of_time():
                    inputs_skipped = "time budget reached"
                else:
                    try:
                        input_sets = [make_inputs(shape, dtype, device, seed, group.active_share)
                                      for seed in range(options.input_sets)]
                    except Exception as err:  # noqa: BLE001  inputs that do not fit are recorded, not fatal
                        if not is_oom(err):
                            raise
                        inputs_skipped = "the inputs do not fit in memory"
                if input_sets:
                    frame = None if mode == "full" else shape.tokens_per_frame
                    base["active_share"] = active_share(*input_sets[0], MARGIN, mode, frame)
                    if shape.tokens <= options.check_max_tokens:
                        reference = float64_reference(*input_sets[0], mode, shape)
                    free = cuda_available_bytes() if device == "cuda" else None
                for impl in group.impls:
                    for pass_name in group.passes:
                        backward = pass_name == "fwd+bwd"
                        row = dict(base, impl=impl, **{"pass": pass_name})
                        reason = inputs_skipped or skip_reason(impl, shape, dtype, backward, options, free,
                                                               refs.get("copy", {}).get("GBps"))
                        if reason:
                            row["skipped"] = reason
                        else:
                            try:
                                measure_row(row, impl, mode, shape, backward, input_sets, reference, options, reader)
                            except Exception as err:  # noqa: BLE001  recorded: the other rows still run
                                if is_oom(err):
                                    row.update(oom=True, ms=None, peak_mib=None)
                                else:
                                    traceback.print_exc()
                                    row.update(error=f"{type(err).__name__}: {err}", ms=None)
                                if device == "cuda":
                                    torch.cuda.empty_cache()
                        add_rates(row, shape, mode, backward, refs.get(dtype_name, {}).get("tflops"),
                                  peaks.get(dtype_name))
                        options.add(row)
                        print(format_row(row), flush=True)
                del input_sets, reference
                if device == "cuda":
                    torch.cuda.empty_cache()


def add_rates(row: dict, shape: Shape, mode: str, backward: bool, matmul: Optional[float], peak: Optional[float]):
    """Useful TFLOP/s, end to end and in the kernels alone, and their fractions of the measured matmul rates."""
    work = flops(shape, mode, backward)
    for prefix, ms in (("", row.get("ms")), ("kernel_", row.get("kernel_ms"))):
        if not ms:
            continue
        rate = work / ms / 1e9
        row[f"{prefix}tflops"] = rate
        if matmul:
            row[f"{prefix}frac_of_matmul"] = rate / matmul
        if peak:
            row[f"{prefix}frac_of_peak"] = rate / peak
    row.update(matmul_tflops=matmul, peak_matmul_tflops=peak)


def run_benchmarks(groups: list[Group], options: Options) -> list[dict]:
    """Measure every group; returns (and writes, row by row) the references and rows."""
    env = environment(options.device)
    reader = gpu_reader(options.device)
    peaks = {}
    for row in reference_rows(None, options, reader, env):
        options.add(row)
        peaks[row["dtype"]] = row["tflops"]
        print(f"measured {row['dtype']} matmul rate: {row['tflops']:.1f} TFLOP/s", flush=True)
    for group in groups:
        run_group(group, options, reader, env, peaks)
    return options.rows


COLUMNS = ["shape", "mode", "dtype", "pass", "impl", "ms", "kernel_ms", "peak_mib", "tflops", "frac_of_matmul",
           "active_share", "sm_clock_mhz", "max_rel_err"]


def trd_rows(rows):
    """The loss measurements among `rows` (rows from before references existed have no kind)."""
    return [r for r in rows if r.get("kind", "trd") == "trd"]


def format_row(row: dict) -> str:
    def cell(key):
        value = row.get(key)
        if key == "ms" and row.get("oom"):
            return "OOM"
        if key == "ms" and row.get("skipped"):
            return "skipped"
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if key in ("max_rel_err",) else f"{value:.2f}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    return "  ".join(f"{cell(k):>14}" for k in COLUMNS)


def print_table(rows):
    print("\n" + "  ".join(f"{k:>14}" for k in COLUMNS))
    for row in trd_rows(rows):
        print(format_row(row))
    for row in rows:
        if row.get("skipped"):
            print(f"skipped {row['shape']} {row['mode']} {row['dtype']} {row['pass']} {row['impl']}: {row['skipped']}")


def plot(rows, path):
    """Against N for the B = 1 sweep (fwd+bwd), log-log: time, extra memory, and the share of the measured matmul
    rate (end to end solid, kernels alone dashed). One colour per implementation and dtype; modes other than
    full dotted (time, memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_rows = [r for r in trd_rows(rows) if r["shape"].startswith("sweep-") and r.get("ms")
                  and r["pass"] == "fwd+bwd"]
    styles = {"full": "-", "spatial": ":", "temporal": "--"}
    series = sorted({(r["impl"], r["dtype"]) for r in sweep_rows})
    colors = {key: f"C{i}" for i, key in enumerate(series)}
    fig, (ax_t, ax_m, ax_f) = plt.subplots(1, 3, figsize=(17, 4.8))
    for (impl, dtype), color in colors.items():
        for mode, style in styles.items():
            pts = sorted((r["N"], r["ms"], r.get("peak_mib"), r.get("frac_of_matmul"), r.get("kernel_frac_of_matmul"))
                         for r in sweep_rows if (r["impl"], r["dtype"], r["mode"]) == (impl, dtype, mode))
            if not pts:
                continue
            label = f"{impl} {dtype} {mode}"
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker="o", label=label)
            mem = [p for p in pts if p[2]]
            ax_m.plot([p[0] for p in mem], [p[2] for p in mem], style, color=color, marker="o", label=label)
            if mode == "full":
                for column, line in ((3, "-"), (4, "--")):
                    frac = [p for p in pts if p[column]]
                    ax_f.plot([p[0] for p in frac], [100 * p[column] for p in frac], line, color=color, marker=".",
                              label=label + (" (kernels)" if column == 4 else ""))
    device = rows[0].get("device", "") if rows else ""
    for ax, title, unit in ((ax_t, "time", "ms (median)"), (ax_m, "extra memory", "MiB"),
                            (ax_f, "useful FLOP rate", "% of measured matmul rate (same shape)")):
        ax.set_xscale("log")
        if ax is not ax_f:
            ax.set_yscale("log")
        ax.set_xlabel("tokens N (B = 1)")
        ax.set_ylabel(unit)
        ax.set_title(f"TRD loss fwd+bwd {title} — {device}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    ax_f.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def share_arg(value: str) -> Optional[float]:
    if value == "randn":
        return None
    share = float(value)
    if not 0.0 < share < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) or 'randn', got {value}")
    return share


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few small shapes: a smoke run in a minute")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), help="default: all (the Triton ones only on cuda)")
    p.add_argument("--modes", nargs="+", choices=["full", "spatial", "temporal"], default=["full", "spatial", "temporal"])
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 and fp32 on cuda, fp32 on cpu")
    p.add_argument("--shapes", nargs="+", metavar="NAME",
                   help="only these default shapes (paper, full-res, student-1920, paper-b1, sweep-N), e.g. to run a "
                        "long benchmark in pieces and merge them with --from-json")
    p.add_argument("--sweep", nargs="+", type=int, metavar="N",
                   help="token counts for a B=1 sweep (replaces the default shapes; adds to --shapes)")
    p.add_argument("--active-share", type=share_arg, default=DEFAULT_ACTIVE_SHARE, metavar="SHARE",
                   help=f"share of pairs with |Δ| > margin in the inputs (default {DEFAULT_ACTIVE_SHARE}; see "
                        "bench/NOTES.md), or 'randn' for independent randn tokens")
    p.add_argument("--min-samples", type=int,
                   help="timed calls per measurement at least (default: 10 on cuda, 3 on cpu)")
    p.add_argument("--sample-ms", type=float,
                   help="more timed calls until they fill this many ms (default: 300 on cuda, 0 on cpu)")
    p.add_argument("--profile-calls", type=int, default=3,
                   help="calls profiled for the kernel-only time (0: no profiling)")
    p.add_argument("--input-sets", type=int, default=2, help="input sets rotated between timed calls")
    p.add_argument("--check-max-tokens", type=int, default=10**9,
                   help="check against float64 only up to this N (default: every shape; the blockwise float64 "
                        "check costs O(N²·D) time and O(N·D) memory)")
    p.add_argument("--memory-limit-gib", type=float,
                   help="skip implementations whose estimated extra memory exceeds this (default: the GPU's free "
                        "memory; no limit on cpu)")
    p.add_argument("--max-row-s", type=float, default=60.0,
                   help="skip N×N implementations whose estimated time for one row exceeds this")
    p.add_argument("--json", metavar="PATH", help="write the rows here (a list of objects), after every row")
    p.add_argument("--plot", metavar="PATH", help="write a time/memory/rate vs N plot (PNG) here")
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


def default_options(device: str, **overrides) -> Options:
    """Sampling defaults per device: on CUDA ≥ 10 samples filling ≥ 300 ms; on CPU 3 samples."""
    cuda = device == "cuda"
    values = dict(min_samples=10 if cuda else 3, sample_ms=300.0 if cuda else 0.0)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Options(device=device, **values)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        rows = []
        for path in args.from_json:
            with open(path) as f:
                rows += json.load(f)
        if args.json:
            write_json(args.json, rows)
    else:
        options = default_options(args.device, min_samples=args.min_samples, sample_ms=args.sample_ms,
                                  input_sets=args.input_sets, check_max_tokens=args.check_max_tokens,
                                  profile_calls=args.profile_calls, memory_limit_gib=args.memory_limit_gib,
                                  max_row_s=args.max_row_s, json_path=args.json)
        group = Group(args.shapes, args.modes, args.dtypes, args.impls, args.passes, args.active_share)
        rows = run_benchmarks([group], options)
    if args.plot:
        plot(rows, args.plot)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
