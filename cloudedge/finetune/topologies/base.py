"""The topology interface and its registry (see :mod:`cloudedge.finetune.topologies`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cloudedge.finetune.messages import CLOUD
from cloudedge.fleet.topology import Node
from cloudedge.registry import Registry

if TYPE_CHECKING:
    from cloudedge.finetune.loop import HierFinetune

Tensors = dict[str, torch.Tensor]
TOPOLOGIES: Registry[type[Topology]] = Registry("fine-tuning topology")


class Topology:
    """One way of reaching the cloud. Subclasses implement :meth:`step`; the rest has defaults for
    a topology whose aggregation points are the edges and that keeps no state between cloud updates."""

    def __init__(self, run: HierFinetune):
        self.run = run

    def points(self) -> list[str]:
        """The aggregation points of device updates (each edge by default)."""
        return [e.id for e in self.run.fleet.edges]

    def point_range(self, agg_id: str) -> tuple[int, int]:
        """The device numbers under an aggregation point (no device node is built)."""
        return (0, len(self.run.fleet.devices)) if agg_id == CLOUD else self.run.fleet.device_range(agg_id)

    def point_devices(self) -> dict[str, list[Node]]:
        """Each aggregation point's devices (built: for DP's sampling rates)."""
        return {e.id: self.run.fleet.devices_of(e.id) for e in self.run.fleet.edges}

    def start(self) -> None:
        """A fresh run, after its first metric row (not after a resume)."""

    def step(self) -> bool:
        """One cloud update (its metric row logged); True, doing nothing, when the run is over."""
        raise NotImplementedError

    def state_dict(self) -> list[dict[str, Any]]:
        """What a checkpoint keeps between cloud updates (nested: tensors anywhere in plain data)."""
        return []

    def load_state_dict(self, items: list[dict[str, Any]]) -> None:
        """Restore :meth:`state_dict` output (called after the run's global state is restored)."""
