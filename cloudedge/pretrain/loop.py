"""The pre-training loop: every node of the fleet can be a worker; data stays on its node.

Read top to bottom: set up (data shards, fleet, memory caps, workers, model, optimizers, controller,
resume), then one round at a time:

    available workers -> controller plans batches -> workers compute (through the Engine)
    -> virtual clock charges transfers and FLOPs -> aggregate (sample/token weighted; FedNova)
    -> optimizer step (sync) or outer step (local) -> controller observes -> log -> checkpoint.

``pretrain(cfg, ...)`` is the API; ``run_pretrain(cfg, out_dir, resume, engine_kind)`` is what the
CLI calls. The algorithms and controller rules are in docs/pretraining.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cloudedge import comm
from cloudedge.aggregate import weighted_mean
from cloudedge.checkpoint import check_state_dict, load_latest, save_checkpoint
from cloudedge.config import with_overrides
from cloudedge.config.pretrain import PretrainConfig
from cloudedge.config.run import RunConfig
from cloudedge.device import PRECISIONS, resolve_device, to_device
from cloudedge.engine import Engine, Task, WorkerError, WorkerSpec, make_engine
from cloudedge.errors import InputError
from cloudedge.fleet import CLOUD_ID, Fleet, Node, VirtualClock, available_nodes
from cloudedge.fleet.clock import transfer_seconds
from cloudedge.models.charge import cost_model_summary, resolve_charge
from cloudedge.models.inputs import ImageSpec, check_images, convert_channels
from cloudedge.perf import stage_peak_size, utilization_fields
from cloudedge.pretrain.batch import CONTROLLERS, BatchController, Observation, Plan, WorkerInfo
from cloudedge.pretrain.costs import charged_costs, trained_costs
from cloudedge.pretrain.tasks import build_task_model, evaluate_loss
from cloudedge.pretrain.workers import PretrainWorker, build_optimizer, trainable
from cloudedge.robust import UpdateGate
from cloudedge.track.run import RunDir
from cloudedge.track.stage_run import run_stage_into

STAGE = "pretrain"
Tensors = dict[str, torch.Tensor]


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the trained global model, every logged row and the summary.

    ``client_states`` holds each client's private objective state as flat tensors (what
    ``Objective.client_state_dict`` gives; ``pin``: its local and personalized models).
    """

    model: nn.Module
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: RunDir | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    client_states: dict[str, Tensors] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- data


@dataclass
class Shards:
    """Each worker's training data (plain tensors), the cloud's held-out data, and task facts."""

    train: dict[str, Tensors]
    val: Tensors | None
    n_classes: int
    excluded: dict[str, str]


def _tensor_subset(data: Tensors, idx: np.ndarray) -> Tensors:
    index = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[index] for k, v in data.items()}


