"""Batch controllers: who trains this round and on how many samples.

Every controller has the same two verbs, called by the loop each round:

- ``plan(round, workers) -> Plan``: per-worker batch sizes (participants are the workers with a
  positive batch), the global batch and a learning-rate scale;
- ``observe(round, observations, round_s, train_loss)``: what happened (per-worker virtual compute
  and communication seconds, batch, squared gradient norm), to adapt the next plan.

``get_state()/set_state()`` hand the controller's memory to checkpoints (tensors + JSON), so a
resumed run decides exactly as an uninterrupted one. Controllers register by name in
:data:`CONTROLLERS` with their parameter model (``uniform``, ``proportional``, ``reweighted``,
``goodput``, ``learned``); a config names one as ``controller: goodput`` or
``controller: {name: goodput, lr_power: 0.5}``. The exact rules are in docs/pretraining.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from cloudedge.errors import InputError
from cloudedge.registry import Params, Registry

CONTROLLERS: Registry[type[BatchController]] = Registry("batch controller")


class ControllerParams(Params):
    """Knobs every controller takes."""

    min_batch: int = Field(default=1, ge=1, description="smallest batch a participant gets")


@dataclass(frozen=True)
class WorkerInfo:
    """What a controller knows of a worker before a round (from its profile and memory estimate)."""

    worker_id: str
    flops: float  # profile FLOP/s: the prior for throughput before anything was measured
    max_batch: int  # largest batch that fits in memory at once (more means gradient accumulation)
    available: bool = True
    samples: int | None = None  # size of the worker's data shard (None: unknown, no data floor)
    # The clock's priors, before anything was measured (None: unknown): virtual seconds to train one
    # sample, fixed seconds per round (broadcast + upload), and the chance of being reachable.
    sample_s: float | None = None
    overhead_s: float | None = None
    availability: float = 1.0


@dataclass(frozen=True)
class Observation:
    """What one worker did in a round, measured on the virtual clock."""

    worker_id: str
    batch: int  # samples per local step
    compute_s: float  # virtual seconds computing
    comm_s: float  # virtual seconds of fixed per-round overhead (transfers, latency)
    steps: int = 1
    grad_sq_norm: float | None = None  # |g|^2 of its (first) mini-batch gradient at batch size `batch`
    loss: float | None = None

    @property
    def throughput(self) -> float:
        """Samples per virtual second of compute."""
        return self.batch * self.steps / max(self.compute_s, 1e-12)


@dataclass
class Plan:
    """A round's plan. ``batches`` holds participants only (batch >= 1).

    ``weights`` (optional): each participant's weight in the aggregate (they need not sum to 1; the
    loop normalizes over the updates that arrive). None: weight by units (tokens or samples), the
    gradient of the mean loss over the union of the batches.
    """

    batches: dict[str, int]
    lr_scale: float = 1.0
    info: dict[str, float] = field(default_factory=dict)  # logged as is (e.g. noise scale)
    weights: dict[str, float] | None = None

    @property
    def global_batch(self) -> int:
        return int(sum(self.batches.values()))


def split_integer(total: int, weights: dict[str, float], minimum: int = 1) -> dict[str, int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder), each >= minimum.

    Workers with zero weight get nothing. Used so a global batch is dealt exactly, never off by one.
    """
    keys = [k for k, w in weights.items() if w > 0]
    if not keys:
        return {}
    total = max(total, minimum * len(keys))
    wsum = sum(weights[k] for k in keys)
    spare = total - minimum * len(keys)
    raw = {k: spare * weights[k] / wsum for k in keys}
    out = {k: minimum + int(math.floor(raw[k])) for k in keys}
    left = total - sum(out.values())
    # Deterministic tie-break: larger remainder first, then id.
    for k in sorted(keys, key=lambda k: (-(raw[k] - math.floor(raw[k])), k))[:left]:
        out[k] += 1
    return out


