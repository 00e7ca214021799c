"""pretrain-ood benchmark: the protocol's data really carries the shortcut; every objective runs in the stage loop."""

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
    noisy_labels,
    run,
)
from cloudedge.data import PALETTE, load_digits
from cloudedge.errors import InputError

TINY = dataclasses.replace(QUICK, rounds=2, hidden=16, layers=1, seeds=(0,))


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
    noisy = noisy_labels(clean, 10, 0.25, seed=0)
    changed = (noisy != clean).float().mean().item()
    assert 0.22 < changed < 0.28
    assert noisy_labels(clean, 10, 0.0, seed=0).equal(clean)
    binary = noisy_labels((clean >= 5).long(), 2, 0.25, seed=0)
    assert 0.22 < (binary != (clean >= 5).long()).float().mean().item() < 0.28 and int(binary.max()) == 1


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
    # Equal training sets (full batches of one size); every image is used once at most.
    assert len({len(c["y_train"]) for c in clients}) == 1
    assert len(load_digits()) - 4 <= sum(len(c["y_train"]) + len(c["y_id"]) for c in clients) <= len(load_digits())


def test_each_client_has_its_own_rotation(clients):
    # The mean stroke image of client 0 (0 degrees) and client 3 (90 degrees) differ by a rotation.
    mean0 = clients[0]["x_train"].amax(1).mean(0)
    mean3 = clients[3]["x_train"].amax(1).mean(0)
    rotated_gap = min((torch.rot90(mean0, k) - mean3).abs().mean() for k in (1, -1))
    assert rotated_gap < 0.5 * (mean0 - mean3).abs().mean()


def test_benchmark_runs_every_objective_end_to_end_through_the_stage_loop(tmp_path: Path):
    result = run(quick=True, out_dir=tmp_path, setup=TINY)
    assert list(result["methods"]) == list(METHODS)
    assert result["config"]["loop"].startswith("cloudedge.pretrain.loop.pretrain")
    for method, row in result["methods"].items():
        assert 0.0 <= row["ood_acc_worst"] <= row["ood_acc"] <= 1.0 and 0.0 <= row["id_acc"] <= 1.0, method
        assert set(row["per_client"]) == {"c0", "c1", "c2", "c3"}
        assert row["virtual_time_s"] > 0
    pin, ablation = result["methods"]["pin"], result["methods"]["pin-lam0"]
    assert {"ood_global_acc", "ood_local_acc", "ood_mi_pg", "ood_cos_pl"} <= pin.keys()
    # Without the anchor the personalized model is trained exactly like the local one.
    assert ablation["ood_cos_pl"] == pytest.approx(1.0, abs=1e-5) and pin["ood_cos_pl"] < 1.0 - 1e-4
    assert result["config"]["objective_args"]["pin-lam0"]["lam"] == 0.0
    # pin's private models are charged to the clock: more compute than ERM for the same schedule.
    assert pin["virtual_time_s"] > result["methods"]["erm"]["virtual_time_s"]


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
    with pytest.raises(ValueError, match="n_classes"):
        OODSetup(n_classes=11)
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
