"""A user's image folder through `cloudedge adapt`, as a new user runs it (a subprocess).

The case from issue 13: an RGB image folder with the bundled (1-channel) CLIP failed inside the
workers for three rounds and ended with a traceback and exit 1. Now the images convert, the stage
writes its report, and an input problem a worker finds ends as one line and exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cloudedge.cli import main

TINY_CLIP = {"kind": "clip", "hidden": 32, "layers": 1, "heads": 2, "context": 32, "image_size": 8,
             "patch_size": 4, "channels": 1, "projection_dim": 16}


def _setup(tmp_path: Path, class_names: str | None = None) -> Path:
    """An RGB image folder, a tiny bundled CLIP checkpoint and an adapt config; the config's path."""
    from safetensors.torch import save_file

    from cloudedge.config import config_from_dict
    from cloudedge.models import build_model

    rng = np.random.default_rng(0)
    for folder in ("cat", "dog", "fox"):
        (tmp_path / "pics" / folder).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "pics" / folder / f"{i}.png")
    model = build_model(config_from_dict({"model": TINY_CLIP}).model, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    data = {"source": "imagefolder", "path": "pics", "image_size": 8, "test_fraction": 0.5}
    if class_names is not None:
        (tmp_path / "names.txt").write_text(class_names)
        data["class_names"] = "names.txt"
    config = {"name": "rgb-folder", "seed": 0, "engine": {"threads": 1},
              "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 2, "profile": "edge-server"}]},
              "data": data, "model": TINY_CLIP,
              "adapt": {"checkpoint": "clip.safetensors", "method": "zeroshot", "batch_size": 2}}
    path = tmp_path / "adapt.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudedge", *args], capture_output=True, text=True, timeout=300)


def test_rgb_folder_adapts_with_a_grey_clip_and_the_stage_writes_its_report(tmp_path):
    config = _setup(tmp_path)
    out = tmp_path / "run"
    proc = _cli("adapt", str(config), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    # Both edges stream the same (unshifted) spec, so they share its 6 test images, disjointly.
    per_edge = summary["adapt"]["acc_per_edge"]
    assert summary["complete"] and [per_edge[e]["images"] for e in ("edge0", "edge1")] == [3, 3]
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert "Stage: adapt" in html and "## Stage: adapt" in md
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots and all(f"plots/{p}" in md for p in plots) and f"report: {out / 'report.html'}" in proc.stdout


def test_an_input_error_inside_a_worker_is_one_line_and_exit_2(tmp_path):
    # Class names longer than the text tower's 32 positions: found when an edge builds its prompts.
    long_name = "a remarkably long and very descriptive name of a cat"
    config = _setup(tmp_path, class_names=f"cat {long_name}\ndog a dog\nfox a fox\n")
    proc = _cli("adapt", str(config), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("error: ")
    assert "prompt too long for the text tower" in err and long_name in err and "data.class_names" in err
    summary = tmp_path / "run" / "summary.json"
    assert not summary.is_file() or not json.loads(summary.read_text()).get("complete")


def test_an_input_error_in_a_worker_task_is_not_retried_as_a_worker_failure(tmp_path):
    # LoRA targets that match no module: found when the cloud worker builds its model in its
    # first task, which the engine used to report as a failed worker (a traceback, exit 1).
    config = tmp_path / "finetune.yaml"
    config.write_text(json.dumps({
        "name": "bad-targets", "seed": 0, "engine": {"threads": 1},
        "fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid"}]}]},
        "data": {"source": "digits", "test_fraction": 0.5},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4, "channels": 1},
        "finetune": {"lora": {"rank": 2, "targets": ["no_such_module"]}, "max_cloud_rounds": 1}}))
    proc = _cli("finetune", str(config), "--out", str(tmp_path / "run"))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("error: finetune.lora.targets: ['no_such_module'] do not fit the vit model")


def test_a_report_that_cannot_be_written_loses_nothing(tmp_path, capsys, monkeypatch):
    import cloudedge.track.run as track_run

    config = _setup(tmp_path)
    out = tmp_path / "run"
    create = track_run.RunDir.create.__func__

    def create_then_block_the_report(cls, *args, **kwargs):
        run = create(cls, *args, **kwargs)
        (run.path / "report.html").mkdir()  # a real failure: the report cannot replace a folder
        (run.path / "report.html" / "keep").write_text("x")
        return run

    monkeypatch.setattr(track_run.RunDir, "create", classmethod(create_then_block_the_report))
    assert main(["adapt", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "report not written" in err and f"cloudedge report {out}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["adapt"]["acc_mean"] is not None
    assert (out / "report.html" / "keep").is_file()
