"""Crash and resume: SIGKILL a real CLI run at a seeded random moment, resume it, compare.

What is claimed (docs/reliability.md, "Crash and resume: what is tested"): a stage killed with
SIGKILL after its first checkpoint and continued with ``--resume`` ends with the same final
metrics and the same metric rows as an uninterrupted run of the same seeded config; the interrupted
directory is never marked complete; a checkpoint write killed half-way leaves ``load_latest``
returning the last complete checkpoint.

The killed run and the resumed run are separate ``python -m cloudedge`` processes (the way a user
runs them), so nothing survives the kill but what is on disk; the uninterrupted reference runs in
this process through the same entry point (``cloudedge.cli.main``). Kill delays come from
``numpy.random.default_rng`` seeded per stage; ``CLOUDEDGE_CRASH_SEED`` changes the seed to explore
other kill points. Most of the cost is process start-up (torch, transformers, peft imports).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cloudedge.checkpoint import LATEST, load_latest
from cloudedge.config import load_config
from cloudedge.errors import InputError
from cloudedge.track.run import RunDir

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

SEED = int(os.environ.get("CLOUDEDGE_CRASH_SEED", "14"))
POLL_S = 0.005
TIMEOUT_S = 240.0  # a hung child fails the test instead of hanging the suite
# Fields that measure the host, not the run: they differ between any two runs.
WALL_CLOCK_FIELDS = {"wall_s", "ms_per_image", "cpu_ms_per_image", "peak_mem_mb", "mfu_measured", "mfu_compute", "mfu_profile",
                     "achieved_flops", "peak_flops_measured", "work_wall_s", "compute_wall_s"}

TINY_CLIP = {"kind": "clip", "hidden": 32, "layers": 1, "heads": 4, "context": 32, "image_size": 8,
             "patch_size": 4, "channels": 1, "projection_dim": 16}

# Tiny configs, 8 rounds each, a checkpoint every round; one torch thread so runs are bitwise equal.
CONFIGS = {
    "pretrain": """
name: crash-pretrain
seed: 1
engine: {threads: 1}
fleet:
  cloud: {profile: a100}
  edges:
    - {count: 1, devices: [{count: 2, profile: jetson-orin, overrides: {availability: 1.0}}]}
data: {source: text, path: corpus.txt, partition: {kind: iid}}
model: {kind: gpt, hidden: 16, layers: 1, heads: 2, context: 16}
pretrain: {task: lm, algorithm: local, local_steps: 2, outer_optimizer: nesterov, rounds: 8,
           global_batch: 8, lr: 0.003, eval_every: 1, checkpoint_every: 1}
""",
    "finetune": """
name: crash-finetune
seed: 3
engine: {threads: 1}
fleet:
  edges:
    - count: 2
      overrides: {latency_s: 0.0005}
      devices: [{count: 2, profile: phone-mid, overrides: {availability: 1.0, latency_s: 0.0005, flops: 1.0e8}}]
data: {source: digits, partition: {kind: dirichlet, alpha: 0.5}}
model: {kind: vit, hidden: 16, layers: 1, heads: 2, image_size: 8, patch_size: 4, channels: 1}
finetune:
  lora: {rank: 2, alpha: 4.0}
  sync: {name: hierfavg, k1: 3, k2: 2, max_steps: 6}
  batch_size: 8
  lr: 0.01
  time_budget_s: 1.0e9
  max_cloud_rounds: 8
  eval_max: 64
  checkpoint_every: 1
""",
    "adapt": f"""
name: crash-adapt
seed: 2
engine: {{threads: 1}}
fleet:
  cloud: {{profile: a100}}
  edges: [{{count: 2, profile: edge-server}}]
data: {{source: digits, test_fraction: 0.5}}
model: {json.dumps(TINY_CLIP)}
adapt:
  checkpoint: clip
  method: {{name: swapprompt, lr: 0.05}}
  streams: [{{corruption: gaussian_noise, severity: 3}}, {{corruption: contrast, severity: 5}}]
  stream_samples: 48
  batch_size: 6
  share_every: 2
  checkpoint_every: 1
