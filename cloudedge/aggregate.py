"""Aggregation of client updates and server optimizers.

Every aggregator takes a list of tensor dicts with the same keys and shapes (client updates or
models) and returns one dict of the same structure. Work is done per key on stacked tensors or with
``torch._foreach_*`` over all keys, never element by element in Python; results keep each key's
dtype (integer keys are rounded). The exact rules are in docs/aggregation.md.

Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", in the forms OpenFedLLM
uses) turn the aggregated delta ``mean_i w_i (client_i - global)`` into the next global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field

from cloudedge.errors import InputError
from cloudedge.registry import Choice, Params, Registry

Tensors = dict[str, torch.Tensor]
Aggregator = Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[float] | None], Tensors]


# --------------------------------------------------------------------------------------------------
# Helpers


def _check_updates(updates: Sequence[Mapping[str, torch.Tensor]], what: str) -> list[str]:
    """The common key list; raises ValueError when the updates do not share keys and shapes."""
    if len(updates) == 0:
        raise ValueError(f"{what}: no updates")
    keys = list(updates[0])
    for i, upd in enumerate(updates[1:], start=1):
        if list(upd) != keys and set(upd) != set(keys):
            raise ValueError(f"{what}: update {i} has keys {sorted(upd)} != {sorted(keys)}")
        for k in keys:
            if upd[k].shape != updates[0][k].shape:
                raise ValueError(f"{what}: update {i} key '{k}': shape {tuple(upd[k].shape)} != "
                                 f"{tuple(updates[0][k].shape)}")
    return keys


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast_back(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)


def _stack(updates: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    """``[n, numel]`` of one key across clients, in the accumulation dtype."""
    dtype = _acc_dtype(updates[0][key].dtype)
    return torch.stack([u[key].detach().reshape(-1).to(dtype) for u in updates])


def _normalized_weights(weights: Sequence[float] | torch.Tensor | None, n: int, what: str) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != n:
        raise ValueError(f"{what}: {len(w)} weights for {n} updates")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"{what}: weights must be finite and >= 0, got {w}")
    total = math.fsum(w)
    if total <= 0:
        raise ValueError(f"{what}: weights sum to zero")
    return [x / total for x in w]


# --------------------------------------------------------------------------------------------------
# Aggregators


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float] | torch.Tensor | None = None) -> Tensors:
    """``sum_i w_i u_i / sum_i w_i`` per key (uniform when ``weights`` is None).

    Weights must be finite and non-negative with a positive sum (else ValueError). Accumulates in
    float32 (float64 for float64 keys) with one fused ``_foreach`` pass per client.
    """
    keys = _check_updates(updates, "weighted_mean")
    w = _normalized_weights(weights, len(updates), "weighted_mean")
    acc = [torch.zeros(updates[0][k].shape, dtype=_acc_dtype(updates[0][k].dtype), device=updates[0][k].device)
           for k in keys]
    for wi, upd in zip(w, updates, strict=True):
        if wi == 0.0:
            continue
        torch._foreach_add_(acc, [upd[k].detach().to(a.dtype) for k, a in zip(keys, acc, strict=True)], alpha=wi)
    return {k: _cast_back(a, updates[0][k].dtype) for k, a in zip(keys, acc, strict=True)}


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], beta: float) -> Tensors:
    """Coordinate-wise trimmed mean: per coordinate, sort the n values, drop ``floor(beta * n)``
    at each end and average the rest (unweighted). Needs ``0 <= beta < 0.5`` and something left."""
    keys = _check_updates(updates, "trimmed_mean")
    n = len(updates)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    cut = int(math.floor(beta * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed_mean: beta={beta} trims all {n} updates")
    out: Tensors = {}
    for k in keys:
        stacked = _stack(updates, k).sort(dim=0).values
        kept = stacked[cut:n - cut].mean(dim=0)
        out[k] = _cast_back(kept.view(updates[0][k].shape), updates[0][k].dtype)
    return out


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Coordinate-wise median; with an even count, the mean of the two middle values (as numpy)."""
    keys = _check_updates(updates, "coordinate_median")
    n = len(updates)
    out: Tensors = {}
    for k in keys:
        stacked = _stack(updates, k).sort(dim=0).values
        med = (stacked[(n - 1) // 2] + stacked[n // 2]) / 2
        out[k] = _cast_back(med.view(updates[0][k].shape), updates[0][k].dtype)
    return out


def pairwise_sq_distances(updates: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``[n, n]`` float64 matrix of squared L2 distances between whole updates (all keys)."""
    keys = _check_updates(updates, "pairwise_sq_distances")
    n = len(updates)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for k in keys:
        x = _stack(updates, k).to(torch.float64)
        # Direct differences (not the |a|^2 + |b|^2 - 2ab expansion) so near-equal updates get ~0.
        dist += torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    return dist


def krum_scores(updates: Sequence[Mapping[str, torch.Tensor]], n_byzantine: int) -> torch.Tensor:
    """Krum score of each update (Blanchard et al. 2017): the sum of squared distances to its
    ``n - f - 2`` nearest other updates. Needs ``n >= 2f + 3``."""
    n = len(updates)
    if n_byzantine < 0 or n < 2 * n_byzantine + 3:
        raise ValueError(f"krum: needs n >= 2f + 3, got n={n}, f={n_byzantine}")
    dist = pairwise_sq_distances(updates)
    dist.fill_diagonal_(float("inf"))  # exclude each update from its own neighbours
    nearest = dist.sort(dim=1).values[:, : n - n_byzantine - 2]
    return nearest.sum(dim=1)


def krum_select(updates: Sequence[Mapping[str, torch.Tensor]], n_byzantine: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` lowest-score updates (ties: lower index first)."""
    n = len(updates)
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum: m must be in [1, {n}], got {m}")
    scores = krum_scores(updates, n_byzantine)
    return torch.argsort(scores, stable=True)[:m].tolist()


def krum(updates: Sequence[Mapping[str, torch.Tensor]], n_byzantine: int) -> Tensors:
    """The single update with the lowest Krum score (a copy)."""
    (best,) = krum_select(updates, n_byzantine, 1)
    return {k: v.detach().clone() for k, v in updates[best].items()}


def multi_krum(updates: Sequence[Mapping[str, torch.Tensor]], n_byzantine: int, m: int,
               weights: Sequence[float] | None = None) -> Tensors:
    """Mean of the ``m`` lowest-score updates (scores computed once over all n, as in Blanchard
    et al.), weighted by their ``weights`` when given."""
    chosen = krum_select(updates, n_byzantine, m)
    sub_w = None if weights is None else [weights[i] for i in chosen]
    return weighted_mean([updates[i] for i in chosen], sub_w)


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all tensors together (computed in float64; NaN/inf if any entry is)."""
    tensors = [t.detach() if t.dtype.is_floating_point else t.detach().to(torch.float64) for t in update.values()]
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def clip_by_norm(update: Mapping[str, torch.Tensor], max_norm: float) -> Tensors:
    """Scale the whole update by ``min(1, max_norm / global_norm)`` (a new dict)."""
    if not max_norm > 0:
        raise ValueError(f"clip_by_norm: max_norm must be > 0, got {max_norm}")
    norm = global_norm(update)
    if not math.isfinite(norm):
        raise ValueError("clip_by_norm: update has non-finite values")
    keys = list(update)
    out = [update[k].detach().clone() for k in keys]
    if norm > max_norm:
        floats = [t for t in out if t.dtype.is_floating_point]
        torch._foreach_mul_(floats, max_norm / norm)
    return dict(zip(keys, out, strict=True))


def validate_update(update: Mapping[str, torch.Tensor], reference_state: Mapping[str, torch.Tensor],
                    max_norm: float | None = None) -> str | None:
    """Why ``update`` must be rejected (missing/extra keys, wrong shape, non-finite values, norm
    above ``max_norm``), or None if it is acceptable."""
    missing = [k for k in reference_state if k not in update]
    if missing:
        return f"missing keys: {missing}"
    extra = [k for k in update if k not in reference_state]
    if extra:
        return f"unexpected keys: {extra}"
    for k, ref in reference_state.items():
        if update[k].shape != ref.shape:
            return f"key '{k}': shape {list(update[k].shape)} != expected {list(ref.shape)}"
    keys = [k for k, t in update.items() if t.dtype.is_floating_point]
    if not keys:
        return None
    # One fused pass: a float64 per-tensor norm is non-finite exactly when some entry is.
    norms = torch._foreach_norm([update[k].detach() for k in keys], 2, dtype=torch.float64)
    for k, nrm in zip(keys, norms, strict=True):
        if not math.isfinite(float(nrm)):
            return f"key '{k}': non-finite values"
    if max_norm is not None:
        total = float(torch.linalg.vector_norm(torch.stack(norms)))
        if total > max_norm:
            return f"update norm {total:.6g} > max_norm {max_norm:.6g}"
    return None


# --------------------------------------------------------------------------------------------------
# Aggregator registry


AGGREGATORS: Registry[Callable[..., Aggregator]] = Registry("aggregator")


class TrimmedMeanParams(Params):
    beta: float = Field(default=0.1, ge=0, lt=0.5, description="share trimmed at each end")


class KrumParams(Params):
    n_byzantine: int = Field(default=1, ge=0, description="f, the attackers tolerated")


class MultiKrumParams(KrumParams):
    m: int | None = Field(default=None, ge=1, description="updates averaged; null: n - f")


@AGGREGATORS.register("mean")
def _make_mean() -> Aggregator:
    return lambda updates, weights=None: weighted_mean(updates, weights)


@AGGREGATORS.register("trimmed_mean", TrimmedMeanParams)
def _make_trimmed_mean(beta: float) -> Aggregator:
    return lambda updates, weights=None: trimmed_mean(updates, float(beta))


@AGGREGATORS.register("median")
def _make_median() -> Aggregator:
    return lambda updates, weights=None: coordinate_median(updates)


@AGGREGATORS.register("krum", KrumParams)
def _make_krum(n_byzantine: int) -> Aggregator:
    return lambda updates, weights=None: krum(updates, int(n_byzantine))


@AGGREGATORS.register("multi_krum", MultiKrumParams)
def _make_multi_krum(n_byzantine: int, m: int | None) -> Aggregator:
    def aggregate(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> Tensors:
        # m unset: the n - f updates Krum keeps when it expects f attackers.
        keep = m if m is not None else max(1, len(updates) - int(n_byzantine))
        return multi_krum(updates, int(n_byzantine), int(keep), weights)

    return aggregate


def get_aggregator(name: str, **kw: Any) -> Aggregator:
    """``fn(updates, weights) -> dict`` for ``name`` in :data:`AGGREGATORS` with its knobs ``kw``
    (``trimmed_mean``: beta; ``krum``: n_byzantine; ``multi_krum``: n_byzantine, m), validated by its
    parameter model. Robust aggregators other than multi_krum ignore the weights."""
    if name not in AGGREGATORS:
        raise InputError(f"aggregator: unknown aggregator '{name}' (known: {', '.join(AGGREGATORS)})")
    try:
        params = AGGREGATORS.validate_params(name, kw)
    except ValueError as err:
        raise InputError(f"aggregator '{name}': {err}") from None
    return AGGREGATORS.build(Choice(name=name, params=params))


# --------------------------------------------------------------------------------------------------
# Server optimizers


class ServerOptimizer:
    """Turns the aggregated delta into the next global state: ``step(global_state, delta)``.

    ``delta`` is the weighted mean of ``client - global`` (a pseudo-gradient pointing downhill).
    Floating keys follow the optimizer's rule with float32 state (float64 for float64 keys);
    integer keys get ``global + round(delta)``. Keys of ``global_state`` absent from ``delta``
    are kept unchanged (a frozen base). Inputs are not modified.
    """

    name = "base"

    def __init__(self, lr: float = 1.0):
        if not lr > 0:
            raise InputError(f"server optimizer '{self.name}': lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.steps = 0
        self.buffers: dict[str, Tensors] = {}  # buffer name -> key -> tensor (e.g. "m", "v")

    def hparams(self) -> dict[str, float]:
        return {"lr": self.lr}

    def step(self, global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Tensors:
        """The next global state (a new dict in each key's dtype)."""
        extra = [k for k in delta if k not in global_state]
        if extra:
            raise ValueError(f"{self.name}.step: delta has keys not in the global state: {extra}")
        keys = [k for k in delta if global_state[k].dtype.is_floating_point]
        for k in delta:
            if delta[k].shape != global_state[k].shape:
                raise ValueError(f"{self.name}.step: key '{k}': delta shape {tuple(delta[k].shape)} != "
                                 f"{tuple(global_state[k].shape)}")
        params = [global_state[k].detach().to(_acc_dtype(global_state[k].dtype), copy=True) for k in keys]
        deltas = [delta[k].detach().to(p.dtype) for k, p in zip(keys, params, strict=True)]
        if keys:
            self._update(keys, params, deltas)
        self.steps += 1
        out: Tensors = {}
        updated = dict(zip(keys, params, strict=True))
        for k, base in global_state.items():
            if k in updated:
                out[k] = updated[k].to(base.dtype)
            elif k in delta:  # integer/bool key
                out[k] = (base.to(torch.int64) + delta[k].to(torch.float64).round().to(torch.int64)).to(base.dtype)
            else:
                out[k] = base.detach().clone()
        return out

    def _update(self, keys: list[str], params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        """Update ``params`` in place from ``deltas`` (lists aligned with ``keys``)."""
        raise NotImplementedError

    def _buffer(self, name: str, keys: list[str], like: list[torch.Tensor], fill: float) -> list[torch.Tensor]:
        """This optimizer's buffer ``name`` for ``keys``, created as ``fill`` where absent."""
        buf = self.buffers.setdefault(name, {})
        for k, t in zip(keys, like, strict=True):
            if k not in buf:
                buf[k] = torch.full_like(t, fill)
        return [buf[k] for k in keys]

    def _fresh(self, name: str, keys: list[str]) -> list[bool]:
        buf = self.buffers.get(name, {})
        return [k not in buf for k in keys]

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": {"<buffer>/<key>": Tensor}, "scalars": {name, steps, hparams}}``: the
        tensors go to a safetensors file, the scalars to JSON."""
        tensors = {f"{b}/{k}": t.clone() for b, buf in self.buffers.items() for k, t in buf.items()}
        return {"tensors": tensors, "scalars": {"name": self.name, "steps": self.steps, "hparams": self.hparams()}}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore from :meth:`state_dict` output; InputError if it belongs to another optimizer."""
        scalars = state.get("scalars", {})
        if scalars.get("name") != self.name:
            raise InputError(f"{source}: server optimizer state is for '{scalars.get('name')}', not '{self.name}'")
        # Buffers built under other knobs (betas, tau, momentum) would be continued under these; lr
        # may change on a resume, as any optimizer's may.
        saved = scalars.get("hparams", {})
        changed = [k for k, v in self.hparams().items() if k != "lr" and k in saved and saved[k] != v]
        if changed:
            k = changed[0]
            raise InputError(f"{source}: server optimizer '{self.name}' was saved with {k} {saved[k]}, "
                             f"not {self.hparams()[k]}: resume with the knobs it was started with")
        buffers: dict[str, Tensors] = {}
        for full, t in state.get("tensors", {}).items():
            buf, sep, key = full.partition("/")
            if not sep or buf not in self.buffer_names:
                raise InputError(f"{source}: server optimizer tensor '{full}' is not a {self.name} buffer")
            buffers.setdefault(buf, {})[key] = t.detach().clone()
        self.buffers = buffers
        self.steps = int(scalars.get("steps", 0))

    buffer_names: tuple[str, ...] = ()


class FedAvg(ServerOptimizer):
    """``x <- x + lr * delta`` (lr = 1: the plain (weighted) average of the client models)."""

    name = "fedavg"

    def _update(self, keys: list[str], params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        torch._foreach_add_(params, deltas, alpha=self.lr)


class FedAvgM(ServerOptimizer):
    """Server momentum, OpenFedLLM form: ``m <- delta`` on a key's first step, else
    ``m <- momentum * m + (1 - momentum) * delta``; ``x <- x + lr * m``."""

    name = "fedavgm"
    buffer_names = ("m",)

    def __init__(self, lr: float = 1.0, *, momentum: float):  # knob defaults: FedAvgMParams
        super().__init__(lr)
        if not 0.0 <= momentum < 1.0:
            raise InputError(f"server optimizer 'fedavgm': momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def hparams(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def _update(self, keys: list[str], params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        m = _momentum(self, keys, deltas, self.momentum)
        torch._foreach_add_(params, m, alpha=self.lr)


def _momentum(opt: ServerOptimizer, keys: list[str], deltas: list[torch.Tensor], beta1: float) -> list[torch.Tensor]:
    """Update and return buffer ``m``: the delta itself on a key's first step, then an EMA."""
    fresh = opt._fresh("m", keys)
    m = opt._buffer("m", keys, deltas, 0.0)
    old = [t for t, f in zip(m, fresh, strict=True) if not f]
    if old:
        d_old = [d for d, f in zip(deltas, fresh, strict=True) if not f]
        torch._foreach_lerp_(old, d_old, 1.0 - beta1)  # m + (1-b1)(d - m) = b1 m + (1-b1) d
    for t, d, f in zip(m, deltas, fresh, strict=True):
        if f:
            t.copy_(d)
    return m


class _Adaptive(ServerOptimizer):
    """Shared parts of FedAdam / FedYogi: ``x <- x + lr * m / (sqrt(v) + tau)``, ``v`` starts at tau^2."""

    buffer_names = ("m", "v")

    def __init__(self, lr: float = 1e-2, *, beta1: float, beta2: float, tau: float):  # knob defaults: AdaptiveParams
        super().__init__(lr)
        for label, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise InputError(f"server optimizer '{self.name}': {label} must be in [0, 1), got {b}")
        if not tau > 0:
            raise InputError(f"server optimizer '{self.name}': tau must be > 0, got {tau}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def hparams(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _second_moment(self, v: list[torch.Tensor], sq: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _update(self, keys: list[str], params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        m = _momentum(self, keys, deltas, self.beta1)
        v = self._buffer("v", keys, deltas, self.tau**2)
        self._second_moment(v, torch._foreach_mul(deltas, deltas))
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.tau)
        torch._foreach_addcdiv_(params, m, denom, value=self.lr)


class FedAdam(_Adaptive):
    """``v <- beta2 * v + (1 - beta2) * delta^2`` (Reddi et al. 2021, no bias correction)."""

    name = "fedadam"

    def _second_moment(self, v: list[torch.Tensor], sq: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(v, sq, 1.0 - self.beta2)


class FedYogi(_Adaptive):
    """``v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)`` (Reddi et al. 2021)."""

    name = "fedyogi"

    def _second_moment(self, v: list[torch.Tensor], sq: list[torch.Tensor]) -> None:
        sign = torch._foreach_sub(v, sq)
        torch._foreach_sign_(sign)
        torch._foreach_mul_(sign, sq)
        torch._foreach_add_(v, sign, alpha=-(1.0 - self.beta2))


class FedAvgMParams(Params):
    momentum: float = Field(default=0.9, ge=0, lt=1, description="server momentum")


class AdaptiveParams(Params):
    beta1: float = Field(default=0.9, ge=0, lt=1, description="first-moment decay")
    beta2: float = Field(default=0.99, ge=0, lt=1, description="second-moment decay")
    tau: float = Field(default=1e-3, gt=0, description="adaptivity: v starts at tau^2, and the step divides by sqrt(v) + tau")


# The family a config names (`finetune.server_optimizer`: a name, or {name: ..., its knobs}); the
# server lr is the config's `server_lr`, passed to every optimizer as ``lr``.
SERVER_OPTIMIZERS: Registry[type[ServerOptimizer]] = Registry("server optimizer")
SERVER_OPTIMIZERS.add("fedavg", FedAvg)
SERVER_OPTIMIZERS.add("fedavgm", FedAvgM, FedAvgMParams)
SERVER_OPTIMIZERS.add("fedadam", FedAdam, AdaptiveParams)
SERVER_OPTIMIZERS.add("fedyogi", FedYogi, AdaptiveParams)


def get_server_optimizer(choice: str | Choice | dict[str, Any], lr: float | None = None, **knobs: Any) -> ServerOptimizer:
    """A fresh server optimizer: a name (fedavg, fedavgm, fedadam, fedyogi or a plug-in's), a
    ``{name: ..., knobs}`` mapping or a :class:`Choice`, with ``lr`` and knobs (``momentum``;
    ``beta1``, ``beta2``, ``tau``) checked by its parameter model. Bad ones are InputErrors."""
    if knobs:
        if isinstance(choice, Choice):
            choice = {"name": choice.name, **choice.kwargs()}
        choice = {**choice, **knobs} if isinstance(choice, dict) else {"name": choice, **knobs}
    return SERVER_OPTIMIZERS.build(choice, **({} if lr is None else {"lr": lr}))
