"""Timing for the benchmarks: end-to-end samples, kernel-only time from the profiler, and the chip's references
(device-to-device copy bandwidth, matmul rate) that the TRD timings are read against.

Every function takes the device ("cuda" or "cpu") and works on both, so the whole harness runs on a CPU; on CUDA
the samples are CUDA-event times with the L2 cache flushed before each one (as triton.testing.do_bench does).
"""

import math
import statistics
import time
from collections import defaultdict

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2
PROFILER_OVERHEAD = ("Activity Buffer Request",)  # CUPTI's own bookkeeping, recorded as a device activity


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def summarize(samples: list[float]) -> dict:
    """Median and the 20th/80th percentiles of millisecond samples."""
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7], "n_samples": len(samples)}


def sample_count(estimate_ms: float, min_samples: int, target_ms: float, max_samples: int = 1000) -> int:
    """Enough samples to fill `target_ms` of timed calls, never fewer than `min_samples`."""
    wanted = math.ceil(target_ms / max(estimate_ms, 1e-3))
    return max(min_samples, min(wanted, max_samples))


def time_samples(run, device: str, min_samples: int, target_ms: float) -> dict:
    """Time `run` (already warm): one call for an estimate, then `sample_count` timed calls, summarized. On CUDA
    the calls are queued back to back, each between two events after an L2 flush, and read after one final
    synchronisation, so host overhead hides behind the GPU work as it does in training."""
    if device == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

        def timed(count):
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(count)]
            for start, end in events:
                flush.zero_()
                start.record()
                run()
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in events]
    else:
        def timed(count):
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                run()
                samples.append((time.perf_counter() - start) * 1e3)
            return samples

    estimate = timed(1)[0]
    return summarize(timed(sample_count(estimate, min_samples, target_ms)))


def kernel_totals(events, device: str, calls: int, top: int = 6) -> dict:
    """Per-call time spent in kernels from profiler events: on CUDA the device-side activities (kernels, copies,
    memsets), on CPU the operators' self time. Returns the total and the `top` largest by name."""
    from torch.autograd import DeviceType

    totals = defaultdict(float)
    for event in events:
        on_device = event.device_type != DeviceType.CPU
        if event.name in PROFILER_OVERHEAD:
            continue
        if device == "cuda" and on_device:
            totals[event.name] += event.time_range.elapsed_us()
        elif device != "cuda" and not on_device:
            totals[event.name] += event.self_cpu_time_total
    per_call = {name: us / 1e3 / calls for name, us in totals.items()}
    largest = sorted(per_call.items(), key=lambda kv: -kv[1])[:top]
    return {"kernel_ms": sum(per_call.values()), "kernels": [[name[:80], round(ms, 4)] for name, ms in largest]}


def kernel_time(run, device: str, calls: int) -> dict:
    """`kernel_totals` of `calls` profiled calls of `run` (already warm)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        synchronize(device)
    return kernel_totals(prof.events(), device, calls)


def copy_gbps(device: str, nbytes: int, min_samples: int, target_ms: float) -> float:
    """Device-to-device copy bandwidth, counting the bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = time_samples(lambda: dst.copy_(src), device, min_samples, target_ms)["ms"]
    return 2 * nbytes / ms / 1e6


def gemm_tflops(device: str, dtype, m: int, k: int, n: int, min_samples: int, target_ms: float) -> float:
    """Dense (m × k) @ (k × n) rate in TFLOP/s on random data."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    ms = time_samples(lambda: a @ b, device, min_samples, target_ms)["ms"]
    return 2 * m * k * n / ms / 1e9
