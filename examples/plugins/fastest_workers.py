"""A batch controller of one's own: only the ``top_k`` fastest available workers train, on equal
batches (docs/extending.md). Name it in a config's ``plugins:`` list, then
``pretrain: {controller: {name: fastest, top_k: 2}}``."""

from __future__ import annotations

from pydantic import Field

from cloudedge.pretrain.batch import (
    CONTROLLERS,
    BatchController,
    ControllerParams,
    Plan,
    WorkerInfo,
    split_integer,
)


class FastestParams(ControllerParams):
    """The knobs, their defaults and ranges: the config is checked against this when it loads."""

    top_k: int = Field(default=2, ge=1, description="workers that train each round (the fastest by profile FLOP/s)")


@CONTROLLERS.register("fastest", FastestParams)
class FastestWorkers(BatchController):
    """The ``top_k`` available workers with the most FLOP/s share the global batch equally."""

    name = "fastest"

    def __init__(self, global_batch: int, min_batch: int, top_k: int):
        super().__init__(global_batch, min_batch)
        self.top_k = top_k

    def plan(self, round_idx: int, workers: list[WorkerInfo]) -> Plan:
        available = [w for w in workers if w.available]
        chosen = sorted(available, key=lambda w: (-w.flops, w.worker_id))[: self.top_k]
        return Plan(split_integer(self.global_batch, {w.worker_id: 1.0 for w in chosen}, self.min_batch))
