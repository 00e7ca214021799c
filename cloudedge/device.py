"""Where a stage's model runs (cpu / cuda / auto) and in which precision.

Workers hold their model on the device a stage's config names, resolved on their own host (``auto``:
that host's GPU, if any); everything that crosses the engine is in host memory (``copy_plain`` /
``to_host`` in ``engine.base``), so a coordinator and its workers may sit on different devices,
or machines, without either knowing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from cloudedge.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str, field: str) -> str:
    """``cpu`` / ``cuda`` / ``auto`` (cuda when there is one) -> a torch device string.

    ``field`` names the config field in the error when ``cuda`` is asked for and absent.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{field}: 'cuda' asked for, but no CUDA device is available (use 'cpu' or 'auto')")
    return name


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (cpu for a module without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (the same tensors when they are there already)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass: ``bf16`` runs matmuls in bfloat16 (weights, gradients
    and optimizer state stay float32); ``fp32`` changes nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision]):
        yield


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (so wall-clock timings on a GPU cover the work)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["PRECISIONS", "autocast", "module_device", "resolve_device", "synchronize", "to_device"]