def build_shards(cfg: RunConfig, pcfg: PretrainConfig, workers: list[Node], seq_len: int) -> Shards:
    """Load the stage's data, hold out the test split for the cloud, deal the rest to workers.

    Text is dealt by document (``partition.kind: domain`` keeps whole modules on one worker) and
    then cut into LM blocks per worker; images are dealt by sample. A worker whose shard is too
    small to train on is left out (listed in ``excluded``).
    """
    from cloudedge.data import build_dataset, lm_blocks, partition
    from cloudedge.data.tokenizer import ByteTokenizer

    data_cfg = cfg.stage_data(STAGE)
    train, test = build_dataset(data_cfg, cfg.base_dir, cfg.seed)
    part = data_cfg.partition
    weights = [n.data_share if n.data_share > 0 else 1.0 for n in workers]
    excluded: dict[str, str] = {}
    shards: dict[str, Tensors] = {}
    if pcfg.task == "lm":
        if not hasattr(train, "texts"):
            raise InputError(f"pretrain.task: 'lm' needs text data, data.source is '{data_cfg.source}'")
        tok = ByteTokenizer()
        labels = np.zeros(len(train), dtype=np.int64)
        parts = partition(labels, len(workers), part.kind, cfg.seed, alpha=part.alpha, domains=train.domains,
                          min_samples=part.min_samples, weights=weights)
        for node, idx in zip(workers, parts, strict=True):
            texts = [train.texts[int(i)] for i in idx]
            try:
                shards[node.id] = {"input_ids": lm_blocks(texts, tok, seq_len)}
            except InputError:
                excluded[node.id] = "its text is shorter than one sequence"
        val = {"input_ids": lm_blocks(test.texts, tok, seq_len)[: pcfg.eval_samples]}
        return Shards(shards, val, 0, excluded)

    if not hasattr(train, "x"):
        raise InputError(f"pretrain.task: '{pcfg.task}' needs image data, data.source is '{data_cfg.source}'")
    model_cfg = cfg.stage_model(STAGE)
    spec = ImageSpec(size=model_cfg.image_size, channels=model_cfg.channels)
    # Up front, before any worker: channels convert (grey <-> RGB), sizes must match for classify
    # (the clip task resizes each batch to its vision tower, cloudedge.models.inputs.fit_pixels).
    check_images(train.x.shape, spec, f"{STAGE}.data ({data_cfg.source}) for {STAGE}.model",
                 resize=pcfg.task == "clip")
    if pcfg.task == "classify":
        train.x, test.x = convert_channels(train.x, spec.channels), convert_channels(test.x, spec.channels)
    whole: Tensors = {"x": train.x, "y": train.y}
    val: Tensors = {"x": test.x[: pcfg.eval_samples], "y": test.y[: pcfg.eval_samples]}
    if pcfg.task == "clip":
        from cloudedge.pretrain.clip_task import clip_batch

        plain = data_cfg.glyphs.plain_captions if data_cfg.source == "glyphs" else 0.0
        whole = clip_batch(train.x, train.y, train.classes, cfg.seed, model_cfg.context, train.meta, plain)
        val = clip_batch(test.x, test.y, test.classes, cfg.seed + 1, model_cfg.context, test.meta, plain)
        val = {k: v[: pcfg.eval_samples] for k, v in val.items()}
    domains = train.domains.numpy() if train.domains is not None else None
    parts = partition(train.y.numpy(), len(workers), part.kind, cfg.seed, alpha=part.alpha, domains=domains,
                      min_samples=part.min_samples, weights=weights)
    for node, idx in zip(workers, parts, strict=True):
        if len(idx) == 0:
            excluded[node.id] = "no samples were dealt to it"
        else:
            shards[node.id] = _tensor_subset(whole, idx)
    return Shards(shards, val, len(train.classes), excluded)