def finish_together(total: float, rate: dict[str, float], overhead: dict[str, float]) -> dict[str, float]:
    """Real-valued batches b_i with b_i / rate_i + overhead_i equal for all, summing to ``total``.

    Water-filling on the common finish time T: b_i = rate_i * max(T - overhead_i, 0). A worker whose
    fixed overhead alone exceeds T gets nothing. With zero overheads this is b_i ~ rate_i.
    """
    ids = sorted(rate, key=lambda k: overhead[k])
    active: list[str] = []
    for k in ids:
        active.append(k)
        rsum = sum(rate[j] for j in active)
        t = (total + sum(rate[j] * overhead[j] for j in active)) / rsum
        nxt = next((overhead[j] for j in ids if j not in active), math.inf)
        if t <= nxt:
            break
    return {k: (rate[k] * max(t - overhead[k], 0.0) if k in active else 0.0) for k in rate}


class BatchController:
    """Interface. Subclasses set ``name`` and override :meth:`plan` (and :meth:`observe`)."""

    name = "base"

    def __init__(self, global_batch: int, min_batch: int = 1):
        if global_batch < 1:
            raise InputError(f"pretrain.global_batch: must be >= 1, got {global_batch}")
        self.global_batch = int(global_batch)
        self.min_batch = int(min_batch)

    def plan(self, round_idx: int, workers: list[WorkerInfo]) -> Plan:
        raise NotImplementedError

    def observe(self, round_idx: int, observations: list[Observation], round_s: float, train_loss: float) -> None:
        """Learn from a finished round. Default: nothing to learn."""

    def describe(self) -> dict[str, Any]:
        """What the controller reports in the run summary (default: its name)."""
        return {"name": self.name}

    # Checkpointing: tensors (safetensors) and plain JSON state.
    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def set_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""


@CONTROLLERS.register("uniform", ControllerParams)
class UniformController(BatchController):
    """Every available worker gets the same batch: global_batch / n (the DDP default)."""

    name = "uniform"

    def plan(self, round_idx: int, workers: list[WorkerInfo]) -> Plan:
        avail = {w.worker_id: 1.0 for w in workers if w.available}
        return Plan(split_integer(self.global_batch, avail, self.min_batch))


class ThroughputTracker:
    """EMA of each worker's measured throughput (samples per compute-second) and fixed overhead."""

    def __init__(self, smoothing: float = 0.5):
        self.smoothing = smoothing
        self.rate: dict[str, float] = {}
        self.overhead: dict[str, float] = {}

    def update(self, observations: list[Observation]) -> None:
        a = self.smoothing
        for o in observations:
            if o.compute_s <= 0:
                continue
            # Overhead per local step, so b / rate + overhead is one step's time for any H.
            per_round_overhead = o.comm_s / max(1, o.steps)
            if o.worker_id in self.rate:
                self.rate[o.worker_id] = a * self.rate[o.worker_id] + (1 - a) * o.throughput
                self.overhead[o.worker_id] = a * self.overhead[o.worker_id] + (1 - a) * per_round_overhead
            else:
                self.rate[o.worker_id] = o.throughput
                self.overhead[o.worker_id] = per_round_overhead

    def estimates(self, workers: list[WorkerInfo]) -> tuple[dict[str, float], dict[str, float]]:
        """Rates and overheads for ``workers``; unmeasured ones scale from the profile FLOP/s ratio."""
        measured = [w for w in workers if w.worker_id in self.rate]
        if measured:
            # samples/s per FLOP/s, from measured workers: a prior that is right up to model cost.
            per_flop = float(np.median([self.rate[w.worker_id] / w.flops for w in measured]))
        else:
            per_flop = 1.0
        # A worker never measured: the clock's own prior when the loop gave one (seconds per sample
        # and per step), else its profile FLOP/s scaled as above and no overhead.
        rate = {w.worker_id: self.rate.get(w.worker_id, (1.0 / w.sample_s) if w.sample_s else per_flop * w.flops)
                for w in workers}
        overhead = {w.worker_id: self.overhead.get(w.worker_id, w.overhead_s or 0.0) for w in workers}
        return rate, overhead


def fill_with_floor(total: float, rate: dict[str, float], overhead: dict[str, float],
                    floor: dict[str, float]) -> dict[str, float]:
    """Finish-together batches that never drop below ``floor``: b_i = max(floor_i, rate_i (T - c_i)).

    T is found by bisection (the sum is monotone in T), so the batches sum to ``total``. With a zero
    floor this equals :func:`finish_together`.
    """
    if sum(floor.values()) >= total:
        scale = total / sum(floor.values()) if sum(floor.values()) > 0 else 0.0
        return {k: floor.get(k, 0.0) * scale for k in rate}

    def batches(t: float) -> dict[str, float]:
        return {k: max(floor.get(k, 0.0), rate[k] * max(t - overhead[k], 0.0)) for k in rate}

    lo, hi = 0.0, max(overhead.values(), default=0.0) + total / max(min(rate.values()), 1e-30) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(batches(mid).values()) < total:
            lo = mid
        else:
            hi = mid
    return batches(hi)