""",
}
STAGES = ("pretrain", "finetune", "adapt")
ROUNDS = 8  # checkpoints each stage writes (every config above has 8 rounds)


# ------------------------------------------------------------------------------------ helpers


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CLOUDEDGE_QUIET": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _launch(stage: str, config: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cloudedge", stage, str(config), "--out", str(out)]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, cwd=config.parent, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, what: str) -> None:
    """Wait for a run that must succeed; its stderr is the failure message when it does not."""
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{what}: no result within {TIMEOUT_S} s")
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}"


def _wait_until(done: Callable[[], bool], proc: subprocess.Popen) -> bool:
    """Poll ``done`` until it holds (True) or ``proc`` has exited (False)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if proc.poll() is not None:
            return done()
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint after {TIMEOUT_S} s")
        time.sleep(POLL_S)
    return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _kill_mid_run(stage: str, config: Path, out: Path, rng: np.random.Generator, tries: int = 4) -> dict[str, Any]:
    """Start the stage, SIGKILL it at a random moment after its checkpoints begin; returns what happened.

    The delay is drawn after the second checkpoint, scaled by the round time just measured (so
    a slow, loaded machine gets a proportionally longer delay): uniform in [0, 0.8 x the expected
    rest of the run]. A run that finished before the kill is retried with half the scale.
    """
    latest = out / "checkpoints" / stage / LATEST
    scale = 0.8
    for attempt in range(tries):
        if out.exists():
            _move_away(out, attempt)
        proc = _launch(stage, config, out)
        if not _wait_until(latest.is_file, proc):
            _check_finished(proc, stage)  # too fast to catch its first checkpoint: try again
            continue
        t_first, first = time.monotonic(), _read(latest)
        if not _wait_until(lambda first=first: _read(latest) != first, proc):
            _check_finished(proc, stage)
            continue
        round_s = time.monotonic() - t_first
        delay = float(rng.uniform(0.0, scale * round_s * (ROUNDS - 2)))
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
        summary = _summary(out)
        if proc.returncode == -signal.SIGKILL and not summary.get("complete"):
            return {"delay_s": delay, "round_s": round_s, "attempt": attempt, "summary": summary,
                    "latest": _read(latest)}
        # The run had already finished (exit 0, or killed on its way out after marking itself
        # complete): that is no crash, so draw a shorter delay.
        if proc.returncode != -signal.SIGKILL:
            _check_finished(proc, stage)
        scale /= 2
    pytest.fail(f"{stage}: the run always finished before the kill ({tries} tries)")


def _check_finished(proc: subprocess.Popen, stage: str) -> None:
    """A child that exited on its own must have succeeded."""
    _, err = proc.communicate()
    assert proc.returncode == 0, f"{stage} failed by itself (exit {proc.returncode}):\n{err[-3000:]}"


def _move_away(out: Path, attempt: int) -> None:
    out.rename(out.with_name(f"{out.name}.try{attempt}"))


def _summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _without_wall_clock(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_FIELDS}
    if isinstance(value, list):
        return [_without_wall_clock(v) for v in value]
    return value


def _rows(run: Path, stage: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [_without_wall_clock(r) for r in map(json.loads, filter(str.strip, lines)) if r.get("stage") == stage]


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row.get("method"), row.get("round"), row.get("edge"))


