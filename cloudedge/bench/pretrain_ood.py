"""``pretrain-ood``: shortcut-averse objectives on colored + rotated digits, ID vs OOD accuracy.

Protocol (after the IRM Colored-MNIST recipe; ``docs/invariant-learning.md`` has the table and why):

- scikit-learn's 1,797 digits; the label is the digit (10-way) or, with ``n_classes=2``, IRM's
  binary ``digit >= 5``; then label noise: with probability ``label_noise`` (0.25, as in IRM's
  Colored MNIST) the label is replaced by a uniformly drawn other label, so the digit's shape
  predicts the (noisy) label with accuracy ~0.75;
- iid split over ``n_clients`` clients, one client = one environment; client ``k`` rotates all its
  images by its own angle (the personalized feature) and colors them with the palette color of
  the label, flipped to another label's color with its own probability (0.10..0.25 in training,
  so color predicts the label *better* than shape does: a shortcut);
- each client holds out ``test_fraction`` of its images: the ID test keeps the training flip
  probability, the OOD test flips the color with probability 0.90 (same images and labels);
- every method trains the same MLP classifier from the same initialization with its default
  objective arguments (nothing is tuned per method) in the one pre-training loop,
  :func:`cloudedge.pretrain.loop.pretrain`, with the clients' data handed over as ``shards``
  and their tests as ``client_eval``. The loop scores every client with the objective's
  ``predict`` (``pin``: that client's personalized model; also its global and local models).

Metrics per method: ``id_acc`` and ``ood_acc`` (mean over clients, then over seeds),
``ood_acc_worst`` (worst client), per-client values, the virtual time the fleet took, and for
``pin`` its global invariant and local ERM models' accuracies.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloudedge.config import RunConfig, config_from_dict
from cloudedge.data import PALETTE, load_digits, partition, rotated
from cloudedge.pretrain.loop import pretrain
from cloudedge.pretrain.objectives import get_objective

METHODS: tuple[str, ...] = ("erm", "irm", "vrex", "fedsr", "fediir", "pin", "pin-lam0")
# Rows that are an objective with non-default arguments: the ablation of pin's anchor (lam = 0:
# the personalized model is trained by cross-entropy alone, on the same private schedule).
VARIANTS: dict[str, tuple[str, dict[str, float]]] = {"pin-lam0": ("pin", {"lam": 0.0})}


def resolve(method: str) -> tuple[str, dict[str, float]]:
    """The objective name and arguments of a benchmark row (``pin-lam0`` -> ``pin`` with ``lam=0``)."""
    objective, args = VARIANTS.get(method, (method, {}))
    get_objective(objective, **args)  # unknown names -> InputError
    return objective, dict(args)


@dataclasses.dataclass(frozen=True)
class OODSetup:
    """Everything the benchmark's protocol fixes (the same for every method)."""

    n_clients: int = 4
    degrees: tuple[float, ...] = (0.0, 30.0, 60.0, 90.0)
    train_flip: tuple[float, ...] = (0.10, 0.15, 0.20, 0.25)
    test_flip: float = 0.90
    n_classes: int = 10
    label_noise: float = 0.25
    test_fraction: float = 0.3
    # How the loop trains: `sync` = one full-batch gradient per environment per round, averaged by
    # samples, one AdamW step at the server (IRM's reference recipe, federated). `local` = FedAvg
    # of `local_steps` AdamW steps per client on `batch_size` samples (0: the whole shard).
    algorithm: str = "sync"
    rounds: int = 200
    local_steps: int = 1
    batch_size: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW's decoupled decay: the same for every method
    hidden: int = 128
    layers: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if not (len(self.degrees) == len(self.train_flip) == self.n_clients):
            raise ValueError("one rotation angle and one training flip probability per client")
        if not 2 <= self.n_classes <= PALETTE.shape[0]:
            raise ValueError(f"n_classes must be in 2..{PALETTE.shape[0]} (one palette color per class)")


