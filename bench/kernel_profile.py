"""Where the two-pass TRD call's device time goes, kernel by kernel, against what its tiles can reach; and what the
call costs with no host in the way.

    python bench/kernel_profile.py [--json profile.json] > kernel-profile.txt    # CUDA only; ~30 s on an H100

1. At the full grid (B = 1, N = 32,400) and the paper's shape (B = 4, N = 3,600), bf16, student gradient: device
   ms and executed TFLOP/s of each kernel of four variants, each at the launch configuration the rule picks:
   - "triangle": two-pass as trd_loss runs it (pass 1 over the tiles J ≥ I, pass 2 reading the tiles J < I
     from the stored (J, I) tile, transposed);
   - "all rows": the same problem as one shard holding every row, as under sequence parallelism: pass 1 over the
     whole square with no column partials, pass 2 reading every tile as stored. Pass 2's rate here against
     the triangle's is what storing a transposed copy of the map would gain (bench/NOTES.md v4, next steps);
   - "main loop ×2" and "main loop ×1": pass 1's tiles with nothing but the Gram products and a tile sum for an
     epilogue, the student's and the teacher's features in two accumulators one after the other as in pass 1
     (170 registers in triton 3.9's sm_90 compile: one block per SM, as pass 1's 255), or in one (106: two).
     Pass 1 below "×2" by the cost of its epilogue (Δ, the loss, the map and the radial sums); "×2" below "×1" by
     what a second resident block gains, its main loop running under the other's prologue and epilogue.
2. The paper's shape, forward and backward captured in a CUDA graph and replayed, per implementation: the call's
   time once the host's cost per call (Python, autograd, launches) is gone, as under torch.compile's
   mode="reduce-overhead" or a trainer that graphs its step.
3. bench/host_overhead.py's host time per call, unless --no-host.
"""

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from videorepa.kernels import trd_loss  # noqa: E402
from videorepa.kernels.triton_common import _gram, device_of, dot_precision, fitted_block  # noqa: E402
from videorepa.kernels.triton_two_pass import (_pass1_tile, select_configs, tile_grid,  # noqa: E402
                                               two_pass_forward, two_pass_gradient)
from videorepa.kernels.validation import validate  # noqa: E402

SHAPES = ((1, 32400, 768), (4, 3600, 768))
MARGIN = 0.1  # trd_loss's default
IMPLS = {"two-pass": dict(backend="triton", schedule="two-pass"), "fused": dict(backend="triton", schedule="fused"),
         "naive": dict(backend="naive")}
# Profiler names of the kernels the variants launch.
KERNELS = {"pass 1": "_pass1_kernel", "pass 2": "_pass2_kernel", "norms": "_norms_kernel",
           "main loop": "_gram_mainloop_kernel"}


def inputs(batch, tokens, dim, device="cuda", dtype=torch.bfloat16):
    """Student correlated with the teacher (about half the pairs active, as bench_trd's inputs)."""
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(batch, tokens, dim, device=device, generator=gen)
    student = teacher + 0.75 * torch.randn(batch, tokens, dim, device=device, generator=gen)
    return student.to(dtype).requires_grad_(), teacher.to(dtype)


def step(student, teacher, **options):
    def run():
        student.grad = None
        trd_loss(student, teacher, **options).backward()
    return run


@triton.jit
def _gram_mainloop_kernel(X, OUT, N, D, DS, NB, stride_b, stride_n, stride_d, TWO: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr):
    """The sum of tile (I, J) of X·Xᵀ: pass 1's main loop without its epilogue, its tiles walked GROUP row blocks
    at a time as pass 1 walks a rectangle (pass 1's triangle groups them as much: GROUP × GROUP super-tiles). TWO:
    the features [0, DS) and [DS, D) in two accumulators, one after the other, as pass 1 keeps Ŝ and T̂."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row_block, col_block, _, _ = _pass1_tile(pid, 0, N, N, N, NB, NB, 1, 0, True, BLOCK, GROUP)
    local = tl.arange(0, BLOCK)
    rows = row_block * BLOCK + local
    cols = col_block * BLOCK + local
    row_ok, col_ok = rows < N, cols < N
    if TWO:
        first = _gram(X + DS * stride_d, b, rows, cols, row_ok, col_ok, D - DS, stride_b, stride_n, stride_d,
                      BLOCK_K, PRECISION, BLOCK, BLOCK)
        acc = _gram(X, b, rows, cols, row_ok, col_ok, DS, stride_b, stride_n, stride_d, BLOCK_K, PRECISION, BLOCK,
                    BLOCK) + first
    else:
        acc = _gram(X, b, rows, cols, row_ok, col_ok, D, stride_b, stride_n, stride_d, BLOCK_K, PRECISION, BLOCK,
                    BLOCK)
    tl.store(OUT + b * NB * NB + row_block * NB + col_block, tl.sum(tl.sum(acc, axis=1), axis=0))


def gram_tile_sums(x: torch.Tensor, pass1_config, split: int = 0, group: int = 1) -> torch.Tensor:
    """(B, NB²) sums of x·xᵀ's BLOCK × BLOCK tiles, row by row, computed at pass 1's tile configuration and L2
    grouping; with `split`, the features before and after it in two accumulators."""
    batch, tokens, dim = x.shape
    block = pass1_config["BLOCK"]
    blocks = triton.cdiv(tokens, block)
    out = torch.empty(batch, blocks * blocks, device=x.device)
    width = max(split, dim - split) if split else dim
    launch = {**pass1_config.launch_kwargs(), "BLOCK_K": fitted_block(pass1_config["BLOCK_K"], width)}
    with device_of(x):
        _gram_mainloop_kernel[(blocks * blocks, batch)](x, out, tokens, dim, split, blocks, *x.stride(),
                                                        TWO=bool(split), GROUP=group,
                                                        PRECISION=dot_precision(x.dtype), **launch)
    return out


def all_rows_step(student, teacher):
    """(problem, configs, run): forward and student gradient of the two-pass kernels on the problem as one shard
    holding every row. run() returns (per-clip loss sums, gradient); the gradient is the loss's gradient for
    grad_output 1, as trd_loss's."""
    problem = validate(student, teacher, MARGIN, "full", None, rows=(0, student.shape[1]))
    configs = select_configs(problem, True, False)
    unit = torch.ones(1, device=student.device)

    def run():
        clip_sums, pair_map, radial, norms_s, _ = two_pass_forward(problem, True, False, configs)
        return clip_sums, two_pass_gradient(problem, student, norms_s, pair_map, radial, clip_sums, unit, False, 0,
                                            1, configs)

    return problem, configs, run


