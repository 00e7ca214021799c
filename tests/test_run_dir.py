"""A run directory's life: what starts a run, what resumes one, and damaged run files.

Bad run files (summary.json, metrics.jsonl, config.yaml) are one-line InputErrors naming the file
and change nothing; a start that failed before its first row leaves no run that blocks the
corrected one; a resume continues only the run its config.yaml describes (docs/tracking.md,
"Run directories").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudedge.cli import main
from cloudedge.config import config_from_dict, dump_config
from cloudedge.errors import InputError
from cloudedge.stage import StageRun
from cloudedge.track import RunDir, read_metrics
from cloudedge.track.report import render_report

PRETRAIN = {"task": "lm", "workers": ["cloud", "edge"], "rounds": 2, "global_batch": 4, "eval_every": 1, "lr": 0.003}


def _cfg(tmp_path: Path, track: dict | None = None, engine: dict | None = None, **pretrain: object):
    raw = {"name": "rd", "seed": 1, "pretrain": {**PRETRAIN, **pretrain}}
    if track is not None:
        raw["track"] = track
    if engine is not None:
        raw["engine"] = engine
    return config_from_dict(raw, source="test", base_dir=tmp_path)


def _interrupted_run(tmp_path: Path, **pretrain: object) -> Path:
    """A run that logged two rows and was then killed (its summary not complete)."""
    run = RunDir.create(tmp_path / "run", _cfg(tmp_path, **pretrain))
    run.log(stage="pretrain", method="m", round=0, train_loss=2.0)
    run.log(stage="pretrain", method="m", round=1, train_loss=1.5)
    run.update_summary("pretrain", {"rounds": 2})
    return run.path


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- damaged run files --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "what"), [('{"complete": tr', "not valid JSON"), ("[1, 2]", "not a JSON object")])
def test_a_damaged_summary_is_an_input_error_naming_it_and_changes_nothing(tmp_path, text, what):
    path = _interrupted_run(tmp_path)
    (path / "summary.json").write_text(text)
    before = _files(path)
    with pytest.raises(InputError, match=rf"summary\.json: damaged: {what}"):
        RunDir.create(path, _cfg(tmp_path), resume=True)
    with pytest.raises(InputError, match=rf"summary\.json: damaged: {what}"):
        render_report(path)
    assert _files(path) == before


def test_a_metrics_line_that_is_not_an_object_names_file_and_line(tmp_path):
    path = _interrupted_run(tmp_path)
    with (path / "metrics.jsonl").open("a") as fh:
        fh.write("[1, 2]\n")
    before = _files(path)
    for read in (read_metrics, render_report, lambda p: RunDir.create(p, _cfg(tmp_path), resume=True),
                 lambda p: StageRun.open("pretrain", RunDir(p), None, "m").resume()):
        with pytest.raises(InputError, match=r"metrics\.jsonl:3: not a JSON object \(a JSON array\)"):
            read(path)
    assert _files(path) == before


@pytest.mark.parametrize(("text", "what"), [("name: [a\n", "not valid YAML at line 2"),
                                            ("- a\n- b\n", "not a mapping of config sections")])
def test_a_damaged_config_yaml_is_an_input_error_naming_it(tmp_path, text, what):
    path = _interrupted_run(tmp_path)
    (path / "config.yaml").write_text(text)
    with pytest.raises(InputError, match=rf"config\.yaml: damaged: {what}"):
        render_report(path)
    with pytest.raises(InputError, match=rf"config\.yaml: damaged: {what}"):
        RunDir.create(path, _cfg(tmp_path), resume=True)
    assert (path / "config.yaml").read_text() == text and not (path / "report.md").exists()


# --- starting -------------------------------------------------------------------------------------

def test_a_start_that_failed_on_its_data_does_not_block_the_corrected_run(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i}: the quick brown fox. " * 3 for i in range(40)))
    config = {"name": "fix", "engine": {"threads": 1},
              "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 1, "devices": [{"count": 1, "profile": "jetson-orin"}]}]},
              "data": {"source": "text", "path": "missing.txt"},
              "model": {"kind": "gpt", "hidden": 16, "layers": 1, "heads": 2, "context": 16},
              "pretrain": {"task": "lm", "workers": ["cloud", "edge"], "rounds": 1, "global_batch": 4}}
    path, out = tmp_path / "lm.yaml", tmp_path / "run"
    path.write_text(json.dumps(config))
    assert main(["pretrain", str(path), "--out", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err
    config["data"]["path"] = "corpus.txt"
    path.write_text(json.dumps(config))
    assert main(["pretrain", str(path), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    assert "corpus.txt" in (out / "config.yaml").read_text()
    (aside,) = tmp_path.glob("run.old-*")  # the failed start's files, kept
    assert "missing.txt" in (aside / "config.yaml").read_text()


def test_a_directory_with_no_run_yet_takes_a_new_run_with_the_failed_starts_files_moved_aside(tmp_path, capsys):
    """Nothing of the failed start (its trackers' files included) mixes with the new run, and
    nothing is lost: it is moved aside whole."""
    out = tmp_path / "run"
    RunDir.create(out, _cfg(tmp_path, lr=0.5))  # a start that then failed before its first row
    (out / "checkpoints" / "pretrain").mkdir()
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1").write_text("old")
    (out / "notes.txt").write_text("mine")
    run = RunDir.create(out, _cfg(tmp_path))
    assert "lr: 0.003" in (out / "config.yaml").read_text() and not (out / "tensorboard").exists()
    assert run.read_metrics() == [] and not run.resumed
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "notes.txt").read_text() == "mine" and "lr: 0.5" in (aside / "config.yaml").read_text()
    assert (aside / "tensorboard" / "events.out.tfevents.1").is_file()
    assert f"moved it aside to {aside.name}" in capsys.readouterr().err


@pytest.mark.parametrize("made", ["a row", "a checkpoint", "a summary"])
def test_a_directory_holding_a_run_is_not_started_over(tmp_path, made):
    out = tmp_path / "run"
    run = RunDir.create(out, _cfg(tmp_path))
    if made == "a row":
        run.log(stage="pretrain", method="m", round=0)
    elif made == "a checkpoint":
        (run.checkpoint_dir("pretrain") / "latest").write_text("step-000000")
    else:
        run.update_summary("pretrain", {})
    with pytest.raises(InputError, match="already holds a run; pass --resume"):
        RunDir.create(out, _cfg(tmp_path))


def test_resume_with_nothing_to_resume_starts_a_new_run_and_says_so(tmp_path, capsys):
    out = tmp_path / "new"
    run = RunDir.create(out, _cfg(tmp_path), resume=True)
    assert not run.resumed and run.read_metrics() == [] and (out / "config.yaml").is_file()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no run to resume yet; starting a new one" in err
    again = RunDir.create(out, _cfg(tmp_path, lr=0.5), resume=True)  # still no row: the new config wins
    assert not again.resumed and "lr: 0.5" in (out / "config.yaml").read_text()


def test_resume_in_a_directory_of_other_files_is_an_error_and_creates_nothing(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# my own notes\n")
    for resume in (True, False):
        with pytest.raises(InputError, match="holds no cloudedge run|no cloudedge run here"):
            RunDir.create(out, _cfg(tmp_path), resume=resume)
    assert _files(out) == {"config.yaml": b"# my own notes\n"}


# --- resuming -------------------------------------------------------------------------------------

def test_resume_with_a_different_config_names_each_field_and_keeps_the_runs(tmp_path):
    path = _interrupted_run(tmp_path)
    before = _files(path)
    with pytest.raises(InputError) as err:
        RunDir.create(path, _cfg(tmp_path, lr=0.01, rounds=4), resume=True)
    message = str(err.value)
    assert "pretrain.lr: 0.003 -> 0.01" in message and "pretrain.rounds: 2 -> 4" in message
    assert message.startswith(f"{path / 'config.yaml'}: --resume") and "\n" not in message
    assert _files(path) == before  # config.yaml not rewritten, nothing else touched


def test_a_finished_run_resumed_with_more_rounds_is_refused_by_the_cli(tmp_path, capsys):
    path = _interrupted_run(tmp_path)
    RunDir(path).write_summary({}, complete=True)
    config = tmp_path / "more.yaml"
    config.write_text(dump_config(_cfg(tmp_path, rounds=12)))
    saved = (path / "config.yaml").read_text()
    assert main(["pretrain", str(config), "--out", str(path), "--resume"]) == 2
    assert "pretrain.rounds: 2 -> 12" in capsys.readouterr().err
    assert (path / "config.yaml").read_text() == saved


def test_resume_may_change_tracking_and_engine_only(tmp_path):
    path = _interrupted_run(tmp_path)
    saved = (path / "config.yaml").read_text()
    changed = _cfg(tmp_path, track={"experiment": "other"}, engine={"threads": 3})
    run = RunDir.create(path, changed, resume=True)
    assert run.resumed and len(run.read_metrics()) == 2
    assert (path / "config.yaml").read_text() == saved  # the run's config stays what it started with


def test_a_config_yaml_written_before_a_field_existed_still_resumes(tmp_path):
    path = _interrupted_run(tmp_path)
    saved = (path / "config.yaml").read_text()
    older = saved.replace("  eval_samples: 128\n", "")  # as if written before the field existed (at its default)
    assert older != saved
    (path / "config.yaml").write_text(older)
    assert RunDir.create(path, _cfg(tmp_path), resume=True).resumed
    with pytest.raises(InputError, match=r"pretrain\.eval_samples: 128 -> 64"):
        RunDir.create(path, _cfg(tmp_path, eval_samples=64), resume=True)


def test_resume_after_the_project_moved_notes_other_paths_and_continues(tmp_path, capsys):
    """The run's config.yaml names its data by a path; the project moved (another checkout), so the
    same config now gives another path: said on stderr, not refused. Another setting still is."""
    path = _interrupted_run(tmp_path)
    saved = (path / "config.yaml").read_text()
    (path / "config.yaml").write_text(saved.replace("  path: null\n", "  path: /old/checkout/corpus.txt\n", 1))
    assert "/old/checkout/corpus.txt" in (path / "config.yaml").read_text()
    assert RunDir.create(path, _cfg(tmp_path), resume=True).resumed
    err = capsys.readouterr().err
    assert "resuming with other paths" in err and '"/old/checkout/corpus.txt" -> null' in err
    assert RunDir.create(path, _cfg(tmp_path, device="auto"), resume=True).resumed  # e.g. on a GPU now
    assert "pretrain.device: \"cpu\" -> \"auto\"" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"pretrain\.lr: 0\.003 -> 0\.5"):
        RunDir.create(path, _cfg(tmp_path, lr=0.5), resume=True)