QUICK = OODSetup(rounds=120, seeds=(0,))
FULL = OODSetup()


# -- data --------------------------------------------------------------------------------------
def _other_label(y: torch.Tensor, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly drawn label different from each ``y``."""
    return (y + torch.randint(1, n_classes, y.shape, generator=gen)) % n_classes


def noisy_labels(y: torch.Tensor, n_classes: int, label_noise: float, seed: int) -> torch.Tensor:
    """Each label replaced, with probability ``label_noise``, by a uniformly drawn other label."""
    gen = torch.Generator().manual_seed(seed)
    hit = torch.rand(y.shape, generator=gen) < label_noise
    return torch.where(hit, _other_label(y, n_classes, gen), y)


def color_by_label(gray: torch.Tensor, y: torch.Tensor, flip: float, n_classes: int, seed: int) -> torch.Tensor:
    """Strokes [N, 1, H, W] times ``PALETTE[y]``, or, with probability ``flip``, another label's color."""
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.rand(y.shape, generator=gen) < flip
    color = torch.where(flipped, _other_label(y, n_classes, gen), y)
    return (gray * PALETTE[color][:, :, None, None]).contiguous()


def build_clients(setup: OODSetup, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per client: ``x_train, y_train`` (training flips), ``x_id, y_id`` and ``x_ood, y_ood`` (0.9 flips).

    Every client gets the same number of training images (the smallest share), so a full batch
    is the same size everywhere.
    """
    base = load_digits()
    digit = base.y
    y_all = digit if setup.n_classes == 10 else (digit * setup.n_classes // 10)  # 2: IRM's digit >= 5
    y_all = noisy_labels(y_all, setup.n_classes, setup.label_noise, seed)
    parts = partition(digit.numpy(), setup.n_clients, "iid", seed)
    rng = np.random.default_rng(seed + 7919)
    n_train = min(len(p) - round(len(p) * setup.test_fraction) for p in parts)
    clients = []
    for k, idx in enumerate(parts):
        gray = rotated(base.subset(idx), setup.degrees[k]).x.mean(dim=1, keepdim=True)
        y = y_all[torch.as_tensor(idx, dtype=torch.long)]
        order = rng.permutation(len(idx))
        n_test = round(len(idx) * setup.test_fraction)
        test = torch.as_tensor(np.sort(order[:n_test]))
        train = torch.as_tensor(np.sort(order[n_test:][:n_train]))
        color_seed = 1000 * seed + 10 * k
        clients.append({
            "x_train": color_by_label(gray[train], y[train], setup.train_flip[k], setup.n_classes, color_seed),
            "y_train": y[train].clone(),
            "x_id": color_by_label(gray[test], y[test], setup.train_flip[k], setup.n_classes, color_seed + 1),
            "y_id": y[test].clone(),
            "x_ood": color_by_label(gray[test], y[test], setup.test_flip, setup.n_classes, color_seed + 2),
            "y_ood": y[test].clone(),
        })
    return clients


# -- one method, one seed, through the pre-training loop ---------------------------------------
def client_ids(setup: OODSetup) -> list[str]:
    """The fleet's device ids, one per client (in client order)."""
    return [f"edge0/dev{k}" for k in range(setup.n_clients)]


def run_config(setup: OODSetup, method: str, seed: int, train_per_client: int) -> RunConfig:
    """The run: one edge with ``n_clients`` always-available Jetson devices that train; objective ``method``."""
    batch = setup.batch_size or train_per_client
    objective, args = resolve(method)
    return config_from_dict({
        "name": f"pretrain-ood-{method}", "seed": seed,
        "fleet": {"cloud": {"profile": "a100"},
                  "edges": [{"count": 1, "profile": "edge-server",
                             "devices": [{"count": setup.n_clients, "profile": "jetson-orin",
                                          "overrides": {"availability": 1.0}}]}]},
        "model": {"kind": "gpt", "hidden": setup.hidden, "layers": setup.layers, "heads": 1, "channels": 3,
                  "image_size": 8, "num_labels": setup.n_classes},
        "pretrain": {
            "task": "classify", "encoder": "mlp", "workers": ["device"], "algorithm": setup.algorithm,
            "outer_optimizer": "fedavg", "local_steps": setup.local_steps, "controller": "uniform",
            "global_batch": batch * setup.n_clients, "rounds": setup.rounds, "optimizer": "adamw",
            "lr": setup.lr, "weight_decay": setup.weight_decay, "grad_clip": None, "objective": objective,
            "objective_args": args,
            "eval_every": setup.rounds, "checkpoint_every": setup.rounds},
    })


def train_method(method: str, clients: list[dict[str, torch.Tensor]], setup: OODSetup, seed: int) -> dict[str, Any]:
    """Train ``method`` with :func:`pretrain` on the clients; per-client metrics and the loop's summary."""
    ids = client_ids(setup)
    shards = {wid: {"x": c["x_train"], "y": c["y_train"]} for wid, c in zip(ids, clients, strict=True)}
    tests = {wid: {"id": {"x": c["x_id"], "y": c["y_id"]}, "ood": {"x": c["x_ood"], "y": c["y_ood"]}}
             for wid, c in zip(ids, clients, strict=True)}
    cfg = run_config(setup, method, seed, int(len(clients[0]["y_train"])))
    result = pretrain(cfg, method=method, shards=shards, client_eval=tests)
    per_client = [result.summary["clients"][wid] for wid in ids]
    return {"clients": per_client, "virtual_time_s": result.summary["virtual_time_s"],
            "bytes_total": result.summary["bytes_total"], "cost_model": result.summary["cost_model"]}


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


def run(quick: bool, out_dir: Path, methods: str | None = None, setup: OODSetup | None = None) -> dict[str, Any]:
    """Run every method on the protocol and return the results table.

    Args:
        quick: one seed and fewer rounds (:data:`QUICK`) instead of three seeds (:data:`FULL`).
        out_dir: where the caller writes ``results.json`` (nothing else is written here).
        methods: optional comma-separated subset of :data:`METHODS`.
        setup: a protocol other than QUICK/FULL (tests use a toy one).
    """
    setup = setup or (QUICK if quick else FULL)
    chosen = METHODS if not methods else tuple(m.strip() for m in str(methods).split(",") if m.strip())
    for m in chosen:
        resolve(m)  # unknown names -> InputError before any work
    clients_by_seed = {seed: build_clients(setup, seed) for seed in setup.seeds}
    table: dict[str, Any] = {}
    # A 42k-parameter MLP gains nothing from intra-op threads, and on a shared machine their
    # spinning made the run ~6x slower; restore the caller's setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in chosen:
            runs = [train_method(method, clients_by_seed[seed], setup, seed) for seed in setup.seeds]
            table[method] = _summarize([r["clients"] for r in runs])
            table[method]["virtual_time_s"] = statistics.fmean(r["virtual_time_s"] for r in runs)
            table[method]["bytes_total"] = statistics.fmean(r["bytes_total"] for r in runs)
            table[method]["cost_model"] = runs[0]["cost_model"]  # the trained and the charged model
    finally:
        torch.set_num_threads(threads)
    config = dataclasses.asdict(setup)
    config["objective_args"] = {m: get_objective(resolve(m)[0], **resolve(m)[1]).params for m in chosen}
    config["train_samples_per_client"] = [int(len(c["y_train"])) for c in clients_by_seed[setup.seeds[0]]]
    config["loop"] = "cloudedge.pretrain.loop.pretrain (shards + client_eval)"
    result: dict[str, Any] = {"benchmark": "pretrain-ood", "config": config, "methods": table}
    if "erm" in table and "pin" in table:
        result["pin_minus_erm_ood_points"] = 100.0 * (table["pin"]["ood_acc"] - table["erm"]["ood_acc"])
    return result
