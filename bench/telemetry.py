"""SM clock, temperature and power of the GPU, sampled while a measurement runs.

A throttled chip (power cap, heat) runs the same kernel slower, and the tensor cores draw power that depends on
the data, so every timed row carries what the chip was doing meanwhile. NVML (the nvidia-ml-py package, imported
as pynvml) is read directly where it is installed; otherwise `nvidia-smi` is asked; on a machine with neither
(a CPU run) the rows carry no telemetry.
"""

import shutil
import statistics
import subprocess
import threading


def _nvml_reader(gpu_id: str):
    import pynvml

    pynvml.nvmlInit()
    handle = (pynvml.nvmlDeviceGetHandleByUUID(gpu_id) if gpu_id.startswith("GPU-")
              else pynvml.nvmlDeviceGetHandleByIndex(int(gpu_id)))

    def read() -> dict:
        return {"sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                "temp_c": float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3}

    read()
    return read


def _smi_reader(gpu_id: str):
    command = ["nvidia-smi", f"--id={gpu_id}", "--query-gpu=clocks.sm,temperature.gpu,power.draw",
               "--format=csv,noheader,nounits"]

    def read() -> dict:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
        clock, temp, power = (float(v) for v in out.strip().splitlines()[0].split(","))
        return {"sm_clock_mhz": clock, "temp_c": temp, "power_w": power}

    read()
    return read


def gpu_reader(device: str):
    """A function returning {sm_clock_mhz, temp_c, power_w} for the current CUDA device, or None (no GPU, or
    neither NVML nor nvidia-smi answers). The device is named by its UUID, which NVML and CUDA agree on whatever
    CUDA_VISIBLE_DEVICES says; by CUDA's index where torch gives no UUID."""
    if device != "cuda":
        return None
    import torch

    index = torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
    ids = ([uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"] if uuid else []) + [str(index)]
    makers = [_nvml_reader] + ([_smi_reader] if shutil.which("nvidia-smi") else [])
    for make in makers:
        for gpu_id in ids:
            try:
                return make(gpu_id)
            except Exception:  # noqa: BLE001  no pynvml, or it refuses this id: try the next way
                pass
    return None


class Telemetry:
    """`with Telemetry(reader) as tm: ...` samples `reader` every `interval_s` on a thread (and once at each end);
    `tm.summary()` gives median SM clock and power, the lowest clock, the highest temperature and power."""

    def __init__(self, reader, interval_s: float = 0.1):
        self.reader, self.interval_s = reader, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        try:
            self.samples.append(self.reader())
        except Exception:  # noqa: BLE001  a failed read is a missing sample, never a failed measurement
            pass

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self):
        if self.reader is not None:
            self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        return False

    def summary(self) -> dict:
        if not self.samples:
            return {"telemetry_samples": 0}
        clocks = [s["sm_clock_mhz"] for s in self.samples]
        power = [s["power_w"] for s in self.samples]
        return {"telemetry_samples": len(self.samples), "sm_clock_mhz": statistics.median(clocks),
                "sm_clock_min_mhz": min(clocks), "temp_c": max(s["temp_c"] for s in self.samples),
                "power_w": statistics.median(power), "power_max_w": max(power)}
