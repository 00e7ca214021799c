"""Offline training of the ``learned`` batch controller on the virtual clock.

The agent is trained before the run, on a simulator of the fleet it will control, and then
evaluated frozen. The simulator is the clock's own cost model, with no model training in it:

- a round's time is max over participants of b_i x (seconds per sample)_i + (fixed seconds)_i,
  the same figures the loop charges (``WorkerInfo.sample_s`` / ``overhead_s``);
- each worker is reachable with its profile's availability, drawn per round;
- a round's *progress* is the statistical efficiency of its global batch M,
  M / (M + B_noise) (McCandlish et al. 2018: a step at batch M makes that fraction of the progress
  of a noiseless step), times the data coverage: the share of the round's available data (shard
  sizes) whose workers took part (a worker sitting out drops its shard from that step's objective).

An episode is ``horizon`` rounds; its return is progress per virtual second over the episode,
relative to uniform batches on the same draws (1.0 = as good as uniform). REINFORCE with a running
mean baseline, one Adam step per episode. The trained policy and its learning curve are cached under
``$XDG_CACHE_HOME/cloudedge/learned`` by a hash of everything the training depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from cloudedge.pretrain.batch import LearnedController, WorkerInfo


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cloudedge/learned`` (``~/.cache/cloudedge/learned`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "cloudedge" / "learned"


def setup_key(ctl: LearnedController, workers: list[WorkerInfo]) -> str:
    """Hash of what offline training depends on: the fleet's clock figures, the controller's knobs."""
    fleet = [(w.worker_id, round(_sample_s(w), 12), round(w.overhead_s or 0.0, 9), w.max_batch,
              round(w.availability, 6), w.samples) for w in workers]
    knobs = {"B": ctl.global_batch, "min": ctl.min_batch, "levels": ctl.levels, "horizon": ctl.sim_horizon,
             "episodes": ctl.episodes, "noise": ctl.noise_scale, "lr": ctl.lr, "hidden": ctl.hidden,
             "seed": ctl.seed, "version": 1}
    return hashlib.sha256(json.dumps([fleet, knobs], sort_keys=True).encode()).hexdigest()[:32]


def _sample_s(w: WorkerInfo) -> float:
    return float(w.sample_s) if w.sample_s else 1.0 / max(w.flops, 1e-30)


def state_features(rates: np.ndarray, caps: np.ndarray, overheads: np.ndarray, shares: np.ndarray,
                   mask: np.ndarray, last_round_s: np.ndarray, last_taking: np.ndarray,
                   global_batch: int) -> np.ndarray:
    """The learned controller's state, ``[E, n, 5]`` for E situations of n workers (``mask``: who is
    available; other rows are zero). Features: log throughput over the fastest available; log of
    the memory cap over the uniform share B/n (clipped to +-3); overhead over the last round time;
    took part last round; shard share of the available data times n."""
    n_avail = np.maximum(mask.sum(axis=1, keepdims=True), 1)
    top = np.max(np.where(mask, rates, 0.0), axis=1, keepdims=True)
    share = global_batch / n_avail
    data = np.where(mask, shares, 0.0)
    feats = np.stack([
        np.log(np.maximum(rates, 1e-30) / np.maximum(top, 1e-30)),
        np.clip(np.log(np.maximum(caps, 1) / share), -3.0, 3.0),
        np.where(last_round_s[:, None] > 0, overheads / np.maximum(last_round_s[:, None], 1e-30), 0.0),
        last_taking.astype(float),
        data * n_avail / np.maximum(data.sum(axis=1, keepdims=True), 1e-30),
    ], axis=2)
    return np.where(mask[:, :, None], feats, 0.0)


def level_batches(levels: np.ndarray, actions: np.ndarray, mask: np.ndarray, global_batch: int,
                  min_batch: int) -> np.ndarray:
    """Per-worker batches (0 = sits out) of level indices ``actions`` over the available workers."""
    share = global_batch / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    lv = levels[actions]
    return np.where(mask & (lv > 0), np.maximum(min_batch, np.round(lv * share)), 0.0)


def ensure_someone(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Where every available worker drew level 0, the available worker whose best non-zero level
    scores highest takes part at that level."""
    idle = ~((actions > 0) & mask).any(dim=1)
    if not bool(idle.any()):
        return actions
    best = logits[..., 1:].max(dim=2)
    score = torch.where(mask, best.values, torch.full_like(best.values, -torch.inf))
    who = score.argmax(dim=1)
    actions = actions.clone()
    rows = torch.nonzero(idle).squeeze(1)
    actions[rows, who[rows]] = best.indices[rows, who[rows]] + 1
    return actions


