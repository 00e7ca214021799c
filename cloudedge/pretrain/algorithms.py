"""Pre-training algorithms: how a round's worker updates become one step of the global model.

Each algorithm is a class registered by name in :data:`ALGORITHMS` (``pretrain.algorithm`` in a
config: ``sync`` or ``local``, bare or as ``{name: ...}``). It owns the parts of a round that differ
between algorithms: what each worker is asked to compute (:meth:`PretrainAlgorithm.worker_task`),
how many inner steps a round holds, the coordinator's optimizer, and how the updates that arrived
become that optimizer's step (:meth:`PretrainAlgorithm.step`). The round around it (plan, dispatch,
clock, update checks, controller, log, checkpoint) is the stage's (:mod:`cloudedge.pretrain.stage`).

The knobs of ``local`` (``local_steps``, ``outer_optimizer``, ``outer_lr``, ``outer_momentum``,
``fednova``) stay fields of the ``pretrain`` section, so existing configs keep working; the
algorithms' own parameter models are empty (docs/pretraining.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cloudedge.aggregate import weighted_mean
from cloudedge.engine.base import Task
from cloudedge.registry import Registry

Tensors = dict[str, torch.Tensor]

ALGORITHMS: Registry[type[PretrainAlgorithm]] = Registry("pre-training algorithm")


def union_batch_gradient(grads: list[Tensors], units: list[float]) -> Tensors:
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


class PretrainAlgorithm:
    """Base class: holds the coordinator's parameters, its optimizer and the objective.

    Subclasses set :attr:`task_kind` (the worker method a round calls), build :attr:`optimizer`
    and implement :meth:`gradient`.
    """

    task_kind: ClassVar[str] = ""

    def __init__(self, pcfg: Any, params: dict[str, nn.Parameter], objective: Any = None):
        self.pcfg, self.params, self.objective = pcfg, params, objective
        self.weights = list(params.values())
        self.optimizer: torch.optim.Optimizer

    @classmethod
    def steps_per_round(cls, pcfg: Any) -> int:
        """Optimizer steps a worker takes per round (the unit of the objective's schedules)."""
        return 1

    @property
    def combines(self) -> bool:
        """Whether the objective combines the clients' gradients at the server (V-REx in ``sync``)."""
        return False

    def worker_task(self, wid: str, common: dict[str, Any], lr: float, release: bool) -> Task:
        """What worker ``wid`` computes this round (``common``: params, batch, round, messages)."""
        return Task(wid, self.task_kind, common, release=release)

    def gradient(self, updates: list[Tensors], weights: list[float], results: list[dict[str, Any]],
                 step_count: int) -> Tensors:
        """The (pseudo-)gradient the coordinator's optimizer steps on."""
        raise NotImplementedError

    def step(self, updates: list[Tensors], weights: list[float], results: list[dict[str, Any]], lr: float,
             step_count: int) -> None:
        """Aggregate the updates that arrived (weighted by ``weights``) and step the global model."""
        self.optimizer.zero_grad(set_to_none=True)
        grad = self.gradient(updates, weights, results, step_count)
        for k, p in self.params.items():
            p.grad = grad[k].to(p.dtype)
        self.before_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def before_step(self) -> None:
        """Called with the aggregated gradient in place, before the optimizer steps."""

    # --- checkpoints: the optimizer's state as a nested state (cloudedge.checkpoint.save_state)
    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Nested states keep dict keys as strings; torch keys a parameter's state by its index.
        self.optimizer.load_state_dict({"state": {int(k): v for k, v in state["state"].items()},
                                        "param_groups": state["param_groups"]})


@ALGORITHMS.register("sync")
class SyncSGD(PretrainAlgorithm):
    """One step per round on the gradient of the union of every worker's batch (large-batch SGD)."""

    task_kind = "gradient"

    def __init__(self, pcfg: Any, params: dict[str, nn.Parameter], objective: Any = None):
        super().__init__(pcfg, params, objective)
        from cloudedge.pretrain.workers import build_optimizer

        self.optimizer = build_optimizer(pcfg.optimizer, self.weights, pcfg.lr, pcfg.weight_decay)

    @property
    def combines(self) -> bool:
        return self.objective is not None and self.objective.combines_in_sync

    def step(self, updates: list[Tensors], weights: list[float], results: list[dict[str, Any]], lr: float,
             step_count: int) -> None:
        for g in self.optimizer.param_groups:  # warm-up and the controller's lr scale, this round
            g["lr"] = lr
        super().step(updates, weights, results, lr, step_count)

    def gradient(self, updates: list[Tensors], weights: list[float], results: list[dict[str, Any]],
                 step_count: int) -> Tensors:
        if self.combines:  # the objective needs this step's risks from every client (V-REx)
            return self.objective.combine_gradients(updates, weights, [float(res["loss"]) for res in results],
                                                    step_count)
        # Weighted by units (or the controller's weights): the gradient of the mean loss over the union.
        return union_batch_gradient(updates, weights)

    def before_step(self) -> None:
        if self.pcfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.weights, self.pcfg.grad_clip)


@ALGORITHMS.register("local")
class LocalSGD(PretrainAlgorithm):
    """``local_steps`` inner steps on every worker, then an outer step on the mean delta (DiLoCo,
    ``outer_optimizer: nesterov``) or theta + mean delta (FedAvg); FedNova normalizes unequal steps."""

    task_kind = "local_train"

    def __init__(self, pcfg: Any, params: dict[str, nn.Parameter], objective: Any = None):
        super().__init__(pcfg, params, objective)
        if pcfg.outer_optimizer == "nesterov":  # DiLoCo: SGD with Nesterov momentum on the pseudo-gradient
            self.optimizer = torch.optim.SGD(self.weights, lr=pcfg.outer_lr, momentum=pcfg.outer_momentum,
                                             nesterov=True)
        else:  # FedAvg: theta <- theta + mean delta
            self.optimizer = torch.optim.SGD(self.weights, lr=1.0)

    @classmethod
    def steps_per_round(cls, pcfg: Any) -> int:
        return int(pcfg.local_steps)

    def worker_task(self, wid: str, common: dict[str, Any], lr: float, release: bool) -> Task:
        # The inner lr goes to the workers; the outer lr is fixed.
        return Task(wid, self.task_kind, {**common, "steps": self.pcfg.local_steps, "lr": lr}, release=release)

    def gradient(self, updates: list[Tensors], weights: list[float], results: list[dict[str, Any]],
                 step_count: int) -> Tensors:
        worker_steps = [int(res["steps"]) for res in results]
        delta = fednova_delta(updates, weights, worker_steps) if self.pcfg.fednova else weighted_mean(updates, weights)
        return {k: -v for k, v in delta.items()}  # pseudo-gradient: theta_old - theta_new


def algorithm_class(pcfg: Any) -> type[PretrainAlgorithm]:
    """The class ``pcfg.algorithm`` names (a Choice, or a bare name)."""
    name = pcfg.algorithm if isinstance(pcfg.algorithm, str) else pcfg.algorithm.name
    return ALGORITHMS.get(name)


def objective_steps(pcfg: Any) -> int:
    """The objective's steps over the whole run: ``rounds`` times the algorithm's steps per round
    (one in ``sync``, ``local_steps`` in ``local``): the unit of penalty schedules (``anneal_steps``)."""
    return pcfg.rounds * algorithm_class(pcfg).steps_per_round(pcfg)


__all__ = ["ALGORITHMS", "LocalSGD", "PretrainAlgorithm", "SyncSGD", "algorithm_class", "fednova_delta",
           "objective_steps", "union_batch_gradient"]
