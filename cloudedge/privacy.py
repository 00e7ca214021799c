"""Optional differential privacy for device updates: DP-FedAvg and its privacy accountant.

**Mechanism (default: user-level central DP, DP-FedAvg of McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models").** Each round the aggregator (the edge server
for its devices; it is the party trusted to add the noise) receives the participants' deltas and

1. clips each delta to global L2 norm ``S = clip_norm``: ``d_k <- d_k * min(1, S / ||d_k||)``
   (done again at the aggregator even if the client clipped: the guarantee must not rest on the
   client);
2. sums them with uniform weights (sample-count weights would raise the sensitivity and leak the
   data size), adds ``N(0, (z S)^2)`` per coordinate with ``z = noise_multiplier``, and divides by a
   fixed denominator ``n`` (the expected number of participants, ``q * population``; by default the
   number received). The released mean carries noise of std ``z S / n`` per coordinate.

One user changes the sum by at most ``S``, so each round is a Gaussian mechanism with noise
multiplier ``z`` on a ``q``-subsampled population; :class:`PrivacyAccountant` composes the rounds
with Renyi DP (Mironov 2017; subsampled Gaussian: Mironov, Talwar and Zhang 2019) through Opacus'
RDP analysis, ``q = participants / population``, one step per round.

**Local DP** (``mode="local"``) trusts no aggregator: :func:`clip_and_noise` runs on the client and
adds ``N(0, (z S)^2)`` to its own clipped update; the aggregator then averages. Each client's update
is then ``(eps, delta)``-DP by itself (the accountant with ``q = 1`` and one step per round the
client takes part), at the cost of ``sqrt(n)`` times more noise in the mean than central DP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cloudedge.aggregate import clip_by_norm, global_norm
from cloudedge.errors import InputError

Tensors = dict[str, torch.Tensor]
DP_MODES = ("central", "local")
# RDP orders: the grid TensorFlow Privacy and Opacus use, fine near 1 where small epsilons live.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def _check_dp_params(clip_norm: float, noise_multiplier: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise InputError(f"privacy.clip_norm: must be a finite number > 0, got {clip_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise InputError(f"privacy.noise_multiplier: must be a finite number >= 0, got {noise_multiplier}")


def _check_floating(delta: Mapping[str, torch.Tensor], what: str) -> None:
    ints = [k for k, v in delta.items() if not v.dtype.is_floating_point]
    if ints:
        # Integer buffers (e.g. BatchNorm counters) cannot be noised meaningfully; a stage must
        # leave them out of what it releases under DP.
        raise ValueError(f"{what}: DP updates must hold floating tensors only; integer keys {ints}")


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[Tensors, float]:
    """``(delta * min(1, clip_norm / ||delta||), ||delta||)`` (global L2 norm over all keys).

    A non-finite delta raises ValueError: the update gate must have rejected it before."""
    _check_floating(delta, "clip_update")
    return clip_by_norm(delta, clip_norm), global_norm(delta)


def gaussian_noise(like: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> Tensors:
    """I.i.d. ``N(0, std^2)`` tensors shaped like ``like`` (float32, float64 for float64 keys),
    drawn from ``generator`` key by key in order."""
    out: Tensors = {}
    for k, v in like.items():
        dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        out[k] = torch.randn(v.shape, generator=generator, dtype=dtype) * float(std)
    return out


def _add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: (a[k].to(b[k].dtype) + b[k]).to(a[k].dtype) for k in a}


def clip_and_noise(delta: Mapping[str, torch.Tensor], clip_norm: float, noise_multiplier: float,
                   generator: torch.Generator) -> Tensors:
    """Local DP on one client: clip ``delta`` to L2 norm ``clip_norm``, then add Gaussian noise of
    std ``noise_multiplier * clip_norm`` to every coordinate. (The central default adds the noise
    once to the sum at the aggregator instead: :func:`dp_mean`.)"""
    _check_dp_params(clip_norm, noise_multiplier)
    clipped, _ = clip_update(delta, clip_norm)
    return _add(clipped, gaussian_noise(clipped, noise_multiplier * clip_norm, generator))


def dp_mean(updates: Sequence[Mapping[str, torch.Tensor]], clip_norm: float, noise_multiplier: float,
            generator: torch.Generator, expected_count: float | None = None) -> tuple[Tensors, dict[str, float]]:
    """Central DP-FedAvg aggregate: ``(sum_k clip(d_k) + N(0, (z S)^2)) / n``.

    ``n = expected_count`` (the fixed denominator of McMahan et al. 2018: the expected number of
    participants; default ``len(updates)``). Returns the noisy mean and stats for the log:
    ``clipped_fraction`` (share of updates whose norm exceeded S), ``mean_norm`` (before clipping),
    ``noise_std`` (per coordinate of the mean, ``z S / n``).
    """
    _check_dp_params(clip_norm, noise_multiplier)
    if not updates:
        raise ValueError("dp_mean: no updates")
    n = float(len(updates) if expected_count is None else expected_count)
    if not n > 0:
        raise ValueError(f"dp_mean: expected_count must be > 0, got {expected_count}")
    total: Tensors | None = None
    norms: list[float] = []
    for upd in updates:
        clipped, norm = clip_update(upd, clip_norm)
        norms.append(norm)
        acc = {k: v.to(torch.float64 if v.dtype == torch.float64 else torch.float32) for k, v in clipped.items()}
        total = acc if total is None else {k: total[k] + acc[k] for k in total}
    assert total is not None
    noise = gaussian_noise(total, noise_multiplier * clip_norm, generator)
    mean = {k: ((total[k] + noise[k]) / n).to(updates[0][k].dtype) for k in total}
    stats = {
        "clipped_fraction": sum(nrm > clip_norm for nrm in norms) / len(norms),
        "mean_norm": float(np.mean(norms)),
        "noise_std": noise_multiplier * clip_norm / n,
    }
    return mean, stats


class DPFedAvg:
    """DP for one aggregation point, in ``mode`` ``central`` (default) or ``local``.

    Clients call :meth:`client` on their delta before sending; the aggregator calls
    :meth:`aggregate` on what it received. Central: the client only clips, the aggregator clips
    again, sums, adds noise ``N(0, (z S)^2)`` and divides by ``expected_count``. Local: the client
    clips and adds ``N(0, (z S)^2)`` itself; the aggregator takes the plain mean.
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, mode: str = "central"):
        _check_dp_params(clip_norm, noise_multiplier)
        if mode not in DP_MODES:
            raise InputError(f"privacy.mode: unknown mode {mode!r} (known: {', '.join(DP_MODES)})")
        self.clip_norm, self.noise_multiplier, self.mode = float(clip_norm), float(noise_multiplier), mode

    def client(self, delta: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> Tensors:
        """What a client sends: its clipped delta (local mode: clipped and noised; needs ``generator``)."""
        if self.mode == "local":
            if generator is None:
                raise ValueError("DPFedAvg.client: local mode needs a generator")
            return clip_and_noise(delta, self.clip_norm, self.noise_multiplier, generator)
        return clip_update(delta, self.clip_norm)[0]

    def aggregate(self, updates: Sequence[Mapping[str, torch.Tensor]], generator: torch.Generator,
                  expected_count: float | None = None) -> tuple[Tensors, dict[str, float]]:
        """The released mean of ``updates`` and its log stats (see :func:`dp_mean`)."""
        if self.mode == "central":
            return dp_mean(updates, self.clip_norm, self.noise_multiplier, generator, expected_count)
        from cloudedge.aggregate import weighted_mean

        n = len(updates)
        return weighted_mean(updates), {"noise_std": self.noise_multiplier * self.clip_norm / math.sqrt(n)}


class PrivacyAccountant:
    """Renyi-DP accountant for repeated subsampled Gaussian rounds.

    Every round (:meth:`step`) is a Gaussian mechanism with noise multiplier ``z`` applied to a
    Poisson sample of rate ``q = participants / population``. The RDP of each round at every order
    comes from Opacus (``opacus.accountants.analysis.rdp.compute_rdp``, the analysis of Mironov,
    Talwar and Zhang 2019); RDP adds up over rounds and is converted to ``(eps, delta)``-DP with the
    tighter conversion of Balle et al. 2020 (``conversion="improved"``, Opacus' default) or the
    classic ``eps = rdp - log(delta) / (alpha - 1)`` (Mironov 2017; what Abadi et al. 2016 report).
    Fixed-size sampling of ``n`` of ``N`` is accounted as Poisson with ``q = n / N``, as is usual.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, orders: Sequence[float] = DEFAULT_ORDERS):
        self._check(noise_multiplier, sample_rate)
        if not orders or any(not (math.isfinite(a) and a > 1) for a in orders):
            raise InputError(f"privacy.orders: every RDP order must be a finite number > 1, got {list(orders)}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.orders = [float(a) for a in orders]
        self.history: list[list[float]] = []  # [noise_multiplier, sample_rate, steps], merged runs

    @classmethod
    def for_fleet(cls, noise_multiplier: float, participants: int, population: int, **kw: Any) -> PrivacyAccountant:
        """An accountant with ``q = participants / population``."""
        if not 0 < participants <= population:
            raise InputError(f"privacy: need 0 < participants <= population, got {participants} of {population}")
        return cls(noise_multiplier, participants / population, **kw)

    @staticmethod
    def _check(noise_multiplier: float, sample_rate: float) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise InputError(f"privacy.noise_multiplier: must be > 0 for accounting, got {noise_multiplier}")
        if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
            raise InputError(f"privacy.sample_rate: must be in (0, 1], got {sample_rate}")

    @property
    def rounds(self) -> int:
        """Rounds accounted so far."""
        return int(sum(steps for _, _, steps in self.history))

    def step(self, rounds: int = 1, noise_multiplier: float | None = None, sample_rate: float | None = None) -> None:
        """Account ``rounds`` more rounds (with this round's ``z``/``q`` if they changed)."""
        if rounds < 0:
            raise ValueError(f"PrivacyAccountant.step: rounds must be >= 0, got {rounds}")
        z = self.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        q = self.sample_rate if sample_rate is None else float(sample_rate)
        self._check(z, q)
        if rounds == 0:
            return
        if self.history and self.history[-1][0] == z and self.history[-1][1] == q:
            self.history[-1][2] += rounds
        else:
            self.history.append([z, q, rounds])

    def rdp(self) -> np.ndarray:
        """Total RDP at each of ``orders`` (zeros before the first round)."""
        from opacus.accountants.analysis.rdp import compute_rdp

        total = np.zeros(len(self.orders))
        for z, q, steps in self.history:
            total += np.asarray(compute_rdp(q=q, noise_multiplier=z, steps=int(steps), orders=self.orders))
        return total

    def epsilon(self, delta: float, conversion: str = "improved") -> float:
        """The smallest ``eps`` over the orders such that the rounds so far are ``(eps, delta)``-DP."""
        return self.epsilon_and_order(delta, conversion)[0]

    def epsilon_and_order(self, delta: float, conversion: str = "improved") -> tuple[float, float]:
        """``(eps, alpha)``: epsilon and the RDP order that attains it."""
        if not 0 < delta < 1:
            raise InputError(f"privacy.delta: must be in (0, 1), got {delta}")
        if not self.history:
            return 0.0, self.orders[0]
        rdp = self.rdp()
        orders = np.asarray(self.orders)
        if conversion == "improved":
            from opacus.accountants.analysis.rdp import get_privacy_spent

            eps, order = get_privacy_spent(orders=self.orders, rdp=rdp, delta=delta)
            return float(eps), float(order)
        if conversion == "classic":
            eps_all = rdp - math.log(delta) / (orders - 1)
            best = int(np.nanargmin(eps_all))
            return float(eps_all[best]), float(orders[best])
        raise ValueError(f"PrivacyAccountant.epsilon: unknown conversion {conversion!r} (improved, classic)")

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON state (goes into a checkpoint's JSON file)."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "orders": list(self.orders), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict` output; a malformed state is an InputError naming ``source``."""
        try:
            history = [[float(z), float(q), int(steps)] for z, q, steps in state["history"]]
            orders = [float(a) for a in state["orders"]]
            z0, q0 = float(state["noise_multiplier"]), float(state["sample_rate"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{source}: malformed privacy accountant state ({type(err).__name__}: {err})") from None
        for z, q, steps in history:
            if steps < 0:
                raise InputError(f"{source}: privacy accountant state has a negative step count")
            try:
                self._check(z, q)
            except InputError as err:
                raise InputError(f"{source}: privacy accountant state: {err}") from None
        if orders != self.orders:
            raise InputError(f"{source}: privacy accountant state uses other RDP orders than this accountant")
        self.noise_multiplier, self.sample_rate, self.history = z0, q0, history
