"""cloudedge.adapt: test-time prompt adaptation of a frozen CLIP on every edge's unlabeled stream.

``adapt(cfg, run_dir, engine, **overrides) -> StageResult`` (:mod:`cloudedge.adapt.stage`) is the API; ``adapt_checkpoint(path)``
the demo's shortcut; ``run_adapt(cfg, out_dir, resume, engine_kind)`` what ``cloudedge adapt`` calls.
Methods (zeroshot, coop, tpt, swapprompt, tda, template-select) are in :mod:`cloudedge.adapt.methods`, the prompt
learner in :mod:`cloudedge.adapt.prompts`, model loading in :mod:`cloudedge.adapt.clip_model`.
Names are imported on first use, so importing a submodule stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "adapt": "stage", "adapt_checkpoint": "stage", "run_adapt": "stage",
    "AdaptWorker": "edges", "build_streams": "edges", "CloudContext": "methods",
    "METHODS": "methods", "TTAMethod": "methods", "build_method": "methods",
    "PromptLearner": "prompts",
    "ClipAdapter": "clip_model", "load_clip": "clip_model",
    "AugmentSpec": "augment", "augment": "augment", "make_views": "augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cloudedge.adapt' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cloudedge.adapt.{_EXPORTS[name]}"), name)
