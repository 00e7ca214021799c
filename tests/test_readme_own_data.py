"""The README's "Your own data, your own model" example, run as written: an HF dataset, TensorBoard, generate."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import datasets
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from cloudedge.cli import main

REPO = Path(__file__).resolve().parents[1]


def _example_commands() -> list[list[str]]:
    """The commands of the README's bash block that uses configs/pretrain-hf.yaml, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    block = next(b for b in blocks if "pretrain-hf.yaml" in b)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_own_data_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "pretrain-hf.yaml", tmp_path / "configs")
    # The user's corpus: the project's own docs, one paragraph a row, saved as a Hugging Face dataset.
    paragraphs = [p.strip() for f in sorted((REPO / "docs").glob("*.md")) for p in f.read_text().split("\n\n")
                  if len(p.strip()) > 40]
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": paragraphs}).save_to_disk(str(tmp_path / "my_corpus"))

    commands = _example_commands()
    assert [c[:2] for c in commands] == [["cloudedge", "pretrain"], ["tensorboard", "--logdir"],
                                         ["cloudedge", "generate"]]
    for command in commands:
        if command[0] == "tensorboard":  # the server is not started here: its log directory is read instead
            acc = EventAccumulator(str(tmp_path / command[2] / "pretrain" / "sync-proportional"))
            acc.Reload()
            losses = [e.value for e in acc.Scalars("train_loss")]
            assert len(losses) == 100 and losses[-1] < losses[0]
            continue
        capsys.readouterr()
        assert main(command[1:]) == 0, command
    sampled = capsys.readouterr().out.rstrip("\n")
    prompt = commands[2][commands[2].index("--prompt") + 1]
    assert sampled.startswith(prompt) and len(sampled) > len(prompt)
    # The exported model is a plain Hugging Face model directory.
    model_dir = tmp_path / "runs" / "my-lm" / "model"
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert model(**tok("The fleet", return_tensors="pt")).logits.shape[-1] == len(tok) == 259
