"""Host time of one TRD loss call (forward, and forward + backward) per implementation on CUDA, then a cProfile of
the two-pass call: where the CPU time of a call goes when the GPU work is too small to hide it.

    python bench/host_overhead.py > host-overhead.txt

"host" is the time to queue `calls` calls back to back, "wall" the same until the GPU has finished them: equal
values mean the GPU waited for the host.
"""

import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from videorepa.kernels import trd_loss  # noqa: E402

IMPLS = {"two-pass": dict(backend="triton", schedule="two-pass"), "fused": dict(backend="triton", schedule="fused"),
         "naive": dict(backend="naive"), "auto": {}}


def host_us(fn, calls=300):
    """(host µs, wall µs) per call of `fn`, after 10 warm-up calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / calls * 1e6


def inputs(batch, tokens, dim):
    student = torch.randn(batch, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return student, torch.randn(batch, tokens, dim, device="cuda", dtype=torch.bfloat16)


def step(student, teacher, **kwargs):
    trd_loss(student, teacher, **kwargs).backward()
    student.grad = None


def main():
    for batch, tokens, dim in ((1, 256, 64), (4, 3600, 768)):
        s, t = inputs(batch, tokens, dim)
        for name, kwargs in IMPLS.items():
            def forward():
                with torch.no_grad():
                    trd_loss(s, t, **kwargs)
            print(f"B{batch} N{tokens} D{dim} {name:9s} fwd host/wall us %.0f/%.0f" % host_us(forward),
                  " fwd+bwd host/wall us %.0f/%.0f" % host_us(lambda: step(s, t, **kwargs)), flush=True)
    s, t = inputs(1, 256, 64)
    for _ in range(10):
        step(s, t, **IMPLS["two-pass"])
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        step(s, t, **IMPLS["two-pass"])
    torch.cuda.synchronize()
    profile.disable()
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(35)
        print(out.getvalue())


if __name__ == "__main__":
    main()