def cap_by_memory(batches: dict[str, float], caps: dict[str, int], total: float) -> dict[str, float]:
    """Cap each batch at its worker's memory; give the excess to uncapped workers pro rata."""
    out = dict(batches)
    for _ in range(len(out) + 1):
        over = {k: v - caps[k] for k, v in out.items() if v > caps[k] + 1e-9}
        if not over:
            break
        for k in over:
            out[k] = float(caps[k])
        free = {k: v for k, v in out.items() if v < caps[k] - 1e-9 and v > 0}
        excess = sum(over.values())
        fsum = sum(free.values())
        if not free or fsum <= 0:
            break  # everyone is at their cap: the global batch shrinks to what fits
        for k in free:
            out[k] += excess * free[k] / fsum
    return out


class ThroughputShareParams(ControllerParams):
    """Knobs of the controllers that deal batches by measured throughput (``reweighted``'s own)."""

    dead_band: float = Field(default=0.1, ge=0, description="relative change below which a worker keeps its batch")
    smoothing: float = Field(default=0.5, ge=0, lt=1, description="EMA weight of the old throughput estimate")
    memory_cap: bool = Field(default=True, description="cap batches at what fits in memory (false: accumulate)")


class ProportionalParams(ThroughputShareParams):
    data_floor: float = Field(default=0.5, ge=0, le=1,
                              description="share of the global batch dealt by shard size before water-filling")


@CONTROLLERS.register("proportional", ProportionalParams)
class ProportionalController(BatchController):
    """b_i from measured throughput so all workers finish a step together, capped by memory.

    Rule: b = finish_together(B, X, c) with X_i the EMA of measured samples per compute-second and
    c_i the EMA of fixed per-round overhead; b_i <= max_batch_i (excess goes to uncapped workers);
    integers by largest remainder. Dead band: a worker keeps its previous batch unless the new one
    differs by more than ``dead_band`` (relative), so measurement noise does not make batches hop.

    Data floor: data never moves, so a worker whose batch falls to zero silently drops its data from
    the objective (the union-batch gradient then covers only fast workers' shards). With
    ``data_floor`` f > 0 and shard sizes known, every available worker gets at least
    f * B * n_i / sum_j n_j samples per step and the rest is water-filled as above.
    """

    name = "proportional"

    def __init__(self, global_batch: int, min_batch: int = 1, dead_band: float = 0.1,
                 smoothing: float = 0.5, memory_cap: bool = True, data_floor: float = 0.5):
        super().__init__(global_batch, min_batch)
        if not 0.0 <= float(data_floor) <= 1.0:
            raise InputError(f"pretrain.controller.data_floor: must be in [0, 1], got {data_floor}")
        self.data_floor = float(data_floor)
        self.dead_band = float(dead_band)
        self.memory_cap = bool(memory_cap)
        self.tracker = ThroughputTracker(smoothing)
        self.previous: dict[str, int] = {}

    def real_split(self, total: float, workers: list[WorkerInfo]) -> dict[str, float]:
        """Real-valued batches of ``total`` over available ``workers``: finish-together, with the data
        floor and the memory caps applied (what :meth:`split` rounds; goodput's time model uses it)."""
        avail = [w for w in workers if w.available]
        rate, overhead = self.tracker.estimates(avail)
        n_total = sum(w.samples or 0 for w in avail)
        if self.data_floor > 0 and n_total > 0 and all(w.samples is not None for w in avail):
            floor = {w.worker_id: self.data_floor * total * w.samples / n_total for w in avail}
            real = fill_with_floor(float(total), rate, overhead, floor)
        else:
            real = finish_together(float(total), rate, overhead)
        if self.memory_cap:
            real = cap_by_memory(real, {w.worker_id: w.max_batch for w in avail}, float(total))
        return real

    def split(self, total: int, workers: list[WorkerInfo]) -> dict[str, int]:
        """The finish-together split of ``total`` over available ``workers`` (no dead band)."""
        real = self.real_split(total, workers)
        total_now = min(total, int(round(sum(real.values())))) if real else total
        return split_integer(total_now, real, self.min_batch) if total_now > 0 else {}

    def plan(self, round_idx: int, workers: list[WorkerInfo]) -> Plan:
        target = self.split(self.global_batch, workers)
        if self.previous and set(self.previous) == set(target):
            held = {k: (self.previous[k] if abs(target[k] - self.previous[k]) <= self.dead_band * self.previous[k]
                        else target[k]) for k in target}
            # Holding some workers can move the sum off the global batch; only accept the held plan
            # when it still deals the global batch within the dead band.
            if abs(sum(held.values()) - sum(target.values())) <= self.dead_band * sum(target.values()):
                target = held
        self.previous = dict(target)
        return Plan(target)

    def observe(self, round_idx: int, observations: list[Observation], round_s: float, train_loss: float) -> None:
        self.tracker.update(observations)

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"rate": self.tracker.rate, "overhead": self.tracker.overhead, "previous": self.previous}

    def set_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.tracker.rate = {k: float(v) for k, v in state.get("rate", {}).items()}
        self.tracker.overhead = {k: float(v) for k, v in state.get("overhead", {}).items()}
        self.previous = {k: int(v) for k, v in state.get("previous", {}).items()}


