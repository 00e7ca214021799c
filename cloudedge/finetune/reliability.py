"""Reliability of the fine-tuning loop: the update gate, robust aggregation, churn, DP and memory.

The loop (:mod:`cloudedge.finetune.loop`) calls these at its aggregation points; the rules and why
are in docs/reliability.md ("Reliability in fine-tuning").

- :class:`UpdateGuard`: the update gate (:class:`cloudedge.robust.UpdateGate`) over a round's updates,
  with norms compared **per unit of work** (per local step at an edge, per edge round at the cloud):
  devices of one round run different numbers of steps (the autonomous policy fits steps to each
  device's speed), so raw norms of honest updates differ by the step ratio and a norm rule on them
  would reject the fast devices. The aggregator itself still receives the raw updates.
- :func:`robust_delta`: the configured aggregator over the accepted deltas, through
  :func:`cloudedge.robust.robust_aggregate` (Krum falls back to the median when too few arrived).
- :class:`PrivacyLedger`: one :class:`cloudedge.privacy.PrivacyAccountant` per aggregation point
  (each edge for its devices); a device belongs to one edge, so by parallel composition the fleet's
  epsilon is the largest of the edges'.
- :func:`memory_need` / :func:`check_memory`: what fine-tuning needs on a device, checked against
  each device profile before any work starts.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

from cloudedge.config.finetune import GateSection, RobustSection
from cloudedge.errors import InputError
from cloudedge.robust import GateResult, RobustAggregate, UpdateGate, robust_aggregate

Tensors = dict[str, torch.Tensor]

_GATE_KEYS = ("norm_rule", "max_norm_ratio", "max_norm", "min_updates", "mad_floor")
# Fine-tuning's gate defaults (the config's): honest per-step norms of one round are tightly spread
# (max / median <= 1.21 measured over 12 rounds), so MAD is tiny and `med + 5 MAD` with the shared
# default floor (0.01 med) rejected honest updates 1.15x the median; a floor of 0.1 med puts the
# bound at >= 1.5x the median, still far below a boosted update.
GATE_DEFAULTS: dict[str, Any] = {k: v for k, v in GateSection().model_dump().items() if v is not None}


class UpdateGuard:
    """The gate one aggregation point applies to its round's updates (see the module docstring).

    ``gate_cfg`` is the ``finetune.robust.gate`` section as a dict. With ``dp`` the statistical norm
    rule is off: DP clipping already bounds every update's influence, and a rule that rejects an
    update by comparing it with the others would make one user's presence change what happens to
    the rest (the sensitivity analysis assumes it does not). Structural checks and the absolute cap
    depend on the update alone and stay on.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor], gate_cfg: Mapping[str, Any] | None, dp: bool = False):
        unknown = [k for k in (gate_cfg or {}) if k not in _GATE_KEYS]
        if unknown:
            raise InputError(f"finetune.robust.gate: unknown option '{unknown[0]}' (known: {', '.join(_GATE_KEYS)})")
        cfg = {**GATE_DEFAULTS, **{k: v for k, v in (gate_cfg or {}).items() if v is not None}}
        if dp:
            cfg["norm_rule"] = "none"
        self.gate = UpdateGate(reference, **cfg)
        self.structural = UpdateGate(reference, norm_rule="none")

    def check(self, updates: Mapping[Hashable, Any], work: Mapping[Hashable, float]) -> GateResult:
        """Gate ``updates`` (id -> delta); the norm rule compares ``norm / work[id]``.

        ``accepted`` holds the callers' raw updates; ``norms`` are per unit of work."""
        scaled: dict[Hashable, Any] = {}
        for cid, upd in updates.items():
            w = float(work.get(cid, 1.0))
            if self.gate.structural_reason(upd) is None and w > 0 and w != 1.0:
                scaled[cid] = {k: v / w for k, v in upd.items()}
            else:
                scaled[cid] = upd
        result = self.gate.check(scaled)
        result.accepted = {cid: updates[cid] for cid in result.accepted}
        for cid, reason in result.rejected.items():
            if reason.startswith("update norm") and result.threshold is not None and "max_norm" not in reason:
                result.rejected[cid] = reason + " [norms per unit of work]"
        return result


