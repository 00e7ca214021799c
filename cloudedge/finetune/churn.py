"""Churn in fine-tuning (``finetune.churn``; docs/reliability.md, "Reliability in fine-tuning").

- ``dropout``: a device that started its round goes away (battery, network, user) with this
  chance; the work it did is charged and its update never arrives.
- ``stale_prob``: a device holding an older model than the round's misses the broadcast with this
  chance (e.g. it just came back) and trains from its cached copy. Its update is weighted
  ``(1 + s)^-stale_decay`` (``s`` edge rounds behind) and rejected beyond ``max_staleness``, or at
  any staleness under product mode (which refactors the adapters every round).

Each aggregation point draws from its own churn stream (:mod:`cloudedge.finetune.streams`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cloudedge.config.finetune import ChurnSection
from cloudedge.finetune.lora import mode_class
from cloudedge.finetune.streams import stable_index, stream

Tensors = dict[str, torch.Tensor]
DEFAULTS: dict[str, Any] = ChurnSection().model_dump()  # the config's defaults, for settings built by hand


class Churn:
    """Dropouts and stale models of one run (``options``: the ``finetune.churn`` section as a dict)."""

    def __init__(self, options: dict[str, Any], seed: int, lora_mode: str):
        self.opts = {**DEFAULTS, **options}
        self.seed, self.lora_mode = seed, lora_mode
        self.refactors = mode_class(lora_mode).refactors
        self.rngs: dict[str, np.random.Generator] = {}
        self.device_cache: dict[str, tuple[int, Tensors]] = {}  # last model each device received

    def rng(self, agg_id: str) -> np.random.Generator:
        """The aggregation point's stream for churn (dropouts, stale devices)."""
        return stream(self.rngs, [self.seed, 15_485_863, stable_index(agg_id)], agg_id)

    def start_state(self, agg_id: str, dev_id: str, received: Tensors, version: int) -> tuple[Tensors, int]:
        """The model a device trains from, and how many edge rounds it is behind."""
        if self.opts["stale_prob"] <= 0:
            return received, 0
        cached = self.device_cache.get(dev_id)
        if cached is not None and cached[0] < version and self.rng(agg_id).random() < self.opts["stale_prob"]:
            return cached[1], version - cached[0]
        self.device_cache[dev_id] = (version, received)
        return received, 0

    def dropout_share(self, rng: np.random.Generator) -> float | None:
        """None when a device that starts its round stays; else the share of its work done before it
        left. ``rng``: its aggregation point's stream (:meth:`rng`)."""
        if self.opts["dropout"] > 0 and rng.random() < self.opts["dropout"]:
            return float(rng.random())
        return None

    def stale_reason(self, staleness: int) -> str | None:
        """Why an update ``staleness`` edge rounds old is rejected (None: it is accepted)."""
        if staleness > self.opts["max_staleness"]:
            return (f"stale: trained from a model {staleness} edge rounds old > churn.max_staleness "
                    f"{self.opts['max_staleness']}")
        if staleness > 0 and self.refactors:
            return (f"stale: {self.lora_mode} mode refactors the adapters every round, so an older update "
                    "does not apply")
        return None

    def state_dict(self) -> dict[str, Any]:
        """The streams and each device's cached model (its version and tensors), as a nested state."""
        return {"rngs": {k: g.bit_generator.state for k, g in self.rngs.items()},
                "cache": {d: {"version": v, "state": cached} for d, (v, cached) in self.device_cache.items()}}

    def load_state_dict(self, state: dict[str, Any], key_order: list[str]) -> None:
        """Restore :meth:`state_dict` output; ``key_order``: the adapter state's keys (a checkpoint sorts them)."""
        for agg_id, rng_state in state["rngs"].items():
            self.rng(agg_id).bit_generator.state = rng_state
        self.device_cache = {d: (int(c["version"]), {k: c["state"][k] for k in key_order})
                             for d, c in state["cache"].items()}