# No data floor: every shard keeps its weight by reweighting.
@CONTROLLERS.register("reweighted", ThroughputShareParams)
class ReweightedController(ProportionalController):
    """Batches follow speed; each worker's gradient is weighted by its data share, not its batch.

    Rule: every available worker with a shard gets b_i = max(min_batch, finish-together share of B)
    (no data floor: a slow worker's batch may be a single sample), memory caps as ``proportional``;
    the aggregate is g = sum_i p_i g_i with p_i = n_i / sum_j n_j over the round's available workers
    (n_i its shard size) and g_i the mean gradient of its batch. Since E[g_i] is the gradient of
    worker i's shard loss, E[g] is the gradient of the full objective (every shard at its size),
    whatever the batches: the objective is kept without a floor, so the speed-up is not capped.

    The price is variance: with per-sample variance s^2, Var(g) = sum_i p_i^2 s_i^2 / b_i instead of
    s^2 / B for data-proportional batches; the plan logs ``effective_batch`` = 1 / sum_i p_i^2 / b_i
    (B when b_i = p_i B, smaller otherwise) and ``variance_inflation`` = B / effective_batch.
    """

    name = "reweighted"

    def __init__(self, global_batch: int, min_batch: int = 1, dead_band: float = 0.1, smoothing: float = 0.5,
                 memory_cap: bool = True):
        super().__init__(global_batch, min_batch, dead_band=dead_band, smoothing=smoothing,
                         memory_cap=memory_cap, data_floor=0.0)

    def real_split(self, total: float, workers: list[WorkerInfo]) -> dict[str, float]:
        real = super().real_split(total, workers)
        # A worker the water-filling left out still takes part, so its shard keeps its weight.
        return {k: max(v, 1e-9) for k, v in real.items()}

    def plan(self, round_idx: int, workers: list[WorkerInfo]) -> Plan:
        plan = super().plan(round_idx, workers)
        shares = {w.worker_id: float(w.samples or 0) for w in workers if w.worker_id in plan.batches}
        if sum(shares.values()) <= 0:
            return plan  # shard sizes unknown: the union-batch gradient, as `proportional`
        total = sum(shares.values())
        plan.weights = {k: v / total for k, v in shares.items()}
        plan.info = {"effective_batch": effective_batch(plan.batches, plan.weights),
                     "variance_inflation": plan.global_batch / effective_batch(plan.batches, plan.weights)}
        return plan


def effective_batch(batches: dict[str, int], weights: dict[str, float]) -> float:
    """1 / sum_i w_i^2 / b_i (w normalized): the batch of i.i.d. samples whose mean has the variance
    of the weighted aggregate sum_i w_i mean(batch_i), for equal per-sample variance."""
    wsum = sum(weights[k] for k in batches)
    return 1.0 / sum((weights[k] / wsum) ** 2 / batches[k] for k in batches if batches[k] > 0)


