"""``pretrain-ood``: shortcut-averse objectives on colored + rotated digits, ID vs OOD accuracy.

Protocol (after the IRM Colored-MNIST recipe; ``docs/invariant-learning.md`` has the table):

- scikit-learn's 1,797 digits, 10-way label from the digit, then label noise: with probability
  ``label_noise`` (0.25, as in IRM's Colored MNIST) the label is replaced by a uniformly drawn other
  label, so the digit's shape predicts the (noisy) label with accuracy ~0.75;
- iid split over ``n_clients`` clients; client ``k`` rotates all its images by its own angle
  (the personalized feature) and colors them with the palette color of the label, flipped to
  another color with its own probability (0.10..0.25 in training, so color predicts the label
  *better* than shape does: a shortcut);
- each client holds out ``test_fraction`` of its samples: the ID test keeps the training flip
  probability, the OOD test flips the color with probability 0.90 (same images and labels);
- every method trains the same MLP classifier from the same initialization with its default
  objective arguments (nothing is tuned per method), FedAvg with sample weights, Adam inside
  each client; a global method is evaluated with the aggregated model on each client,
  ``pin`` with each client's personalized model (its ``predict``).

Metrics per method: ``id_acc`` and ``ood_acc`` (mean over clients, then over seeds),
``ood_acc_worst`` (worst client), per-client values, and for ``pin`` also its global invariant
model's and local ERM model's accuracies.

TO BE REPLACED: :func:`train_federated` is a minimal federated loop kept inside this module
because the stage loop (``cloudedge.pretrain.loop``) has no entry point yet for "classification
with objective X on these per-client datasets". It uses only the Objective interface,
``cloudedge.aggregate.weighted_mean`` and the engine, so swapping it for the stage's entry point
is local to this function.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloudedge.aggregate import weighted_mean
from cloudedge.config.model import ModelConfig
from cloudedge.data import ImageDataset, colored, load_digits, partition, rotated
from cloudedge.engine import Engine, LocalEngine, Task, WorkerSpec
from cloudedge.pretrain.objectives import get_objective
from cloudedge.pretrain.tasks import build_classifier

METHODS: tuple[str, ...] = ("erm", "irm", "vrex", "fedsr", "fediir", "pin")
N_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class OODSetup:
    """Everything the benchmark's protocol fixes (the same for every method)."""

    n_clients: int = 4
    degrees: tuple[float, ...] = (0.0, 30.0, 60.0, 90.0)
    train_flip: tuple[float, ...] = (0.10, 0.15, 0.20, 0.25)
    test_flip: float = 0.90
    label_noise: float = 0.25
    test_fraction: float = 0.3
    rounds: int = 50
    local_steps: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0  # Adam's L2; 0: IRM's loss division would let it swamp the risk
    hidden: int = 128
    layers: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if not (len(self.degrees) == len(self.train_flip) == self.n_clients):
            raise ValueError("one rotation angle and one training flip probability per client")

    def model_config(self) -> ModelConfig:
        return ModelConfig(kind="gpt", hidden=self.hidden, layers=self.layers, heads=1, channels=3, image_size=8)


QUICK = OODSetup(rounds=25, seeds=(0,))
FULL = OODSetup()


# -- data --------------------------------------------------------------------------------------
def noisy_digits(label_noise: float, seed: int) -> ImageDataset:
    """The digits with each label replaced, with probability ``label_noise``, by a uniformly drawn other label."""
    base = load_digits()
    rng = np.random.default_rng(seed)
    y = base.y.numpy().copy()
    hit = rng.random(len(y)) < label_noise
    y[hit] = (y[hit] + rng.integers(1, N_CLASSES, int(hit.sum()))) % N_CLASSES
    return ImageDataset(x=base.x, y=torch.from_numpy(y), classes=list(base.classes))


