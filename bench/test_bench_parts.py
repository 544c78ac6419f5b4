"""The benchmark's pieces on CPU: correlated inputs and their active share, timing, kernel-only time from profiler
events, telemetry sampling, up-front skips, the time budget and the autotuner's pick."""

import json
import os
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

import bench_trd
from correlated_inputs import active_share, calibrate_mixing, correlated_pair
from measure import kernel_totals, sample_count, time_samples
import telemetry
from telemetry import Telemetry
from videorepa.memory import PeakMemory


def dense_share(s, t, margin, mode, frame):
    s, t = F.normalize(s.double(), dim=-1), F.normalize(t.double(), dim=-1)
    hit = ((s @ s.mT) - (t @ t.mT)).abs() > margin
    n = s.shape[-2]
    f = torch.arange(n) // (frame or n)
    same = f[:, None] == f[None, :]
    keep = {"full": torch.ones_like(same), "spatial": same, "temporal": ~same}[mode]
    return (hit & keep).sum().item() / (s.shape[0] * keep.sum().item())


@pytest.mark.parametrize("mode", ["full", "spatial", "temporal"])
def test_active_share_counts_the_kept_pairs_block_by_block(mode):
    s, t = correlated_pair(2, 90, 24, 16, 0.5, "cpu", seed=3)
    frame = None if mode == "full" else 9
    assert active_share(s, t, 0.1, mode, frame, block=16) == pytest.approx(dense_share(s, t, 0.1, mode, frame))


@pytest.mark.parametrize("student_dim, teacher_dim", [(128, 128), (320, 128)])
def test_calibrated_inputs_hit_the_target_share(student_dim, teacher_dim):
    for target in (0.4, 0.55):
        mixing = calibrate_mixing(target, student_dim, teacher_dim, "cpu")
        s, t = correlated_pair(2, 512, student_dim, teacher_dim, mixing, "cpu", seed=7)  # fresh draws
        assert active_share(s, t) == pytest.approx(target, abs=0.02)
        assert s.shape == (2, 512, student_dim) and t.shape == (2, 512, teacher_dim)


def test_independent_randn_leaves_few_pairs_active_and_mixing_lowers_the_share():
    gen = torch.Generator().manual_seed(0)
    randn = active_share(torch.randn(1, 768, 768, generator=gen), torch.randn(1, 768, 768, generator=gen))
    assert 0.03 < randn < 0.08  # the ~5 % that flatters the tensor cores
    shares = [active_share(*correlated_pair(1, 512, 768, 768, m, "cpu", seed=1)) for m in (0.0, 0.7, 1.0)]
    assert shares[0] > 0.55 and shares[0] > shares[1] > shares[2] and shares[2] < 0.05


def test_unreachable_share_names_the_flag():
    with pytest.raises(ValueError, match=r"--active-share 0.99 is out of reach for Ds=64, Dt=64"):
        calibrate_mixing(0.99, 64, 64, "cpu", tokens=128)


def test_sample_count_fills_the_target_time_with_a_floor():
    assert sample_count(50.0, 10, 300.0) == 10  # slow calls: the floor
    assert sample_count(1.0, 10, 300.0) == 300
    assert sample_count(0.0, 3, 300.0, max_samples=50) == 50


def test_time_samples_on_cpu_takes_the_floor_and_orders_quantiles():
    calls = []
    stats = time_samples(lambda: calls.append(time.sleep(0.002)), "cpu", min_samples=4, target_ms=0.0)
    assert stats["n_samples"] == 4 and len(calls) == 5  # one estimate, then the samples
    assert 2.0 <= stats["ms_p20"] <= stats["ms"] <= stats["ms_p80"]


def event(name, start, end, device_type):
    return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device_type)


def test_kernel_totals_take_device_activities_on_cuda_and_operator_time_on_cpu():
    events = [event("aten::mm", 0, 900, DeviceType.CPU), event("_trd_pass1", 10, 310, DeviceType.CUDA),
              event("_trd_pass2", 320, 720, DeviceType.CUDA), event("_trd_pass1", 800, 1100, DeviceType.CUDA),
              event("Activity Buffer Request", 1100, 5000, DeviceType.CUDA)]
    cuda = kernel_totals(events, "cuda", calls=2)
    assert cuda["kernel_ms"] == pytest.approx(0.5)  # (300 + 400 + 300) µs over two calls
    assert cuda["kernels"] == [["_trd_pass1", 0.3], ["_trd_pass2", 0.2]]
    cpu = kernel_totals(events, "cpu", calls=1)
    assert cpu["kernel_ms"] == pytest.approx(0.9) and cpu["kernels"] == [["aten::mm", 0.9]]


def test_telemetry_samples_during_the_block_and_survives_a_failing_reader():
    clocks = iter([1980.0, 1755.0, 1830.0] + [1900.0] * 100)
    with Telemetry(lambda: {"sm_clock_mhz": next(clocks), "temp_c": 60.0, "power_w": 500.0}, 0.01) as tm:
        time.sleep(0.05)
    summary = tm.summary()
    assert summary["telemetry_samples"] >= 3 and summary["sm_clock_min_mhz"] == 1755.0
    assert summary["temp_c"] == 60.0 and summary["power_max_w"] == 500.0
    taken = len(tm.samples)
    time.sleep(0.03)
    assert len(tm.samples) == taken  # sampling stopped with the block

    def broken():
        raise RuntimeError("NVML gone")

    with Telemetry(broken, 0.01) as tm:
        time.sleep(0.02)
    assert tm.summary() == {"telemetry_samples": 0}
    with Telemetry(None) as tm:
        pass
    assert tm.summary() == {"telemetry_samples": 0}


