"""Where a TRD loss call's device time goes, kernel by kernel, and what the call costs with no host in the way.

    python bench/kernel_profile.py > kernel-profile.txt        # CUDA only; about 20 s on an H100

1. The default (two-pass) forward and backward, bf16, student gradient, at the full grid (B = 1, N = 32,400) and
   the paper's shape (B = 4, N = 3,600): device time per call of each kernel, from the profiler.
2. The paper's shape, forward and backward captured in a CUDA graph and replayed, per implementation: the call's
   time once the host's cost per call (Python, autograd, launches) is gone, as under torch.compile's
   mode="reduce-overhead" or a trainer that graphs its step.
"""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from videorepa.kernels import trd_loss  # noqa: E402

SHAPES = ((1, 32400, 768), (4, 3600, 768))
IMPLS = {"two-pass": dict(backend="triton", schedule="two-pass"), "fused": dict(backend="triton", schedule="fused"),
         "naive": dict(backend="naive")}


def inputs(batch, tokens, dim):
    """bf16 student correlated with the teacher (about half the pairs active, as bench_trd's inputs)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    teacher = torch.randn(batch, tokens, dim, device="cuda", generator=gen)
    student = teacher + 0.75 * torch.randn(batch, tokens, dim, device="cuda", generator=gen)
    return student.to(torch.bfloat16).requires_grad_(), teacher.to(torch.bfloat16)


def step(student, teacher, **options):
    def run():
        student.grad = None
        trd_loss(student, teacher, **options).backward()
    return run


def kernel_times(run, calls=5) -> dict:
    """Device ms per call of each kernel `run` launches."""
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


def main():
    if not torch.cuda.is_available():
        sys.exit("kernel_profile.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__}")
    for shape in SHAPES:
        times = kernel_times(step(*inputs(*shape)))
        print(f"== B{shape[0]} N{shape[1]} D{shape[2]}, two-pass fwd+bwd: device ms per call by kernel")
        for name, ms in sorted(times.items(), key=lambda item: -item[1])[:8]:
            print(f"  {ms:8.3f}  {name[:90]}")
        print(f"  {sum(times.values()):8.3f}  total")
    student, teacher = inputs(*SHAPES[1])
    for name, options in IMPLS.items():
        ms = graphed_ms(step(student, teacher, **options))
        print(f"CUDA graph replay, B4 N3600 D768 fwd+bwd, {name}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
