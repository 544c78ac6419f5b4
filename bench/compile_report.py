"""Compile the Triton TRD kernels ahead of time for NVIDIA GPUs, on a machine without one, and report what each
launch candidate costs: registers per thread, local memory (spills), shared memory, the matmul instructions
Triton chose and how many blocks fit on one SM. A spilling or oversized config is slow or unlaunchable on the chip;
this finds it before a GPU does.

    python bench/compile_report.py --arch 90 --json bench/results/sm90-compile-v4-triton3.9-2026-11-25.json
    python bench/compile_report.py --arch 80 90 100 --quick

Arguments are specialised exactly as a launch would specialise them (pointer alignment, unit strides), from the
kernels' own launch builders on real tensors of the requested shape, so the code compiled here is the code a
launch runs.
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
from videorepa.kernels import triton_fused, triton_two_pass  # noqa: E402
from videorepa.kernels.triton_common import dtype_family  # noqa: E402
from videorepa.kernels.validation import validate  # noqa: E402

# Per compute capability: shared memory one block may use (KiB; A100 163, H100/H200 227, B200 227), and the SM's
# shared memory and 32-bit registers.
SHARED_LIMIT_KIB = {80: 163, 90: 227, 100: 227}
SM_SHARED_KIB = {80: 164, 90: 228, 100: 228}
SM_REGISTERS = 65536


@dataclass(frozen=True)
class Variant:
    """One specialisation of one kernel: what changes its code, besides the tile configuration."""

    kernel: str  # "pass1", "pass2" (two-pass schedule) or "fused"
    dtype: str
    mode: str
    grads: str  # "" (loss only), "s" (student), "st" (student and teacher)

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.dtype}/{self.mode}/grad-{self.grads or 'none'}"


TRAINING_CASES = ("pass1/bf16/full/grad-s", "pass2/bf16/full/grad-s", "fused/bf16/full/grad-s")


def default_variants(quick: bool) -> list[Variant]:
    if quick:  # the training case in every kernel, and float32's two passes
        return [Variant(*name.split("/")[:3], "s") for name in TRAINING_CASES] + \
            [Variant("pass1", "fp32", "full", "s"), Variant("pass2", "fp32", "full", "s")]
    variants = [Variant("pass1", dtype, "full", grads) for dtype in DTYPES for grads in ("", "s", "st")]
    variants += [Variant("pass2", dtype, "full", "s") for dtype in DTYPES]
    variants += [Variant("fused", dtype, "full", grads) for dtype in DTYPES for grads in ("s", "st")]
    return variants + [Variant(kernel, "bf16", mode, "s") for kernel in ("pass1", "pass2", "fused")
                       for mode in ("spatial", "temporal")]


def candidates(variant: Variant) -> list:
    """Every configuration a launch of this kernel may use: pass 2 once per pass-1 tile size it can follow."""
    family = dtype_family(DTYPES[variant.dtype])
    if variant.kernel == "fused":
        return triton_fused.CANDIDATES[family]
    firsts = triton_two_pass.PASS1_CANDIDATES[family]
    if variant.kernel == "pass1":
        return [(first, None) for first in firsts]
    blocks = sorted({first["BLOCK"] for first in firsts}, reverse=True)
    return [(next(f for f in firsts if f["BLOCK"] == block), second)
            for block in blocks for second in triton_two_pass.PASS2_CANDIDATES[family]]


def launch_arguments(variant: Variant, config, tokens: int, dim: int, tokens_per_frame: int):
    """(kernel, args, kwargs) of the launch this variant and config make, from the kernels' own builders."""
    dtype = DTYPES[variant.dtype]
    student = torch.empty(1, tokens, dim, dtype=dtype)
    teacher = torch.empty(1, tokens, dim, dtype=dtype)
    problem = validate(student, teacher, 0.1, variant.mode, None if variant.mode == "full" else tokens_per_frame)
    need_s, need_t = "s" in variant.grads, "t" in variant.grads
    norms = torch.ones(1, tokens)
    if variant.kernel == "fused":
        kernel, _, args, kwargs, _ = triton_fused.fused_launch(problem, norms, norms, need_s, need_t, config)
        return kernel, args, kwargs
    configs = (config[0], config[1] or triton_two_pass.PASS2_CANDIDATES["fp32"][0], 1)
    kernel, _, args, kwargs, (_, pair_map, radial) = triton_two_pass.pass1_launch(
        problem, norms, norms, need_s, need_t, configs)
    if variant.kernel == "pass1":
        return kernel, args, kwargs
    kernel, _, args, kwargs, _ = triton_two_pass.pass2_launch(
        problem, student, torch.ones(2, 1, tokens), pair_map, radial, torch.ones(1, dtype=torch.float64),
        torch.ones(1), False, 0, 1, configs)
    return kernel, args, kwargs


