"""``pretrain-ood``: IRM's Colored-MNIST protocol on glyph digits, federated, plus a personal cue.

The protocol is fixed before any run (``docs/invariant-learning.md`` has the table and why):

- **Images**: digits of the ``glyphs`` source (28 px, 1 channel, every face that has a bold and a
  regular weight), downsampled to 14 px by taking every other pixel, as IRM's
  ``colored_mnist/main.py`` does, then put on two channels (red, green).
- **Label** (IRM's): ``digit < 5``, then flipped with probability ``label_noise`` 0.25, so shape
  predicts the label with accuracy 0.75.
- **Colour** (IRM's): ``label XOR Bernoulli(flip)``, the other channel zeroed. Each client is one
  environment with its own flip (0.10, 0.15, 0.20, 0.25): colour predicts the label *better* than
  shape in training, and at test the flip is 0.90 (the shortcut lies).
- **Personal cue** (ours, for ``pin``): each client's images are bold-faced with probability
  ``personal_cue`` (0.85) when ``label == d_k`` and regular otherwise, with a per-client direction
  ``d_k`` alternating over clients. Within a client the cue is stable (ID and OOD tests keep it)
  and predicts better than shape; over the fleet it carries no information about the label, and
  no image says which client it came from, so only a personalized model can use it.
- **Grayscale oracle**: ERM on the same images with the colour removed (both channels equal).
- **Model and recipe** (IRM's): MLP 392 -> hidden -> hidden -> 2, Adam (betas 0.9/0.999),
  lr 4.9e-4, L2 1.1e-3 (the objective's ``l2``), full batches, 501 steps, penalty weight 91,257
  from 38% of training (IRM's step 190 of 501, ``anneal_fraction``). The hidden width shrinks
  from 390 to 64 to fit the time budget (``hidden``); the results say which width ran.
- **Two tables**: ``sync`` (each step the server averages every client's full-batch gradient: the
  centralized objective exactly) and ``local`` (FedAvg: ``local_steps`` Adam steps per client on
  batches of ``local_batch``, what a real fleet does; rows prefixed ``local/``).

Everything trains in the one pre-training loop (:func:`cloudedge.pretrain.stage.pretrain`, the
clients' data as ``shards`` and their tests as ``client_eval``); each client scores its own ID
and OOD tests with the objective's ``predict`` (``pin``: its personalized model).

Metrics per method: ``id_acc``, ``ood_acc`` (mean over clients, then seeds), ``ood_acc_worst``
(worst client), standard deviations over seeds, per-client values and ``pin``'s anchor
diagnostics. The top level holds the reproduction gate (ERM <= 0.20 OOD, IRM and V-REx >= 0.50
in ``sync``), checked and reported before anything else.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloudedge.config import RunConfig, config_from_dict
from cloudedge.config.glyphs import GlyphsConfig
from cloudedge.data.glyph_attrs import FACES
from cloudedge.data.glyphs import glyph_specs, glyph_split
from cloudedge.errors import InputError
from cloudedge.pretrain.objectives import get_objective
from cloudedge.pretrain.stage import pretrain

METHODS: tuple[str, ...] = ("grayscale", "erm", "irm", "vrex", "fedsr", "fediir", "pin", "pin-lam0")
TABLES: tuple[str, ...] = ("sync", "local")
# Rows that are an objective with non-default arguments or data: the ablation of pin's anchor
# (lam = 0: the personalized model is trained by cross-entropy alone, on the same private
# schedule) and the grayscale oracle (ERM on colour-free images).
VARIANTS: dict[str, tuple[str, dict[str, float]]] = {"pin-lam0": ("pin", {"lam": 0.0}), "grayscale": ("erm", {})}
# IRM's recipe, applied to every row (the penalty's weight and schedule to irm, vrex and pin's
# global model; nothing is tuned per method).
PENALTY_WEIGHT = 91257.18
ANNEAL_FRACTION = 190 / 501
PENALIZED = ("irm", "vrex", "pin")
# pin's personalized model starts from the global invariant model after the penalty has acted.
PIN_START_FRACTION = 0.6


@dataclasses.dataclass(frozen=True)
class OODSetup:
    """Everything the benchmark's protocol fixes (the same for every method)."""

    train_flip: tuple[float, ...] = (0.10, 0.15, 0.20, 0.25)
    test_flip: float = 0.90
    label_noise: float = 0.25
    personal_cue: float = 0.85
    train_per_client: int = 12_500
    test_images: int = 10_000  # OOD test images over all clients (the ID test has as many)
    steps: int = 501
    lr: float = 4.9e-4
    l2: float = 1.1e-3
    hidden: int = 64  # IRM's 390 (or 128) would not fit the full run's 30 minutes on 2 cores
    layers: int = 2
    local_steps: int = 10
    local_batch: int = 500
    tables: tuple[str, ...] = TABLES
    seeds: tuple[int, ...] = (0, 1, 2)
    # torch threads while training. One: these small matmuls gain little from a second thread,
    # and on a loaded machine OpenMP threads waiting for each other made a run ~10x slower.
    threads: int = 1

    @property
    def n_clients(self) -> int:
        return len(self.train_flip)

    def __post_init__(self) -> None:
        if self.n_clients < 2:
            raise ValueError("at least two environments (one flip probability per client)")
        if self.test_images < self.n_clients:
            raise ValueError("test_images: at least one test image per client")
        if unknown := set(self.tables) - set(TABLES):
            raise ValueError(f"tables: unknown {sorted(unknown)} (known: {', '.join(TABLES)})")


