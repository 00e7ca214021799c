"""cloudedge.pretrain: collaborative pre-training across cloud, edge and device workers.

``pretrain(cfg, run_dir, engine, **overrides) -> StageResult`` (:mod:`cloudedge.pretrain.stage`) is the API;
``run_pretrain(cfg, out_dir, resume, engine_kind)`` is what ``cloudedge pretrain`` calls.
Algorithms (sync, local) are in :mod:`cloudedge.pretrain.algorithms`, batch controllers in
:mod:`cloudedge.pretrain.batch`, objectives in
:mod:`cloudedge.pretrain.objectives`, the worker in :mod:`cloudedge.pretrain.workers`.
Names are imported on first use, so importing a submodule (e.g. objectives) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CONTROLLERS": "batch", "BatchController": "batch", "Observation": "batch", "Plan": "batch",
    "WorkerInfo": "batch", "get_controller": "batch",
    "ALGORITHMS": "algorithms", "PretrainAlgorithm": "algorithms", "fednova_delta": "algorithms",
    "union_batch_gradient": "algorithms", "pretrain": "stage", "run_pretrain": "stage",
    "Classifier": "tasks", "build_classifier": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cloudedge.pretrain' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cloudedge.pretrain.{_EXPORTS[name]}"), name)
