"""Prompt messages priced as the model the clock charges (``clock.charge_as``; docs/profiles.md).

A prompt is ``n_ctx`` context vectors of the text tower's token-embedding width. Charged as another
CLIP, the same prompt has that CLIP's text width: the clock charges the bytes of ``[n_ctx, width]``
tensors (same names, dtype and compression), so sharing a prompt costs what it would for that model.
"""

from __future__ import annotations

from typing import Any

import torch

from cloudedge import comm
from cloudedge.models.charge import ChargedModel, describe, meta_backbone

Tensors = dict[str, torch.Tensor]


class PromptWire:
    """Bytes of prompt messages: as sent (no charge), or with the charged CLIP's text width."""

    def __init__(self, charge: ChargedModel | None, compression: str):
        from cloudedge.errors import InputError

        self.charge, self.compression = charge, compression
        if charge is None:
            return
        if charge.family != "clip":
            raise InputError(f"{charge.field}: {charge.name} is a {charge.family} model; prompt adaptation adapts a CLIP "
                             "(charge it as clip-vit-b16 or a clip model config)")
        self.width = (charge.model_cfg.hidden if charge.model_cfg is not None
                      else int(charge.hf_config.text_config.hidden_size))  # type: ignore[union-attr]

    def nbytes(self, prompt: Tensors, sent_nbytes: int) -> int:
        """What the clock charges for sending ``prompt`` (``sent_nbytes``: its real payload's bytes)."""
        if self.charge is None:
            return sent_nbytes
        return comm.wire_nbytes(self._charged(prompt), self.compression)

    def _charged(self, prompt: Tensors) -> Tensors:
        return {k: torch.empty(*v.shape[:-1], self.width, dtype=v.dtype, device="meta") for k, v in prompt.items()}

    def cost_model(self, trained_name: str, trained_params: int, prompt: Tensors) -> dict[str, Any]:
        """The summary's ``cost_model``: both models' parameters and the bytes of one prompt message."""
        from cloudedge.models.charge import cost_model_summary

        sent = comm.wire_nbytes(prompt, self.compression)
        trained = describe(trained_name, trained_params, sent)
        charged = None
        if self.charge is not None:
            charged = describe(self.charge.name, self._charged_params(), self.nbytes(prompt, sent))
        return cost_model_summary(trained, charged, self.charge)

    def _charged_params(self) -> int:
        assert self.charge is not None
        if self.charge.model_cfg is not None:
            from cloudedge.models import build_model

            with torch.device("meta"):
                return sum(p.numel() for p in build_model(self.charge.model_cfg).parameters())
        return sum(p.numel() for p in meta_backbone(self.charge).parameters())