class FleetSim:
    """The fleet as the clock sees it, E episodes side by side (see the module docstring)."""

    def __init__(self, workers: list[WorkerInfo], global_batch: int, noise_scale: float, rng: np.random.Generator):
        self.sample_s = np.array([_sample_s(w) for w in workers])
        self.overhead = np.array([w.overhead_s or 0.0 for w in workers])
        self.avail_p = np.array([w.availability for w in workers])
        self.caps = np.array([w.max_batch for w in workers], dtype=float)
        shards = np.array([float(w.samples or 1) for w in workers])
        self.share = shards / shards.sum()
        self.global_batch = global_batch
        self.noise = noise_scale
        self.rng = rng

    def draw_available(self, episodes: int) -> np.ndarray:
        mask = self.rng.random((episodes, len(self.share))) < self.avail_p
        mask[~mask.any(axis=1), int(np.argmax(self.avail_p))] = True
        return mask

    def round(self, batches: np.ndarray, available: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(progress, seconds) per episode of one round with ``batches`` [E, n] (0 = sits out)."""
        taking = batches > 0
        m = batches.sum(axis=1)
        seconds = np.max(np.where(taking, batches * self.sample_s + self.overhead, 0.0), axis=1)
        coverage = (self.share * taking).sum(axis=1) / (self.share * available).sum(axis=1)
        return coverage * m / (m + self.noise), seconds

    def uniform(self, available: np.ndarray) -> np.ndarray:
        n = available.sum(axis=1, keepdims=True)
        return np.where(available, np.maximum(1.0, np.round(self.global_batch / n)), 0.0)


PARALLEL_EPISODES = 10  # episodes per policy update (their returns share one baseline)


def train_offline(ctl: LearnedController, workers: list[WorkerInfo]) -> list[float]:
    """Train ``ctl.policy`` for ``ctl.episodes`` episodes on :class:`FleetSim` (``PARALLEL_EPISODES``
    at a time, one Adam step on each group); the learning curve (each episode's return, relative to
    uniform batches) is returned."""
    # Tiny tensors: one thread is several times faster than two on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(ctl, workers)
    finally:
        torch.set_num_threads(threads)


def _train(ctl: LearnedController, workers: list[WorkerInfo]) -> list[float]:
    rng = np.random.default_rng([ctl.seed, 11])
    sim = FleetSim(workers, ctl.global_batch, ctl.noise_scale, rng)
    optimizer = torch.optim.Adam(ctl.policy.parameters(), lr=ctl.lr)
    generator = torch.Generator().manual_seed(ctl.seed + 2)
    levels = np.array(ctl.levels)
    rates = 1.0 / sim.sample_s
    curve: list[float] = []
    baseline: float | None = None
    n = len(workers)
    while len(curve) < ctl.episodes:
        e = min(PARALLEL_EPISODES, ctl.episodes - len(curve))
        logp = torch.zeros(e)
        progress, seconds, ref_progress, ref_seconds = (np.zeros(e) for _ in range(4))
        last_round_s, last_taking = np.zeros(e), np.zeros((e, n), dtype=bool)
        for _ in range(ctl.sim_horizon):
            available = sim.draw_available(e)
            feats = state_features(np.broadcast_to(rates, (e, n)), sim.caps, sim.overhead, sim.share, available,
                                   last_round_s, last_taking, ctl.global_batch)
            logits = ctl.policy(torch.as_tensor(feats, dtype=torch.float32))
            mask = torch.as_tensor(available)
            probs = torch.softmax(logits, dim=2).reshape(e * n, -1)
            actions = torch.multinomial(probs, 1, generator=generator).reshape(e, n)
            actions = ensure_someone(logits.detach(), actions, mask)
            chosen = torch.log_softmax(logits, dim=2).gather(2, actions[..., None]).squeeze(2)
            logp = logp + torch.where(mask, chosen, torch.zeros_like(chosen)).sum(dim=1)
            batches = level_batches(levels, actions.numpy(), available, ctl.global_batch, ctl.min_batch)
            p, s = sim.round(batches, available)
            q, t = sim.round(sim.uniform(available), available)
            progress, seconds, ref_progress, ref_seconds = progress + p, seconds + s, ref_progress + q, ref_seconds + t
            last_round_s, last_taking = s, batches > 0
        returns = (progress / seconds) / (ref_progress / ref_seconds)
        curve.extend(float(x) for x in returns)
        base = float(returns.mean()) if baseline is None else baseline
        advantage = torch.as_tensor(returns - base, dtype=torch.float32)
        baseline = float(returns.mean()) if baseline is None else 0.9 * baseline + 0.1 * float(returns.mean())
        optimizer.zero_grad()
        (-(advantage * logp).mean()).backward()
        optimizer.step()
    return curve


def load_or_train(ctl: LearnedController, workers: list[WorkerInfo]) -> tuple[list[float], bool]:
    """Train offline, or load the cached policy of the same setup; returns (curve, from_cache)."""
    path = cache_dir() / f"{setup_key(ctl, workers)}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        ctl.policy.load_state_dict(tensors)
        with open(path.with_suffix(".json")) as f:
            return [float(x) for x in json.load(f)["curve"]], True
    curve = train_offline(ctl, workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each file is written whole and renamed into place (the curve first: a policy file means both
    # are there), so a concurrent run never reads half of either.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"curve": curve, "episodes": ctl.episodes, "workers": [w.worker_id for w in workers]}, f)
    os.replace(tmp, path.with_suffix(".json"))
    save_file({k: v.detach().contiguous() for k, v in ctl.policy.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return curve, False


def describe_curve(curve: list[float], points: int = 50) -> dict[str, Any]:
    """The learning curve in ``points`` windows (mean return per window), for logs and results."""
    if not curve:
        return {"episodes": 0, "window": 0, "mean_return": []}
    window = max(1, len(curve) // points)
    means = [float(np.mean(curve[i:i + window])) for i in range(0, len(curve), window)]
    return {"episodes": len(curve), "window": window, "mean_return": means}
