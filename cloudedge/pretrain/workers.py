"""The pre-training worker: one node's trainer, reached only through the Engine.

A worker holds its node's data shard (plain tensors) and builds its model on first use. It keeps no
training state between rounds: the coordinator sends the global parameters, the plan (batch,
micro-batch, steps, lr) and the objective's client state with every task, and gets back an update,
the counts to weight it by, and the client state. So a device that is not sampled holds nothing,
a resumed run needs no worker state, and the Local and Ray engines give the same results.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import torch
from torch import nn

from cloudedge.config.model import ModelConfig
from cloudedge.device import autocast, resolve_device, synchronize, to_device
from cloudedge.models.zoo import build_uninitialised
from cloudedge.pretrain.tasks import batch_loss, batch_units, build_task_model, evaluate_loss

Tensors = dict[str, torch.Tensor]


def batch_generator(seed: int, worker_id: str, round_idx: int, step: int) -> torch.Generator:
    """The generator that draws one worker's batch at (round, step): a pure function of them.

    Nothing to checkpoint, and a resumed run draws the very batches an uninterrupted one would.
    """
    key = (seed * 1_000_003 + zlib.crc32(worker_id.encode()) * 7_919 + round_idx * 104_729 + step) % (2**63)
    return torch.Generator().manual_seed(key)


def sample_batch(data: Tensors, batch: int, generator: torch.Generator) -> Tensors:
    """``batch`` samples without replacement (with replacement when the shard is smaller)."""
    n = int(next(iter(data.values())).shape[0])
    if batch <= n:
        idx = torch.randperm(n, generator=generator)[:batch]
    else:
        idx = torch.randint(0, n, (batch,), generator=generator)
    return {k: v[idx] for k, v in data.items()}


def build_optimizer(name: str, weights: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``pretrain.optimizer``: the sync step's optimizer, or a worker's inner one in ``local``.

    ``adamw``: decoupled decay, DiLoCo's betas 0.9/0.95; ``adam``: torch's defaults (betas
    0.9/0.999, coupled L2 as ``weight_decay``), IRM's recipe; ``sgd``: plain SGD.
    """
    if name == "adamw":
        return torch.optim.AdamW(weights, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(weights, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(weights, lr=lr, weight_decay=weight_decay)


def micro_batches(data: Tensors, micro_batch: int) -> list[Tensors]:
    """Consecutive chunks of at most ``micro_batch`` samples."""
    n = int(next(iter(data.values())).shape[0])
    return [{k: v[s:s + micro_batch] for k, v in data.items()} for s in range(0, n, max(1, micro_batch))]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that are trained and exchanged (tied weights appear once)."""
    return dict(model.named_parameters())


def load_params(model: nn.Module, params: Tensors) -> None:
    with torch.no_grad():
        for name, p in trainable(model).items():
            p.copy_(params[name])


def sq_norm(tensors: Tensors) -> float:
    """Squared L2 norm over all tensors, in float64 (one host sync, not one per tensor)."""
    if not tensors:
        return 0.0
    return float(torch.stack([t.double().pow(2).sum() for t in tensors.values()]).sum())


def _tick(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def _tock(device: torch.device, start: float) -> float:
    """Wall seconds since ``start`` once the device has finished the queued work."""
    synchronize(device)
    return time.perf_counter() - start


class PretrainWorker:
    """Trains on one node's shard. Built by the Engine from plain keyword arguments."""

    def __init__(self, worker_id: str, task: str, model_cfg: dict[str, Any], data: Tensors, seed: int,
                 n_classes: int = 0, encoder: str = "mlp", objective: str = "erm",
                 objective_args: dict[str, float] | None = None, objective_steps: int | None = None,
                 optimizer: str = "adamw",
                 weight_decay: float = 0.1, grad_clip: float | None = 1.0, base_dir: str = ".",
                 eval_data: dict[str, Tensors] | None = None, device: str = "cpu", precision: str = "fp32"):
        self.worker_id, self.task, self.seed = worker_id, task, int(seed)
        self.model_cfg = ModelConfig.model_validate(model_cfg)
        self.data = data
        self.eval_data = dict(eval_data or {})  # this client's own test sets; they never leave the node
        self.n_classes, self.encoder = int(n_classes), encoder
        self.objective_name, self.objective_args = objective, dict(objective_args or {})
        self.objective_steps = objective_steps
        self.optimizer_name, self.weight_decay, self.grad_clip = optimizer, float(weight_decay), grad_clip
        self.base_dir = base_dir
        # The shard stays in host memory; each sampled batch moves to the device. Results return
        # to host memory at the engine, so the coordinator never sees device tensors. The device
        # name is resolved here, on this worker's host (auto: this host's GPU, if it has one).
        self.device, self.precision = torch.device(resolve_device(device, "pretrain.device")), precision
        self._model: nn.Module | None = None
        self._objective: Any = None

    # -- lazily built parts -----------------------------------------------------------------------

    @property
    def objective(self) -> Any:
        if self._objective is None and self.task == "classify":
            from cloudedge.pretrain.objectives import get_objective

            self._objective = get_objective(self.objective_name, total_steps=self.objective_steps,
                                            **self.objective_args)
        return self._objective

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            # Every task loads the coordinator's parameters before it uses the model, so it is
            # built uninitialised, on its device (a kind-hf checkpoint loads from disk as usual).
            def build() -> nn.Module:
                return build_task_model(self.task, self.model_cfg, n_classes=self.n_classes, encoder=self.encoder,
                                        seed=self.seed, objective=self.objective, base_dir=self.base_dir)  # type: ignore[arg-type]

            self._model = build() if self.model_cfg.kind == "hf" else build_uninitialised(build, self.device)
            self._model.to(self.device)
            self._model.train()
        return self._model

    def _client_state(self, saved: Tensors | None) -> dict[str, Any]:
        if self.objective is None:
            return {}
        state = self.objective.init_client(self.model, self.worker_id, self.seed)
        if saved:
            self.objective.load_client_state_dict(state, saved)
        return state

    # -- one mini-batch ---------------------------------------------------------------------------

    def _accumulate(self, batch: Tensors, micro_batch: int, client_state: dict[str, Any],
                    server_msg: dict[str, Any], step: int) -> tuple[float, dict[str, float]]:
        """Backward of the batch's mean loss, in micro-batches that fit memory.

        Each micro-batch's mean loss is weighted by its share of the batch's units, so the summed
        gradient equals the gradient of the whole batch's mean loss (exactly, for per-sample losses).
        """
        total_units = batch_units(self.task, batch)
        loss_sum, logs_sum = 0.0, {}
        for chunk in micro_batches(batch, micro_batch):
            share = batch_units(self.task, chunk) / total_units
            with autocast(self.device, self.precision):
                loss, logs = batch_loss(self.task, self.model, chunk, objective=self.objective,
                                        client_state=client_state, server_msg=server_msg, step=step)
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v) * share
        return loss_sum, logs_sum

    def _grads(self) -> Tensors:
        # No copy here: the engine copies what it returns, and the next task sets fresh grads.
        return {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p))
                for n, p in trainable(self.model).items()}

    def _sample(self, round_idx: int, step: int, batch: int) -> Tensors:
        data = sample_batch(self.data, batch, batch_generator(self.seed, self.worker_id, round_idx, step))
        return to_device(data, self.device)

    def _private_and_report(self, batch: Tensors, client_state: dict[str, Any], step: int) -> None:
        if self.objective is not None:
            self.objective.local_private_step(self.model, batch["x"], batch["y"], client_state, step)

    def _finish(self, client_state: dict[str, Any], last: Tensors) -> tuple[dict[str, Any], Tensors]:
        if self.objective is None:
            return {}, {}
        report = self.objective.client_report(self.model, last["x"], last["y"], client_state)
        return report, self.objective.client_state_dict(client_state)

    # -- tasks ------------------------------------------------------------------------------------

    def gradient(self, params: Tensors, batch: int, micro_batch: int, round_idx: int, step: int = 0,
                 server_msg: dict[str, Any] | None = None, client_state: Tensors | None = None) -> dict[str, Any]:
        """Mean-loss gradient of one batch at ``params`` (for ``sync``).

        Returns ``update`` (the gradient), ``units`` (tokens or samples it averages over, the
        weight for the union-batch mean), ``loss``, ``grad_sq_norm`` and the objective's
        ``report`` and ``client_state``.
        """
        load_params(self.model, params)
        self.model.zero_grad(set_to_none=True)
        state = self._client_state(client_state)
        data = self._sample(round_idx, 0, batch)
        t0 = _tick(self.device)
        loss, logs = self._accumulate(data, micro_batch, state, server_msg or {}, step)
        compute_s = _tock(self.device, t0)
        grads = self._grads()
        self._private_and_report(data, state, step)
        report, saved = self._finish(state, data)
        return {"update": grads, "units": batch_units(self.task, data), "samples": batch, "steps": 1,
                "loss": loss, "grad_sq_norm": sq_norm(grads), "logs": logs, "report": report,
                "client_state": saved, "compute_wall_s": compute_s}

    def local_train(self, params: Tensors, batch: int, micro_batch: int, steps: int, lr: float, round_idx: int,
                    step: int = 0, server_msg: dict[str, Any] | None = None,
                    client_state: Tensors | None = None) -> dict[str, Any]:
        """``steps`` inner optimizer steps from ``params`` (for ``local``); ``update`` = new - old.

        The inner optimizer (AdamW with DiLoCo's betas 0.9/0.95, or SGD) starts fresh each round, so
        a worker carries nothing from one round to the next. ``grad_sq_norm`` is the first step's.
        """
        load_params(self.model, params)
        state = self._client_state(client_state)
        weights = list(trainable(self.model).values())
        opt = build_optimizer(self.optimizer_name, weights, lr, self.weight_decay)
        losses, first_sq, units, logs_sum = [], None, 0, {}
        data: Tensors = {}
        compute_s = 0.0
        for s in range(steps):
            data = self._sample(round_idx, s, batch)
            t0 = _tick(self.device)
            opt.zero_grad(set_to_none=True)
            loss, logs = self._accumulate(data, micro_batch, state, server_msg or {}, step + s)
            if first_sq is None:
                first_sq = sq_norm(self._grads())
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(weights, self.grad_clip)
            opt.step()
            compute_s += _tock(self.device, t0)
            self._private_and_report(data, state, step + s)
            losses.append(loss)
            units += batch_units(self.task, data)
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + v / steps
        update = {n: p.detach() - params[n].to(p.device) for n, p in trainable(self.model).items()}
        report, saved = self._finish(state, data)
        return {"update": update, "units": units, "samples": batch * steps, "steps": steps,
                "loss": sum(losses) / len(losses), "grad_sq_norm": first_sq, "logs": logs_sum,
                "report": report, "client_state": saved, "compute_wall_s": compute_s}

    def evaluate(self, params: Tensors, client_state: Tensors | None = None,
                 batch_size: int = 1024) -> dict[str, dict[str, float]]:
        """Metrics of this client's model at ``params`` on each of its own test sets.

        ``classify``: ``acc`` and ``loss`` (cross-entropy) of the objective's ``predict`` with this
        client's private state (a personalized objective scores its own private model here), plus
        ``<variant>_acc`` for every extra model the objective names in ``eval_logits`` (``pin``:
        its global invariant and local ERM models). Other tasks: ``loss`` (``evaluate_loss``).
        Nothing is trained and no state is kept: the client state is rebuilt from ``client_state``.
        """
        load_params(self.model, params)
        state = self._client_state(client_state)
        self.model.eval()
        out: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for name, data in self.eval_data.items():
                if self.task != "classify":
                    out[name] = {"loss": evaluate_loss(self.task, self.model, data, batch_size)}
                    continue
                out[name] = self._classify_metrics(data, state, batch_size)
        self.model.train()
        return out

    def _classify_metrics(self, data: Tensors, state: dict[str, Any], batch_size: int) -> dict[str, float]:
        x, y = data["x"], data["y"]
        correct: dict[str, float] = {}
        stats: dict[str, float] = {}
        loss_sum = 0.0
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size].to(self.device), y[start:start + batch_size].to(self.device)
            logits = {"": (self.objective.predict(self.model, xb, state) if self.objective is not None
                           else self.model(xb))}
            if self.objective is not None:
                logits.update(self.objective.eval_logits(self.model, xb, state))
                for key, value in self.objective.eval_stats(self.model, xb, state).items():
                    stats[key] = stats.get(key, 0.0) + value * len(yb)  # sample-weighted mean below
            loss_sum += float(nn.functional.cross_entropy(logits[""], yb, reduction="sum"))
            for key, lg in logits.items():
                correct[key] = correct.get(key, 0.0) + float((lg.argmax(dim=1) == yb).sum())
        n = max(len(y), 1)
        metrics = {"acc": correct.pop("") / n, "loss": loss_sum / n}
        metrics.update({f"{key}_acc": c / n for key, c in correct.items()})
        metrics.update({key: total / n for key, total in stats.items()})
        return metrics