def mainloop_step(student, teacher, configs, accumulators: int):
    features = torch.cat([student.detach(), teacher], dim=2)
    split = student.shape[2] if accumulators == 2 else 0
    return lambda: gram_tile_sums(features, configs[0], split, configs[2])


def executed_flops(problem, configs, all_rows: bool) -> dict:
    """FLOP each kernel executes, padding of partial tiles included: pass 1's two Gram products over its tiles
    (the triangle, or the whole square for all rows), pass 2's G·X over every tile of its rows and feature chunks,
    and the main loop's Gram products over the whole square."""
    block = configs[0]["BLOCK"]
    blocks = tile_grid(problem, block)[0]
    ds, dt = problem.student.shape[2], problem.teacher.shape[2]
    block_d = fitted_block(configs[1]["BLOCK_D"], ds)
    tile = 2 * problem.batch * block * block
    square = blocks * blocks
    return {"pass 1": tile * (square if all_rows else blocks * (blocks + 1) // 2) * (ds + dt),
            "pass 2": tile * square * triton.cdiv(ds, block_d) * block_d,
            "main loop": tile * square * (ds + dt)}


def kernel_times(run, calls=5) -> dict:
    """Device ms per call of each kernel `run` launches."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return {event.key: event.device_time_total / calls / 1e3 for event in prof.key_averages()
            if event.device_type.name == "CUDA" and event.device_time_total > 0}


def graphed_ms(run, replays=50) -> float:
    """ms per replay of `run` captured in a CUDA graph (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def variant_rows(shape, variant, times, flops, configs) -> list[dict]:
    """One row per kernel of interest: ms, executed TFLOP/s where the kernel multiplies."""
    rows = []
    for kernel, name in KERNELS.items():
        ms = sum(t for key, t in times.items() if key.startswith(name))
        if ms:
            row = dict(shape=list(shape), variant=variant, kernel=kernel, ms=round(ms, 4))
            if kernel in flops:
                row["tflops"] = round(flops[kernel] / ms / 1e9, 1)
            rows.append(row)
    total = sum(times.values())
    rows.append(dict(shape=list(shape), variant=variant, kernel="all kernels", ms=round(total, 4),
                     pass1=configs[0].launch_kwargs(), pass2=configs[1].launch_kwargs(), group=configs[2]))
    return rows


def profile_shape(shape):
    """Each variant's rows, as it is timed."""
    student, teacher = inputs(*shape)
    problem, configs, all_rows = all_rows_step(student, teacher)
    triangle_problem = validate(student, teacher, MARGIN, "full", None)
    triangle_configs = select_configs(triangle_problem, True, False)
    triangle_flops = executed_flops(triangle_problem, triangle_configs, all_rows=False)
    variants = (("triangle", step(student, teacher, backend="triton", schedule="two-pass"), triangle_flops,
                 triangle_configs),
                ("all rows", all_rows, executed_flops(problem, configs, all_rows=True), configs),
                ("main loop ×2", mainloop_step(student, teacher, triangle_configs, 2), triangle_flops,
                 triangle_configs),
                ("main loop ×1", mainloop_step(student, teacher, triangle_configs, 1), triangle_flops,
                 triangle_configs))
    for variant, run, flops, variant_configs in variants:
        yield variant_rows(shape, variant, kernel_times(run), flops, variant_configs)
        torch.cuda.empty_cache()


def print_rows(rows):
    for row in rows:
        rate = f"  {row['tflops']:7.1f} TFLOP/s" if "tflops" in row else ""
        print(f"  {row['variant']:15s} {row['kernel']:15s} {row['ms']:8.3f} ms{rate}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write every figure here too")
    p.add_argument("--no-host", action="store_true", help="skip bench/host_overhead.py's table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernel_profile.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__}")
    result = {"device": torch.cuda.get_device_name(), "kernels": [], "graph_replay_ms": {}}

    def save():  # after every measurement: a run cut short keeps what it timed
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    for shape in SHAPES:
        print(f"== B{shape[0]} N{shape[1]} D{shape[2]}, bf16, student gradient: device ms per call by kernel")
        for rows in profile_shape(shape):
            print_rows(rows)
            result["kernels"] += rows
            save()
    student, teacher = inputs(*SHAPES[1])
    for name, options in IMPLS.items():
        ms = graphed_ms(step(student, teacher, **options))
        result["graph_replay_ms"][name] = round(ms, 4)
        print(f"CUDA graph replay, B4 N3600 D768 fwd+bwd, {name}: {ms:.3f} ms")
        save()
    if not args.no_host:
        import host_overhead

        host_overhead.main()
    return result


if __name__ == "__main__":
    main()
