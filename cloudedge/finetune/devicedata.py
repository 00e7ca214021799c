"""Device data built when a device is read, not when the fleet is: fine-tuning at a million devices.

:class:`LazyDeviceData` is a ``device id -> tensors`` mapping over a fleet whose values are made on
access by a ``build(number)`` function and dropped by the caller after the device's round; its sizes
are known without building anything (``samples_of``, ``samples_in``). Two builders:

- :class:`ShardView`: a partition kept as one permutation of the dataset and ``N + 1`` cut points
  (device ``i`` holds ``perm[cuts[i]:cuts[i+1]]``), the same shards the eager iid/quantity
  partitioners give, without a million index arrays.
- the scale benchmark's synthetic images, drawn from ``(seed, device number)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


class LazyDeviceData(Mapping):
    """``device id -> tensors`` built on read (see the module docstring).

    ``sizes``: samples per device, an int (every device) or an array indexed by device number.
    ``built`` counts the devices whose data was made (tests check it stays with the participants).
    """

    def __init__(self, fleet: Any, build: Callable[[int], Tensors], sizes: int | np.ndarray):
        self.fleet, self.build, self.sizes = fleet, build, sizes
        self.built = 0
        if not isinstance(sizes, int):
            self._cum = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])

    def _number(self, device_id: str) -> int:
        number = self.fleet.device_number(device_id)
        if number is None:
            raise KeyError(device_id)
        return number

    def __getitem__(self, device_id: str) -> Tensors:
        data = self.build(self._number(device_id))
        self.built += 1
        return data

    def __iter__(self) -> Iterator[str]:
        return (d.id for d in self.fleet.devices)

    def __len__(self) -> int:
        return len(self.fleet.devices)

    def samples_of(self, device_id: str) -> int:
        number = self._number(device_id)
        return self.sizes if isinstance(self.sizes, int) else int(self.sizes[number])

    def samples_in(self, lo: int, hi: int) -> int:
        """Samples held by devices numbered ``lo .. hi-1``."""
        if isinstance(self.sizes, int):
            return self.sizes * (hi - lo)
        return int(self._cum[hi] - self._cum[lo])


class ShardView:
    """Shards as one permutation and cut points: ``indices(i) = sorted(perm[cuts[i]:cuts[i+1]])``."""

    def __init__(self, perm: np.ndarray, sizes: np.ndarray):
        self.perm = np.asarray(perm, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.cuts = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return len(self.sizes)

    def indices(self, i: int) -> np.ndarray:
        return np.sort(self.perm[self.cuts[i]:self.cuts[i + 1]])


def sample_count(data: Mapping[str, Tensors], device_id: str) -> int:
    """Samples a device holds, without building a lazy device's data."""
    if isinstance(data, LazyDeviceData):
        return data.samples_of(device_id)
    return int(data[device_id]["labels"].shape[0])


def samples_of_range(data: Mapping[str, Tensors], fleet: Any, lo: int, hi: int) -> int:
    """Samples held by the devices numbered ``lo .. hi-1``."""
    if isinstance(data, LazyDeviceData):
        return data.samples_in(lo, hi)
    return sum(int(data[d.id]["labels"].shape[0]) for d in fleet.devices[lo:hi] if d.id in data)
