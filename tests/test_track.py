import json
from pathlib import Path

import pytest

from cloudedge.config import config_from_dict
from cloudedge.errors import InputError
from cloudedge.track import RunDir, read_metrics
from cloudedge.track.report import render_report


def test_run_dir_lifecycle(tmp_path):
    cfg = config_from_dict({"name": "t"})
    run = RunDir.create(tmp_path / "r", cfg)
    assert (run.path / "config.yaml").read_text().startswith("name: t")
    run.log(stage="pretrain", method="a", round=0, time_s=0.0, val_loss=float("nan"))
    run.log(stage="pretrain", method="a", round=1, time_s=1.5, val_loss=2.0)
    rows = read_metrics(run.path)
    assert rows[0]["val_loss"] is None and rows[1]["val_loss"] == 2.0 and "wall_s" in rows[1]
    run.update_summary("pretrain", {"best": 2.0})
    assert not run.complete
    run.write_summary({"headline": {}})
    assert run.complete and run.read_summary()["pretrain"]["best"] == 2.0


def test_existing_run_is_not_clobbered(tmp_path):
    run = RunDir.create(tmp_path / "r")
    run.log(round=0)
    with pytest.raises(InputError, match="already holds a run"):
        RunDir.create(tmp_path / "r")
    again = RunDir.create(tmp_path / "r", resume=True)
    assert len(again.read_metrics()) == 1  # resume keeps what was logged
    fresh = RunDir.create(tmp_path / "r", overwrite=True)
    assert fresh.read_metrics() == []
    asides = list(tmp_path.glob("r.old-*"))
    assert len(asides) == 1 and (asides[0] / "metrics.jsonl").read_text().strip()


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        RunDir.create(blocker)


def test_damaged_metrics_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"a": 1}\n{broken\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_report_renders_plots_and_html(tmp_path):
    cfg = config_from_dict({"name": "rep"})
    run = RunDir.create(tmp_path / "r", cfg)
    for m in ("x", "y"):
        for r in range(4):
            run.log(stage="finetune", method=m, round=r, time_s=r * 2.0, bytes_total=r * 1000, acc=0.1 * r)
    run.log(stage="adapt", method="zeroshot", shift="noise-3", acc=0.5)
    run.log(stage="adapt", method="swapprompt", shift="noise-3", acc=0.6)
    run.write_summary({"finetune": {"methods": {"x": {"final_acc": 0.3}}},
                       "headline": {"speedup": {"value": 2.0, "how": "time to 30%"}}})
    md, html = render_report(run.path)
    text = md.read_text()
    assert "| speedup | 2x | time to 30% |" in text and "finetune_acc_vs_time_s.png" in text
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 3  # two curves + the shift bars
    assert json.loads((run.path / "summary.json").read_text())["complete"] is True


# --- progress (cloudedge.track.progress) ----------------------------------------------------------


def _lines_env(monkeypatch, every: str = "0") -> None:
    monkeypatch.delenv("CLOUDEDGE_QUIET", raising=False)
    monkeypatch.setenv("CLOUDEDGE_PROGRESS", "lines")
    monkeypatch.setenv("CLOUDEDGE_PROGRESS_EVERY", every)


def test_progress_lines_print_each_step_to_stderr(monkeypatch, capsys):
    from cloudedge.track.progress import progress_bar

    _lines_env(monkeypatch)
    with progress_bar("pretrain sync", 3) as bar:
        for _ in range(3):
            bar.advance()
    out = capsys.readouterr()
    assert out.out == ""
    assert [line.split(" (")[0] for line in out.err.splitlines()] == [
        "pretrain sync: 1/3", "pretrain sync: 2/3", "pretrain sync: 3/3"]


def test_progress_lines_are_throttled_but_the_last_state_is_printed(monkeypatch, capsys):
    from cloudedge.track.progress import progress_bar

    _lines_env(monkeypatch, every="3600")
    with pytest.raises(RuntimeError):
        with progress_bar("finetune hierfavg", 10) as bar:
            for _ in range(4):
                bar.advance()
            raise RuntimeError("a crash half-way")
    # The first step, then nothing for an hour, then where it stopped (also when it stopped early).
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        "finetune hierfavg: 1/10", "finetune hierfavg: 4/10"]


def test_progress_is_silent_in_tests_and_off_when_asked(monkeypatch, capsys):
    from cloudedge.track.progress import progress_bar, progress_mode

    assert progress_mode() == "off"  # CLOUDEDGE_QUIET, set by conftest, wins over everything
    monkeypatch.delenv("CLOUDEDGE_QUIET", raising=False)
    monkeypatch.setenv("CLOUDEDGE_PROGRESS", "off")
    with progress_bar("adapt", 2) as bar:
        bar.advance(2)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CLOUDEDGE_PROGRESS", "auto")
    assert progress_mode() == "off"  # stderr is captured here, not a terminal


@pytest.mark.parametrize(("name", "value"), [("CLOUDEDGE_PROGRESS", "verbose"), ("CLOUDEDGE_PROGRESS_EVERY", "soon"),
                                             ("CLOUDEDGE_PROGRESS_EVERY", "-1")])
def test_bad_progress_settings_name_the_variable(monkeypatch, name, value):
    from cloudedge.track.progress import progress_bar

    _lines_env(monkeypatch)
    monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=name):
        with progress_bar("pretrain", 1):
            pass


def test_a_stage_run_prints_its_rounds_as_lines(monkeypatch, capsys):
    from cloudedge.pretrain.stage import pretrain

    _lines_env(monkeypatch)
    cfg = config_from_dict({
        "seed": 0, "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 1, "devices": [{"count": 1, "profile": "phone-mid"}]}]},
        "data": {"source": "pydocs", "max_docs": 60},
        "model": {"kind": "gpt", "hidden": 16, "layers": 1, "heads": 2, "context": 16},
        "pretrain": {"task": "lm", "rounds": 2, "global_batch": 4, "eval_every": 1, "eval_samples": 4}})
    pretrain(cfg, None)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0].split(": ")[1] for line in err] == ["1/2", "2/2"]
    assert err[0].startswith("pretrain ")


def test_a_bad_progress_setting_stops_the_cli_before_anything_is_written(monkeypatch, tmp_path, capsys):
    from cloudedge.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain-lm.yaml")
    for name, value in (("CLOUDEDGE_PROGRESS_EVERY", "x"), ("CLOUDEDGE_PROGRESS", "loud")):
        monkeypatch.setenv(name, value)
        out = tmp_path / name
        assert main(["pretrain", config, "--out", str(out)]) == 2
        assert name in capsys.readouterr().err
        assert not out.exists()
        monkeypatch.delenv(name)