def noise_regression(batches: list[int], sq_norms: list[float]) -> tuple[float, float] | None:
    """Least-squares fit |g|^2 = |G|^2 + tr(Sigma) / b over workers' (b, |g_b|^2).

    E|g_b|^2 = |G|^2 + tr(Sigma)/b for a mean over b i.i.d. samples, so the intercept estimates the
    squared true gradient and the slope the per-sample gradient variance. None when all b are equal.
    """
    inv_b = np.array([1.0 / b for b in batches], dtype=np.float64)
    y = np.array(sq_norms, dtype=np.float64)
    if len(inv_b) < 2 or np.ptp(inv_b) <= 1e-12:
        return None
    slope, intercept = np.polyfit(inv_b, y, 1)
    return float(intercept), float(slope)


class GoodputParams(ProportionalParams):
    max_global_batch: int | None = Field(default=None, ge=1, description="largest global batch (default 8 B)")
    min_global_batch: int | None = Field(default=None, ge=1, description="smallest global batch (default B / 4)")
    ema: float = Field(default=0.8, ge=0, lt=1, description="EMA weight of the old noise-scale estimates")
    lr_power: float = Field(default=1.0, ge=0, description="exponent on AdaScale's gain (1: SGD; 0.5 suits Adam)")


@CONTROLLERS.register("goodput", GoodputParams)
class GoodputController(ProportionalController):
    """Global batch M from the gradient noise scale (Pollux goodput), split proportionally.

    Each round the workers' (b_i, |g_i|^2) pairs give |G|^2 (intercept) and tr(Sigma) (slope) by
    regression on 1/b; both are EMA-smoothed, B_noise = tr(Sigma) / |G|^2. Next M maximises
    goodput(M) = M / T(M) * (B_noise + M0) / (B_noise + M) over a grid in [M_min, M_max], where
    T(M) is the finish-together round time of the proportional split (measured rates and
    overheads). The lr is scaled by AdaScale's gain r = (tr/M0 + |G|^2) / (tr/M + |G|^2), raised to
    ``lr_power`` (1 for SGD; 0.5, the square-root rule, suits Adam).
    """

    name = "goodput"

    def __init__(self, global_batch: int, min_batch: int = 1, max_global_batch: int | None = None,
                 min_global_batch: int | None = None, ema: float = 0.8, lr_power: float = 1.0,
                 **proportional: Any):
        super().__init__(global_batch, min_batch, **proportional)
        self.base_batch = int(global_batch)  # M0: the batch the base lr was tuned for
        self.max_global = int(max_global_batch or 8 * global_batch)
        self.min_global = int(min_global_batch or max(1, global_batch // 4))
        self.ema = float(ema)
        self.lr_power = float(lr_power)
        self.g2: float | None = None  # EMA of |G|^2
        self.trace: float | None = None  # EMA of tr(Sigma)
        self.current = int(global_batch)

    @property
    def noise_scale(self) -> float | None:
        if self.g2 is None or self.trace is None or self.g2 <= 0:
            return None
        return max(self.trace, 0.0) / self.g2

    def gain(self, batch: int) -> float:
        """AdaScale gain for a global batch ``batch`` relative to the base batch M0."""
        if self.g2 is None or self.trace is None or self.g2 <= 0:
            return 1.0
        tr = max(self.trace, 0.0)
        return (tr / self.base_batch + self.g2) / (tr / batch + self.g2)

    def round_time(self, total: int, workers: list[WorkerInfo]) -> tuple[float, float]:
        """(batch actually dealt, round seconds) for a global batch ``total``: the split this
        controller would deal (:meth:`real_split`: data floors and memory caps included, so a floor
        that holds a slow worker at its share, or caps that shrink the batch, count), timed with
        the measured rates and overheads."""
        avail = [w for w in workers if w.available]
        rate, overhead = self.tracker.estimates(avail)
        b = self.real_split(float(total), workers)
        dealt = sum(b.values())
        return dealt, max((b[k] / rate[k] + overhead[k] for k in b if b[k] > 0), default=math.inf)

    def choose_batch(self, workers: list[WorkerInfo]) -> int:
        bn = self.noise_scale
        if bn is None or not self.tracker.rate:
            return self.current
        grid = np.unique(np.geomspace(self.min_global, self.max_global, 24).round().astype(int))
        m0 = self.base_batch

        def goodput(m: int) -> float:
            dealt, seconds = self.round_time(int(m), workers)
            return dealt / seconds * (bn + m0) / (bn + dealt) if seconds > 0 else 0.0

        return int(max(grid, key=goodput))

    def plan(self, round_idx: int, workers: list[WorkerInfo]) -> Plan:
        self.current = self.choose_batch(workers)
        self.global_batch = self.current
        plan = super().plan(round_idx, workers)
        m = plan.global_batch
        plan.lr_scale = self.gain(m) ** self.lr_power
        plan.info = {"noise_scale": float(self.noise_scale or 0.0), "gain": float(self.gain(m))}
        return plan

    def observe(self, round_idx: int, observations: list[Observation], round_s: float, train_loss: float) -> None:
        super().observe(round_idx, observations, round_s, train_loss)
        pairs = [(o.batch, o.grad_sq_norm) for o in observations if o.grad_sq_norm is not None]
        fit = noise_regression([b for b, _ in pairs], [g for _, g in pairs]) if pairs else None
        if fit is None:
            return
        g2, trace = fit
        a = self.ema
        self.g2 = g2 if self.g2 is None else a * self.g2 + (1 - a) * g2
        self.trace = trace if self.trace is None else a * self.trace + (1 - a) * trace

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().get_state()
        state.update(g2=self.g2, trace=self.trace, current=self.current)
        return tensors, state

    def set_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().set_state(tensors, state)
        self.g2, self.trace = state.get("g2"), state.get("trace")
        self.current = int(state.get("current", self.current))
        self.global_batch = self.current


class _PolicyNet(nn.Module):
    """Shared per-worker policy: features -> logits over batch levels (level 0 = sit out)."""

    def __init__(self, n_features: int, n_levels: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_levels))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


class LearnedParams(ControllerParams):
    levels: tuple[float, ...] = Field(default=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0), min_length=2,
                                      description="batch levels, times the uniform share B/n (0: sit out)")
    lr: float = Field(default=0.02, gt=0, description="Adam's learning rate for the policy")
    horizon: int = Field(default=20, ge=1, description="rounds per simulated episode")
    seed: int | None = Field(default=None, ge=0, description="policy init and simulator draws (default: the run's seed)")
    hidden: int = Field(default=16, ge=1, description="policy MLP width")
    episodes: int = Field(default=1000, ge=0, description="offline training episodes")
    noise_scale: float | None = Field(default=None, ge=0, description="B_noise of the reward (default: B)")
    cache: bool = Field(default=True, description="reuse the policy trained for the same setup")


