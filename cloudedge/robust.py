"""The update gate: the one check every stage runs on client updates before aggregating them.

A round's updates arrive as ``{client_id: delta}``. :class:`UpdateGate` rejects, with a one-line
reason each (for the run log):

1. anything that is not a mapping of tensors;
2. missing or unexpected keys, wrong shapes, NaN/inf values, and (optionally) a global L2 norm
   above an absolute cap ``max_norm`` -- all through :func:`cloudedge.aggregate.validate_update`;
3. norms far outside the round's own distribution (``norm_rule="mad"``, the default): with
   ``m >= min_updates`` (3) structurally valid updates whose norms are ``n_1 .. n_m``,
   ``med = median(n)``, ``mad = median(|n_i - med|)``, an update is rejected when
   ``n_i > med + k * max(mad, mad_floor * med)`` with ``k = max_norm_ratio`` (5). The floor keeps a
   round of near-identical honest norms (mad ~ 0) from rejecting the slightly larger ones.
   ``norm_rule="ratio"`` rejects ``n_i > k * med`` instead; ``"none"`` skips this step.

The rule is one-sided: a small update cannot move the model far, a large one can. The exact rule and
its reasoning are in docs/reliability.md.

:func:`robust_aggregate` runs the gate, then the aggregator named in config
(:func:`cloudedge.aggregate.get_aggregator`) over what was accepted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cloudedge.aggregate import get_aggregator, global_norm, validate_update
from cloudedge.errors import InputError

Tensors = dict[str, torch.Tensor]
NORM_RULES = ("mad", "ratio", "none")
# Aggregators whose rule needs a minimum number of inputs (n >= 2f + 3).
_KRUM_FAMILY = ("krum", "multi_krum")


@dataclass
class GateResult:
    """What the gate decided for one round.

    ``accepted``: client id -> delta (the caller's tensors, not copies), in arrival order.
    ``rejected``: client id -> one-line reason. ``norms``: global L2 norm of every structurally
    valid update (accepted or rejected by the norm rule). ``threshold``: the norm bound applied this
    round by the norm rule (None when the rule did not apply).
    """

    accepted: dict[Hashable, Tensors] = field(default_factory=dict)
    rejected: dict[Hashable, str] = field(default_factory=dict)
    norms: dict[Hashable, float] = field(default_factory=dict)
    threshold: float | None = None

    def log_lines(self) -> list[str]:
        """One line per rejected update: ``rejected update from <id>: <reason>``."""
        return [f"rejected update from {cid}: {reason}" for cid, reason in self.rejected.items()]


class UpdateGate:
    """Rejects malformed and outlying client updates against ``reference_state``.

    ``reference_state`` names the keys and shapes every update must have (e.g. the global model's
    trainable state, or the LoRA adapter state). Options are validated here and raise
    :class:`InputError` (they come from config).
    """

    def __init__(self, reference_state: Mapping[str, torch.Tensor], norm_rule: str = "mad",
                 max_norm_ratio: float = 5.0, max_norm: float | None = None, min_updates: int = 3,
                 mad_floor: float = 0.01):
        if norm_rule not in NORM_RULES:
            raise InputError(f"gate.norm_rule: unknown rule {norm_rule!r} (known: {', '.join(NORM_RULES)})")
        if not (math.isfinite(max_norm_ratio) and max_norm_ratio > 0):
            raise InputError(f"gate.max_norm_ratio: must be a finite number > 0, got {max_norm_ratio}")
        if norm_rule == "ratio" and max_norm_ratio <= 1:
            raise InputError(f"gate.max_norm_ratio: must be > 1 for the 'ratio' rule, got {max_norm_ratio}")
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise InputError(f"gate.max_norm: must be a finite number > 0, got {max_norm}")
        if min_updates < 3:
            raise InputError(f"gate.min_updates: must be >= 3 (a median of fewer says nothing), got {min_updates}")
        if not (math.isfinite(mad_floor) and mad_floor >= 0):
            raise InputError(f"gate.mad_floor: must be a finite number >= 0, got {mad_floor}")
        self.reference = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in reference_state.items()}
        self.norm_rule = norm_rule
        self.max_norm_ratio = float(max_norm_ratio)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.min_updates = int(min_updates)
        self.mad_floor = float(mad_floor)

    def structural_reason(self, update: Any) -> str | None:
        """Why one update is unusable on its own (type, keys, shapes, non-finite, absolute cap)."""
        if not isinstance(update, Mapping):
            return f"not a mapping of tensors (got {type(update).__name__})"
        for k, v in update.items():
            if not isinstance(v, torch.Tensor):
                return f"key '{k}': not a tensor (got {type(v).__name__})"
        return validate_update(update, self.reference, max_norm=self.max_norm)

    def norm_threshold(self, norms: list[float]) -> float | None:
        """The bound the norm rule applies to a round with these norms (None: no bound)."""
        if self.norm_rule == "none" or len(norms) < self.min_updates:
            return None
        med = statistics.median(norms)
        if self.norm_rule == "ratio":
            return self.max_norm_ratio * med
        mad = statistics.median([abs(n - med) for n in norms])
        return med + self.max_norm_ratio * max(mad, self.mad_floor * med)

    def check(self, updates: Mapping[Hashable, Any]) -> GateResult:
        """Split ``updates`` (client id -> delta) into accepted and rejected (with reasons)."""
        result = GateResult()
        valid: dict[Hashable, Tensors] = {}
        for cid, update in updates.items():
            reason = self.structural_reason(update)
            if reason is None:
                valid[cid] = update
                result.norms[cid] = global_norm(update)
            else:
                result.rejected[cid] = reason
        result.threshold = self.norm_threshold(list(result.norms.values()))
        for cid, update in valid.items():
            norm = result.norms[cid]
            if result.threshold is not None and norm > result.threshold:
                result.rejected[cid] = (f"update norm {norm:.6g} > {result.threshold:.6g} "
                                        f"({self._rule_text()} of this round's {len(valid)} norms)")
            else:
                result.accepted[cid] = update
        return result

    def _rule_text(self) -> str:
        k = f"{self.max_norm_ratio:g}"
        return f"median + {k} x MAD" if self.norm_rule == "mad" else f"{k} x median"


@dataclass
class RobustAggregate:
    """:func:`robust_aggregate`'s answer. ``delta`` is None when the gate accepted nothing (the
    caller keeps its global state for this round). ``aggregator`` is the rule actually used
    (``median`` when a Krum rule had too few accepted updates; ``note`` then says why)."""

    delta: Tensors | None
    gate: GateResult
    aggregator: str
    note: str | None = None


def robust_aggregate(updates: Mapping[Hashable, Any], weights: Mapping[Hashable, float] | None,
                     aggregator_name: str = "mean", gate: UpdateGate | None = None,
                     reference_state: Mapping[str, torch.Tensor] | None = None,
                     **aggregator_kw: Any) -> RobustAggregate:
    """Gate ``updates`` (client id -> delta), then aggregate the accepted ones.

    Pass a configured ``gate``, or a ``reference_state`` to build a default one (MAD rule, k = 5).
    ``weights`` (client id -> weight, e.g. sample counts; None: uniform) are taken for the accepted
    clients only. ``aggregator_kw`` go to :func:`cloudedge.aggregate.get_aggregator`. A Krum rule
    needs ``n >= 2f + 3`` accepted updates; with fewer, the coordinate median is used instead
    (recorded in ``note``) so that rejections never stop a run.
    """
    if gate is None:
        if reference_state is None:
            raise ValueError("robust_aggregate: pass a gate or a reference_state")
        gate = UpdateGate(reference_state)
    aggregate = get_aggregator(aggregator_name, **aggregator_kw)  # validates name and options first
    result = gate.check(updates)
    ids = list(result.accepted)
    if not ids:
        return RobustAggregate(delta=None, gate=result, aggregator=aggregator_name,
                               note="no update accepted; round skipped")
    used, note = aggregator_name, None
    if aggregator_name in _KRUM_FAMILY:
        f = int(aggregator_kw.get("n_byzantine", 1))
        m = int(aggregator_kw.get("m") or 1)  # unset: n - f, which never exceeds what was accepted
        if len(ids) < 2 * f + 3 or len(ids) < m:
            used = "median"
            note = (f"{aggregator_name} needs >= {max(2 * f + 3, m)} updates, {len(ids)} accepted; "
                    "used the coordinate median")
            aggregate = get_aggregator("median")
    w = None if weights is None else [float(weights[cid]) for cid in ids]
    delta = aggregate([result.accepted[cid] for cid in ids], w)
    return RobustAggregate(delta=delta, gate=result, aggregator=used, note=note)
