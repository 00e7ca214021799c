"""Checkpoints: safetensors tensors + a JSON state, written atomically; resume from the last good one.

Layout under a run's ``checkpoints/`` folder::

    step-000042.safetensors   every tensor (model, optimizer, server optimizer, ...), flat keys
    step-000042.json          plain state: round, RNG seeds, controller state, clock, ...
    latest                    the name of the last complete checkpoint (written last)

Each file is written to a temporary name and renamed, and ``latest`` is updated only after both
files are in place, so a crash at any point leaves the previous checkpoint usable. The last
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cloudedge.errors import InputError

LATEST = "latest"


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path`` (same directory: atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and shared storage; clone what is not a standalone dense tensor.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(ckpt_dir: str | Path, step: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Save one checkpoint and mark it latest. Returns the tensors file's path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step-{step:06d}"
    tensor_path, state_path = ckpt_dir / f"{stem}.safetensors", ckpt_dir / f"{stem}.json"
    _atomic_write(tensor_path, lambda tmp: save_file(_contiguous(tensors), tmp, metadata={"step": str(step)}))
    atomic_write_text(state_path, json.dumps({"step": step, **state}, indent=1, sort_keys=True))
    atomic_write_text(ckpt_dir / LATEST, stem + "\n")
    _prune(ckpt_dir, keep)
    return tensor_path


def _prune(ckpt_dir: Path, keep: int) -> None:
    stems = sorted(p.stem for p in ckpt_dir.glob("step-*.safetensors"))
    for stem in stems[:-keep] if keep > 0 else []:
        for suffix in (".safetensors", ".json"):
            (ckpt_dir / f"{stem}{suffix}").unlink(missing_ok=True)
    # Temporary files of writes killed half-way (each as large as a checkpoint): called right after
    # a complete save, so no write of ours is in flight in this directory.
    for tmp in ckpt_dir.glob(".step-*"):
        tmp.unlink(missing_ok=True)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or foreign file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable safetensors checkpoint ({err})") from None


def load_checkpoint(ckpt_dir: str | Path, stem: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ckpt_dir = Path(ckpt_dir)
    tensors = load_tensors(ckpt_dir / f"{stem}.safetensors")
    state_path = ckpt_dir / f"{stem}.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{state_path}: checkpoint state file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{state_path}: not valid JSON ({err})") from None
    return tensors, state


def load_latest(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last complete checkpoint in ``ckpt_dir``, or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / LATEST
    if not marker.is_file():
        return None
    return load_checkpoint(ckpt_dir, marker.read_text(encoding="utf-8").strip())


def check_state_dict(tensors: dict[str, torch.Tensor], model: torch.nn.Module, source: str,
                     prefix: str = "") -> dict[str, torch.Tensor]:
    """Select ``prefix``-keys of ``tensors`` and check they fit ``model`` (keys and shapes).

    A checkpoint of another model is an InputError naming the first mismatching key.
    """
    expected = model.state_dict()
    got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise InputError(f"{source}: checkpoint does not fit the model: missing key '{prefix}{missing[0]}'"
                         f" ({len(missing)} missing)")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise InputError(f"{source}: checkpoint does not fit the model: unexpected key '{prefix}{extra[0]}'")
    for k, v in expected.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise InputError(f"{source}: checkpoint does not fit the model: '{prefix}{k}' has shape "
                             f"{tuple(got[k].shape)}, the model needs {tuple(v.shape)}")
    return got
