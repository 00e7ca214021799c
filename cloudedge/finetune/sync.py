"""Synchronization policies: how many local steps each device runs, and when each edge syncs with the cloud.

Every policy is a small class with the same verbs (pure: plain numbers in, decisions out):

- ``deadline(edge)``: seconds an edge round may last from its start (None: wait for everyone).
- ``device_steps(edge_id, device, deadline_s)``: local steps this device runs this edge round.
- ``should_sync(edge)``: after an edge round, does this edge sync with the cloud now?
- ``merge_weight(data_share, staleness, n_edges)``: without a barrier, the weight of an edge's
  delta when the cloud merges it (autonomous: data share, discounted for excess staleness).
- ``on_edge_round(edge_id, stats)``: feedback after an edge round (Wang's estimates).
- ``on_cloud_sync(reports)``: feedback at the cloud after a sync (Tempo, autonomous' reference).
- ``state_dict()`` / ``load_state_dict()``: plain JSON-able state for resume.

The class attribute ``topology`` names how the cloud gets its updates (a class of
:mod:`cloudedge.finetune.topologies`): ``barrier`` (the cloud waits for every edge before it
aggregates), ``two_tier`` (devices talk to the cloud directly, no edge aggregation) or
``autonomous`` (each edge merges into the global model on its own schedule). The exact rules,
their inputs and why are in docs/finetuning.md ("Synchronization policies").

Policies register by name in :data:`POLICIES`, each with its parameter model (a subclass of
:class:`SyncParams`: the knobs, their defaults and ranges). A config names one as
``sync: autonomous`` or ``sync: {name: autonomous, k1: 5, max_steps: 20}``. Besides its knobs a
policy gets the run's context: ``time_budget_s`` (virtual seconds of the run) and ``lr`` (the
devices' learning rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field, model_validator

from cloudedge.errors import InputError
from cloudedge.registry import Params, Registry

POLICIES: Registry[type[SyncPolicy]] = Registry("sync policy")


class SyncParams(Params):
    """Knobs every policy takes: the fixed schedule and the straggler rule."""

    k1: int = Field(default=5, ge=1, description="local steps per edge round (fixed policies; autonomous: the "
                                                 "median device's)")
    k2: int = Field(default=2, ge=1, description="edge rounds per cloud sync (hierfavg, tempo base, adaptive-interval)")
    deadline_factor: float | None = Field(
        default=2.0, gt=0, description="edge-round deadline = factor x median device's k1-step time; null: none")
    min_steps: int = Field(default=1, ge=1, description="fewest local steps a device runs (autonomous: else it sits out)")
    max_steps: int = Field(default=40, ge=1, description="most local steps a device runs (adaptive policies)")

    @model_validator(mode="after")
    def _steps_ordered(self) -> SyncParams:
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must be <= max_steps")
        return self


class AdaptiveIntervalParams(SyncParams):
    phi: float = Field(default=0.025, gt=0, description="Wang's control parameter")


class AutonomousParams(SyncParams):
    alpha: float = Field(default=1.0, gt=0, description="weight of divergence against sync cost")
    k2_max: int = Field(default=8, ge=1, description="most edge rounds between cloud syncs")
    margin: float = Field(default=0.9, gt=0, le=1, description="share of the deadline a device plans to use")
    sync_budget_bytes: float | None = Field(default=None, gt=0, description="edge->cloud bytes per edge over the run")
    staleness_exponent: float = Field(
        default=0.5, ge=0, description="a in the merge weight w_e (1 + excess staleness)^-a (0: no discount)")


@dataclass(frozen=True)
class DeviceObs:
    """What a device knows before an edge round."""

    device_id: str
    sec_per_step: float  # measured (virtual) seconds per local step, EMA of past rounds
    comm_s: float  # expected seconds to receive the edge model and send the update back
    n_samples: int


@dataclass(frozen=True)
class EdgeObs:
    """What an edge knows after an edge round (and at the start of one: rounds_done = 0)."""

    edge_id: str
    rounds_done: int  # edge rounds since this edge last synced with the cloud
    divergence: float  # |w_edge - w_global_pulled| over the adapter state
    device_drift: float  # mean over devices of |delta_d - mean delta| / |mean delta| in the last round
    round_s: float  # EMA of this edge's edge-round duration (s)
    sync_s: float  # expected seconds of one edge <-> cloud sync (up + down)
    sync_energy_j: float  # radio energy of one sync (both ends)
    round_energy_j: float  # device energy of the last edge round
    devices: tuple[DeviceObs, ...] = ()
    now: float = 0.0
    layer_divergence: float = 0.0  # Tempo's d_i: sum over layers of |w_edge - w_global| * n_i / N
    sync_bytes: float = 0.0  # bytes of one edge <-> cloud sync (up + down)
    # The cloud's answer at a sync: 1 - cos(this edge's change since its pull, the others' change
    # meanwhile), in [0, 2]; None when the cloud saw no other change to compare with.
    disagreement: float | None = None


@dataclass(frozen=True)
class DeviceStats:
    """One device's report for Wang's estimates (all over the trained adapter parameters)."""

    weight: float  # samples
    grad_start: Any  # flat tensor: gradient at the model it received, first batch
    grad_end_diff: float  # |grad_i(w_i) - grad_i(w_start)| on the same batch
    loss_diff: float  # |F_i(w_i) - F_i(w_start)| on the same batch
    step_norm: float  # |w_i - w_start|


@dataclass
class EdgeRoundStats:
    """What an edge measured in one round, for policies that learn from it."""

    local_step_s: float  # c: mean seconds per local step of its devices
    agg_s: float  # b: seconds of one aggregation (communication) in the round
    devices: list[DeviceStats] = field(default_factory=list)
    now: float = 0.0


class SyncPolicy:
    """Base: fixed ``k1`` local steps, sync every ``k2`` edge rounds, deadline from config."""

    name: ClassVar[str] = "base"
    topology: ClassVar[str] = "barrier"  # a name in cloudedge.finetune.topologies.TOPOLOGIES
    needs_grad_stats: ClassVar[bool] = False
    # The knobs of SyncParams (subclasses annotate their own), set from the validated parameters.
    k1: int
    k2: int
    deadline_factor: float | None
    min_steps: int
    max_steps: int

    def __init__(self, *, time_budget_s: float = 100.0, lr: float = 0.01, **knobs: Any):
        """``knobs`` are validated by the policy's registered parameter model (unknown ones are an
        InputError naming ``finetune.sync``) and become attributes of the same names."""
        try:
            params = POLICIES.validate_params(self.name, knobs)
        except ValueError as err:
            raise InputError(f"finetune.sync: {err}") from None
        for key in type(params).model_fields:
            setattr(self, key, getattr(params, key))
        self.time_budget_s, self.lr = float(time_budget_s), float(lr)

    def deadline(self, edge: EdgeObs) -> float | None:
        """``deadline_factor`` x the median device's expected round time for ``k1`` steps (None:
        no deadline). The same straggler rule for every fixed-step policy."""
        if self.deadline_factor is None or not edge.devices:
            return None
        return self.deadline_factor * _median([d.comm_s + self.k1 * d.sec_per_step for d in edge.devices])

    def device_steps(self, edge_id: str, device: DeviceObs, deadline_s: float | None) -> int:
        return self.k1

    def should_sync(self, edge: EdgeObs) -> bool:
        return edge.rounds_done >= self.k2

    def merge_weight(self, data_share: float, staleness: int, n_edges: int) -> float:
        """Weight of an edge's delta when it merges alone (no barrier): its share of the samples."""
        return float(data_share)

    def on_edge_round(self, edge_id: str, stats: EdgeRoundStats) -> None:
        """Feedback after an edge round (default: nothing to learn)."""

    def on_cloud_sync(self, reports: dict[str, EdgeObs]) -> None:
        """Feedback at the cloud after a sync (default: nothing to learn)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


@POLICIES.register("fedavg2", SyncParams)
class FedAvg2(SyncPolicy):
    """Two-tier FedAvg: devices run ``k1`` local steps and send to the cloud; no edge tier."""

    name = "fedavg2"
    topology = "two_tier"

    def should_sync(self, edge: EdgeObs) -> bool:
        return True


@POLICIES.register("hierfavg", SyncParams)
class HierFAVG(SyncPolicy):
    """HierFAVG (Liu et al. 2020): ``k1`` local steps per edge round, ``k2`` edge rounds per cloud sync."""

    name = "hierfavg"


@POLICIES.register("tempo", SyncParams)
class Tempo(SyncPolicy):
    """Tempo-style: the cloud gives each edge its number of edge rounds from the log of its divergence.

    ``d_i = sum_layers |w_edge_i - w_global| * n_i / N`` (reported at each sync);
    ``k2_i = clip(round(k2 * (1 + ln 2) / (1 + ln(1 + d_i / mean_j d_j))), 1, 2 k2)``:
    an edge of average divergence keeps ``k2``; a more divergent one syncs more often.
    """

    name = "tempo"

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.k2_of: dict[str, int] = {}

    def should_sync(self, edge: EdgeObs) -> bool:
        return edge.rounds_done >= self.k2_of.get(edge.edge_id, self.k2)

    def on_cloud_sync(self, reports: dict[str, EdgeObs]) -> None:
        ds = {e: r.layer_divergence for e, r in reports.items()}
        mean = sum(ds.values()) / max(1, len(ds))
        if mean <= 0:
            return
        for e, d in ds.items():
            k = self.k2 * (1 + math.log(2)) / (1 + math.log1p(d / mean))
            self.k2_of[e] = int(min(2 * self.k2, max(1, round(k))))

    def state_dict(self) -> dict[str, Any]:
        return {"k2_of": dict(self.k2_of)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k2_of = {str(k): int(v) for k, v in state.get("k2_of", {}).items()}


def wang_tau(*, beta: float, rho: float, delta: float, eta: float, phi: float, c: float, b: float,
             remaining_s: float, tau_prev: int, tau_cap: int = 100) -> int:
    """Wang et al. (JSAC 2019) budgeted interval: ``argmin_tau gap(tau)`` over ``1..min(10 tau_prev, cap)``.

    ``h(tau) = max(0, delta/beta ((eta beta + 1)^tau - 1) - eta delta tau)``,
    ``T(tau) = (R - c - b) tau / (c tau + b)``,
    ``gap(tau) = (1 + sqrt(1 + 4 T^2 phi rho eta h(tau) / tau)) / (2 T eta phi) + rho h(tau)``.
    Returns ``tau_prev`` when the budget is spent (T <= 0) or the estimates are degenerate.
    """
    if remaining_s - c - b <= 0 or eta <= 0 or phi <= 0:
        return tau_prev
    best_tau, best_gap = tau_prev, math.inf
    for tau in range(1, min(10 * tau_prev, tau_cap) + 1):
        if beta > 0 and delta > 0:
            h = delta / beta * ((eta * beta + 1) ** tau - 1) - eta * delta * tau
            h = max(0.0, h)
        else:
            h = 0.0
        big_t = (remaining_s - c - b) * tau / (c * tau + b)
        if big_t <= 0:
            continue
        gap = (1 + math.sqrt(1 + 4 * big_t**2 * phi * rho * eta * h / tau)) / (2 * big_t * eta * phi) + rho * h
        if gap < best_gap - 1e-15:
            best_tau, best_gap = tau, gap
    return best_tau


@POLICIES.register("adaptive-interval", AdaptiveIntervalParams)
class AdaptiveInterval(SyncPolicy):
    """Wang et al.'s budgeted adaptive interval, applied per edge to the local-step count ``tau``.

    After each edge round the edge estimates ``beta = sum p_i beta_i``, ``rho = sum p_i rho_i``
    and ``delta = sum p_i |g_i(w) - g(w)|`` from its devices' reports and sets ``tau`` with
    :func:`wang_tau` (``c`` = seconds per local step, ``b`` = seconds of the round's communication,
    ``R`` = the time budget left). Edge rounds per cloud sync stay fixed at ``k2``.
    """

    name = "adaptive-interval"
    needs_grad_stats = True

    phi: float

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.tau_of: dict[str, int] = {}

    def device_steps(self, edge_id: str, device: DeviceObs, deadline_s: float | None) -> int:
        return self.tau_of.get(edge_id, self.k1)

    def deadline(self, edge: EdgeObs) -> float | None:
        if self.deadline_factor is None or not edge.devices:
            return None
        tau = self.tau_of.get(edge.edge_id, self.k1)
        return self.deadline_factor * _median([d.comm_s + tau * d.sec_per_step for d in edge.devices])

    def on_edge_round(self, edge_id: str, stats: EdgeRoundStats) -> None:
        devs = [d for d in stats.devices if d.step_norm > 0]
        if not devs:
            return
        total = sum(d.weight for d in devs)
        p = [d.weight / total for d in devs]
        beta = sum(pi * d.grad_end_diff / d.step_norm for pi, d in zip(p, devs, strict=True))
        rho = sum(pi * d.loss_diff / d.step_norm for pi, d in zip(p, devs, strict=True))
        mean_grad = sum(pi * d.grad_start for pi, d in zip(p, devs, strict=True))
        delta = sum(pi * float((d.grad_start - mean_grad).norm()) for pi, d in zip(p, devs, strict=True))
        prev = self.tau_of.get(edge_id, self.k1)
        self.tau_of[edge_id] = wang_tau(beta=beta, rho=rho, delta=delta, eta=self.lr, phi=self.phi,
                                        c=stats.local_step_s, b=stats.agg_s,
                                        remaining_s=self.time_budget_s - stats.now, tau_prev=prev,
                                        tau_cap=min(100, self.max_steps))

    def state_dict(self) -> dict[str, Any]:
        return {"tau_of": dict(self.tau_of)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau_of = {str(k): int(v) for k, v in state.get("tau_of", {}).items()}


@POLICIES.register("autonomous", AutonomousParams)
class Autonomous(SyncPolicy):
    """Ours (after Tomtit): every device and every edge sets its own schedule; no global k1, k2.

    Device: ``steps = min(floor(margin * (deadline - comm_s) / sec_per_step), max_steps)`` with its
    measured speed, so every device finishes by its edge's deadline: fast devices do more, slow ones
    fewer, nobody straggles; a device for which fewer than ``min_steps`` fit sits the round out
    (0 steps: no download, no energy). The edge's deadline is the time its median device needs
    for ``k1`` steps, divided by ``margin`` (its own devices' speeds; no global k1 for anyone).

    Edge: syncs with the cloud after ``k2_e`` edge rounds, chosen after each round as
    ``k2_e = clip(round(sqrt(2 kappa_e / (alpha g_e))), k2_floor_e, k2_max)``, every input in
    absolute units (edge rounds), so an edge's interval does not depend on the other edges':

    - ``kappa_e = sync_s / round_s + sync_energy_j / round_energy_j``: what one sync costs, in edge
      rounds of time and of energy (link cost and energy);
    - ``g_e = nu_e / k_e``: the share of a round's progress that staleness wastes, per round without
      a sync. ``nu_e = 1 - cos(edge change since its pull, the other edges' change meanwhile)``
      (0: it moves where the fleet moves; 1: at right angles; 2: against it), measured by the cloud
      at each sync over that period's ``k_e`` rounds and sent back with the global model; before
      the first answer, ``nu = 1`` (nothing known: assume no agreement);
    - ``k2_floor_e`` keeps edge -> cloud bytes within ``sync_budget_bytes`` over ``time_budget_s``.

    With a fixed cost per sync and a waste that grows linearly between syncs, the interval that
    minimises (sync cost + waste) per round is the square-root rule (the economic-order-quantity
    trade-off): an edge whose data pull it away from the fleet syncs sooner, an edge behind an
    expensive link later. ``barrier`` is False: each edge merges into the global model when it decides.
    """

    name = "autonomous"
    topology = "autonomous"

    alpha: float
    k2_max: int
    margin: float
    sync_budget_bytes: float | None
    staleness_exponent: float

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.disagreement_of: dict[str, float] = {}  # the cloud's last nu_e, per edge
        self.rounds_of: dict[str, int] = {}  # the k_e that nu_e was measured over
        self.k2_of: dict[str, int] = {}

    def deadline(self, edge: EdgeObs) -> float | None:
        if not edge.devices:
            return None
        # Divided by the margin, so the median device plans exactly k1 steps.
        return _median([d.comm_s + self.k1 * d.sec_per_step for d in edge.devices]) / self.margin

    def device_steps(self, edge_id: str, device: DeviceObs, deadline_s: float | None) -> int:
        """Steps that fit the deadline; 0 (sit this round out, spend nothing) when fewer than
        ``min_steps`` fit."""
        if deadline_s is None:
            return self.k1
        room = self.margin * (deadline_s - device.comm_s)
        steps = math.floor(room / device.sec_per_step) if device.sec_per_step > 0 else self.max_steps
        return 0 if steps < self.min_steps else int(min(self.max_steps, steps))

    def waste_rate(self, edge_id: str) -> float:
        """``g_e = nu_e / k_e``: the share of a round's progress lost per round without a sync."""
        nu = self.disagreement_of.get(edge_id, 1.0)
        return nu / max(1, self.rounds_of.get(edge_id, 1))

    def edge_k2(self, edge: EdgeObs) -> int:
        """The edge's current sync interval (edge rounds per cloud sync) from what it observes."""
        kappa = edge.sync_s / max(edge.round_s, 1e-12)
        if edge.round_energy_j > 0:
            kappa += edge.sync_energy_j / edge.round_energy_j
        g = self.waste_rate(edge.edge_id)
        k2 = math.sqrt(2 * kappa / (self.alpha * g)) if g > 0 else math.inf
        floor = 1
        if self.sync_budget_bytes:
            syncs_allowed = self.sync_budget_bytes / max(edge.sync_bytes, 1.0)
            rounds_in_budget = self.time_budget_s / max(edge.round_s, 1e-12)
            floor = max(1, math.ceil(rounds_in_budget / max(syncs_allowed, 1e-12)))
        return int(min(self.k2_max, max(floor, round(k2) if math.isfinite(k2) else self.k2_max)))

    def merge_weight(self, data_share: float, staleness: int, n_edges: int) -> float:
        """The cloud's mixing weight for an edge's merge: ``global += eta_e (edge - pulled_e)``.

        ``eta_e = w_e * (1 + max(0, tau_e - (E - 1)))^(-a)``: ``w_e`` the edge's share of the
        fleet's samples, ``tau_e`` the merges the cloud applied since this edge pulled, ``E`` the
        number of edges, ``a`` = ``staleness_exponent`` (FedAsync's polynomial staleness function).
        ``E - 1`` merges since a pull is what a fleet of edges syncing at the same pace sees anyway
        (each delta misses the other edges' latest ones, as in a synchronous average of deltas
        computed from one global model), so it costs nothing: with equal paces the merges add up to
        exactly the barrier's sample-weighted average. Only staleness beyond that (this edge
        trained through several of the others' merges) is discounted, because its delta points
        where the global model was, not where it is.
        """
        excess = max(0, int(staleness) - (int(n_edges) - 1))
        return float(data_share) * (1.0 + excess) ** (-self.staleness_exponent)

    def should_sync(self, edge: EdgeObs) -> bool:
        k2 = self.edge_k2(edge)
        self.k2_of[edge.edge_id] = k2
        return edge.rounds_done >= k2

    def on_cloud_sync(self, reports: dict[str, EdgeObs]) -> None:
        # The cloud's answer to each edge that synced: its disagreement with the fleet, and over
        # how many rounds it was measured (kept until the next answer).
        for e, r in reports.items():
            if r.disagreement is not None:
                self.disagreement_of[e] = float(r.disagreement)
                self.rounds_of[e] = max(1, int(r.rounds_done))

    def state_dict(self) -> dict[str, Any]:
        return {"disagreement_of": dict(self.disagreement_of), "rounds_of": dict(self.rounds_of),
                "k2_of": dict(self.k2_of)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.disagreement_of = {str(k): float(v) for k, v in state.get("disagreement_of", {}).items()}
        self.rounds_of = {str(k): int(v) for k, v in state.get("rounds_of", {}).items()}
        self.k2_of = {str(k): int(v) for k, v in state.get("k2_of", {}).items()}


def disagreement(change: dict[str, Any], others: dict[str, Any]) -> float | None:
    """``1 - cos(change, others)`` over the tensors both have (flattened together), in [0, 2].

    ``change``: an edge's state minus the global state it pulled; ``others``: how the global model
    moved by the other edges' updates over the same time. None when either is zero (nothing to compare).
    """
    dot = na = nb = 0.0
    for k, a in change.items():
        if k not in others:
            continue
        a64, b64 = a.double().reshape(-1), others[k].double().reshape(-1)
        dot += float(a64 @ b64)
        na += float(a64 @ a64)
        nb += float(b64 @ b64)
    if na <= 0 or nb <= 0:
        return None
    return 1.0 - dot / math.sqrt(na * nb)


def make_policy(name: str, **kw: Any) -> SyncPolicy:
    """The policy called ``name`` (``finetune.sync``), built with its knobs and the run's context
    (``time_budget_s``, ``lr``)."""
    if name not in POLICIES:
        raise InputError(f"finetune.sync: unknown sync policy {name!r} (known: {', '.join(POLICIES)})")
    return POLICIES.get(name)(**kw)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