def build_clients(setup: OODSetup, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per client: ``x_train, y_train`` (training flips), ``x_id, y_id`` and ``x_ood, y_ood`` (0.9 flips)."""
    data = noisy_digits(setup.label_noise, seed)
    parts = partition(data.y.numpy(), setup.n_clients, "iid", seed)
    rng = np.random.default_rng(seed + 7919)
    clients = []
    for k, idx in enumerate(parts):
        mine = rotated(data.subset(idx), setup.degrees[k])
        order = rng.permutation(len(mine))
        n_test = round(len(mine) * setup.test_fraction)
        train, test = mine.subset(np.sort(order[n_test:])), mine.subset(np.sort(order[:n_test]))
        color_seed = 1000 * seed + 10 * k
        train = colored(train, setup.train_flip[k], color_seed)
        id_test = colored(test, setup.train_flip[k], color_seed + 1)
        ood_test = colored(test, setup.test_flip, color_seed + 2)
        clients.append({"x_train": train.x, "y_train": train.y, "x_id": id_test.x, "y_id": id_test.y,
                        "x_ood": ood_test.x, "y_ood": ood_test.y})
    return clients


# -- the minimal federated loop (TO BE REPLACED by the stage's entry point) ---------------------
class OODClient:
    """One client: its data, its copy of the shared model, its objective's private state."""

    def __init__(self, client_id: str, data: dict[str, torch.Tensor], objective: str,
                 objective_args: dict[str, float], model: dict[str, Any], seed: int, lr: float, batch_size: int,
                 weight_decay: float = 0.0):
        self.client_id, self.data, self.seed, self.lr, self.batch_size = client_id, data, seed, lr, batch_size
        self.weight_decay = weight_decay
        self.objective = get_objective(objective, **objective_args)
        self.model = self.objective.prepare_model(build_classifier(ModelConfig(**model), N_CLASSES, seed, kind="mlp"))
        self.client_state: dict[str, Any] | None = None
        self.rng = torch.Generator().manual_seed(seed)
        self.step = 0

    def train(self, global_state: dict[str, torch.Tensor], server_msg: dict[str, Any], local_steps: int) -> dict[str, Any]:
        """``local_steps`` steps from the global weights; returns new weights, report, sample count, logs."""
        model, objective = self.model, self.objective
        model.load_state_dict(global_state)
        model.train()
        if self.client_state is None:
            self.client_state = objective.init_client(model, self.client_id, self.seed)
        x_all, y_all = self.data["x_train"], self.data["y_train"]
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        logs: dict[str, float] = {}
        for _ in range(local_steps):
            idx = torch.randperm(len(y_all), generator=self.rng)[: self.batch_size]
            x, y = x_all[idx], y_all[idx]
            optimizer.zero_grad(set_to_none=True)
            loss, logs = objective.local_loss(model, x, y, self.client_state, server_msg, self.step)
            loss.backward()
            optimizer.step()
            objective.local_private_step(model, x, y, self.client_state, self.step)
            self.step += 1
        report = objective.client_report(model, x_all, y_all, self.client_state)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"state": state, "report": report, "n": len(y_all), "logs": logs}

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
        """ID and OOD accuracy of ``predict`` (and, for personalized objectives, of each private model)."""
        model = self.model
        model.load_state_dict(global_state)
        model.eval()
        state = self.client_state or {}
        out: dict[str, float] = {}
        with torch.no_grad():
            for split in ("id", "ood"):
                x, y = self.data[f"x_{split}"], self.data[f"y_{split}"]
                out[f"{split}_acc"] = _accuracy(self.objective.predict(model, x, state), y)
                if self.objective.personalized:
                    out[f"global_{split}_acc"] = _accuracy(model(x), y)
                    if "local" in state:
                        out[f"local_{split}_acc"] = _accuracy(state["local"](x), y)
        model.train()
        return out


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def train_federated(engine: Engine, method: str, clients: list[dict[str, torch.Tensor]], setup: OODSetup,
                    seed: int, objective_args: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Train ``method`` over the clients (FedAvg, sample weights); per-client evaluation results.

    TO BE REPLACED by the pre-training stage's entry point (see the module docstring).
    """
    objective_args = dict(objective_args or {})
    objective = get_objective(method, **objective_args)
    model_cfg = setup.model_config()
    global_model = objective.prepare_model(build_classifier(model_cfg, N_CLASSES, seed, kind="mlp"))
    state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    worker_ids = [f"{method}/s{seed}/c{k}" for k in range(len(clients))]
    for k, (wid, data) in enumerate(zip(worker_ids, clients, strict=True)):
        engine.register(wid, WorkerSpec(OODClient, {
            "client_id": f"c{k}", "data": data, "objective": method, "objective_args": objective_args,
            "model": model_cfg.model_dump(), "seed": 1000 * seed + k, "lr": setup.lr, "batch_size": setup.batch_size,
            "weight_decay": setup.weight_decay}))
    server_msg: dict[str, Any] = {}
    for _ in range(setup.rounds):
        results = engine.run([Task(wid, "train", {"global_state": state, "server_msg": server_msg,
                                                  "local_steps": setup.local_steps}) for wid in worker_ids])
        weights = [float(r["n"]) for r in results]
        state = weighted_mean([r["state"] for r in results], weights)
        server_msg = objective.server_update(server_msg, [r["report"] for r in results], weights)
    evaluations = engine.run([Task(wid, "evaluate", {"global_state": state}) for wid in worker_ids])
    for wid in worker_ids:
        engine.release(wid)
    return evaluations


# -- the benchmark -----------------------------------------------------------------------------
def _summarize(per_seed: list[list[dict[str, float]]]) -> dict[str, Any]:
    """Mean over clients per seed, then mean (and std) over seeds; worst client's OOD accuracy."""
    keys = per_seed[0][0].keys()
    client_means = {k: [statistics.fmean(c[k] for c in clients) for clients in per_seed] for k in keys}
    out: dict[str, Any] = {k: statistics.fmean(v) for k, v in client_means.items()}
    out["ood_acc_worst"] = statistics.fmean(min(c["ood_acc"] for c in clients) for clients in per_seed)
    if len(per_seed) > 1:
        out["ood_acc_std"] = statistics.stdev(client_means["ood_acc"])
        out["id_acc_std"] = statistics.stdev(client_means["id_acc"])
    n_clients = len(per_seed[0])
    out["per_client"] = {
        f"c{k}": {m: statistics.fmean(clients[k][m] for clients in per_seed) for m in ("id_acc", "ood_acc")}
        for k in range(n_clients)
    }
    return out


def run(quick: bool, out_dir: Path, methods: str | None = None, **options: Any) -> dict[str, Any]:
    """Run every method on the protocol and return the results table.

    Args:
        quick: one seed and 25 rounds (88 s measured on a loaded 2-core machine) instead of 3 seeds x 50 rounds.
        out_dir: where the caller writes ``results.json`` (nothing else is written here).
        methods: optional comma-separated subset of :data:`METHODS`.
    """
    setup = QUICK if quick else FULL
    chosen = METHODS if not methods else tuple(m.strip() for m in str(methods).split(",") if m.strip())
    for m in chosen:
        get_objective(m)  # unknown names -> InputError before any work
    clients_by_seed = {seed: build_clients(setup, seed) for seed in setup.seeds}
    table: dict[str, Any] = {}
    # A 42k-parameter MLP on 64-sample batches gains nothing from intra-op threads, and on a
    # shared machine their spinning made the run ~6x slower; restore the caller's setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LocalEngine() as engine:
            for method in chosen:
                per_seed = [train_federated(engine, method, clients_by_seed[seed], setup, seed) for seed in setup.seeds]
                table[method] = _summarize(per_seed)
    finally:
        torch.set_num_threads(threads)
    config = dataclasses.asdict(setup)
    config["objective_args"] = {m: get_objective(m).params for m in chosen}
    config["train_samples_per_client"] = [int(len(c["y_train"])) for c in clients_by_seed[setup.seeds[0]]]
    config["loop"] = "minimal in-module FedAvg loop (to be replaced by cloudedge.pretrain's entry point)"
    result: dict[str, Any] = {"benchmark": "pretrain-ood", "config": config, "methods": table}
    if "erm" in table and "pin" in table:
        result["pin_minus_erm_ood_points"] = 100.0 * (table["pin"]["ood_acc"] - table["erm"]["ood_acc"])
    return result
