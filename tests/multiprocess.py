"""Runs a function in a group of processes and returns what each rank returned: for tests of code that calls
torch.distributed. gloo processes on the CPU, or NCCL processes on one GPU each (rank r on cuda:r). A hung
collective fails the test after a timeout instead of hanging CI."""

import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, folder: str, device_type: str, fn, args):
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{folder}/store",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(folder, f"{rank}.pt"))


def run_processes(world: int, fn, *args, timeout: float = 300.0, device_type: str = "cpu") -> list:
    """[fn(rank, world, *args) for each rank], each run in its own process of a `world`-process group on
    `device_type` ("cpu" or "cuda"). `fn` must be importable (a module-level function) and return what torch.save
    and torch.load(weights_only) carry."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_entry, args=(world, folder, device_type, fn, args), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world} processes running {fn.__name__} did not finish in {timeout} s")
        return [torch.load(os.path.join(folder, f"{rank}.pt")) for rank in range(world)]
