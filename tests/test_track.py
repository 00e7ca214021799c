import json

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
