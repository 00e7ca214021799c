"""TensorBoard and MLflow receive every metric row, read back with the libraries' own readers."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cloudedge.cli import main
from cloudedge.config import config_from_dict, load_config
from cloudedge.errors import InputError
from cloudedge.track import RunDir
from cloudedge.track.trackers import flat_params, row_scalars


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_row_scalars_names_series_steps_and_nested_values():
    series, step, scalars = row_scalars({"stage": "pretrain", "method": "sync", "round": 3, "train_loss": 2.5,
                                          "clients": {"edge0": {"acc": 0.5}}, "failures": {"d": "timeout"},
                                          "val_loss": None, "note": "text", "ok": True})
    assert (series, step) == ("pretrain/sync", 3)
    assert scalars == {"train_loss": 2.5, "clients/edge0/acc": 0.5}
    assert row_scalars({"stage": "adapt", "method": "tpt", "round": 1, "edge": "edge1", "acc": 0.25})[2] == \
        {"edge1/acc": 0.25}
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def _next_second() -> None:
    """Wait for the wall clock's next second: TensorBoard names event files by the second and a
    counter, and reads them in name order, so a resume's file made in the same second as the run's
    can sort before it ('.10' < '.9') and its purge would come first. A real resume is a new process,
    seconds later."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def _config(tmp_path: Path, **track) -> object:
    return config_from_dict({"name": "tracked", "seed": 4, "track": track}, source="test", base_dir=tmp_path)


