"""What guards fine-tuning's aggregates: the update gate, robust aggregators, DP, the memory check,
and the simulated attackers they are tested against (docs/reliability.md, "Reliability in fine-tuning").

Every device update passes its aggregation point's gate (an edge's, or the cloud's for two-tier
policies) and is aggregated by ``robust.aggregator`` (or DP-FedAvg's clipped, noised mean); every
edge update passes the cloud's gate and, under a barrier, ``robust.cloud_aggregator``. The rules
themselves are in :mod:`cloudedge.finetune.reliability`; this class holds one run's instances.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cloudedge.attacks import apply_attack, choose_attackers
from cloudedge.config.finetune import AttackSection
from cloudedge.errors import InputError
from cloudedge.finetune.lora import BASE_DELTA_SUFFIX, aggregate_lora, sent_keys
from cloudedge.finetune.messages import CLOUD
from cloudedge.finetune.metrics import Tally
from cloudedge.finetune.reliability import (
    PrivacyLedger,
    UpdateGuard,
    check_memory,
    memory_need,
    robust_delta,
    robust_settings,
)
from cloudedge.finetune.streams import stable_index
from cloudedge.fleet import Fleet
from cloudedge.fleet.topology import Node

# Who attacks, when settings are built by hand without it: the config's defaults.
_ATTACK_DEFAULTS = {k: AttackSection.model_fields[k].default for k in ("fraction", "seed")}

Tensors = dict[str, torch.Tensor]


class Safeguards:
    """Gates, aggregators, attackers and DP of one run, checked before any work starts.

    ``charged``/``charged_layout``: the costs the clock charges (model info, adapter layout or None);
    ``global_state``: the initial global adapter state; ``points``: the aggregation points and their
    devices (DP's sampling rates); ``scaling``: LoRA's alpha / rank.
    """

    def __init__(self, settings: Any, fleet: Fleet, tally: Tally, charged: dict[str, Any],
                 charged_layout: Tensors | None, global_state: Tensors, points: Callable[[], dict[str, list[Node]]],
                 scaling: float):
        s = self.s = settings
        self.tally, self.scaling = tally, scaling
        layout = charged_layout if charged_layout is not None else global_state
        extra = sum(v.numel() * v.element_size() for k, v in layout.items() if k.endswith(BASE_DELTA_SUFFIX))
        self.memory_need = memory_need(charged, s.optimizer, extra, s.precision)
        check_memory(fleet, self.memory_need, s.memory_fraction, s.batch_size)
        self.robust = robust_settings(s.robust)
        self.edge_aggregator = self.robust["aggregator"]["name"]
        self.cloud_aggregator = self.robust["cloud_aggregator"]["name"]
        mode = s.lora()
        if mode.refactors and {self.edge_aggregator, self.cloud_aggregator} != {"mean"}:
            raise InputError(f"finetune.robust.aggregator: robust aggregators need a lora.mode that keeps the "
                             f"factors, such as 'fedavg' or 'ffa' ({mode.name} mode refactors the adapters)")
        sent = sent_keys(list(global_state), s.lora_mode)
        merged = mode.merges
        self.cloud_keys = list(global_state) if merged else sent
        self.device_guard = UpdateGuard({k: global_state[k] for k in sent}, self.robust["gate"],
                                        dp=s.privacy is not None)
        self.cloud_guard = UpdateGuard({k: global_state[k] for k in self.cloud_keys}, self.robust["gate"])
        self.attack_opts: dict[str, Any] | None = None
        self.attackers: list[str] = []
        if s.attack is not None:
            a = s.attack
            # The attack's own knobs: everything but who attacks (fraction, seed); unset ones keep their defaults.
            self.attack_opts = {"kind": a["kind"], **{k: v for k, v in a.items()
                                                      if k not in ("kind", "fraction", "seed") and v is not None}}
            apply_attack(a["kind"], {"x": torch.ones(1)}, seed=0,  # options checked now, not mid-run
                         **{k: v for k, v in self.attack_opts.items() if k != "kind"})
            self.attackers = [str(d) for d in choose_attackers([d.id for d in fleet.devices],
                                                               float(a.get("fraction", _ATTACK_DEFAULTS["fraction"])),
                                                               int(a.get("seed", _ATTACK_DEFAULTS["seed"])))]
        self.dp = None if s.privacy is None else {"mode": "central", "delta": 1e-5, **s.privacy}
        self.privacy: PrivacyLedger | None = None
        self.dp_expected: dict[str, float] = {}
        if self.dp is not None:
            self._init_dp(fleet, points())

    def _init_dp(self, fleet: Fleet, points: dict[str, list[Node]]) -> None:
        from cloudedge.privacy import DPFedAvg

        s, dp = self.s, self.dp
        assert dp is not None
        self.dp_mech = DPFedAvg(dp["clip_norm"], dp["noise_multiplier"], dp["mode"])
        rates = {}
        for agg_id, devs in points.items():
            avail = [s.participation * d.profile.availability for d in devs]
            # The fixed denominator of DP-FedAvg: the expected number of participants. The sampling
            # rate is the most available device's (its epsilon is the largest), conservatively.
            self.dp_expected[agg_id] = max(1.0, sum(avail)) if s.goal is None else float(s.goal)
            q = 1.0 if dp["mode"] == "local" else min(1.0, max(avail, default=0.0))
            if s.goal is not None or fleet.availability.kind != "bernoulli":
                q = 1.0  # who is online follows a trace, not a known rate: no amplification claimed
            if q > 0:
                rates[agg_id] = q
        self.privacy = PrivacyLedger(dp["noise_multiplier"], rates, dp["delta"])

    def train_options(self, dev_id: str) -> dict[str, Any]:
        """A device's extra ``train`` options: its attack (an attacker), or local DP's clipping and noise."""
        if dev_id in self.attackers:
            return {"attack": dict(self.attack_opts or {})}
        if self.dp is not None:
            return {"dp": {k: self.dp[k] for k in ("clip_norm", "noise_multiplier", "mode")}}
        return {}

    def epsilon(self) -> float | None:
        """DP's epsilon so far (None without DP)."""
        return None if self.privacy is None else self.privacy.epsilon()

    def account(self, agg_id: str, accepted: dict[str, Tensors], sent: list[Any]) -> None:
        """One DP step of ``agg_id`` when its round released something: central, a noised mean of the
        ``accepted`` updates; local, the devices' own noised updates (``sent``)."""
        if self.privacy is not None and agg_id in self.privacy.accountants and (
                accepted if self.dp is not None and self.dp["mode"] == "central" else sent):
            self.privacy.step(agg_id)

    def aggregate_devices(self, agg_id: str, version: int, state: Tensors, received: Tensors,
                          accepted: dict[str, Tensors], weights: dict[str, float]) -> Tensors:
        """The aggregation point's next state from the accepted device updates (deltas from ``received``)."""
        if not accepted:
            return dict(state)
        s, ids = self.s, list(accepted)
        if self.dp is not None and (self.dp["mode"] == "central" or self.edge_aggregator == "mean"):
            seed = (s.seed * 1_000_033 + stable_index(agg_id) * 104_729 + version) % (2**31)
            mean, _ = self.dp_mech.aggregate([accepted[i] for i in ids], torch.Generator().manual_seed(seed),
                                             self.dp_expected.get(agg_id))
            return plus(received, mean)
        if self.edge_aggregator == "mean":
            total = sum(weights[i] for i in ids)
            reinit_seed = (s.seed * 100_003 + stable_index(agg_id) * 7_919 + version * 31) % (2**31)
            return aggregate_lora([plus(received, accepted[i]) for i in ids], [weights[i] / total for i in ids],
                                  s.lora_mode, scaling=self.scaling, refactor=s.refactor, reinit_seed=reinit_seed)
        out = robust_delta(self.device_guard, accepted, weights, self.robust["aggregator"])
        assert out.delta is not None
        return plus(received, out.delta)

    def aggregate_edges(self, pulled: Tensors, edge_ids: list[str], states: list[Tensors], weights: list[float],
                        rounds: list[float], reinit_seed: Callable[[], int]) -> Tensors | None:
        """Barrier: gate the edges' updates (norms per edge round) and aggregate the accepted ones
        with the cloud aggregator. None when no edge update was accepted (the cloud keeps its state)."""
        deltas = {e: {k: st[k] - pulled[k] for k in self.cloud_keys} for e, st in zip(edge_ids, states, strict=True)}
        gate = self.cloud_guard.check(deltas, dict(zip(edge_ids, rounds, strict=True)))
        self.tally.reject(CLOUD, dict(gate.rejected))
        ok = [i for i, e in enumerate(edge_ids) if e in gate.accepted]
        if not ok:
            return None
        if self.cloud_aggregator == "mean":
            total = sum(weights[i] for i in ok)
            return aggregate_lora([states[i] for i in ok], [weights[i] / total for i in ok], self.s.lora_mode,
                                  scaling=self.scaling, refactor=self.s.refactor, reinit_seed=reinit_seed())
        out = robust_delta(self.cloud_guard, {edge_ids[i]: deltas[edge_ids[i]] for i in ok},
                           {edge_ids[i]: weights[i] for i in ok}, self.robust["cloud_aggregator"])
        assert out.delta is not None
        return plus(pulled, out.delta)

    def check_edge_alone(self, edge_id: str, state: Tensors, pulled: Tensors) -> Tensors:
        """No barrier: an edge's update merges on its own, so only the checks that need no other
        update apply (structure, finiteness, ``gate.max_norm``). A rejected edge contributes nothing."""
        delta = {k: state[k] - pulled[k] for k in self.cloud_keys}
        reason = self.cloud_guard.gate.structural_reason(delta)
        if reason is None:
            return state
        self.tally.reject(CLOUD, {edge_id: reason})
        return dict(pulled)

    def summary(self) -> dict[str, Any]:
        totals = self.tally.totals
        out: dict[str, Any] = {
            "edge_aggregator": self.edge_aggregator, "cloud_aggregator": self.cloud_aggregator,
            "timed_out_updates": totals["timed_out"], "dropped_out_updates": totals["dropped"],
            "stale_updates": totals["stale"], "rejected_updates": totals["rejected"],
            "failed_updates": totals["failed"],
            "memory_need_bytes": self.memory_need,
            "attack": None if self.attack_opts is None else {**self.attack_opts, "attackers": self.attackers},
            "privacy": None,
        }
        if self.dp is not None and self.privacy is not None:
            out["privacy"] = {**self.dp, "epsilon": self.privacy.epsilon(), "rounds": self.privacy.rounds(),
                              "sample_rates": {a: acc.sample_rate for a, acc in self.privacy.accountants.items()}}
            out["epsilon"] = out["privacy"]["epsilon"]
        return out

    def privacy_state(self) -> dict[str, Any] | None:
        return None if self.privacy is None else self.privacy.state_dict()

    def load_privacy_state(self, state: dict[str, Any] | None, source: str) -> None:
        if self.privacy is not None:
            if state is None:
                raise InputError(f"{source}: the checkpoint was written without privacy; it cannot resume a DP run")
            self.privacy.load_state_dict(state, source)


def plus(state: Tensors, delta: Tensors) -> Tensors:
    """``state`` with ``delta`` added to the keys it has (the others unchanged)."""
    return {**state, **{k: state[k] + v.to(state[k].dtype) for k, v in delta.items()}}
