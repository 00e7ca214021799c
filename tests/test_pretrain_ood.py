"""pretrain-ood benchmark: IRM's Colored-MNIST construction on glyph digits, the personal cue, the
gate, and every objective end to end through the stage loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cloudedge.bench.pretrain_ood import (
    METHODS,
    OODSetup,
    _summarize,
    build_clients,
    colored,
    cue_agreement,
    goal,
    reproduction_gate,
    resolve,
    run,
    weighted_faces,
)
from cloudedge.data.glyph_attrs import FACES
from cloudedge.errors import InputError

SMALL = OODSetup(train_per_client=600, test_images=800, hidden=16, layers=1, steps=4, local_steps=2,
                 local_batch=50, seeds=(0,))


@pytest.fixture(scope="module")
def clients():
    return build_clients(SMALL, seed=0)


def test_irm_colouring_keeps_one_channel_of_the_colour():
    gray = torch.rand(6, 14, 14)
    label = torch.tensor([0, 1, 0, 1, 0, 1])
    x = colored(gray, label, flip=0.0, gen=torch.Generator().manual_seed(0))
    assert x.shape == (6, 2, 14, 14)
    for i, y in enumerate(label.tolist()):
        assert torch.equal(x[i, y], gray[i]) and float(x[i, 1 - y].abs().sum()) == 0.0


def test_colour_is_a_shortcut_in_training_and_lies_at_test(clients):
    agree = cue_agreement(clients)  # [client, (train, id, ood)]
    for k, flip in enumerate(SMALL.train_flip):
        assert abs(agree[k, 0] - (1 - flip)) < 0.05, (k, agree[k])
        assert abs(agree[k, 1] - (1 - flip)) < 0.06, (k, agree[k])
        assert abs(agree[k, 2] - (1 - SMALL.test_flip)) < 0.05, (k, agree[k])
    for c in clients:
        assert c["train"]["x"].shape[1:] == (2, 14, 14)
        assert torch.equal(c["train"]["x_gray"][:, 0], c["train"]["x_gray"][:, 1])  # colour removed
        assert len(c["id"]["y"]) == len(c["ood"]["y"]) == SMALL.test_images // SMALL.n_clients


def _bold_share(x: torch.Tensor) -> torch.Tensor:
    """Ink per image: bold faces carry more (a crude but monotone weight reading)."""
    return x.amax(1).flatten(1).sum(1)


def test_personal_cue_is_stable_within_a_client_and_opposite_across_clients(clients):
    # More ink where the cue says bold: label == direction (client k: direction k % 2).
    for k, c in enumerate(clients):
        for split in ("train", "ood"):
            ink, y = _bold_share(c[split]["x"]), c[split]["y"]
            favoured, other = ink[y == k % 2].mean(), ink[y != k % 2].mean()
            assert favoured > 1.1 * other, (k, split, float(favoured), float(other))
    # Over the fleet the cue says nothing about the label: equal ink for both labels.
    ink = torch.cat([_bold_share(c["train"]["x"]) for c in clients])
    y = torch.cat([c["train"]["y"] for c in clients])
    assert abs(float(ink[y == 1].mean() / ink[y == 0].mean()) - 1.0) < 0.05


def test_weighted_faces_split_every_family_into_bold_and_regular():
    bold, regular = weighted_faces()
    assert bold and regular and not set(bold) & set(regular)
    assert {FACES[i].family for i in bold} == {FACES[i].family for i in regular}


def test_clients_are_deterministic_under_the_seed():
    tiny = dataclasses.replace(SMALL, train_per_client=50, test_images=40)
    a, b = build_clients(tiny, seed=3), build_clients(tiny, seed=3)
    assert all(torch.equal(x[s][k], y[s][k]) for x, y in zip(a, b, strict=True) for s in x for k in x[s])
    assert not torch.equal(build_clients(tiny, seed=4)[0]["train"]["y"], a[0]["train"]["y"])


def test_every_row_runs_end_to_end_through_the_stage_loop_in_both_tables(tmp_path: Path):
    result = run(quick=True, out_dir=tmp_path, setup=SMALL)
    assert list(result["methods"]) == list(METHODS) + [f"local/{m}" for m in METHODS]
    for method, row in result["methods"].items():
        assert 0.0 <= row["ood_acc_worst"] <= row["ood_acc"] <= 1.0 and 0.0 <= row["id_acc"] <= 1.0, method
        assert set(row["per_client"]) == {"c0", "c1", "c2", "c3"} and row["virtual_time_s"] > 0
    pin = result["methods"]["pin"]
    assert {"ood_global_acc", "ood_local_acc", "ood_mi_pg", "ood_cos_pl"} <= pin.keys()
    assert set(result["gate"]["checks"]) == {"erm_ood_at_most_0.20", "irm_ood_at_least_0.50", "vrex_ood_at_least_0.50"}
    assert result["goal"] is not None and "met" in result["goal"]
    assert result["config"]["objective_args"]["irm"]["penalty_weight"] == pytest.approx(91257.18)


def test_rows_share_the_recipe_and_pin_warm_starts():
    assert resolve("erm") == ("erm", {})
    assert resolve("grayscale") == ("erm", {})
    assert resolve("vrex")[1]["anneal_fraction"] == pytest.approx(190 / 501)
    objective, args = resolve("pin-lam0")
    assert objective == "pin" and args["lam"] == 0.0 and args["personal_start_fraction"] > 0


def test_gate_and_goal_read_the_sync_table():
    row = {"ood_acc": 0.0, "ood_acc_worst": 0.0}
    table = {"erm": {**row, "ood_acc": 0.15}, "irm": {**row, "ood_acc": 0.55, "ood_acc_worst": 0.5},
             "vrex": {**row, "ood_acc": 0.49}, "grayscale": {**row, "ood_acc": 0.7}}
    gate = reproduction_gate(table)
    assert gate["checks"] == {"erm_ood_at_most_0.20": True, "irm_ood_at_least_0.50": True,
                              "vrex_ood_at_least_0.50": False} and not gate["holds"]
    table["pin"] = {"ood_acc": 0.60, "ood_acc_worst": 0.52}
    out = goal(table)
    assert out["best_invariant"] == "irm" and out["met"] is True
    assert out["pin_minus_erm_points"] == pytest.approx(45.0)
    table["pin"]["ood_acc_worst"] = 0.45
    assert goal(table)["met"] is False


def test_summary_means_over_clients_then_seeds():
    seed0 = [{"id_acc": 0.8, "ood_acc": 0.2}, {"id_acc": 0.6, "ood_acc": 0.4}]
    seed1 = [{"id_acc": 1.0, "ood_acc": 0.1}, {"id_acc": 0.8, "ood_acc": 0.5}]
    out = _summarize([seed0, seed1])
    assert out["id_acc"] == pytest.approx(0.8) and out["ood_acc"] == pytest.approx(0.3)
    assert out["ood_acc_worst"] == pytest.approx((0.2 + 0.1) / 2)
    assert out["ood_acc_std"] == pytest.approx(0.0)
    assert out["per_client"]["c1"]["ood_acc"] == pytest.approx(0.45)


def test_bad_setups_and_unknown_methods_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="at least two environments"):
        OODSetup(train_flip=(0.1,))
    with pytest.raises(ValueError, match="tables"):
        OODSetup(tables=("async",))
    with pytest.raises(InputError, match="unknown method 'nope'"):
        run(quick=True, out_dir=tmp_path, methods="erm,nope")


def test_example_config_loads_and_names_a_valid_objective():
    from cloudedge.config import load_config
    from cloudedge.pretrain.objectives import get_objective

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain-ood.yaml")
    assert cfg.pretrain is not None and cfg.pretrain.task == "classify"
    objective = get_objective(cfg.pretrain.objective.name, total_steps=cfg.pretrain.rounds * cfg.pretrain.local_steps,
                              **cfg.pretrain.objective.kwargs())
    assert objective.personalized