def test_every_row_reaches_tensorboard_and_mlflow(tmp_path):
    cfg = _config(tmp_path, tensorboard=True, mlflow=True, experiment="exp-a")
    run = RunDir.create(tmp_path / "run", cfg)
    for r in range(3):
        run.log(stage="pretrain", method="sync", round=r, train_loss=3.0 - r, bytes_total=100 * r)
        run.log(stage="pretrain", method="local", round=r, train_loss=4.0 - r)
    run.log(stage="adapt", method="tpt", round=1, edge="edge0", acc=0.75)
    run.write_summary({"pretrain": {"final_val_loss": 1.0}})
    (run.path / "report.md").write_text("# report\n")
    (run.path / "plots" / "curve.png").write_bytes(b"\x89PNG fake")
    run.finish_tracking()

    tb = run.path / "tensorboard"
    assert _scalars(tb / "pretrain" / "sync", "train_loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert _scalars(tb / "pretrain" / "local", "train_loss") == [(0, 4.0), (1, 3.0), (2, 2.0)]
    assert _scalars(tb / "adapt" / "tpt", "edge0/acc") == [(1, 0.75)]

    client = MlflowClient(tracking_uri=(run.path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("exp-a")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"run", "pretrain/sync", "pretrain/local", "adapt/tpt"}
    parent = runs["run"]
    assert parent.data.params["seed"] == "4" and parent.data.params["track.mlflow"] == "true"
    child = runs["pretrain/sync"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (child.data.tags["stage"], child.data.tags["method"]) == ("pretrain", "sync")
    history = client.get_metric_history(child.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [m.value for m in client.get_metric_history(runs["adapt/tpt"].info.run_id, "edge0/acc")] == [0.75]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "summary.json", "config.yaml", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/curve.png"]


def test_resume_continues_the_same_mlflow_runs(tmp_path):
    cfg = _config(tmp_path, mlflow=True)
    run = RunDir.create(tmp_path / "run", cfg)
    run.log(stage="finetune", method="autonomous", round=1, acc=0.5)
    again = RunDir.create(tmp_path / "run", cfg, resume=True)
    again.log(stage="finetune", method="autonomous", round=2, acc=0.625)
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    state = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    history = client.get_metric_history(state["children"]["finetune/autonomous"], "acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.625)]
    assert len(client.search_runs([state["experiment_id"]])) == 2  # one parent, one child


def test_a_resume_shows_each_redone_round_once_in_tensorboard(tmp_path):
    cfg = _config(tmp_path, tensorboard=True)
    run = RunDir.create(tmp_path / "run", cfg)
    for r in range(4):  # checkpointed after round 1; rounds 2 and 3 are lost with the interruption
        run.log(stage="pretrain", method="sync", round=r, train_loss=10.0 + r)
    run.finish_tracking()
    _next_second()
    again = RunDir.create(tmp_path / "run", cfg, resume=True)
    again.log(stage="finetune", method="other", round=0, acc=0.5)  # another series first: no effect on this one
    again.truncate_metrics(lambda row: row["stage"] != "pretrain" or row["round"] <= 1)  # as the stage's resume does
    for r in range(2, 5):  # the resume redoes rounds 2 and 3, then goes on
        again.log(stage="pretrain", method="sync", round=r, train_loss=20.0 + r)
    again.finish_tracking()
    assert _scalars(tmp_path / "run" / "tensorboard" / "pretrain" / "sync", "train_loss") == \
        [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0), (4, 24.0)]
    # A series whose resume logs again at its last kept round (fine-tuning's grid rows carry the
    # round of the last update) keeps that round's kept value: purged with the round, logged again.
    run = RunDir.create(tmp_path / "grid", cfg)
    run.log(stage="finetune", method="auto", round=1, acc=0.5)
    run.finish_tracking()
    _next_second()
    again = RunDir.create(tmp_path / "grid", cfg, resume=True)
    again.log(stage="finetune", method="auto", round=1, bytes_total=7.0)
    again.finish_tracking()
    assert _scalars(tmp_path / "grid" / "tensorboard" / "finetune" / "auto", "acc") == [(1, 0.5)]


def test_rows_redone_at_the_checkpoints_round_show_once_in_both_trackers(tmp_path):
    """Fine-tuning's grid rows logged after checkpoint N carry round N, and the resume logs them
    again: the interrupted run's copy must go (before, TensorBoard purged from N + 1 and kept it,
    and MLflow kept the old child: the row showed twice) while the kept row of round N stays."""
    cfg = _config(tmp_path, tensorboard=True, mlflow=True)

    def update(run: RunDir, r: int) -> None:
        run.log(stage="finetune", method="auto", round=r, virtual_time_s=1.5 * r, bytes_total=10.0 * r)

    def grid(run: RunDir, r: int, k: int) -> None:
        run.log(stage="finetune", method="auto", round=r, virtual_time_s=2.0 * k, acc=0.1 * (k + 1), eval="grid")

    run = RunDir.create(tmp_path / "run", cfg)
    update(run, 0)
    grid(run, 0, 0)
    update(run, 1)  # checkpoint after round 1: these three rows are kept
    grid(run, 1, 1)  # logged after it, then killed
    run.finish_tracking()
    _next_second()
    state = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    again = RunDir.create(tmp_path / "run", cfg, resume=True)
    kept = iter([True, True, True, False])
    again.truncate_metrics(lambda row: next(kept))  # as the stage's resume does
    grid(again, 1, 1)  # redone
    update(again, 2)
    grid(again, 2, 2)
    again.finish_tracking()

    tb = tmp_path / "run" / "tensorboard" / "finetune" / "auto"
    assert _scalars(tb, "acc") == [(0, pytest.approx(0.1)), (1, pytest.approx(0.2)), (2, pytest.approx(0.3))]
    assert _scalars(tb, "bytes_total") == [(0, 0.0), (1, 10.0), (2, 20.0)]  # round 1's kept row too
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    child = json.loads((tmp_path / "run" / "mlflow.json").read_text())["children"]["finetune/auto"]
    assert child != state["children"]["finetune/auto"]  # the old child held the dropped grid row
    assert sorted((m.step, m.value) for m in client.get_metric_history(child, "acc")) == \
        [(0, pytest.approx(0.1)), (1, pytest.approx(0.2)), (2, pytest.approx(0.3))]
    assert sorted((m.step, m.value) for m in client.get_metric_history(child, "bytes_total")) == \
        [(0, 0.0), (1, 10.0), (2, 20.0)]


@pytest.mark.parametrize("text", ['{"experiment_id": "1", "par', "[1, 2]"])
def test_a_damaged_mlflow_state_is_an_input_error_naming_it(tmp_path, text):
    cfg = _config(tmp_path, mlflow=True)
    run = RunDir.create(tmp_path / "run", cfg)
    run.log(stage="pretrain", method="sync", round=0, train_loss=1.0)
    (tmp_path / "run" / "mlflow.json").write_text(text)
    with pytest.raises(InputError, match=r"mlflow\.json: damaged"):
        RunDir.create(tmp_path / "run", cfg, resume=True)


def test_tracking_is_off_by_default_and_a_bad_key_is_an_input_error(tmp_path):
    run = RunDir.create(tmp_path / "run", _config(tmp_path))
    run.log(stage="pretrain", method="m", round=0, train_loss=1.0)
    assert run.trackers == [] and not (tmp_path / "run" / "tensorboard").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("track: {tensorbord: true}\n")
    with pytest.raises(InputError, match="track.tensorbord"):
        load_config(bad)


@pytest.mark.slow
def test_a_stage_command_logs_its_rows_to_tensorboard_and_prints_units(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i}: the quick brown fox." * 3 for i in range(40)))
    config = tmp_path / "lm.yaml"
    config.write_text("""
name: tb
engine: {threads: 1}
fleet: {cloud: {profile: a100}, edges: [{count: 1, devices: [{count: 1, profile: jetson-orin}]}]}
data: {source: text, path: corpus.txt}
model: {kind: gpt, hidden: 16, layers: 1, heads: 2, context: 16}
pretrain: {task: lm, workers: [cloud, edge], rounds: 4, global_batch: 4, eval_every: 2}
track: {tensorboard: true}
""")
    assert main(["pretrain", str(config), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    raw = json.loads((tmp_path / "run" / "summary.json").read_text())["pretrain"]
    assert re.search(r"bytes_total\s+[\d.]+ [kMG]B\s", printed) and re.search(r"utilization\s+[\d.]+ %", printed)
    assert isinstance(raw["bytes_total"], int)  # the summary keeps the raw number
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    method = rows[0]["method"]
    logged = _scalars(tmp_path / "run" / "tensorboard" / "pretrain" / method, "train_loss")
    assert logged == [(r["round"], pytest.approx(r["train_loss"])) for r in rows]


def test_a_resume_shows_each_redone_round_once_in_mlflow(tmp_path):
    cfg = _config(tmp_path, mlflow=True)
    run = RunDir.create(tmp_path / "run", cfg)
    for r in range(4):  # checkpointed after round 1; rounds 2 and 3 are lost with the interruption
        run.log(stage="pretrain", method="sync", round=r, train_loss=10.0 + r)
    run.log(stage="finetune", method="auto", round=0, acc=0.5)  # kept whole: its child stays
    run.finish_tracking()
    state = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    again = RunDir.create(tmp_path / "run", cfg, resume=True)
    again.truncate_metrics(lambda row: row["stage"] != "pretrain" or row["round"] <= 1)  # as the stage's resume does
    for r in range(2, 5):  # the resume redoes rounds 2 and 3, then goes on
        again.log(stage="pretrain", method="sync", round=r, train_loss=20.0 + r)
    again.log(stage="finetune", method="auto", round=1, acc=0.75)
    again.finish_tracking()
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    now = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    old, new = state["children"]["pretrain/sync"], now["children"]["pretrain/sync"]
    assert new != old and now["children"]["finetune/auto"] == state["children"]["finetune/auto"]
    assert sorted((m.step, m.value) for m in client.get_metric_history(new, "train_loss")) == \
        [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0), (4, 24.0)]
    replaced = client.get_run(old)
    assert replaced.info.status == "KILLED" and replaced.data.tags["cloudedge.replaced_by"] == new
    assert client.get_run(new).data.tags["cloudedge.replaces"] == old
    assert sorted((m.step, m.value) for m in client.get_metric_history(now["children"]["finetune/auto"], "acc")) == \
        [(0, 0.5), (1, 0.75)]


def test_a_resume_numbers_rows_without_a_round_after_the_kept_ones(tmp_path):
    """A series without rounds: three rows logged, the resume keeps two and logs two more. Both
    trackers show steps 0..3 with the kept values first (before, the new rows started again at 0)."""
    cfg = _config(tmp_path, tensorboard=True, mlflow=True)
    run = RunDir.create(tmp_path / "run", cfg)
    for i in range(3):
        run.log(stage="demo", score=float(i))
    run.finish_tracking()
    _next_second()
    state = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    again = RunDir.create(tmp_path / "run", cfg, resume=True)
    kept = iter([True, True, False])
    again.truncate_metrics(lambda row: next(kept))
    for i in range(2):
        again.log(stage="demo", score=10.0 + i)
    again.finish_tracking()
    expected = [(0, 0.0), (1, 1.0), (2, 10.0), (3, 11.0)]
    assert _scalars(tmp_path / "run" / "tensorboard" / "demo", "score") == expected
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    now = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    assert now["children"]["demo"] != state["children"]["demo"]  # the old child held the dropped row
    assert sorted((m.step, m.value) for m in client.get_metric_history(now["children"]["demo"], "score")) == expected