QUICK = OODSetup(train_per_client=5_000, steps=301, local_steps=10, local_batch=250, seeds=(0,))
FULL = OODSetup()


# -- data --------------------------------------------------------------------------------------
def weighted_faces() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(bold faces, regular faces) of every family that has both weights (the personal cue)."""
    bold = tuple(i for i, f in enumerate(FACES) if "bold" in f.id)
    families = {FACES[i].family for i in bold}
    regular = tuple(i for i, f in enumerate(FACES) if f.family in families and "bold" not in f.id)
    return bold, regular


def digit_pool(faces: tuple[int, ...], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` glyph digits of ``faces`` as 14 px gray images [N, 14, 14] and their digits."""
    # The source's default pose, blur and noise; stroke width fixed at each face's own, so weight
    # is the face's (bold or regular).
    spec, _ = glyph_specs(GlyphsConfig(fonts=[FACES[i].id for i in faces], stroke=0.0), image_size=28)
    ds = glyph_split(spec, "train", count)
    return ds.x[:, 0, ::2, ::2].contiguous(), ds.y.clone()


def _bernoulli(p: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen) < p).long()


def colored(gray: torch.Tensor, label: torch.Tensor, flip: float, gen: torch.Generator) -> torch.Tensor:
    """IRM's colouring: two channels, the one of colour ``label XOR Bernoulli(flip)`` kept."""
    color = label ^ _bernoulli(flip, len(label), gen)
    x = torch.stack([gray, gray], dim=1)
    x[torch.arange(len(x)), 1 - color] = 0.0
    return x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """The colour removed: both channels carry the strokes."""
    stroke = x.amax(dim=1, keepdim=True)
    return torch.cat([stroke, stroke], dim=1)


