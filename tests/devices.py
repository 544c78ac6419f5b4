"""The device the kernel and training-pattern tests run on: VIDEOREPA_TEST_DEVICE (default cpu, where the Triton
kernels run through Triton's interpreter, see conftest.py; "cuda" compiles them)."""

import os

import torch

DEVICE = torch.device(os.environ.get("VIDEOREPA_TEST_DEVICE", "cpu"))
# Tests of several processes on one machine: gloo processes on the CPU; on GPUs one per process (NCCL refuses two
# processes on one GPU), so there they need two.
TWO_PROCESSES_POSSIBLE = DEVICE.type == "cpu" or torch.cuda.device_count() >= 2
