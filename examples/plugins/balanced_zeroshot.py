"""A test-time method of one's own: zero-shot CLIP that divides out the class prior its own stream
predicts, so a shift that pushes every image toward one class is pushed back (docs/extending.md).
Name it in a config's ``plugins:`` list, then ``adapt: {method: {name: balanced-zeroshot}}``."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from cloudedge.adapt.methods import METHODS, TTAMethod, ZeroShot
from cloudedge.registry import Params


class BalancedParams(Params):
    strength: float = Field(default=1.0, ge=0, le=1, description="share of the log prior subtracted (0: zero-shot)")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="EMA weight of the old prior estimate")


@METHODS.register("balanced-zeroshot", BalancedParams)
class BalancedZeroShot(TTAMethod):
    """logits - strength * log(prior), prior = EMA over batches of the mean zero-shot probabilities."""

    name = "balanced-zeroshot"

    def __init__(self, clip: Any, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)  # validates the knobs into self.params
        self.text_feats = ZeroShot(clip, classnames).text_feats
        self.reset()

    def reset(self) -> None:
        self.prior = torch.full((self.n_classes,), 1.0 / self.n_classes)

    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        logits = self._logits(self.clip.image_features(images), self.text_feats)
        m = self.params.momentum
        self.prior = m * self.prior + (1 - m) * logits.float().softmax(-1).mean(0).cpu()
        return logits - self.params.strength * self.prior.log().to(logits.device, logits.dtype)

    # What changes while streaming, so a resumed run continues from the same prior.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prior": self.prior.clone()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.prior = tensors["prior"].clone()
