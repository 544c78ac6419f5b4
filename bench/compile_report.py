"""Compile the fused TRD kernel ahead of time for NVIDIA GPUs, on a machine without one, and report what each
autotune candidate costs: registers per thread, local memory (spills), shared memory and the matmul instructions
Triton chose. A spilling or oversized config is slow or unlaunchable on the chip; this finds it before a GPU does.

    python bench/compile_report.py --arch 90 --json bench/results/sm90-compile-triton3.9-2026-11-25.json
    python bench/compile_report.py --arch 80 90 100 --quick

Arguments are specialised exactly as a launch would specialise them (pointer alignment, unit strides), from real
tensors of the requested shape, so the code compiled here is the code the autotuner would time.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Under the interpreter triton.jit builds interpreted functions, which cannot be compiled.
    sys.exit("compile_report.py compiles real kernels: unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_trd import DTYPES  # noqa: E402
from videorepa.kernels import trd_triton  # noqa: E402
from videorepa.kernels.validation import validate  # noqa: E402

# Shared memory one block may use (KiB), per compute capability: A100 163, H100/H200 227, B200 227.
SHARED_LIMIT_KIB = {80: 163, 90: 227, 100: 227}


@dataclass(frozen=True)
class Variant:
    """One specialisation of the kernel: what the autotuner keys on, besides the problem size."""

    dtype: str
    mode: str
    symmetric: bool
    grads: str  # "" (loss only), "s" (student), "st" (student and teacher)

    @property
    def name(self) -> str:
        schedule = "symmetric" if self.symmetric else "deterministic"
        return f"{self.dtype}/{self.mode}/{schedule}/grad-{self.grads or 'none'}"


def default_variants(quick: bool) -> list[Variant]:
    if quick:  # the training case, the other schedule with both gradients, and float32
        return [Variant("bf16", "full", False, "s"), Variant("bf16", "full", True, "st"),
                Variant("fp32", "full", False, "s")]
    variants = [Variant(dtype, "full", symmetric, grads) for dtype in DTYPES for symmetric in (False, True)
                for grads in ("", "s", "st")]
    return variants + [Variant("bf16", mode, False, "s") for mode in ("spatial", "temporal")]


def compile_config(variant: Variant, config: triton.Config, arch: int, tokens: int, dim: int,
                   tokens_per_frame: int):
    """triton.compile of `_trd_kernel` for `arch`, specialised from tensors of the given shape."""
    dtype = DTYPES[variant.dtype]
    student = torch.empty(1, tokens, dim, dtype=dtype)
    teacher = torch.empty(1, tokens, dim, dtype=dtype)
    frame = None if variant.mode == "full" else tokens_per_frame
    problem = validate(student, teacher, 0.1, variant.mode, frame)
    rows = torch.empty(1, tokens)
    grad_s = torch.empty(1, tokens, dim) if "s" in variant.grads else None
    grad_t = torch.empty(1, tokens, dim) if "t" in variant.grads else None
    args, flags = trd_triton.kernel_arguments(problem, rows, rows, rows, grad_s, grad_t, variant.symmetric)
    kwargs = {**flags, **config.all_kwargs()}

    kernel = trd_triton._trd_kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The JIT's own binder and packer: the same type, alignment and constant specialisation a launch gets.
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local memory bytes per thread (spills and stack), from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{text}")
    regs, stack, local = map(int, found.groups())
    return {"registers": regs, "local_bytes": max(stack, local)}


def matmul_instruction(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"  # Hopper warp-group MMA
    if "tcgen05.mma" in ptx:
        return "tcgen05"  # Blackwell
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def report_row(variant: Variant, config: triton.Config, arch: int, tokens: int, dim: int,
               tokens_per_frame: int) -> dict:
    row = {"arch": f"sm_{arch}", "variant": variant.name, **config.kwargs, "num_warps": config.num_warps,
           "num_stages": config.num_stages, "tokens": tokens, "dim": dim}
    start = time.perf_counter()
    try:
        compiled = compile_config(variant, config, arch, tokens, dim, tokens_per_frame)
    except Exception as err:  # a config that does not compile is a finding, recorded like the others
        return {**row, "error": f"{type(err).__name__}: {err}"}
    shared = compiled.metadata.shared
    return {**row, "compile_s": round(time.perf_counter() - start, 2), **resource_usage(compiled.asm["cubin"]),
            "shared_kib": round(shared / 1024, 1), "shared_fits": shared <= SHARED_LIMIT_KIB[arch] * 1024,
            "matmul": matmul_instruction(compiled.asm["ptx"])}


def format_row(row: dict) -> str:
    config = (f"{row['BLOCK_M']:>3}x{row['BLOCK_N']:<3} K{row['BLOCK_K']:<3} D{row['BLOCK_D']:<3} "
              f"w{row['num_warps']} s{row['num_stages']}")
    head = f"{row['arch']:<6} {row['variant']:<34} {config}"
    if "error" in row:
        return f"{head}  FAILED  {row['error'][:120]}"
    return (f"{head}  regs {row['registers']:>3}  local {row['local_bytes']:>5} B  shared {row['shared_kib']:>6} KiB"
            f"{'' if row['shared_fits'] else ' (too big)'}  {row['matmul']}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT_KIB),
                        help="compute capabilities to compile for (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="three variants instead of twenty")
    parser.add_argument("--tokens", type=int, default=3600, help="N the arguments are specialised from")
    parser.add_argument("--dim", type=int, default=768, help="Ds = Dt")
    parser.add_argument("--tokens-per-frame", type=int, default=150)
    parser.add_argument("--json", help="write the rows here")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for arch in args.arch:
        for variant in default_variants(args.quick):
            dtype = DTYPES[variant.dtype]
            for config in trd_triton.candidate_configs(dtype, dtype, args.tokens):  # what the autotuner would time
                rows.append(report_row(variant, config, arch, args.tokens, args.dim, args.tokens_per_frame))
                print(format_row(rows[-1]), flush=True)
    if args.json:
        meta = {"triton": triton.__version__, "torch": torch.__version__, "date": datetime.date.today().isoformat()}
        with open(args.json, "w") as f:
            json.dump([{**row, **meta} for row in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