class _Pools:
    """Draws digits of a wanted weight (bold/regular) and size (< 5 or not) without reuse."""

    def __init__(self, need: int):
        bold, regular = weighted_faces()
        # A (weight, small/large) cell is drawn need/4 times on average (binomial: std below
        # sqrt(need)/2), and a pool's digits are exactly balanced, so half a pool per cell.
        count = need // 2 + 10 * int(need**0.5) + 20
        self.pools = [digit_pool(regular, count), digit_pool(bold, count)]
        self.next = {(w, s): 0 for w in (0, 1) for s in (0, 1)}
        self.index = {(w, s): torch.nonzero((self.pools[w][1] < 5).long() == s).flatten() for w in (0, 1) for s in (0, 1)}

    def take(self, weight: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(weight), 14, 14)
        for w in (0, 1):
            for s in (0, 1):
                rows = torch.nonzero((weight == w) & (small == s)).flatten()
                start = self.next[(w, s)]
                idx = self.index[(w, s)][start:start + len(rows)]
                if len(idx) < len(rows):
                    raise RuntimeError("glyph pool too small for the protocol")  # a bug, not input
                out[rows] = self.pools[w][0][idx]
                self.next[(w, s)] = start + len(rows)
        return out


def _client_split(pools: _Pools, n: int, flip: float, setup: OODSetup, direction: int,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` images of one client at colour flip ``flip``: x (coloured), x_gray, y."""
    y = _bernoulli(0.5, n, gen)
    small = y ^ _bernoulli(setup.label_noise, n, gen)  # the digit's true "< 5" before label noise
    weight = (y == direction).long() ^ _bernoulli(1.0 - setup.personal_cue, n, gen)
    gray = pools.take(weight, small)
    x = colored(gray, y, flip, gen)
    return {"x": x, "x_gray": grayscale(x), "y": y}


def build_clients(setup: OODSetup, seed: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per client: ``train`` (its flip), ``id`` (its flip) and ``ood`` (flip 0.90) splits.

    Every split keeps the client's personal cue; ``id`` and ``ood`` hold the same number of images.
    """
    n_test = setup.test_images // setup.n_clients
    pools = _Pools(setup.n_clients * (setup.train_per_client + 2 * n_test))
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for k, flip in enumerate(setup.train_flip):
        direction = k % 2
        clients.append({
            "train": _client_split(pools, setup.train_per_client, flip, setup, direction, gen),
            "id": _client_split(pools, n_test, flip, setup, direction, gen),
            "ood": _client_split(pools, n_test, setup.test_flip, setup, direction, gen),
        })
    return clients


# -- one method, one seed, through the pre-training loop ---------------------------------------
def client_ids(setup: OODSetup) -> list[str]:
    """The fleet's device ids, one per client (in client order)."""
    return [f"edge0/dev{k}" for k in range(setup.n_clients)]


def resolve(method: str) -> tuple[str, dict[str, float]]:
    """The objective name and its arguments for a row (the recipe's penalty and L2 included)."""
    objective, args = VARIANTS.get(method, (method, {}))
    args = dict(args)
    if objective in PENALIZED:
        args.update(penalty_weight=PENALTY_WEIGHT, anneal_fraction=ANNEAL_FRACTION)
    if objective == "pin":
        args["personal_start_fraction"] = PIN_START_FRACTION
    get_objective(objective, total_steps=1000, **args)  # unknown names -> InputError
    return objective, args


def run_config(setup: OODSetup, method: str, seed: int, table: str) -> RunConfig:
    """One edge with one always-available Jetson per client; objective ``method``; ``table``'s loop."""
    objective, args = resolve(method)
    if table == "sync":
        loop = {"algorithm": "sync", "rounds": setup.steps, "local_steps": 1,
                "global_batch": setup.train_per_client * setup.n_clients}
    else:
        loop = {"algorithm": "local", "outer_optimizer": "fedavg", "local_steps": setup.local_steps,
                "rounds": max(1, setup.steps // setup.local_steps), "global_batch": setup.local_batch * setup.n_clients}
    return config_from_dict({
        "name": f"pretrain-ood-{table}-{method}", "seed": seed,
        "fleet": {"cloud": {"profile": "a100"},
                  "edges": [{"count": 1, "profile": "edge-server",
                             "devices": [{"count": setup.n_clients, "profile": "jetson-orin",
                                          "overrides": {"availability": 1.0}}]}]},
        "model": {"kind": "gpt", "hidden": setup.hidden, "layers": setup.layers, "heads": 1, "channels": 2,
                  "image_size": 14, "num_labels": 2},
        "pretrain": {
            "task": "classify", "encoder": "mlp", "workers": ["device"], "controller": "uniform",
            "optimizer": "adam", "lr": setup.lr, "weight_decay": 0.0, "grad_clip": None,
            "objective": {"name": objective, **args, "l2": setup.l2},
            "eval_every": 10**9, "checkpoint_every": 10**9, **loop},
    })


def train_method(method: str, clients: list[dict[str, dict[str, torch.Tensor]]], setup: OODSetup, seed: int,
                 table: str) -> dict[str, Any]:
    """Train ``method`` with :func:`pretrain` on the clients; per-client metrics and the loop's summary."""
    ids = client_ids(setup)
    key = "x_gray" if method == "grayscale" else "x"
    shards = {wid: {"x": c["train"][key], "y": c["train"]["y"]} for wid, c in zip(ids, clients, strict=True)}
    tests = {wid: {split: {"x": c[split][key], "y": c[split]["y"]} for split in ("id", "ood")}
             for wid, c in zip(ids, clients, strict=True)}
    result = pretrain(run_config(setup, method, seed, table), method=method, shards=shards, client_eval=tests)
    return {"clients": [result.summary["clients"][wid] for wid in ids], "cost_model": result.summary["cost_model"],
            "virtual_time_s": result.summary["virtual_time_s"], "bytes_total": result.summary["bytes_total"]}


# -- the benchmark -----------------------------------------------------------------------------
def _summarize(per_seed: list[list[dict[str, float]]]) -> dict[str, Any]:
    """Mean over clients per seed, then mean (and std) over seeds; worst client's OOD accuracy."""
    keys = per_seed[0][0].keys()
    client_means = {k: [statistics.fmean(c[k] for c in clients) for clients in per_seed] for k in keys}
    out: dict[str, Any] = {k: statistics.fmean(v) for k, v in client_means.items()}
    worst = [min(c["ood_acc"] for c in clients) for clients in per_seed]
    out["ood_acc_worst"] = statistics.fmean(worst)
    if len(per_seed) > 1:
        out["ood_acc_std"] = statistics.stdev(client_means["ood_acc"])
        out["id_acc_std"] = statistics.stdev(client_means["id_acc"])
        out["ood_acc_worst_std"] = statistics.stdev(worst)
    out["ood_acc_per_seed"] = client_means["ood_acc"]
    out["per_client"] = {
        f"c{k}": {m: statistics.fmean(clients[k][m] for clients in per_seed) for m in ("id_acc", "ood_acc")}
        for k in range(len(per_seed[0]))
    }
    return out


def reproduction_gate(table: dict[str, Any]) -> dict[str, Any]:
    """IRM's published effect, before any method is judged: in ``sync``, ERM at most 0.20 OOD and
    IRM and V-REx at least 0.50, beside the grayscale oracle."""
    def ood(m: str) -> float | None:
        return table[m]["ood_acc"] if m in table else None

    checks = {"erm_ood_at_most_0.20": (ood("erm"), lambda v: v <= 0.20),
              "irm_ood_at_least_0.50": (ood("irm"), lambda v: v >= 0.50),
              "vrex_ood_at_least_0.50": (ood("vrex"), lambda v: v >= 0.50)}
    result = {name: (None if v is None else bool(rule(v))) for name, (v, rule) in checks.items()}
    measured = [v for v in result.values() if v is not None]
    return {"holds": bool(measured) and all(measured), "checks": result, "grayscale_ood": ood("grayscale"),
            "erm_ood": ood("erm"), "irm_ood": ood("irm"), "vrex_ood": ood("vrex")}


def goal(table: dict[str, Any]) -> dict[str, Any] | None:
    """pin's OOD >= ERM's + 40 points and >= the best non-personalized invariant method's + 3, with
    its worst client no worse than that method's worst client (``sync`` table)."""
    invariant = [m for m in ("irm", "vrex", "fedsr", "fediir") if m in table]
    if "pin" not in table or "erm" not in table or not invariant:
        return None
    best = max(invariant, key=lambda m: table[m]["ood_acc"])
    pin = table["pin"]
    return {"best_invariant": best,
            "pin_minus_erm_points": 100 * (pin["ood_acc"] - table["erm"]["ood_acc"]),
            "pin_minus_best_invariant_points": 100 * (pin["ood_acc"] - table[best]["ood_acc"]),
            "pin_worst_minus_best_invariant_worst_points": 100 * (pin["ood_acc_worst"] - table[best]["ood_acc_worst"]),
            "met": (pin["ood_acc"] - table["erm"]["ood_acc"] >= 0.40
                    and pin["ood_acc"] - table[best]["ood_acc"] >= 0.03
                    and pin["ood_acc_worst"] >= table[best]["ood_acc_worst"])}


def run(quick: bool, out_dir: Path, methods: str | None = None, setup: OODSetup | None = None) -> dict[str, Any]:
    """Run every method on the protocol in each table and return the results.

    Args:
        quick: :data:`QUICK` (one seed, 5,000 images per client, 301 steps) instead of :data:`FULL`.
        out_dir: where the caller writes ``results.json`` (nothing else is written here).
        methods: optional comma-separated subset of :data:`METHODS`.
        setup: a protocol other than QUICK/FULL (tests and the demo use smaller ones).
    """
    setup = setup or (QUICK if quick else FULL)
    chosen = METHODS if not methods else tuple(m.strip() for m in str(methods).split(",") if m.strip())
    for m in chosen:
        if m not in METHODS:
            raise InputError(f"methods: unknown method {m!r} (known: {', '.join(METHODS)})")
        resolve(m)
    clients_by_seed = {seed: build_clients(setup, seed) for seed in setup.seeds}
    table: dict[str, Any] = {}
    threads = torch.get_num_threads()  # restored after
    torch.set_num_threads(setup.threads)
    try:
        for loop in setup.tables:
            for method in chosen:
                runs = [train_method(method, clients_by_seed[s], setup, s, loop) for s in setup.seeds]
                row = _summarize([r["clients"] for r in runs])
                row["virtual_time_s"] = statistics.fmean(r["virtual_time_s"] for r in runs)
                row["bytes_total"] = statistics.fmean(r["bytes_total"] for r in runs)
                row["cost_model"] = runs[0]["cost_model"]  # the trained and the charged model
                table[method if loop == "sync" else f"local/{method}"] = row
    finally:
        torch.set_num_threads(threads)
    config = dataclasses.asdict(setup)
    config.update(penalty_weight=PENALTY_WEIGHT, anneal_fraction=ANNEAL_FRACTION, pin_start_fraction=PIN_START_FRACTION,
                  optimizer="adam", image="glyph digits, 28 px downsampled to 2 x 14 x 14",
                  objective_args={m: resolve(m)[1] for m in chosen},
                  loop="cloudedge.pretrain.stage.pretrain (shards + client_eval)",
                  test_images_per_client=setup.test_images // setup.n_clients)
    sync_rows = {m: v for m, v in table.items() if not m.startswith("local/")}
    return {"benchmark": "pretrain-ood", "config": config, "gate": reproduction_gate(sync_rows),
            "goal": goal(sync_rows), "methods": table}


def fraction_correct(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``pred == y`` (for diagnostics and tests)."""
    return float((pred == y).float().mean())


def cue_agreement(clients: list[dict[str, dict[str, torch.Tensor]]]) -> np.ndarray:
    """Per client and split, the colour's agreement with the label: [clients, 3] (train, id, ood)."""
    out = np.zeros((len(clients), 3))
    for k, c in enumerate(clients):
        for j, split in enumerate(("train", "id", "ood")):
            color = c[split]["x"].flatten(2).amax(2).argmax(1)
            out[k, j] = fraction_correct(color, c[split]["y"])
    return out
