"""Checkpoints of a fine-tuning run: saved after cloud updates, restored by ``--resume``.

One checkpoint (:func:`cloudedge.checkpoint.save_checkpoint`, safetensors + JSON) holds the global
state (``global/<key>``), the server optimizer (``opt/<key>``), what the topology keeps between
cloud updates (``pending/<i>/...``: edges waiting to merge), the models devices cached (``cache/...``,
churn), and as plain data the clock, every random stream, the policy's state, the counts and the
metric rows so far. A resumed run continues exactly as the uninterrupted one would, and keeps the
run directory's rows of the rounds it restored (docs/reliability.md, "Crash and resume").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloudedge.errors import InputError

if TYPE_CHECKING:
    from cloudedge.finetune.loop import HierFinetune


def save_run(run: HierFinetune, ckpt_dir: Path) -> None:
    """A checkpoint of ``run`` after its cloud update ``run.cloud_round``."""
    from cloudedge.checkpoint import save_checkpoint

    tensors = {f"global/{k}": v for k, v in run.global_state.items()}
    opt_state = run.opt.state_dict()
    tensors.update({f"opt/{k}": v for k, v in opt_state["tensors"].items()})
    pending, pending_tensors = run.topology.state_dict()
    tensors.update(pending_tensors)
    rounds = run.rounds.state_dict()
    churn, cache_tensors = run.churn.state_dict()
    tensors.update(cache_tensors)
    tally = run.tally
    state = {
        "cloud_round": run.cloud_round, "t_cloud": run.t_cloud, "merge_count": run.merge_count,
        "train_count": rounds["train_count"], "sec_per_step": rounds["sec_per_step"],
        "edge_round_s": rounds["edge_round_s"], "rngs": rounds["rngs"], "clock": run.clock.state_dict(),
        "policy": run.policy.state_dict(), "opt": opt_state["scalars"], "pending": pending,
        "history": run.history, "method": run.method,
        "dropped_total": tally.dropped_total, "device_steps_total": tally.device_steps_total,
        "reliability": {**tally.state_dict(), "agg_rounds": rounds["agg_rounds"], **churn,
                        "privacy": run.safeguards.privacy_state()},
    }
    save_checkpoint(ckpt_dir, run.cloud_round, tensors, json.loads(json.dumps(state, default=_plain)))


def restore_run(run: HierFinetune, ckpt_dir: Path) -> bool:
    """Load the latest checkpoint in ``ckpt_dir`` into ``run``; False when there is none."""
    from cloudedge.checkpoint import load_latest

    found = load_latest(ckpt_dir)
    if found is None:
        return False
    tensors, state = found
    if "rngs" not in state:
        raise InputError(f"{ckpt_dir}: written by an older cloudedge (one random stream for all edges); "
                         "it cannot continue this run: start it again without --resume")
    key_order = list(run.initial_state())  # safetensors sorts keys
    loaded = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
    run.global_state = {k: loaded[k] for k in key_order}
    run.opt.load_state_dict({"tensors": {k[4:]: v for k, v in tensors.items() if k.startswith("opt/")},
                             "scalars": state["opt"]}, source=str(ckpt_dir))
    run.cloud_round, run.t_cloud = int(state["cloud_round"]), float(state["t_cloud"])
    run.merge_count = int(state["merge_count"])
    rel = state["reliability"]
    run.rounds.load_state_dict({**{k: state[k] for k in ("train_count", "sec_per_step", "edge_round_s", "rngs")},
                                "agg_rounds": rel["agg_rounds"]})
    run.clock.load_state_dict(state["clock"])
    run.policy.load_state_dict(state["policy"])
    run.log.history = list(state["history"])
    run.log.in_effect = run.global_state
    run.tally.dropped_total, run.tally.device_steps_total = int(state["dropped_total"]), int(state["device_steps_total"])
    run.tally.load_state_dict(rel)
    run.churn.load_state_dict(rel, tensors, list(run.global_state))
    run.safeguards.load_privacy_state(rel["privacy"], str(ckpt_dir))
    run.topology.load_state_dict(state["pending"], tensors)
    return True


def _plain(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")