@CONTROLLERS.register("learned", LearnedParams)
class LearnedController(BatchController):
    """A policy-gradient agent that picks participants and per-worker batches; trained offline.

    Before its first plan it trains on a simulator of the fleet it will control (the virtual
    clock's cost model: ``cloudedge.pretrain.batch_rl``) for ``episodes`` episodes, or loads the
    policy cached for the same setup; during the run it is frozen (greedy actions, no updates).

    State (per available worker, 5 features): log of its throughput relative to the fastest
    available worker; its memory cap relative to the uniform share B/n (log, clipped to +-3); its
    fixed overhead relative to the last round time (0 before the first); whether it took part last
    round; its shard's share of the available data times n (1 = an average shard).
    Action (per worker): a level from ``levels`` (default 0, 0.25, 0.5, 1, 2, 4) times the uniform
    share B/n; level 0 means it sits out (at least the top-scored worker always takes part).
    Reward (per simulated episode): progress per virtual second, relative to uniform batches on the
    same availability draws, where a round's progress is coverage x M / (M + B_noise) (M its global
    batch, coverage the share of the available data whose workers took part, B_noise =
    ``noise_scale``, default B). REINFORCE with a running-mean baseline, Adam.
    A shared small MLP scores every worker, so the policy fits any fleet size.
    """

    name = "learned"
    N_FEATURES = 5

    def __init__(self, global_batch: int, min_batch: int = 1,
                 levels: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0), lr: float = 0.02,
                 horizon: int = 20, seed: int | None = 0, hidden: int = 16, episodes: int = 1000,
                 noise_scale: float | None = None, cache: bool = True):
        super().__init__(global_batch, min_batch)
        seed = 0 if seed is None else seed
        self.levels = tuple(float(x) for x in levels)
        self.sim_horizon = max(1, int(horizon))
        self.episodes = int(episodes)
        self.noise_scale = float(global_batch if noise_scale is None else noise_scale)
        self.lr = float(lr)
        self.hidden = int(hidden)
        self.seed = int(seed)
        self.cache = bool(cache)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.policy = _PolicyNet(self.N_FEATURES, len(self.levels), self.hidden)
        self.trained = False
        self.curve: list[float] = []
        self.from_cache = False
        self.tracker = ThroughputTracker(0.5)
        self.last_round_s = 0.0
        self.last_participants: set[str] = set()

    def features(self, workers: list[WorkerInfo]) -> torch.Tensor:
        """The state of the available ``workers`` now (``batch_rl.state_features``, as in training)."""
        from cloudedge.pretrain.batch_rl import state_features

        rate, overhead = self.tracker.estimates(workers)
        n = len(workers)
        feats = state_features(
            np.array([[rate[w.worker_id] for w in workers]]), np.array([w.max_batch for w in workers], dtype=float),
            np.array([overhead[w.worker_id] for w in workers]), np.array([float(w.samples or 1) for w in workers]),
            np.ones((1, n), dtype=bool), np.array([self.last_round_s]),
            np.array([[w.worker_id in self.last_participants for w in workers]]), self.global_batch)
        return torch.as_tensor(feats[0], dtype=torch.float32)

    def prepare(self, workers: list[WorkerInfo]) -> None:
        """Train offline on the fleet of ``workers`` (all of them, with their availability), or load
        the cached policy of the same setup. Called by the first :meth:`plan`."""
        from cloudedge.pretrain.batch_rl import load_or_train, train_offline

        if self.cache:
            self.curve, self.from_cache = load_or_train(self, workers)
        else:
            self.curve, self.from_cache = train_offline(self, workers), False
        self.trained = True

    def plan(self, round_idx: int, workers: list[WorkerInfo]) -> Plan:
        from cloudedge.pretrain.batch_rl import ensure_someone, level_batches

        if not self.trained:
            self.prepare(workers)
        avail = [w for w in workers if w.available]
        with torch.no_grad():
            logits = self.policy(self.features(avail))[None]
        mask = torch.ones(1, len(avail), dtype=torch.bool)
        actions = ensure_someone(logits, logits.argmax(dim=2), mask)  # frozen: the greedy action
        b = level_batches(np.array(self.levels), actions.numpy(), mask.numpy(), self.global_batch, self.min_batch)[0]
        batches = {w.worker_id: int(x) for w, x in zip(avail, b, strict=True) if x > 0}
        return Plan(batches, info={"participants": float(len(batches))})

    def observe(self, round_idx: int, observations: list[Observation], round_s: float, train_loss: float) -> None:
        self.tracker.update(observations)
        self.last_round_s = round_s
        self.last_participants = {o.worker_id for o in observations}

    def describe(self) -> dict[str, Any]:
        from cloudedge.pretrain.batch_rl import describe_curve

        return {"name": self.name, "episodes": self.episodes, "from_cache": self.from_cache,
                "learning_curve": describe_curve(self.curve)}

    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"policy.{k}": v.detach().clone() for k, v in self.policy.state_dict().items()}
        state = {"rate": self.tracker.rate, "overhead": self.tracker.overhead, "last_round_s": self.last_round_s,
                 "last_participants": sorted(self.last_participants), "trained": self.trained, "curve": self.curve}
        return tensors, state

    def set_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
        self.tracker.rate = {k: float(v) for k, v in state.get("rate", {}).items()}
        self.tracker.overhead = {k: float(v) for k, v in state.get("overhead", {}).items()}
        self.last_round_s = float(state.get("last_round_s", 0.0))
        self.last_participants = set(state.get("last_participants", []))
        self.trained = bool(state.get("trained", False))
        self.curve = [float(x) for x in state.get("curve", [])]


def get_controller(name: str, global_batch: int, **params: Any) -> BatchController:
    """A controller by name with ``params`` validated by its parameter model (an InputError naming
    ``pretrain.controller`` and the known names or parameters)."""
    try:
        choice = CONTROLLERS.choice({"name": name, **params})
    except ValueError as err:
        raise InputError(f"pretrain.controller: {err}") from None
    return CONTROLLERS.build(choice, global_batch)
