"""All the GPU evidence in one command, within a time budget, into one folder.

    python bench/gpu_evidence.py --output-dir bench/results/h100-2026-01-01      # about 8 minutes on an H100
    python bench/gpu_evidence.py --device cpu --quick --output-dir /tmp/evidence  # the same orchestration, tiny

Four parts, each a child process with its own budget plus what the parts before it left unused, so the whole
run stays within the sum. A part that overruns is cut (its process group killed), recorded as cut, and what it
finished is kept: the benchmarks rewrite their JSON after every row and start no new measurement within a margin
of their budget's end. They come last, so that they take every second the fixed-size parts leave.

  tests    the kernel tests on the device against float64, and the training patterns and compiled steps around them
           (VIDEOREPA_TEST_DEVICE=cuda pytest TEST_PATHS);
           pass, fail and skip counts are read from pytest's per-test lines, so a cut run still counts.
  train    bench_train_step.py: a CogVideoX-2B-sized training step with fused vs naive TRD (needs diffusers).
  profile  kernel_profile.py (CUDA only): device time and rate of each kernel, against the main loop of pass 1's
           tiles alone; the call replayed as a CUDA graph; then host_overhead.py's host time per call.
  bench    bench_trd.py at every headline shape (paper B=4 N=3600 D=768; full grid B=1 N=32400; student width 1920),
           bf16, fwd and fwd+bwd, every implementation; the paper shape again on independent randn inputs and in
           spatial and temporal modes; then a B=1 sweep over N, coarse sizes first so a cut leaves a coarse sweep.
           Implementations that would not fit or take too long are skipped up front, with the estimate.

The folder gets results.json (everything: environment, plan, parts, test counts, rows, targets), summary.md (one
page), plot.png, log.txt (every part's output) and the parts' own files part-bench.json, part-train.json and
part-profile.json.
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench_trd import (FULL_RES, IMPLS, PAPER, SWEEP_TOKENS, WIDE, Group, Shape, default_options,  # noqa: E402
                       environment, plot, run_benchmarks, sweep, write_json)
from evidence_report import summarize, targets  # noqa: E402

PARTS = ("tests", "train", "profile", "bench")
PART_FILES = ("part-bench.json", "part-train.json", "part-profile.json")
# Budgets in seconds for an H100, from the runs of 2026-11-25 (bench/NOTES.md v4.3): the tests, which compile every
# kernel variant, were cut at 130 s with 262 of 283 done, and the compiled-step tests not reached; the training
# step (a 1.7 B-parameter model) took 63 s; the benchmarks 177 s of 240 for every row. 460 s in all, leaving
# 20 s of the 8 minutes for starting, plotting and summarising.
BUDGETS_S = {"cuda": {"tests": 185, "train": 70, "profile": 45, "bench": 160},
             "cpu": {"tests": 60, "train": 60, "profile": 10, "bench": 90}}
# The benchmarks start no new measurement this long before their budget ends: the longest single one expected.
SOFT_MARGIN_S = {"cuda": 25, "cpu": 10}
# The kernel tests against float64, and the training patterns and torch.compile steps around them (the
# multi-process tests among them need two GPUs).
TEST_PATHS = ["tests/test_trd_loss.py", "tests/test_trd_inputs.py", "tests/test_training_patterns.py",
              "tests/test_compile.py"]
QUICK_TEST_FILTER = "(torch or naive) and not triton"
# A test id is path::name[parameters], and parameters may hold spaces ("[margin must be >= 0]").
TEST_ID = r"\S+::[^\s\[]+(?:\[.*?\])?"
OUTCOME = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
TEST_LINE = [re.compile(rf"^({TEST_ID})\s+({OUTCOME})\b"),  # pytest -v
             re.compile(rf"^\[gw\d+\]\s+\[\s*\d+%\]\s+({OUTCOME})\s+({TEST_ID})\s*$")]  # pytest -n
# "collected 124 items / 78 deselected / 46 selected" (plain) or "4 workers [46 items]" (-n, after -k)
SELECTED = re.compile(r"collected (\d+) items?(?: / \d+ deselected)?(?: / (\d+) selected)?|\[(\d+) items?\]")


def quick_shapes():
    """Tiny stand-ins for the headline shapes, same proportions where it matters (frames, Ds ≠ Dt)."""
    return (Shape("paper-quick", 2, 256, 128, 128, 32), Shape("full-res-quick", 1, 1024, 128, 128, 128),
            Shape("student-1920-quick", 2, 256, 320, 128, 32))


def evidence_plan(device: str, quick: bool) -> dict:
    """What the bench part measures, in priority order, and which shape plays which role in the summary."""
    cuda = device == "cuda"
    paper, full_res, wide = quick_shapes() if quick else (PAPER, FULL_RES, WIDE)
    impls = [i for i in IMPLS if (cuda or IMPLS[i][0] != "triton") and not (quick and i == "compiled")]
    kernels = [i for i in impls if i not in ("naive", "compiled")]
    dtype = "bf16" if cuda else "fp32"
    sizes = [512, 256] if quick else coarse_first(SWEEP_TOKENS)
    groups = [
        Group([paper, full_res, wide], ["full"], [dtype], impls, ["fwd", "fwd+bwd"]),
        Group([paper], ["full"], [dtype], kernels, ["fwd+bwd"], active_share=None),
        Group([paper], ["spatial", "temporal"], [dtype], [i for i in impls if i != "compiled"], ["fwd+bwd"]),
        Group(sweep(sizes, dim=128 if quick else 768), ["full"], [dtype], impls, ["fwd+bwd"]),
    ]
    return {"dtype": dtype, "roles": {"paper": paper.name, "full_res": full_res.name, "wide": wide.name},
            "groups": groups}


def coarse_first(sizes: list[int]) -> list[int]:
    """Every other size first, then the ones between: a run cut short still spans the whole range."""
    return sizes[::2] + sizes[1::2]


def describe(plan: dict) -> dict:
    return {"dtype": plan["dtype"], "roles": plan["roles"],
            "groups": [dict(shapes=[s.name for s in g.shapes], modes=g.modes, dtypes=g.dtypes, impls=g.impls,
                            passes=g.passes, active_share=g.active_share) for g in plan["groups"]]}


def parse_pytest(lines: list[str]) -> dict:
    """Counts and failing test ids from pytest's per-test lines (plain -v or pytest-xdist's -n)."""
    outcome, selected = {}, None
    for line in lines:
        match = SELECTED.search(line)
        if match and selected is None:
            selected = int(match.group(2) or match.group(1) or match.group(3))
        match = TEST_LINE[0].match(line)
        if match:
            outcome[match.group(1)] = match.group(2)
            continue
        match = TEST_LINE[1].match(line)
        if match:
            outcome[match.group(2)] = match.group(1)
    counts = {key.lower(): 0 for key in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    for result in outcome.values():
        counts[result.lower()] += 1
    counts["failing"] = sorted(t for t, r in outcome.items() if r in ("FAILED", "ERROR"))
    counts["selected"] = selected
    return counts


def run_part(command: list[str], env: dict, budget_s: float, log) -> dict:
    """Run `command` from the repository root, echoing its output to stdout and `log`; kill its process group
    when `budget_s` runs out. Returns {status, seconds, lines}."""
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    lines = []

    def echo():
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            sys.stdout.write(line)
        log.flush()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=budget_s)
        status = "done" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own session: its workers (compilers) go with it
        except ProcessLookupError:  # it ended in between
            pass
        proc.wait()
        status = f"cut at its {budget_s:g} s budget"
    reader.join(timeout=10)
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "lines": lines}


def child_env(args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", VIDEOREPA_TEST_DEVICE=args.device)
    if args.device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    if args.commit:
        env["VIDEOREPA_COMMIT"] = args.commit
    if args.quick and args.device == "cpu":
        # Timings are not the point of a quick CPU run; one thread per process keeps a busy machine from
        # stalling it in spin-waits (a tiny loss took 300 ms instead of 1.5 ms with two threads on a loaded box).
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def tests_command(args) -> list[str]:
    # --durations: where the budget goes, for the next revision of it
    command = [sys.executable, "-m", "pytest", *args.tests, "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
               "--durations=25"]
    if args.tests_filter:
        command += ["-k", args.tests_filter]
    if args.tests_workers > 1:
        command += ["-n", str(args.tests_workers)]
    return command


def part_command(name: str, args, budget_s: float) -> list[str]:
    if name == "tests":
        return tests_command(args)
    if name == "profile":
        return [sys.executable, os.path.join(HERE, "kernel_profile.py"), "--json",
                os.path.join(args.output_dir, "part-profile.json")]
    if name == "bench":
        soft = max(budget_s - SOFT_MARGIN_S[args.device], 1.0)
        return [sys.executable, os.path.join(HERE, "gpu_evidence.py"), "--part", "bench", "--soft-budget-s",
                str(soft), "--device", args.device, "--output-dir", args.output_dir] + ["--quick"] * args.quick
    soft = max(budget_s - SOFT_MARGIN_S[args.device] - 5, 1.0)  # a 2B step is slower than a TRD row
    return [sys.executable, os.path.join(HERE, "bench_train_step.py"), "--device", args.device,
            "--model-size", "tiny" if args.quick else "cogvideox-2b", "--steps", "2" if args.quick else "3",
            "--time-budget-s", str(soft), "--json", os.path.join(args.output_dir, "part-train.json")]


def run_bench_part(args):
    """The bench part, inside its own process: every group of the plan against one soft deadline."""
    plan = evidence_plan(args.device, args.quick)
    options = default_options(args.device, json_path=os.path.join(args.output_dir, "part-bench.json"),
                              deadline=time.monotonic() + args.soft_budget_s)
    run_benchmarks(plan["groups"], options)


def read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def device_slug(env: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where a GPU is visible")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, no torch.compile, a test subset on cpu: checks the orchestration in seconds")
    p.add_argument("--output-dir", help="default: bench/results/<device>-<date>")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: all four, in order")
    for part in PARTS:
        p.add_argument(f"--{part}-budget-s", type=float,
                       help=f"seconds for the {part} part (default: {BUDGETS_S['cuda'][part]} on cuda, "
                            f"{BUDGETS_S['cpu'][part]} on cpu)")
    p.add_argument("--tests", nargs="+", default=TEST_PATHS, help=f"test files (default: {' '.join(TEST_PATHS)})")
    p.add_argument("--tests-filter", help=f"pytest -k expression (default with --quick on cpu: {QUICK_TEST_FILTER!r}: "
                                          "the interpreter runs the Triton tests too slowly for a quick run)")
    p.add_argument("--tests-workers", type=int,
                   help="pytest-xdist processes, which compile kernels in parallel (default on cuda where pytest-xdist "
                        "is installed: half the CPU cores, 2 to 8; else 1)")
    p.add_argument("--commit", help="the commit to record where the checkout has no .git (default: git's HEAD)")
    p.add_argument("--part", choices=["bench"], help=argparse.SUPPRESS)  # a child process running one part
    p.add_argument("--soft-budget-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.tests_filter is None and args.quick and args.device == "cpu":
        args.tests_filter = QUICK_TEST_FILTER
    if args.tests_workers is None:
        xdist = importlib.util.find_spec("xdist") is not None
        args.tests_workers = min(8, max(2, (os.cpu_count() or 4) // 2)) if args.device == "cuda" and xdist else 1
    for part in PARTS:
        key = f"{part}_budget_s"
        if getattr(args, key) is None:
            setattr(args, key, BUDGETS_S[args.device][part])
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.commit:
        os.environ["VIDEOREPA_COMMIT"] = args.commit
    env = environment(args.device)
    if args.output_dir is None:
        args.output_dir = os.path.join(HERE, "results", f"{device_slug(env)}-{env['date']}")
    args.output_dir = os.path.abspath(args.output_dir)
    if args.part == "bench":
        return run_bench_part(args)
    os.makedirs(args.output_dir, exist_ok=True)
    for name in PART_FILES:  # a reused folder: a part that writes nothing this time must not report the last run
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.output_dir, name))
    started, started_at = time.monotonic(), datetime.datetime.now(datetime.timezone.utc)
    plan = evidence_plan(args.device, args.quick)
    results = {"environment": env, "started": started_at.isoformat(timespec="seconds"), "quick": args.quick,
               "plan": describe(plan), "parts": {}, "tests": None}
    spare = 0.0  # seconds an earlier part left unused: the next part may have them
    with open(os.path.join(args.output_dir, "log.txt"), "w") as log:
        for name in args.parts:
            budget = getattr(args, f"{name}_budget_s") + spare
            command = part_command(name, args, budget)
            record = {"budget_s": round(budget, 1), "command": " ".join(command)}
            if name == "train" and importlib.util.find_spec("diffusers") is None:
                record.update(status="skipped: diffusers is not installed", seconds=0.0)
            elif name == "profile" and args.device != "cuda":
                record.update(status="skipped: needs a CUDA device", seconds=0.0)
            else:
                log.write(f"\n===== {name}: {record['command']}\n")
                log.flush()
                outcome = run_part(command, child_env(args), budget, log)
                record.update(status=outcome["status"], seconds=outcome["seconds"])
                if name == "tests":
                    results["tests"] = dict(parse_pytest(outcome["lines"]), paths=args.tests,
                                            filter=args.tests_filter, workers=args.tests_workers)
            results["parts"][name] = record
            spare = max(budget - record["seconds"], 0.0)
            print(f"== {name}: {record['status']} after {record['seconds']} s (budget {budget:.0f} s)", flush=True)
    bench, train, profile = (os.path.join(args.output_dir, name) for name in PART_FILES)
    results["rows"] = read_json(bench, [])
    results["train_rows"] = read_json(train, [])
    results["profile"] = read_json(profile, None)
    results["targets"] = targets(results)
    results["seconds"] = round(time.monotonic() - started, 1)
    if results["rows"]:
        plot(results["rows"], os.path.join(args.output_dir, "plot.png"))
    write_json(os.path.join(args.output_dir, "results.json"), results)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(summarize(results))
    print(f"evidence in {args.output_dir} ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