def test_readers_parse_nvidia_smi_and_nvml(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\necho '1755, 61, 512.34'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert telemetry._smi_reader("GPU-1234")() == {"sm_clock_mhz": 1755.0, "temp_c": 61.0, "power_w": 512.34}
    assert (tmp_path / "args").read_text().split()[0] == "--id=GPU-1234"

    handles = []
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: handles.append(uuid) or "h",
        nvmlDeviceGetHandleByIndex=lambda index: handles.append(index) or "h",
        nvmlDeviceGetClockInfo=lambda h, kind: 1980 if kind == 1 else 0,
        nvmlDeviceGetTemperature=lambda h, sensor: 47 if sensor == 0 else -1,
        nvmlDeviceGetPowerUsage=lambda h: 650123)  # milliwatts
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert telemetry._nvml_reader("GPU-abc")() == {"sm_clock_mhz": 1980.0, "temp_c": 47.0, "power_w": 650.123}
    telemetry._nvml_reader("0")
    assert handles == ["GPU-abc", 0]
    assert telemetry.gpu_reader("cpu") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward", [False, True])
def test_memory_estimate_bounds_naive_from_above(dtype, backward):
    shape = bench_trd.Shape("t", 2, 384, 32, 24, 48)
    s, t = bench_trd.make_inputs(shape, dtype, "cpu", 0, None)
    step = bench_trd.make_step("naive", "full", shape, backward)
    with PeakMemory("cpu") as mem:
        step(s, t)
    estimate = bench_trd.estimated_extra_bytes("naive", shape, dtype, backward)
    assert mem.peak_bytes <= estimate <= 2.5 * mem.peak_bytes
    assert bench_trd.estimated_extra_bytes("torch", shape, dtype, backward) is None


def test_skip_reasons_are_decided_up_front():
    shape = bench_trd.Shape("big", 1, 32400, 768, 768, 1350)
    options = bench_trd.Options(device="cpu", min_samples=10, sample_ms=0, memory_limit_gib=8.0, max_row_s=30)
    reason = bench_trd.skip_reason("naive", shape, torch.bfloat16, True, options, None, None)
    assert reason.startswith("needs ~14.7 GiB") and "8.0 GiB available" in reason  # 1.25 × N² × 12 B
    assert bench_trd.skip_reason("torch", shape, torch.bfloat16, True, options, None, None) is None
    options.memory_limit_gib = None
    reason = bench_trd.skip_reason("compiled", shape, torch.bfloat16, True, options, 2**40, 10.0)  # 10 GB/s
    assert "per call" in reason and "> 30 s per row" in reason
    options.deadline = time.monotonic() - 1
    assert bench_trd.skip_reason("torch", shape, torch.bfloat16, True, options, None, None) == "time budget reached"


def test_past_the_deadline_rows_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "rows.json"
    options = bench_trd.Options(device="cpu", min_samples=1, sample_ms=0, json_path=str(out),
                                deadline=time.monotonic() - 1)
    group = bench_trd.Group(bench_trd.sweep([64], dim=16), ["full"], ["fp32"], ["torch", "naive"], ["fwd"])
    bench_trd.run_benchmarks([group], options)
    rows = json.loads(out.read_text())
    assert [r["what"] for r in rows if r["kind"] == "reference"] == ["gemm-peak"] * 3  # no shape references
    assert [(r["impl"], r["skipped"]) for r in rows if r["kind"] == "trd"] == [
        ("torch", "time budget reached"), ("naive", "time budget reached")]


def test_a_failing_implementation_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    make_step = bench_trd.make_step

    def broken(impl, *args):
        if impl == "naive":
            raise TypeError("trd_loss() got an unexpected keyword argument 'schedule'")
        return make_step(impl, *args)

    monkeypatch.setattr(bench_trd, "make_step", broken)
    options = bench_trd.Options(device="cpu", min_samples=1, sample_ms=0, profile_calls=1)
    group = bench_trd.Group(bench_trd.sweep([64], dim=128), ["full"], ["fp32"], ["naive", "torch"], ["fwd"])
    rows = bench_trd.trd_rows(bench_trd.run_benchmarks([group], options))
    assert rows[0]["error"] == "TypeError: trd_loss() got an unexpected keyword argument 'schedule'"
    assert rows[0]["ms"] is None and rows[1]["ms"] > 0 and "error" not in rows[1]
    assert "Traceback" in capsys.readouterr().err


def test_triton_rows_name_the_schedule_and_launch_configs():
    assert bench_trd.loss_kwargs("two-pass") == {"backend": "triton", "schedule": "two-pass"}
    assert bench_trd.loss_kwargs("fused") == {"backend": "triton", "schedule": "fused"}
    assert bench_trd.loss_kwargs("compiled") == {"backend": "naive"}
    s, t = torch.randn(1, 64, 8), torch.randn(1, 64, 8)
    two_pass = bench_trd.launch_configs("two-pass", s, t, "full", None, backward=True)
    assert set(two_pass) == {"pass1", "pass2"} and two_pass["pass1"]["BLOCK"] >= 32
    assert set(bench_trd.launch_configs("fused", s, t, "full", None, backward=True)) == {"fused"}
    assert set(bench_trd.launch_configs("fused", s, t, "full", None, backward=False)) == {"pass1"}  # loss alone