def robust_settings(robust: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loop's plain form of the ``finetune.robust`` section (its dump; empty: the defaults):
    ``aggregator`` and ``cloud_aggregator`` as ``{"name": ..., **knobs}`` (the cloud's is the
    edge's when unset) and ``gate``."""
    try:
        section = RobustSection.model_validate(dict(robust or {}))
    except ValueError as err:
        raise InputError(f"finetune.robust: {err}") from None
    edge = section.aggregator
    cloud = section.cloud_aggregator or edge
    return {"aggregator": {"name": edge.name, **edge.kwargs()}, "cloud_aggregator": {"name": cloud.name, **cloud.kwargs()},
            "gate": section.gate.model_dump()}


def robust_delta(guard: UpdateGuard, accepted: Mapping[Hashable, Tensors], weights: Mapping[Hashable, float],
                 aggregator: Mapping[str, Any]) -> RobustAggregate:
    """Aggregate already-gated ``accepted`` deltas with ``aggregator`` (``{"name": ..., **knobs}``;
    weights: only the mean and multi_krum use them). Krum rules with too few updates fall back to
    the median (``note``)."""
    knobs = {k: v for k, v in aggregator.items() if k != "name"}
    return robust_aggregate(accepted, weights, aggregator["name"], gate=guard.structural, **knobs)


def stale_weight(staleness: int, decay: float) -> float:
    """``(1 + s)^-decay``: the polynomial staleness weight of FedAsync (Xie et al. 2019)."""
    return float((1.0 + staleness) ** (-decay))


class PrivacyLedger:
    """Privacy accounting of DP-FedAvg at every aggregation point (see the module docstring).

    ``rates``: aggregation point -> sampling rate ``q`` of its devices. Each aggregation that
    releases a noised mean is one step of that point's accountant.
    """

    def __init__(self, noise_multiplier: float, rates: Mapping[str, float], delta: float):
        from cloudedge.privacy import PrivacyAccountant

        self.delta = float(delta)
        self.accountants = {agg: PrivacyAccountant(noise_multiplier, q) for agg, q in rates.items()}
        self._eps_cache: dict[str, tuple[int, float]] = {}

    def step(self, agg_id: str) -> None:
        self.accountants[agg_id].step()

    def epsilon_of(self, agg_id: str) -> float:
        acc = self.accountants[agg_id]
        cached = self._eps_cache.get(agg_id)
        if cached is None or cached[0] != acc.rounds:
            self._eps_cache[agg_id] = (acc.rounds, acc.epsilon(self.delta))
        return self._eps_cache[agg_id][1]

    def epsilon(self) -> float:
        """The fleet's epsilon at ``delta``: the largest over aggregation points (parallel composition)."""
        return max((self.epsilon_of(a) for a in self.accountants), default=0.0)

    def rounds(self) -> dict[str, int]:
        return {a: acc.rounds for a, acc in self.accountants.items()}

    def state_dict(self) -> dict[str, Any]:
        return {a: acc.state_dict() for a, acc in self.accountants.items()}

    def load_state_dict(self, state: Mapping[str, Any], source: str) -> None:
        for a, acc in self.accountants.items():
            if a not in state:
                raise InputError(f"{source}: privacy state lacks aggregation point '{a}'")
            acc.load_state_dict(state[a], source)
        self._eps_cache = {}


def memory_need(info: Mapping[str, Any], optimizer: str, extra_weight_bytes: int = 0,
                precision: str = "fp32") -> dict[str, int]:
    """Bytes fine-tuning needs on a device, by part.

    ``weights``: every parameter (frozen base, adapters, head) and dense base deltas, plus under
    ``bf16`` autocast's 2-byte copy of every parameter; ``training_state``: gradients of the trained
    tensors and the optimizer's state (AdamW: two moments; SGD: none); ``activations``: what autograd
    keeps for backward on one batch, measured in float32 by the worker (``model_info``), halved
    under ``bf16``. The same rule as pre-training's (:mod:`cloudedge.pretrain.memory`)."""
    from cloudedge.pretrain.memory import ACTIVATION_BYTES, AUTOCAST_WEIGHT_BYTES, BYTES_PER_FLOAT

    trainable = int(info["trainable_bytes"])
    moments = 2 if optimizer == "adamw" else 0
    need = {"weights": int(info["model_bytes"]) + int(extra_weight_bytes) + AUTOCAST_WEIGHT_BYTES[precision] * int(info["params"]),
            "training_state": trainable * (1 + moments),
            "activations": int(info["activation_bytes"]) * ACTIVATION_BYTES[precision] // BYTES_PER_FLOAT}
    need["total"] = sum(need.values())
    return need


def check_memory(devices: Any, need: Mapping[str, int], memory_fraction: float, batch_size: int) -> None:
    """Raise InputError naming the devices whose usable memory (``memory_fraction`` x profile memory)
    is below ``need['total']``. Checked before any work starts, so a run never fails half-way.

    ``devices``: a list of nodes, or a `Fleet` (checked per distinct profile: no device is built)."""
    from cloudedge.fleet.topology import format_bytes

    if hasattr(devices, "device_profile_set"):
        groups = devices.device_profile_set()
    else:
        groups = [(d.profile, d.id, 1) for d in devices]
    short = [(p, dev_id, n) for p, dev_id, n in groups if p.memory_bytes * memory_fraction < need["total"]]
    if not short:
        return
    profile, dev_id, _ = short[0]
    n_short = sum(n for _, _, n in short)
    others = f" (and {n_short - 1} more device(s))" if n_short > 1 else ""
    raise InputError(
        f"fleet: device {dev_id} (profile '{profile.name}'){others}: fine-tuning needs "
        f"{format_bytes(need['total'])} (weights {format_bytes(need['weights'])} + gradients and optimizer "
        f"state {format_bytes(need['training_state'])} + activations of one batch of {batch_size} "
        f"{format_bytes(need['activations'])}) but finetune.memory_fraction {memory_fraction:g} x "
        f"{format_bytes(profile.memory_bytes)} = {format_bytes(profile.memory_bytes * memory_fraction)} "
        "is usable; use a smaller model or batch_size, or a device profile with more memory")
