"""Peak memory of a block of code: CUDA allocator statistics on GPU; on CPU, live tensor bytes seen by a dispatch mode.

CPU has no allocator statistics, so `PeakMemory` counts the storage bytes of every tensor that an operator returns
(views and in-place results alias an input and are not counted again) until the tensor dies.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.owners: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors using it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out

    def _track(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address == 0:
            return
        entry = self.owners.get(address)
        if entry is None:
            entry = self.owners[address] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int):
        entry = self.owners[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.owners[address]


class PeakMemory:
    """`with PeakMemory(device) as mem: ...` then `mem.peak_bytes`: the most memory held at once inside the block
    beyond what was held on entry."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveTensorBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
        return False

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20
