"""The shared stage skeleton: nested checkpoint state, the one resume rule, metric rows, results;
pre-training algorithms by name; a test-time method's cloud phase."""

from __future__ import annotations

import json

import pytest
import torch

from cloudedge.checkpoint import flatten_state, load_latest_state, save_checkpoint, save_state
from cloudedge.config.pretrain import PretrainConfig
from cloudedge.engine import WorkerError
from cloudedge.errors import InputError
from cloudedge.stage import MetricRow, StageResult, StageRun, drop_failed
from cloudedge.track.run import RunDir


def test_nested_state_round_trips_tensors_and_plain_data_exactly(tmp_path):
    opt_state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}}
    state = {"round": 4, "model": {"head.weight": torch.randn(3, 2)},
             "optimizer": {"state": opt_state, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
             "clients": {"edge0/dev1": {"w": torch.arange(4)}}, "totals": {"t": 1 / 3, "none": None}}
    save_state(tmp_path, 4, state)
    back = load_latest_state(tmp_path)
    assert back["round"] == 4 and back["totals"] == {"t": 1 / 3, "none": None}
    assert torch.equal(back["model"]["head.weight"], state["model"]["head.weight"])
    assert torch.equal(back["optimizer"]["state"]["0"]["exp_avg"], opt_state[0]["exp_avg"])
    assert torch.equal(back["clients"]["edge0/dev1"]["w"], torch.arange(4))
    assert back["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]  # JSON has lists only
    tensors, _ = flatten_state(state)
    assert "optimizer.state.0.exp_avg" in tensors  # readable keys in the safetensors file


def test_two_tensors_on_one_path_and_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="two tensors at the path 'a.b'"):
        flatten_state({"a": {"b": torch.zeros(1)}, "a.b": torch.zeros(1)})
    save_checkpoint(tmp_path, 1, {"model.w": torch.zeros(1)}, {"round": 1})  # the layout before nested states
    with pytest.raises(InputError, match="not a stage state of format"):
        load_latest_state(tmp_path)


def test_resume_keeps_rows_up_to_the_checkpoint_and_other_stages(tmp_path):
    run = StageRun.open("pretrain", tmp_path / "run", None, "sync-uniform")
    run.run_dir.log(stage="finetune", method="x", round=9)
    for r in range(4):
        run.log(MetricRow("pretrain", "sync-uniform", r, values={"loss": float(r)}))
        if r == 1:
            run.checkpoint(r, {"w": torch.ones(2)})
    state, rows = StageRun.open("pretrain", RunDir.create(tmp_path / "run", resume=True), None,
                                "sync-uniform").resume()
    assert state["round"] == 1 and torch.equal(state["w"], torch.ones(2))
    assert [r["round"] for r in rows] == [0, 1]
    assert [(r["stage"], r["round"]) for r in run.run_dir.read_metrics()] == [("finetune", 9), ("pretrain", 0),
                                                                              ("pretrain", 1)]


def test_resume_keeps_the_rows_logged_before_the_checkpoint_whatever_their_round(tmp_path):
    run = StageRun.open("finetune", tmp_path / "run", None, "autonomous")
    run.log(MetricRow("finetune", "autonomous", 0, 0.0))
    run.log(MetricRow("finetune", "autonomous", 1, 1.0))
    run.checkpoint(1, {"w": torch.ones(1)})
    run.log(MetricRow("finetune", "autonomous", 1, 1.5, values={"eval": "grid"}))  # after the checkpoint, round 1
    run.run_dir.log(stage="finetune", method="hierfavg", round=5)  # another method's row stays
    run.log(MetricRow("finetune", "autonomous", 2, 2.0))
    again = StageRun.open("finetune", RunDir.create(tmp_path / "run", resume=True), None, "autonomous")
    state, rows = again.resume()
    assert state["rows"] == 2 and [(r["round"], r["virtual_time_s"]) for r in rows] == [(0, 0.0), (1, 1.0)]
    assert [(r["method"], r["round"]) for r in again.run_dir.read_metrics()] == [
        ("autonomous", 0), ("autonomous", 1), ("hierfavg", 5)]
    again.log(MetricRow("finetune", "autonomous", 2, 2.0))
    again.checkpoint(2, {"w": torch.ones(1)})
    assert load_latest_state(again.ckpt_dir)["rows"] == 3  # counted on from the rows kept


def test_resume_without_a_checkpoint_drops_this_methods_rows(tmp_path):
    run = StageRun.open("adapt", tmp_path / "run", None, "tpt")
    run.log({"stage": "adapt", "method": "tpt", "round": 1})
    run.log({"stage": "adapt", "method": "coop", "round": 1})
    state, rows = run.resume()
    assert state is None and rows == []
    assert [r["method"] for r in run.run_dir.read_metrics()] == ["coop"]


def test_metric_row_names_failures_and_rejections_only_when_asked():
    row = MetricRow("pretrain", "m", 3, 1.5, values={"loss": 0.2}, failures={}, rejections={"w1": "nan"}).as_dict()
    assert row == {"stage": "pretrain", "method": "m", "round": 3, "virtual_time_s": 1.5, "failed": 0,
                   "rejected": 1, "rejections": {"w1": "nan"}, "loss": 0.2}
    assert "failed" not in MetricRow("adapt", "m", 1).as_dict()
    json.dumps(row)


def test_drop_failed_keeps_the_others_in_order():
    ids, results, failed = drop_failed(["a", "b", "c"], [1, WorkerError("b", "step", "boom"), 3])
    assert ids == ["a", "c"] and results == [1, 3] and list(failed) == ["b"] and "boom" in failed["b"]
    assert StageResult([], {}, {"model": "m"}).model == "m" and StageResult([], {}).model is None


def test_pretrain_algorithm_is_a_registered_plugin_bare_or_as_a_mapping():
    from cloudedge.pretrain.algorithms import ALGORITHMS, LocalSGD, SyncSGD, objective_steps

    assert ALGORITHMS.get("sync") is SyncSGD and ALGORITHMS.get("local") is LocalSGD
    assert PretrainConfig(algorithm={"name": "local"}).algorithm.name == "local"
    assert PretrainConfig(algorithm="local").model_dump()["algorithm"] == "local"
    assert objective_steps(PretrainConfig(algorithm="local", local_steps=3, rounds=5)) == 15
    assert objective_steps(PretrainConfig(rounds=5)) == 5
    with pytest.raises(ValueError, match=r"(?s)algorithm.*unknown pre-training algorithm 'diloco' \(known: sync, local\)"):
        PretrainConfig(algorithm="diloco")
    with pytest.raises(ValueError, match="momentum: not a parameter of pre-training algorithm 'sync'"):
        PretrainConfig(algorithm={"name": "sync", "momentum": 0.9})


def test_local_sgd_steps_on_the_mean_delta_and_sync_on_the_mean_gradient():
    from cloudedge.pretrain.algorithms import LocalSGD, SyncSGD

    w = torch.nn.Parameter(torch.zeros(2))
    local = LocalSGD(PretrainConfig(algorithm="local", outer_optimizer="fedavg", fednova=False), {"w": w})
    local.step([{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}], [1.0, 3.0],
               [{"steps": 2}, {"steps": 2}], lr=0.5, step_count=0)
    torch.testing.assert_close(w.detach(), torch.tensor([0.25, 3.0]))  # FedAvg: theta + weighted mean delta
    v = torch.nn.Parameter(torch.zeros(2))
    sync = SyncSGD(PretrainConfig(optimizer="sgd", weight_decay=0.0, grad_clip=None), {"v": v})
    sync.step([{"v": torch.tensor([1.0, 0.0])}, {"v": torch.tensor([0.0, 4.0])}], [1.0, 3.0], [{}, {}],
              lr=0.5, step_count=0)
    torch.testing.assert_close(v.detach(), torch.tensor([-0.125, -1.5]))  # theta - lr * weighted mean gradient
    assert sync.optimizer.param_groups[0]["lr"] == 0.5


def test_any_test_time_method_may_own_a_cloud_phase():
    from cloudedge.adapt.methods import METHODS, CloudContext, CoOp, TTAMethod

    ctx = CloudContext(load_clip=lambda: pytest.fail("no method but CoOp loads the CLIP here"), classnames=["a"],
                       seed=0, adapt=None, source=(torch.zeros(1), torch.zeros(1)), labelled={"clean": None})
    assert all(METHODS.get(m).cloud_phase(ctx) is None for m in METHODS if m != "coop")
    assert CoOp.cloud_phase.__func__ is not TTAMethod.cloud_phase.__func__
