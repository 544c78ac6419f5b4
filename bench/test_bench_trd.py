"""Quick regression benchmarks (pytest-benchmark, CPU) and smoke runs of the bench_trd.py harness and the launch
configuration sweep."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bench_trd
from videorepa.kernels import trd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mode", ["full", "spatial", "temporal"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_fwd_bwd_speed(benchmark, backend, mode):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(1, 1024, 64, generator=gen, requires_grad=True)
    teacher = torch.randn(1, 1024, 48, generator=gen)
    frame = None if mode == "full" else 256

    def step():
        student.grad = None
        loss = trd_loss(student, teacher, 0.1, mode, frame, backend=backend)
        loss.backward()
        return loss

    loss = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert loss.item() > 0 and torch.isfinite(student.grad).all()


def test_harness_writes_checked_rows(tmp_path):
    out, picture = tmp_path / "rows.json", tmp_path / "plot.png"
    bench_trd.main(["--device", "cpu", "--sweep", "256", "512", "--impls", "torch", "naive", "compiled",
                    "--modes", "full", "spatial", "--min-samples", "3", "--json", str(out), "--plot", str(picture)])
    rows = bench_trd.trd_rows(json.loads(out.read_text()))
    assert len(rows) == 2 * 2 * 3 * 2  # sizes × modes × impls × passes
    for row in rows:
        assert {"impl", "pass", "mode", "B", "N", "Ds", "Dt", "dtype", "ms", "ms_p20", "ms_p80", "peak_mib",
                "tflops", "kernel_ms", "active_share", "device", "torch", "commit", "date"} <= row.keys()
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"]
        assert row["max_rel_err"] < 1e-4
    by_key = {(r["impl"], r["pass"], r["mode"], r["N"]): r for r in rows}
    # The blockwise engine never holds the N×N Gram matrices that naive keeps for backward.
    assert by_key["torch", "fwd+bwd", "full", 512]["peak_mib"] < by_key["naive", "fwd+bwd", "full", 512]["peak_mib"]
    assert picture.stat().st_size > 0


def test_harness_runs_in_pieces_and_merges_them(tmp_path, capsys):
    pieces = [tmp_path / "a.json", tmp_path / "b.json"]
    common = ["--device", "cpu", "--impls", "torch", "--modes", "full", "--passes", "fwd", "--min-samples", "1",
              "--profile-calls", "0"]
    bench_trd.main(common + ["--shapes", "sweep-512-d128", "--json", str(pieces[0])])
    bench_trd.main(common + ["--sweep", "256", "--json", str(pieces[1])])
    merged = tmp_path / "merged.json"
    bench_trd.main(["--from-json", *map(str, pieces), "--json", str(merged)])
    rows = bench_trd.trd_rows(json.loads(merged.read_text()))
    assert [(r["shape"], r["N"], r["Ds"]) for r in rows] == [("sweep-512-d128", 512, 128), ("sweep-256", 256, 768)]
    with pytest.raises(SystemExit):
        bench_trd.main(["--device", "cpu", "--shapes", "paper"])  # a GPU shape: the CPU set names paper-b1
    assert "paper-b1" in capsys.readouterr().err


def test_train_step_harness_runs_the_tiny_model(tmp_path):
    pytest.importorskip("diffusers")
    import bench_train_step

    out = tmp_path / "steps.json"
    bench_train_step.main(["--device", "cpu", "--model-size", "tiny", "--steps", "2", "--json", str(out)])
    rows = json.loads(out.read_text())
    # The tiny world's teacher tokens (8×8×12) lie on the transformer's own spatial grid: N = 768 for both grids.
    assert [(r["relation_grid"], r["trd_backend"], r["N"]) for r in rows] == [
        ("teacher", "torch", 768), ("teacher", "naive", 768), ("student", "torch", 768), ("student", "naive", 768)]
    for row in rows:
        assert row["ms"] > 0 and row["peak_mib"] > 0 and row["loss_trd"] > 0
    # Same random model and inputs for both backends: the same TRD loss.
    assert abs(rows[0]["loss_trd"] - rows[1]["loss_trd"]) < 1e-5


def test_config_sweep_times_every_candidate(tmp_path):
    # The sweep is meant for a GPU; through Triton's interpreter it checks that every candidate launches and is
    # recorded with its configs (the interpreter's timings mean nothing).
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "bench/sweep_configs.py", "--device", "cpu", "--shapes", "tiny",
                           "--schedules", "fused", "--dtype", "fp32", "--min-samples", "1", "--sample-ms", "0",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    from videorepa.kernels import triton_fused

    assert [row["configs"]["fused"] for row in rows] == [c.launch_kwargs() for c in triton_fused.CANDIDATES["fp32"]]
    assert all(row["ms"] > 0 and "error" not in row for row in rows)
    assert "fastest fused" in done.stdout
