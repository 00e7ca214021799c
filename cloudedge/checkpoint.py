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

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cloudedge.errors import InputError

LATEST = "latest"


def _umask() -> int:
    """The process's umask. Read from /proc where Linux offers it: setting and restoring it (the only
    portable way to read it) would briefly apply umask 0 to files other threads create meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path`` (same directory: atomic on POSIX).

    The file gets the mode a plain ``open(path, "w")`` would give it (0666 less the umask):
    mkstemp creates its file 0600, which would leave run files unreadable to a group that may read
    their siblings."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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


# --------------------------------------------------------------------------- nested stage state

STATE_FORMAT = "nested-1"
TENSOR_REF = "$tensor"


def flatten_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A nested state (dicts and lists of tensors and plain data) -> (flat tensors, JSON-able tree).

    Each tensor goes to the safetensors file under its dotted path (``model.head.weight``,
    ``optimizer.state.0.exp_avg``) and is replaced in the tree by ``{"$tensor": PATH}``. Dict keys
    become strings (JSON's only key type); the reader converts them back where it needs ints. NumPy
    scalars (a random stream's state, a policy's estimates) become Python numbers.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if torch.is_tensor(value):
            key = ".".join(path)
            if key in tensors:
                raise ValueError(f"state: two tensors at the path '{key}'")
            tensors[key] = value.detach()
            return {TENSOR_REF: key}
        if isinstance(value, dict):
            return {str(k): walk(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        return value

    return tensors, walk(state, ())


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any, source: str) -> Any:
    """Inverse of :func:`flatten_state`; a tensor the tree names but the file lacks is an InputError."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR_REF}:
            try:
                return tensors[tree[TENSOR_REF]]
            except KeyError:
                raise InputError(f"{source}: checkpoint lacks the tensor '{tree[TENSOR_REF]}'") from None
        return {k: unflatten_state(tensors, v, source) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(tensors, v, source) for v in tree]
    return tree


def save_state(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Save a nested stage state (tensors anywhere in it) as one checkpoint (:func:`save_checkpoint`)."""
    tensors, tree = flatten_state(state)
    return save_checkpoint(ckpt_dir, step, tensors, {"format": STATE_FORMAT, "state": tree}, keep=keep)


def load_latest_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The nested state of the last complete checkpoint in ``ckpt_dir`` (None when there is none).

    A checkpoint in another layout (e.g. written before stages shared this format) is an InputError."""
    found = load_latest(ckpt_dir)
    if found is None:
        return None
    tensors, saved = found
    if saved.get("format") != STATE_FORMAT or not isinstance(saved.get("state"), dict):
        raise InputError(f"{ckpt_dir}: checkpoint is not a stage state of format {STATE_FORMAT} "
                         "(written by another version of cloudedge?); start the run again without --resume")
    return unflatten_state(tensors, saved["state"], str(ckpt_dir))