def compile_launch(kernel, args, kwargs, arch: int):
    """triton.compile of `kernel` for `arch`, specialised from the launch's own arguments."""
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


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def sass_loops(cubin: bytes) -> list[dict]:
    """Each loop of the kernel's machine code (a backward branch and the instructions up to it from its target):
    instructions per warp per iteration and how many of them are tensor-core MMAs. Eight warps issue four
    instructions per cycle per SM, so a loop's instructions bound its speed as surely as its MMAs do."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(SASS_LINE.search, text.splitlines()) if m]
    loops = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            body = [op for at, op, _ in code if int(target.group(1), 16) <= at <= address]
            loops.append({"instructions": len(body), "mma": sum(op.startswith(("HGMMA", "HMMA", "UTC")) for op in body)})
    return loops


def matmul_instruction(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"  # Hopper warp-group MMA
    if "tcgen05.mma" in ptx:
        return "tcgen05"  # Blackwell
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Blocks one SM holds at once, by registers (allocated per warp in units of 256) and shared memory."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = SM_REGISTERS // (per_warp * num_warps)
    by_shared = (SM_SHARED_KIB[arch] * 1024) // max(shared_bytes, 1)
    return min(by_registers, by_shared)


def config_columns(variant: Variant, config) -> dict:
    if variant.kernel == "fused":
        parts = [config]
    elif variant.kernel == "pass1":
        parts = [config[0]]
    else:
        parts = [config[1], triton_two_pass.LaunchConfig.of(0, 0, BLOCK=config[0]["BLOCK"])]
    columns = {}
    for part in parts:
        columns.update(dict(part.params))
    return {**columns, "num_warps": parts[0].num_warps, "num_stages": parts[0].num_stages}


def report_row(variant: Variant, config, arch: int, tokens: int, dim: int, tokens_per_frame: int) -> dict:
    row = {"arch": f"sm_{arch}", "variant": variant.name, **config_columns(variant, config), "tokens": tokens,
           "dim": dim}
    start = time.perf_counter()
    try:
        compiled = compile_launch(*launch_arguments(variant, config, tokens, dim, tokens_per_frame), arch)
    except Exception as err:  # a config that does not compile is a finding, recorded like the others
        return {**row, "error": f"{type(err).__name__}: {err}"}
    shared = compiled.metadata.shared
    usage = resource_usage(compiled.asm["cubin"])
    return {**row, "compile_s": round(time.perf_counter() - start, 2), **usage,
            "shared_kib": round(shared / 1024, 1), "shared_fits": shared <= SHARED_LIMIT_KIB[arch] * 1024,
            "blocks_per_sm": blocks_per_sm(usage["registers"], row["num_warps"], shared, arch),
            "matmul": matmul_instruction(compiled.asm["ptx"]), "loops": sass_loops(compiled.asm["cubin"])}


def format_row(row: dict) -> str:
    tiles = " ".join(f"{key.replace('BLOCK_', '').replace('BLOCK', 'T')}{row[key]}"
                     for key in ("BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "GROUP") if key in row)
    head = f"{row['arch']:<6} {row['variant']:<30} {tiles:<22} w{row['num_warps']} s{row['num_stages']}"
    if "error" in row:
        return f"{head}  FAILED  {row['error'][:120]}"
    loops = " ".join(f"{loop['instructions']}/{loop['mma']}" for loop in row["loops"] if loop["mma"])
    return (f"{head}  regs {row['registers']:>3}  local {row['local_bytes']:>5} B  shared {row['shared_kib']:>6} KiB"
            f"{'' if row['shared_fits'] else ' (too big)'}  {row['blocks_per_sm']}/SM  {row['matmul']}"
            f"  loops (instructions/MMA) {loops}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT_KIB),
                        help="compute capabilities to compile for (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="the training case of each kernel and float32's passes")
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
            for config in candidates(variant):
                rows.append(report_row(variant, config, arch, args.tokens, args.dim, args.tokens_per_frame))
                print(format_row(rows[-1]), flush=True)
    if args.json:
        meta = {"triton": triton.__version__, "torch": torch.__version__, "date": datetime.date.today().isoformat()}
        with open(args.json, "w") as f:
            json.dump([{**row, **meta} for row in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
