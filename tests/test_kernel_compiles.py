"""The fused kernel, compiled for real for the H100 (sm_90) through Triton's NVIDIA backend, which needs no GPU:
every autotune candidate compiles, runs its matmuls on Hopper's tensor cores (wgmma), fits in shared memory, and
the training case (bf16, student gradient) keeps its tiles in registers. The interpreter checks what the kernel
computes; this checks what the compiler makes of it."""

import json
import os
import subprocess
import sys

import torch

from videorepa.kernels.trd_triton import candidate_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_config_compiles_for_hopper(tmp_path):
    report = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "bench/compile_report.py", "--arch", "90", "--quick", "--tokens", "3600",
                           "--json", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(report.read_text())
    variants = {row["variant"] for row in rows}
    assert variants == {"bf16/full/deterministic/grad-s", "bf16/full/symmetric/grad-st",
                        "fp32/full/deterministic/grad-s"}
    expected = {dtype: len(candidate_configs(dtype, dtype, 3600)) for dtype in (torch.bfloat16, torch.float32)}
    assert len(rows) == 2 * expected[torch.bfloat16] + expected[torch.float32]
    for row in rows:
        assert "error" not in row, row
        assert row["matmul"] == "wgmma", row  # float32 included: three-TF32 products, not FMA loops
        assert row["shared_fits"], row
    # Register spills, bytes per thread: v2 of the kernel spilled up to 448 B in the training case; compiler
    # versions differ by a few bytes, a regression by hundreds.
    training = [row for row in rows if row["variant"] == "bf16/full/deterministic/grad-s"]
    spilling = [row for row in training if row["local_bytes"] > 32]
    assert not spilling, f"configs spilling registers in the training case: {spilling}"
    # Three-TF32 dots keep high and low operand parts live, so float32 spills a little; its best config stays small.
    assert min(row["local_bytes"] for row in rows if row["variant"].startswith("fp32")) <= 128
