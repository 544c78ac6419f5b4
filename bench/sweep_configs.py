"""Time every launch candidate of the Triton TRD kernels, to check the rule that picks them.

The kernels choose their tile configurations by a fixed rule (`triton_two_pass.select_configs`,
`triton_fused.select_config`), never by timing, so every process runs the same tiles and gets the same bits. The
rule was chosen from sm_90 compiles; this times each candidate (forward + backward, student gradient) on the GPU at
the headline shapes and shows where the rule's pick stands, so the rule can be revised from measurements.

    python bench/sweep_configs.py --json bench/results/sweep-h100-DATE.json
    TRITON_INTERPRET=1 python bench/sweep_configs.py --device cpu --shapes tiny     # checks the script itself
"""

import argparse
import functools
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_trd import DTYPES, FULL_RES, MARGIN, PAPER, Shape, environment, make_inputs, write_json  # noqa: E402
from correlated_inputs import DEFAULT_ACTIVE_SHARE  # noqa: E402
from measure import synchronize, time_samples  # noqa: E402
from videorepa.kernels import triton_fused, triton_two_pass, trd_loss  # noqa: E402
from videorepa.kernels.triton_common import dtype_family  # noqa: E402
from videorepa.kernels.validation import validate  # noqa: E402

SHAPES = {shape.name: shape for shape in (PAPER, FULL_RES, Shape("tiny", 1, 96, 128, 96, 32))}


def candidates(problem, schedules):
    """(schedule, configs) for every candidate of the problem's dtype family, both L2 groupings for two-pass."""
    family = dtype_family(problem.student.dtype, problem.teacher.dtype)
    runs = []
    if "two-pass" in schedules:
        runs += [("two-pass", (pass1, pass2, group)) for pass1 in triton_two_pass.PASS1_CANDIDATES[family]
                 for pass2 in triton_two_pass.PASS2_CANDIDATES[family] for group in (1, 8)]
    if "fused" in schedules:
        runs += [("fused", config) for config in triton_fused.CANDIDATES[family]]
    return runs


def rule_pick(problem, schedule):
    if schedule == "two-pass":
        return triton_two_pass.select_configs(problem, True, False)
    return triton_fused.select_config(problem)


def step(schedule, configs, s, t):
    """One forward and backward (full mode) with exactly these configs in place of the rule's."""
    s.grad = None
    module, rule = (triton_two_pass, "select_configs") if schedule == "two-pass" else (triton_fused, "select_config")
    with mock.patch.object(module, rule, lambda *args: configs):
        trd_loss(s, t, MARGIN, backend="triton", schedule=schedule).backward()


def describe(schedule, configs) -> dict:
    if schedule == "two-pass":
        return {"pass1": configs[0].launch_kwargs(), "pass2": configs[1].launch_kwargs(), "GROUP": configs[2]}
    return {"fused": configs.launch_kwargs()}


def sweep(args) -> list[dict]:
    env = environment(args.device)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        s, t = make_inputs(shape, DTYPES[args.dtype], args.device, 0, DEFAULT_ACTIVE_SHARE)
        problem = validate(s, t, MARGIN, "full", None)
        for schedule, configs in candidates(problem, args.schedules):
            row = dict(shape=name, B=shape.batch, N=shape.tokens, Ds=shape.student_dim, Dt=shape.teacher_dim,
                       dtype=args.dtype, schedule=schedule, configs=describe(schedule, configs),
                       rule_pick=configs == rule_pick(problem, schedule), **env)
            run = functools.partial(step, schedule, configs, s, t)
            try:
                run()  # compiles this specialisation outside the timing
                synchronize(args.device)
                row.update(time_samples(run, args.device, args.min_samples, args.sample_ms))
            except Exception as err:  # noqa: BLE001  a candidate that fails to launch is a finding, recorded
                row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            print(format_row(row), flush=True)
            if args.json:
                write_json(args.json, rows)
    return rows


def format_row(row: dict) -> str:
    timing = f"{row['ms']:9.3f} ms" if "ms" in row else f"FAILED {row['error'][:80]}"
    pick = "  <- rule" if row["rule_pick"] else ""
    return f"{row['shape']:<10} {row['schedule']:<9} {timing}  {row['configs']}{pick}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu runs the kernels through Triton's interpreter (TRITON_INTERPRET=1): a check, not a timing")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["paper", "full-res"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--schedules", nargs="+", choices=["two-pass", "fused"], default=["two-pass", "fused"])
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--sample-ms", type=float, default=300.0, help="keep sampling until this much time is timed")
    p.add_argument("--json", help="write the rows here (rewritten after each candidate)")
    return p.parse_args(argv)


def main(argv=None):
    rows = sweep(parse_args(argv))
    timed = [r for r in rows if "ms" in r]
    for name in dict.fromkeys(r["shape"] for r in timed):
        best = min((r for r in timed if r["shape"] == name), key=lambda r: r["ms"])
        picks = [r for r in timed if r["shape"] == name and r["rule_pick"]]
        print(f"{name}: fastest {best['schedule']} {best['ms']:.3f} ms {best['configs']}; rule's picks: "
              + ", ".join(f"{r['schedule']} {r['ms']:.3f} ms" for r in picks))
    return rows


if __name__ == "__main__":
    main()