def _write_corpus(path: Path, n_paragraphs: int = 60) -> None:
    """A seeded text corpus, one paragraph per document, for the tiny LM (small and self-contained)."""
    words = "cloud edge device model round batch prompt adapter token update merge clock".split()
    rng = np.random.default_rng(0)
    paragraphs = [" ".join(rng.choice(words, size=int(rng.integers(8, 30)))) + "." for _ in range(n_paragraphs)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


def _write_config(stage: str, tmp_path: Path) -> Path:
    if stage == "pretrain":
        _write_corpus(tmp_path / "corpus.txt")
    if stage == "adapt":
        from cloudedge.config.model import ModelConfig
        from cloudedge.models import build_model, save_local

        save_local(build_model(ModelConfig(**TINY_CLIP), seed=0), tmp_path / "clip")
    config = tmp_path / f"{stage}.yaml"
    config.write_text(CONFIGS[stage], encoding="utf-8")
    return config


# ------------------------------------------------------------------------------------ the tests


def _run_in_this_process(stage: str, config: Path, out: Path) -> None:
    """The uninterrupted reference run, through the CLI's own entry point (saves a process start)."""
    from cloudedge.cli import main

    threads = torch.get_num_threads()  # the CLI sets torch's threads from the config; put them back
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([stage, str(config), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)


@dataclass
class Scenario:
    """One stage's crash-and-resume: what was killed when, and how each part went."""

    stage: str
    config: Path
    full_dir: Path
    cut_dir: Path
    killed: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None  # from the kill-and-resume thread
    reference_error: BaseException | None = None  # from the uninterrupted run


def _kill_then_resume(sc: Scenario, rng: np.random.Generator) -> None:
    """Thread body: kill a run, check the interrupted directory, resume it in a fresh process."""
    try:
        sc.killed = _kill_mid_run(sc.stage, sc.config, sc.cut_dir, rng)
        # The interrupted directory: not complete, its latest checkpoint whole, never silently reused.
        assert sc.killed["summary"].get("complete") is not True, sc.killed
        assert load_latest(sc.cut_dir / "checkpoints" / sc.stage) is not None
        with pytest.raises(InputError, match="already holds a run"):
            RunDir.create(sc.cut_dir)
        _finish(_launch(sc.stage, sc.config, sc.cut_dir, resume=True), f"resumed {sc.stage} (after {sc.killed})")
    except BaseException as err:  # re-raised by the stage's test
        sc.error = err


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Scenario]:
    """All three stages killed and resumed at once (each a thread driving child processes).

    Process start-up (importing torch, transformers, peft) is most of the cost, so the three
    stages' children overlap; meanwhile this process runs the uninterrupted reference runs.
    """
    out: dict[str, Scenario] = {}
    threads = []
    for index, stage in enumerate(STAGES):
        root = tmp_path_factory.mktemp(stage)
        sc = out[stage] = Scenario(stage, _write_config(stage, root), root / "full", root / "cut")
        rng = np.random.default_rng([SEED, index])
        threads.append(threading.Thread(target=_kill_then_resume, args=(sc, rng), daemon=True))
    for t in threads:
        t.start()
    for sc in out.values():
        try:
            _run_in_this_process(sc.stage, sc.config, sc.full_dir)
        except BaseException as err:
            sc.reference_error = err
    for t in threads:
        t.join()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_then_resume_matches_an_uninterrupted_run(stage: str, scenarios: dict[str, Scenario]) -> None:
    sc = scenarios[stage]
    if sc.reference_error is not None:
        raise sc.reference_error
    if sc.error is not None:
        raise sc.error
    resumed_summary, full_summary = _summary(sc.cut_dir), _summary(sc.full_dir)
    assert resumed_summary.get("complete") is True
    assert _without_wall_clock(resumed_summary[stage]) == _without_wall_clock(full_summary[stage]), sc.killed
    resumed_rows, full_rows = _rows(sc.cut_dir, stage), _rows(sc.full_dir, stage)
    keys = [_row_key(r) for r in resumed_rows]
    assert len(keys) == len(set(keys)), f"duplicated rows after resume: {keys}"
    assert resumed_rows == full_rows, sc.killed


# A child that saves checkpoints of one large tensor in a loop; every tensor element equals the
# step, so a checkpoint mixing two writes, or a truncated one, is visible. It prints each step once
# save_checkpoint has returned.
_SAVER = """
import sys, torch
from cloudedge.checkpoint import load_latest, save_checkpoint
ckpt_dir, n = sys.argv[1], int(sys.argv[2])
found = load_latest(ckpt_dir)
step = 0 if found is None else found[1]["step"] + 1
big = torch.empty(n)
while True:
    big.fill_(float(step))
    save_checkpoint(ckpt_dir, step, {"big": big, "tag": torch.tensor([step])}, {"round": step}, keep=2)
    print(step, flush=True)
    step += 1
"""


def test_checkpoint_write_killed_midway_leaves_the_last_complete_one(tmp_path: Path) -> None:
    """SIGKILL a process inside save_checkpoint (a 32 MiB tensor) at random moments, twice."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER, encoding="utf-8")
    ckpt_dir = tmp_path / "ckpt"
    rng = np.random.default_rng([SEED, 99])
    seen_steps: list[int] = []
    for trial in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir), str(8 * 2**20)], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one whole checkpoint written by this process
        assert first, f"saver failed: {proc.stderr.read()[-2000:]}"
        time.sleep(float(rng.uniform(0.0, 0.6)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"trial {trial}: saver exited {proc.returncode}"
        completed = [int(first)] + [int(line) for line in out.split()]

        found = load_latest(ckpt_dir)
        assert found is not None
        tensors, state = found
        step = state["step"]
        # The last complete checkpoint: the last one save_checkpoint returned from, or the next one
        # when the kill fell between its `latest` rename and the print.
        assert step in (completed[-1], completed[-1] + 1), (trial, step, completed[-1])
        assert state["round"] == step and int(tensors["tag"]) == step
        assert tensors["big"].numel() == 8 * 2**20
        assert torch.equal(tensors["big"], torch.full_like(tensors["big"], float(step)))  # never a torn write
        if step > 0:  # the one before it is kept too
            assert (ckpt_dir / f"step-{step - 1:06d}.safetensors").is_file()
        seen_steps.append(step)
    assert seen_steps == sorted(seen_steps) and len(set(seen_steps)) == 2  # each trial continued the last


# --------------------------------------------------------------- crashes at awkward moments

_TINY_PRETRAIN = CONFIGS["pretrain"].replace("rounds: 8", "rounds: 4")


def test_kill_before_the_first_checkpoint_does_not_duplicate_rows(tmp_path: Path) -> None:
    from cloudedge.pretrain.stage import pretrain, run_pretrain

    config = tmp_path / "pretrain.yaml"
    _write_corpus(tmp_path / "corpus.txt")
    config.write_text(_TINY_PRETRAIN.replace("checkpoint_every: 1", "checkpoint_every: 4"), encoding="utf-8")
    cfg = load_config(config)

    class Killed(Exception):
        pass

    def die_after_round_1(round_idx: int, row: dict[str, Any]) -> None:
        if round_idx == 1:  # rows 0 and 1 are logged; the first checkpoint would come after round 3
            raise Killed

    with pytest.raises(Killed):
        pretrain(cfg, tmp_path / "run", on_round=die_after_round_1)
    assert load_latest(tmp_path / "run" / "checkpoints" / "pretrain") is None
    run_pretrain(cfg, tmp_path / "run", resume=True)
    assert [r["round"] for r in _rows(tmp_path / "run", "pretrain")] == [0, 1, 2, 3]


def test_kill_while_appending_a_metrics_row_can_be_resumed(tmp_path: Path) -> None:
    from cloudedge.pretrain.stage import pretrain, run_pretrain

    config = tmp_path / "pretrain.yaml"
    _write_corpus(tmp_path / "corpus.txt")
    config.write_text(_TINY_PRETRAIN, encoding="utf-8")
    cfg = load_config(config)

    class Killed(Exception):
        pass

    def die_after_round_1(round_idx: int, row: dict[str, Any]) -> None:
        if round_idx == 1:
            raise Killed

    run = tmp_path / "run"
    with pytest.raises(Killed):
        pretrain(cfg, run, on_round=die_after_round_1)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as fh:  # the row of round 2, cut short
        fh.write('{"stage": "pretrain", "method": "local-uniform", "round": 2, "virtual_ti')
    run_pretrain(cfg, run, resume=True)
    assert [r["round"] for r in _rows(run, "pretrain")] == [0, 1, 2, 3]
