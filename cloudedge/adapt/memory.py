"""Peak memory of an adaptation step: exact on a GPU, tensor-level on a CPU.

On CUDA, ``torch.cuda.max_memory_allocated`` is the answer. On a CPU neither ``tracemalloc`` (it
sees Python objects, not tensor buffers) nor the process's max RSS (monotonic across a whole run)
can tell methods apart, so :class:`TensorPeak` counts the bytes of every tensor storage created
inside the block while it is alive (via a dispatch mode) and keeps the maximum: activations kept
for backward, prompt gradients, optimizer moments, caches. Weights that existed before the block
(the frozen CLIP) are not counted; report them separately.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorPeak(TorchDispatchMode):
    """``with TensorPeak() as tp: ...``; then ``tp.peak_bytes`` (bytes of tensors created inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.live_bytes += nbytes
                    # The first tensor on a storage stands for it (views of it die no later in practice).
                    weakref.finalize(t, self._release, key, nbytes)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def measure_peak_bytes(fn: Any, device: torch.device) -> tuple[Any, int]:
    """Run ``fn()``; return its result and the peak bytes it allocated (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - base)
    with TensorPeak() as tracker:
        result = fn()
    return result, int(tracker.peak_bytes)
