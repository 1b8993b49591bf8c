"""Peak memory, measured one way everywhere (trainer logs, lab.bench, lab.profile, opsd.gpu_check).

- CUDA: `torch.cuda.max_memory_allocated` (tensor bytes, not the caching allocator's reserve).
- CPU: the process's peak resident set size (Linux reports `ru_maxrss` in KiB). It never goes down, so a measurement
  of one piece of work needs a fresh process (the benchmark runs each variant in its own subprocess).
- CPU, exact: `LiveTensorBytes`, the peak of live tensor storage bytes created inside a dispatch mode (per-op
  overhead: for checks on tiny shapes, not for timing).
"""

from __future__ import annotations

import resource
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on GPU, else the process peak RSS, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.extra_gb`: the peak during the block above what was in use at its
    start (CUDA: allocated bytes; CPU: peak RSS growth of the process, meaningful in a fresh process)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.extra_gb = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = peak_memory_gb(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.extra_gb = max(peak_memory_gb(self.device) - self._base, 0.0)


class LiveTensorBytes(TorchDispatchMode):
    """Exact peak of the bytes of tensor storages created while active (CPU-friendly stand-in for CUDA's
    max_memory_allocated): every op output's storage is counted once and uncounted when it is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # outputs that share an input's storage (views, in-place ops) allocate nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out
