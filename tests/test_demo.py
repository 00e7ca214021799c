"""The quick demo end to end: three stages, baselines beside proposed methods, a complete report."""

from __future__ import annotations

import json

import pytest

from cloudedge.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` uses
    out = tmp_path / "runs" / "demo"
    assert main(["demo", "--quick", "--out", "runs/demo"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["quick"] is True
    assert set(summary["pretrain"]["methods"]) == {"sync-uniform", "sync-reweighted", "local-H4"}
    assert summary["pretrain"]["charged_as"] == "clip-vit-b16" and summary["pretrain"]["budget_s"] > 0
    assert set(summary["invariant"]["methods"]) == {"erm", "irm", "pin"}
    assert set(summary["finetune"]["methods"]) == {"fedavg2", "hierfavg", "autonomous"}
    assert set(summary["adapt"]["methods"]) == {"zeroshot", "tpt", "swapprompt"}
    for stage in ("finetune", "adapt"):
        for method, values in summary[stage]["methods"].items():
            acc = values.get("final_acc", values.get("acc_mean"))
            assert acc is not None and 0.0 <= acc <= 1.0, (stage, method)
    headline = summary["headline"]
    for key in ("pretrain_speedup", "ood_gain_points", "finetune_speedup_vs_hierfavg", "tta_gain_vs_tpt_points"):
        assert "how" in headline[key] and "value" in headline[key]
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert len(plots) >= 5, plots
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(plots)
    md = (out / "report.md").read_text()
    assert "## Headline" in md and "## Fleet" in md and "edge0" in md
    # The report is regenerated from the run directory alone.
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == md
    # The pre-trained CLIP that later stages start from is a loadable local HF checkpoint.
    assert (out / "models" / "clip" / "config.json").is_file()
