"""pretrain-ood benchmark: the protocol's data really carries the shortcut, and the loop runs every objective."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cloudedge.bench.pretrain_ood import (
    METHODS,
    QUICK,
    OODSetup,
    _summarize,
    build_clients,
    noisy_digits,
    run,
    train_federated,
)
from cloudedge.data import PALETTE, load_digits
from cloudedge.engine import LocalEngine
from cloudedge.errors import InputError

TINY = dataclasses.replace(QUICK, rounds=2, local_steps=2, batch_size=16, hidden=16, layers=1, seeds=(0,))


def color_index(x: torch.Tensor) -> torch.Tensor:
    """The palette color of each colored image (its brightest pixel's RGB, normalized)."""
    flat = x.flatten(2)  # [N, 3, 64]
    brightest = flat.sum(1).argmax(1)
    rgb = flat[torch.arange(len(x)), :, brightest]
    rgb = rgb / rgb.amax(1, keepdim=True)
    return torch.cdist(rgb, PALETTE).argmin(1)


@pytest.fixture(scope="module")
def clients():
    return build_clients(QUICK, seed=0)


def test_label_noise_rate_and_never_the_true_label():
    clean = load_digits().y
    noisy = noisy_digits(0.25, seed=0).y
    changed = (noisy != clean).float().mean().item()
    assert 0.22 < changed < 0.28
    assert noisy_digits(0.0, seed=0).y.equal(clean)


def test_color_is_a_shortcut_in_training_and_lies_at_test(clients):
    for k, c in enumerate(clients):
        train_agree = (color_index(c["x_train"]) == c["y_train"]).float().mean().item()
        ood_agree = (color_index(c["x_ood"]) == c["y_ood"]).float().mean().item()
        assert abs(train_agree - (1 - QUICK.train_flip[k])) < 0.06, (k, train_agree)
        assert ood_agree < 0.16, (k, ood_agree)
        # ID and OOD tests are the same images and labels, only colored differently.
        assert c["y_id"].equal(c["y_ood"])
        assert torch.allclose(c["x_id"].amax(1), c["x_ood"].amax(1))  # every palette color has max 1
        assert c["x_train"].shape[1:] == (3, 8, 8)
    assert sum(len(c["y_train"]) + len(c["y_id"]) for c in clients) == len(load_digits())


def test_each_client_has_its_own_rotation(clients):
    # The mean stroke image of client 0 (0 degrees) and client 3 (90 degrees) differ by a rotation.
    mean0 = clients[0]["x_train"].amax(1).mean(0)
    mean3 = clients[3]["x_train"].amax(1).mean(0)
    rotated_gap = min((torch.rot90(mean0, k) - mean3).abs().mean() for k in (1, -1))
    assert rotated_gap < 0.5 * (mean0 - mean3).abs().mean()


def test_every_objective_runs_through_the_minimal_loop():
    tiny_clients = build_clients(TINY, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add contention (as in the benchmark)
    try:
        _run_every_objective(tiny_clients)
    finally:
        torch.set_num_threads(threads)


def _run_every_objective(tiny_clients):
    with LocalEngine() as engine:
        for method in METHODS:
            evals = train_federated(engine, method, tiny_clients, TINY, seed=1)
            assert len(evals) == TINY.n_clients
            for e in evals:
                assert 0.0 <= e["id_acc"] <= 1.0 and 0.0 <= e["ood_acc"] <= 1.0
                if method == "pin":
                    assert {"global_ood_acc", "local_ood_acc"} <= e.keys()
        assert engine.live_workers == 0


def test_summary_means_over_clients_then_seeds():
    seed0 = [{"id_acc": 0.8, "ood_acc": 0.2}, {"id_acc": 0.6, "ood_acc": 0.4}]
    seed1 = [{"id_acc": 1.0, "ood_acc": 0.1}, {"id_acc": 0.8, "ood_acc": 0.5}]
    out = _summarize([seed0, seed1])
    assert out["id_acc"] == pytest.approx(0.8) and out["ood_acc"] == pytest.approx(0.3)
    assert out["ood_acc_worst"] == pytest.approx((0.2 + 0.1) / 2)
    assert out["ood_acc_std"] == pytest.approx(0.0)
    assert out["per_client"]["c1"]["ood_acc"] == pytest.approx(0.45)


def test_setup_rejects_mismatched_client_lists_and_run_rejects_unknown_methods(tmp_path: Path):
    with pytest.raises(ValueError, match="one rotation angle"):
        OODSetup(n_clients=3)
    with pytest.raises(InputError, match="unknown objective 'nope'"):
        run(quick=True, out_dir=tmp_path, methods="erm,nope")


def test_clients_are_deterministic_under_the_seed():
    a, b = build_clients(TINY, seed=3), build_clients(TINY, seed=3)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert not np.array_equal(build_clients(TINY, seed=4)[0]["y_train"].numpy(), a[0]["y_train"].numpy())


def test_example_config_loads_and_names_a_valid_objective():
    from cloudedge.config import load_config
    from cloudedge.pretrain.objectives import get_objective

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain-ood.yaml")
    assert cfg.pretrain is not None and cfg.pretrain.task == "classify"
    objective = get_objective(cfg.pretrain.objective, **cfg.pretrain.objective_args)
    assert objective.personalized and objective.params["penalty_weight"] == 1000.0