def client_shards(cfg: RunConfig, pcfg: PretrainConfig, workers: list[Node], shards: dict[str, Tensors],
                  client_eval: dict[str, dict[str, Tensors]], val: Tensors | None) -> Shards:
    """Shards the caller dealt itself (``pretrain(shards=...)``), checked against the fleet and task.

    A training-tier node without a shard sits out (listed in ``excluded``). ``classify``: every shard
    and test set needs ``x`` [N, C, H, W] matching the model config and ``y`` [N]; the number of
    classes is the largest label seen, plus one. ``lm``: ``input_ids`` [N, seq_len].
    """
    needed = ("x", "y") if pcfg.task == "classify" else ("input_ids",) if pcfg.task == "lm" else ()
    worker_ids = {n.id for n in workers}
    for wid in [*shards, *client_eval]:
        if wid not in worker_ids:
            raise InputError(f"shards: '{wid}' is not a node of the training tiers {pcfg.workers}")
    labelled: list[tuple[str, Tensors]] = [(f"shards.{w}", d) for w, d in shards.items()]
    labelled += [(f"client_eval.{w}.{name}", d) for w, sets in client_eval.items() for name, d in sets.items()]
    if val is not None:
        labelled.append(("val", val))
    model_cfg = cfg.stage_model(STAGE)
    for where, data in labelled:
        missing = [k for k in needed if k not in data]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)} (task '{pcfg.task}' needs {', '.join(needed)})")
        sizes = {int(v.shape[0]) for v in data.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise InputError(f"{where}: tensors must be non-empty and have one length (got {sorted(sizes)})")
        if pcfg.task == "classify" and (data["x"].dim() != 4 or data["x"].shape[1] != model_cfg.channels
                                        or data["x"].shape[-1] != model_cfg.image_size):
            raise InputError(f"{where}.x: expected [N, {model_cfg.channels}, {model_cfg.image_size}, "
                             f"{model_cfg.image_size}] images, got {list(data['x'].shape)}")
    n_classes = 0
    if pcfg.task == "classify":
        n_classes = max(int(d["y"].max()) for _, d in labelled) + 1
    excluded = {n.id: "no shard was given for it" for n in workers if n.id not in shards}
    return Shards(dict(shards), val, n_classes, excluded)


# --------------------------------------------------------------------------------- state helpers


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[Tensors, dict[str, Any]]:
    """A torch optimizer's state as flat tensors (safetensors) + JSON (param groups, scalar keys)."""
    sd = opt.state_dict()
    tensors: Tensors = {}
    scalars: dict[str, dict[str, float]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    keys = {str(pid): sorted(k for k, v in st.items() if torch.is_tensor(v)) for pid, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "keys": keys, "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Tensors, meta: dict[str, Any], prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, keys in meta["keys"].items():
        state[int(pid)] = {k: tensors[f"{prefix}.{pid}.{k}"] for k in keys}
        state[int(pid)].update(meta["scalars"].get(pid, {}))
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _split_plain(msg: dict[str, Any], prefix: str) -> tuple[Tensors, dict[str, Any]]:
    """Top-level tensors of a message go to safetensors, the rest to JSON."""
    tensors = {f"{prefix}.{k}": v for k, v in msg.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in msg.items() if not torch.is_tensor(v)}


# ---------------------------------------------------------------------------------- aggregation


def union_batch_gradient(grads: list[Tensors], units: list[int]) -> Tensors:
    """Weighted by tokens/samples: the gradient of the mean loss over the union of all batches."""
    return weighted_mean(grads, [float(u) for u in units])


def fednova_delta(deltas: list[Tensors], units: list[float], steps: list[int]) -> Tensors:
    """FedNova: average per-step progress d_i = delta_i / tau_i, rescale by tau_eff = sum p_i tau_i.

    With equal step counts this is the plain unit-weighted mean of the deltas.
    """
    total = float(sum(units))
    p = [u / total for u in units]
    tau_eff = sum(pi * ti for pi, ti in zip(p, steps, strict=True))
    normalized = [{k: v / t for k, v in d.items()} for d, t in zip(deltas, steps, strict=True)]
    mean = weighted_mean(normalized, p)
    return {k: v * tau_eff for k, v in mean.items()}


_UNCOMPRESSED_NBYTES: dict[tuple, int] = {}


def _roundtrip(tensors: Tensors, mode: str) -> tuple[Tensors, int]:
    """What arrives after sending ``tensors`` compressed, and the exact bytes on the wire."""
    if mode == "none":
        # Uncompressed bytes depend only on names, shapes and dtypes: count them once per layout
        # instead of building (copying) a payload for every update of every round.
        layout = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in tensors.items())
        if layout not in _UNCOMPRESSED_NBYTES:
            _UNCOMPRESSED_NBYTES[layout] = int(comm.compress(tensors, "none").nbytes)
        return tensors, _UNCOMPRESSED_NBYTES[layout]
    payload = comm.compress(tensors, mode)
    return payload.decompress(), int(payload.nbytes)


# ----------------------------------------------------------------------------------------- loop


def objective_steps(pcfg: PretrainConfig) -> int:
    """The objective's steps over the whole run: one per round in ``sync``, ``local_steps`` per
    round in ``local`` (the unit of penalty schedules such as ``anneal_steps``)."""
    return pcfg.rounds * (pcfg.local_steps if pcfg.algorithm == "local" else 1)


def _lr_at(pcfg: PretrainConfig, round_idx: int) -> float:
    """Linear warm-up over ``warmup_rounds``, then constant (so controllers compare at one lr)."""
    if pcfg.warmup_rounds and round_idx < pcfg.warmup_rounds:
        return pcfg.lr * (round_idx + 1) / pcfg.warmup_rounds
    return pcfg.lr


def pretrain(cfg: RunConfig, run_dir: RunDir | str | Path | None = None, engine: Engine | None = None, *,
             resume: bool = False, on_round: Callable[[int, dict[str, Any]], None] | None = None,
             method: str | None = None, shards: dict[str, Tensors] | None = None,
             client_eval: dict[str, dict[str, Tensors]] | None = None, val: Tensors | None = None,
             **overrides: Any) -> PretrainResult:
    """Pre-train one model across the fleet ``cfg`` describes.

    Args:
        cfg: the run config; its ``pretrain`` section (defaults when absent) with ``overrides``
            applied (any PretrainConfig field, e.g. ``controller="goodput"``).
        run_dir: where to log (``RunDir`` or a path); None keeps everything in memory.
        engine: how workers are reached (default: a ``LocalEngine``).
        resume: continue from the last checkpoint in ``run_dir``.
        on_round: called after each round with (round, logged row); an exception it raises
            interrupts the run like a crash would (the checkpoints stay).
        method: the label logged in each row (default ``ALGORITHM-CONTROLLER``).
        shards: per-node training data ``{node_id: {"x": ..., "y": ...}}`` (``{"input_ids": ...}``
            for ``lm``) instead of dealing ``cfg``'s data section (:func:`build_shards`, the default);
            nodes of the training tiers without a shard sit out.
        client_eval: per-node test sets ``{node_id: {set_name: {"x": ..., "y": ...}}}``; they stay
            on their node and are scored there every ``eval_every`` rounds and at the end with the
            objective's ``predict`` and that client's private state. Rows log ``<set>_acc`` (mean
            over clients), ``<set>_acc_worst`` and ``clients`` (every client's metrics).
        val: the cloud's held-out data when ``shards`` is given (default: none, no ``val_loss``).
    """
    pcfg = with_overrides(cfg.pretrain or PretrainConfig(), overrides, STAGE)
    model_cfg = cfg.stage_model(STAGE)
    method = method or f"{pcfg.algorithm}-{pcfg.controller.name}"
    seq_len = pcfg.seq_len or model_cfg.context
    if pcfg.task == "lm" and seq_len > model_cfg.context:
        raise InputError(f"pretrain.seq_len: {seq_len} exceeds model.context ({model_cfg.context})")
    if isinstance(run_dir, str | Path):
        run_dir = RunDir.create(run_dir, cfg, resume=resume)
    device = resolve_device(pcfg.device, "pretrain.device")
    own_engine = engine is None
    engine = engine or make_engine("local")

    # --- fleet, data, model ------------------------------------------------------------------
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    nodes = [n for n in fleet.nodes.values() if n.tier in pcfg.workers]
    client_eval = dict(client_eval or {})
    data = (build_shards(cfg, pcfg, nodes, seq_len) if shards is None
            else client_shards(cfg, pcfg, nodes, shards, client_eval, val))
    encoder = pcfg.encoder or ("vit" if model_cfg.kind == "vit" else "mlp")
    objective = None
    if pcfg.task == "classify":
        from cloudedge.pretrain.objectives import get_objective

        objective = get_objective(pcfg.objective.name, total_steps=objective_steps(pcfg), **pcfg.objective.kwargs())
    model = build_task_model(pcfg.task, model_cfg, n_classes=data.n_classes, encoder=encoder,  # type: ignore[arg-type]
                             seed=cfg.seed, objective=objective, base_dir=cfg.base_dir)
    model.to(device).train()  # the coordinator's copy: aggregation, optimizer step and evaluation run there
    params = trainable(model)

    # --- costs: the trained model's, or those of the model the clock charges (clock.charge_as) --
    flops_factor = objective.train_flops_factor if objective is not None else 1.0  # e.g. pin trains two more models
    trained_cost = trained_costs(pcfg.task, model, model_cfg, seq_len=seq_len, n_classes=data.n_classes,
                                 encoder=encoder, flops_factor=flops_factor)
    charge = resolve_charge(cfg.clock)
    cost = trained_cost if charge is None else charged_costs(
        pcfg.task, charge, seq_len=seq_len, n_classes=data.n_classes, encoder=pcfg.encoder, seed=cfg.seed,
        objective=objective, base_dir=cfg.base_dir, flops_factor=flops_factor)

    # --- memory: the largest micro-batch each worker can hold --------------------------------
    caps: dict[str, int] = {}
    excluded = dict(data.excluded)
    for node in nodes:
        cap = cost.micro_batch_cap(node.profile.memory_bytes, pcfg.memory_fraction)
        if cap < 1:
            excluded.setdefault(node.id, f"{cost.name}'s weights and optimizer do not fit its memory")
        elif node.id not in excluded:
            caps[node.id] = cap
    workers = [n for n in nodes if n.id in caps]
    if not workers:
        raise InputError(f"pretrain.workers: no node can train ({'; '.join(f'{k}: {v}' for k, v in excluded.items())})")
    flops_per_sample = cost.train_flops_per_sample

    # --- workers behind the engine -----------------------------------------------------------
    for node in workers:
        engine.register(node.id, WorkerSpec(PretrainWorker, {
            "worker_id": node.id, "task": pcfg.task, "model_cfg": model_cfg.model_dump(mode="json"),
            "data": data.train[node.id], "seed": cfg.seed, "n_classes": data.n_classes, "encoder": encoder,
            "objective": pcfg.objective.name, "objective_args": pcfg.objective.kwargs(),
            "objective_steps": objective_steps(pcfg), "optimizer": pcfg.optimizer, "weight_decay": pcfg.weight_decay, "grad_clip": pcfg.grad_clip,
            "base_dir": cfg.base_dir, "eval_data": client_eval.get(node.id), "device": pcfg.device,
            "precision": pcfg.precision}))
    eval_ids = [n.id for n in workers if client_eval.get(n.id)]
    # Shard sizes (samples, or LM blocks) let the proportional controller keep every shard in the objective.
    shard_sizes = {n.id: int(next(iter(data.train[n.id].values())).shape[0]) for n in workers}

    # --- optimizers, controller, clock ---------------------------------------------------------
    weights = list(params.values())
    if pcfg.algorithm == "sync":
        optimizer: torch.optim.Optimizer = build_optimizer(pcfg.optimizer, weights, pcfg.lr, pcfg.weight_decay)
    elif pcfg.outer_optimizer == "nesterov":  # DiLoCo: SGD with Nesterov momentum on the pseudo-gradient
        optimizer = torch.optim.SGD(weights, lr=pcfg.outer_lr, momentum=pcfg.outer_momentum, nesterov=True)
    else:  # FedAvg: theta <- theta + mean delta
        optimizer = torch.optim.SGD(weights, lr=1.0)
    ctl_args: dict[str, Any] = pcfg.controller.kwargs()
    if "seed" in ctl_args and ctl_args["seed"] is None:  # a controller's seed defaults to the run's
        ctl_args["seed"] = cfg.seed
    controller: BatchController = CONTROLLERS.get(pcfg.controller.name)(pcfg.global_batch, **ctl_args)
    clock = VirtualClock(fleet)
    client_states: dict[str, Tensors] = {}
    server_msg: dict[str, Any] = {}
    totals = {"compute_s": 0.0, "slot_s": 0.0, "time_to_target_s": None}
    rows: list[dict[str, Any]] = []
    start_round = 0

    # --- resume ------------------------------------------------------------------------------
    ckpt_dir = run_dir.checkpoint_dir(STAGE) if run_dir is not None else None
    if resume and ckpt_dir is not None and (ckpt := load_latest(ckpt_dir)) is not None:
        tensors, state = ckpt
        src = str(ckpt_dir)
        model_t = check_state_dict(tensors, _ParamView(params), src, prefix="model.")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(model_t[k])
        load_optimizer_state(optimizer, tensors, state["optimizer"], "opt")
        controller.set_state({k[4:]: v for k, v in tensors.items() if k.startswith("ctl.")}, state["controller"])
        clock.load_state_dict(state["clock"])
        client_states = {wid: {k[len(f"client.{wid}."):]: v for k, v in tensors.items()
                               if k.startswith(f"client.{wid}.")} for wid in state["clients"]}
        server_msg = {**state["server_msg"], **{k[4:]: v for k, v in tensors.items() if k.startswith("msg.")}}
        totals = state["totals"]
        start_round = int(state["round"]) + 1
        rows = [r for r in run_dir.read_metrics() if r.get("stage") == STAGE and r.get("round", -1) < start_round]
        run_dir.truncate_metrics(lambda r: r.get("stage") != STAGE or r.get("round", -1) < start_round)
    elif resume and run_dir is not None:
        # Killed before its first checkpoint: start over, without the rows logged before the crash.
        run_dir.truncate_metrics(lambda r: r.get("stage") != STAGE or r.get("method") != method)

    param_nbytes = cost.message_bytes(pcfg.compression)
    charged_update_bytes = None if charge is None else cost.message_bytes(pcfg.compression)
    val_loss: float | None = rows[-1].get("val_loss") if rows else None
    # The clock's priors for the controllers: seconds per sample, and a round's broadcast + upload
    # (on idle links) per local step.
    local_h = pcfg.local_steps if pcfg.algorithm == "local" else 1
    cloud_profile = fleet.nodes[CLOUD_ID].profile
    priors = {n.id: (flops_per_sample / n.profile.flops,
                     0.0 if n.id == CLOUD_ID else (transfer_seconds(cloud_profile, n.profile, param_nbytes)
                                                   + transfer_seconds(n.profile, cloud_profile, param_nbytes)) / local_h)
              for n in workers}

    # --- rounds --------------------------------------------------------------------------------
    for r in range(start_round, pcfg.rounds):
        if pcfg.time_budget_s is not None and clock.now >= pcfg.time_budget_s:
            break  # the virtual-time budget is spent
        # 1. who is reachable, and the plan
        avail = {n.id for n in available_nodes(workers, np.random.default_rng([cfg.seed, 7, r]))}
        infos = [WorkerInfo(n.id, n.profile.flops, caps[n.id], n.id in avail, samples=shard_sizes[n.id],
                            sample_s=priors[n.id][0], overhead_s=priors[n.id][1],
                            availability=1.0 if n.id == CLOUD_ID else n.profile.availability)
                 for n in workers]
        plan: Plan = controller.plan(r, infos)
        if not plan.batches:
            plan = Plan({max(workers, key=lambda n: n.profile.flops).id: pcfg.global_batch})
        ids = sorted(plan.batches, key=lambda k: list(caps).index(k))
        steps = {k: (pcfg.local_steps if pcfg.algorithm == "local" else 1) for k in ids}
        lr = _lr_at(pcfg, r) * plan.lr_scale
        step_count = r * (pcfg.local_steps if pcfg.algorithm == "local" else 1)

        # 2. work, through the engine
        sent = {k: v.detach() for k, v in params.items()}  # the engine copies what crosses it
        combine = pcfg.algorithm == "sync" and objective is not None and objective.combines_in_sync
        msg_out = {**server_msg, "combine_at_server": True} if combine else server_msg
        tasks = []
        for wid in ids:
            common = {"params": sent, "batch": plan.batches[wid], "micro_batch": min(plan.batches[wid], caps[wid]),
                      "round_idx": r, "step": step_count, "server_msg": msg_out,
                      "client_state": client_states.get(wid)}
            # Devices hold no model between the rounds they are sampled in.
            release = fleet.nodes[wid].tier == "device"
            if pcfg.algorithm == "sync":
                tasks.append(Task(wid, "gradient", common, release=release))
            else:
                tasks.append(Task(wid, "local_train", {**common, "steps": steps[wid], "lr": lr}, release=release))
        wall0 = time.perf_counter()
        results = engine.run_tolerant(tasks)
        work_wall_s = time.perf_counter() - wall0
        # A worker that failed (a crashed actor, an exception) is left out of this round and logged;
        # the round completes with the others. Ray rebuilds a dead host for the next round.
        failed = {wid: str(res) for wid, res in zip(ids, results, strict=True) if isinstance(res, WorkerError)}
        if failed:
            if len(failed) == len(ids):
                raise WorkerError("round", str(r), f"every worker failed: {'; '.join(failed.values())}")
            kept = [(wid, res) for wid, res in zip(ids, results, strict=True) if wid not in failed]
            ids, results = [w for w, _ in kept], [res for _, res in kept]

        # This host's model-FLOPs utilization while the workers computed (real FLOPs over real
        # seconds), against its measured matmul peak and against the fastest participant's profile.
        # mfu_compute counts only the workers' own forward/backward/optimizer seconds: the gap to
        # mfu_measured is what the engine, the copies and the bookkeeping around them cost.
        flops_done = sum(plan.batches[w] * steps[w] * flops_per_sample for w in ids)
        host_util = utilization_fields(flops_done, work_wall_s, max(fleet.nodes[w].profile.flops for w in ids),
                                       device=device, peak_size=stage_peak_size(device),
                                       dtype=PRECISIONS[pcfg.precision])
        compute_wall_s = sum(float(res.get("compute_wall_s", 0.0)) for res in results)
        if host_util and compute_wall_s > 0:
            host_util["mfu_compute"] = flops_done / compute_wall_s / host_util["peak_flops_measured"]

        # 3. virtual clock: broadcast, compute, upload; everyone waits for the slowest
        t0 = clock.now
        ready = {wid: (t0 if wid == CLOUD_ID else clock.transfer(CLOUD_ID, wid, param_nbytes, start=t0)) for wid in ids}
        compute_s = {wid: plan.batches[wid] * steps[wid] * flops_per_sample / fleet.nodes[wid].profile.flops
                     for wid in ids}
        done = {wid: clock.compute(wid, plan.batches[wid] * steps[wid] * flops_per_sample, start=ready[wid])
                for wid in ids}
        updates: list[Tensors] = []
        for wid, res in zip(ids, results, strict=True):
            arrived, nbytes = _roundtrip(res["update"], pcfg.compression)
            nbytes = charged_update_bytes or nbytes  # an update has the charged model's layout
            updates.append(to_device(arrived, device))
            if wid != CLOUD_ID:
                done[wid] = clock.transfer(wid, CLOUD_ID, nbytes, start=done[wid])
        t1 = clock.barrier([*ids, CLOUD_ID])
        round_s = t1 - t0
        # Every update is checked before it is aggregated (a hostile or broken worker can send
        # anything): a rejected one is dropped from this round and its reason logged.
        verdict = UpdateGate(params, norm_rule="mad" if pcfg.update_check == "norm" else "none").check(
            dict(zip(ids, updates, strict=True)))
        if verdict.rejected:
            if not verdict.accepted:
                raise WorkerError("round", str(r), f"every update was rejected: {verdict.rejected}")
            kept = [i for i, wid in enumerate(ids) if wid not in verdict.rejected]
            ids, results, updates = [ids[i] for i in kept], [results[i] for i in kept], [updates[i] for i in kept]

        # 4. aggregate and step
        units = [int(res["units"]) for res in results]
        if pcfg.algorithm == "sync":  # the outer lr of `local` is fixed; its inner lr went to the workers
            for g in optimizer.param_groups:
                g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        # The controller may weight each update by its own rule (reweighted: the worker's data
        # share), else by units: the gradient of the mean loss over the union of the batches.
        agg_w = ([float(plan.weights[w]) for w in ids] if plan.weights is not None else [float(u) for u in units])
        if combine:  # the objective needs this step's risks from every client (V-REx)
            grad = objective.combine_gradients(updates, agg_w,  # type: ignore[union-attr]
                                               [float(res["loss"]) for res in results], step_count)
        elif pcfg.algorithm == "sync":
            grad = weighted_mean(updates, agg_w) if plan.weights is not None else union_batch_gradient(updates, units)
        else:
            worker_steps = [int(res["steps"]) for res in results]
            delta = (fednova_delta(updates, agg_w, worker_steps) if pcfg.fednova
                     else weighted_mean(updates, agg_w))
            grad = {k: -v for k, v in delta.items()}  # pseudo-gradient: theta_old - theta_new
        for k, p in params.items():
            p.grad = grad[k].to(p.dtype)
        if pcfg.algorithm == "sync" and pcfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(weights, pcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for wid, res in zip(ids, results, strict=True):
            if res["client_state"]:
                client_states[wid] = res["client_state"]
        if objective is not None:
            server_msg = objective.server_update(server_msg, [res["report"] for res in results],
                                                 [u / sum(units) for u in units])

        # 5. the controller learns from what the clock measured
        train_loss = sum(res["loss"] * u for res, u in zip(results, units, strict=True)) / sum(units)
        controller.observe(r, [Observation(wid, plan.batches[wid], compute_s[wid], (done[wid] - t0) - compute_s[wid],
                                           steps[wid], res["grad_sq_norm"], res["loss"])
                               for wid, res in zip(ids, results, strict=True)], round_s, train_loss)
        busy = sum(compute_s.values())
        totals["compute_s"] += busy
        totals["slot_s"] += len(ids) * round_s

        # 6. evaluate, log, checkpoint
        last = r == pcfg.rounds - 1
        row_val = None
        client_metrics: dict[str, Any] = {}
        if (r + 1) % pcfg.eval_every == 0 or last:
            if data.val is not None:
                row_val = val_loss = evaluate_loss(pcfg.task, model, data.val)
                if (pcfg.target_val_loss is not None and totals["time_to_target_s"] is None
                        and val_loss <= pcfg.target_val_loss):
                    totals["time_to_target_s"] = clock.now
            client_metrics = _evaluate_clients(engine, fleet, eval_ids, params, client_states)
        summary_clock = clock.summary()
        row = {"stage": STAGE, "method": method, "round": r, "virtual_time_s": clock.now, "round_s": round_s,
               "train_loss": train_loss, "val_loss": row_val, "lr": lr,
               "batch_per_step": plan.global_batch,
               "effective_batch": sum(plan.batches[w] * steps[w] for w in ids),
               "participants": len(ids), "accumulating": sum(plan.batches[w] > caps[w] for w in ids),
               "utilization": busy / (len(ids) * round_s) if round_s > 0 else 0.0,
               "bytes_total": summary_clock["bytes_total"], "energy_j": summary_clock["energy_j_total"],
               "failed": len(failed), **({"failures": failed} if failed else {}),
               "work_wall_s": work_wall_s, "compute_wall_s": compute_wall_s,
               **host_util,
               "rejected": len(verdict.rejected), **({"rejections": verdict.rejected} if verdict.rejected else {}),
               **{f"ctl_{k}": v for k, v in plan.info.items()}, **client_metrics}
        rows.append(run_dir.log(**row) if run_dir is not None else row)
        if ckpt_dir is not None and ((r + 1) % pcfg.checkpoint_every == 0 or last):
            _checkpoint(ckpt_dir, r, params, optimizer, controller, clock, client_states, server_msg, totals)
        if on_round is not None:
            on_round(r, row)

    if own_engine:
        engine.close()
    summary = _summary(pcfg, method, rows, clock, totals, val_loss, excluded, len(workers))
    summary["controller"] = controller.describe()
    summary["cost_model"] = cost_model_summary(trained_cost.describe(pcfg.compression),
                                               cost.describe(pcfg.compression) if charge else None, charge)
    if run_dir is not None:
        run_dir.update_summary(STAGE, summary)
    return PretrainResult(model, rows, summary, run_dir, excluded, client_states)


def _evaluate_clients(engine: Engine, fleet: Fleet, eval_ids: list[str], params: dict[str, nn.Parameter],
                      client_states: dict[str, Tensors]) -> dict[str, Any]:
    """Every client scores the current model (and its private state) on its own test sets.

    Returns row fields: ``clients`` ({client: {"<set>_<metric>": value}}), and per set the mean
    over clients (each client counts once, as personalized FL reports it) ``<set>_<metric>`` and
    the worst client's accuracy ``<set>_acc_worst``. A set called ``id`` also gives ``acc``.
    Evaluation is not charged to the virtual clock.
    """
    if not eval_ids:
        return {}
    current = {k: v.detach() for k, v in params.items()}  # the engine copies what crosses it
    results = engine.run([Task(wid, "evaluate", {"params": current, "client_state": client_states.get(wid)},
                               release=fleet.nodes[wid].tier == "device") for wid in eval_ids])
    clients = {wid: {f"{name}_{k}": v for name, metrics in res.items() for k, v in metrics.items()}
               for wid, res in zip(eval_ids, results, strict=True)}
    out: dict[str, Any] = {}
    for key in sorted({k for metrics in clients.values() for k in metrics}):
        values = [metrics[key] for metrics in clients.values() if key in metrics]
        out[key] = float(np.mean(values))
        if key.endswith("_acc"):
            out[f"{key}_worst"] = float(min(values))
    if "id_acc" in out:
        out["acc"] = out["id_acc"]
    out["clients"] = clients
    return out


class _ParamView(nn.Module):
    """Lets ``check_state_dict`` compare a checkpoint with the trainable parameters only."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        self._params = params

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {k: v.detach() for k, v in self._params.items()}


def _checkpoint(ckpt_dir: Path, r: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                controller: BatchController, clock: VirtualClock, client_states: dict[str, Tensors],
                server_msg: dict[str, Any], totals: dict[str, Any]) -> None:
    opt_t, opt_meta = optimizer_state(optimizer, "opt")
    ctl_t, ctl_meta = controller.get_state()
    msg_t, msg_meta = _split_plain(server_msg, "msg")
    tensors = {**{f"model.{k}": v.detach() for k, v in params.items()}, **opt_t,
               **{f"ctl.{k}": v for k, v in ctl_t.items()}, **msg_t,
               **{f"client.{w}.{k}": v for w, st in client_states.items() for k, v in st.items()}}
    save_checkpoint(ckpt_dir, r, tensors, {
        "round": r, "optimizer": opt_meta, "controller": ctl_meta, "clock": clock.state_dict(),
        "clients": sorted(client_states), "server_msg": msg_meta, "totals": totals})


def _summary(pcfg: PretrainConfig, method: str, rows: list[dict[str, Any]], clock: VirtualClock,
             totals: dict[str, Any], val_loss: float | None, excluded: dict[str, str], n_workers: int) -> dict[str, Any]:
    c = clock.summary()
    return {
        "method": method, "task": pcfg.task, "rounds": len(rows), "workers": n_workers,
        "final_val_loss": val_loss, "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "target_val_loss": pcfg.target_val_loss, "time_to_target_s": totals["time_to_target_s"],
        "virtual_time_s": clock.now, "bytes_total": c["bytes_total"], "energy_j": c["energy_j_total"],
        "compute_s": totals["compute_s"],  # virtual compute seconds of all participants, summed
        # Compute utilization: share of the participants' round time spent computing.
        "utilization": totals["compute_s"] / totals["slot_s"] if totals["slot_s"] > 0 else 0.0,
        "mean_batch_per_step": float(np.mean([r["batch_per_step"] for r in rows])) if rows else 0.0,
        "excluded": excluded,
        **_last_client_eval(rows),
    }


def _last_client_eval(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields :func:`_evaluate_clients` wrote into the last row that has them (or nothing)."""
    for row in reversed(rows):
        if "clients" in row:
            keys = {"clients", "acc", *(k for metrics in row["clients"].values() for k in metrics)}
            keys |= {f"{k}_worst" for k in keys}
            return {k: v for k, v in row.items() if k in keys}
    return {}


def run_pretrain(cfg: RunConfig, out_dir: str | Path, resume: bool = False, engine_kind: str = "local") -> dict[str, Any]:
    """The CLI's entry: run the stage into ``out_dir`` (the trained model in ``out_dir/model``)."""

    def save_model(result: PretrainResult, path: Path) -> None:
        if hasattr(result.model, "save_pretrained"):
            from cloudedge.models.zoo import save_local

            save_local(result.model, path / "model")

    return run_stage_into(STAGE, cfg, out_dir, resume, engine_kind, pretrain, save_model)


__all__ = ["PretrainResult", "fednova_delta", "pretrain", "run_pretrain", "union_batch_gradient"]
