"""Mutual-information lower bounds used by the invariant objectives (``pin``).

The one bound here is InfoNCE (van den Oord et al. 2018; Poole et al. 2019) with a cosine critic
``f(a, b) = cos(a, b) / tau``. For a batch of ``B`` pairs ``(p_i, g_i)`` drawn from the joint of
two representations ``P`` and ``G``,

    I(P; G) >= log B - L_NCE,
    L_NCE = -(1/B) sum_i log( e^{f(p_i, g_i)} / sum_j e^{f(p_i, g_j)} ).

``pin`` adds, for each sample, one *extra* negative ``n_i`` (the client's local ERM feature of the
same sample, which carries the client's shortcut), weighted by ``w >= 0``:

    L_pin = -(1/B) sum_i log( e^{f(p_i, g_i)} / (sum_j e^{f(p_i, g_j)} + w e^{f(p_i, n_i)}) ).

Every added denominator term is positive, so ``L_pin >= L_NCE`` and ``log B - L_pin`` is still a
valid (looser) lower bound on ``I(P; G)``: minimising ``L_pin`` raises a lower bound on the
information the personalized feature keeps about the global invariant feature while pushing it
away from the shortcut-laden local feature of the same input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    extra_negative: torch.Tensor | None = None,
    tau: float = 0.5,
    extra_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss and the mutual-information lower bound it certifies.

    Args:
        anchor: ``p`` [B, D], the representation being trained.
        positive: ``g`` [B, D]; row ``i`` is the positive of anchor ``i`` and every other row is
            one of its in-batch negatives.
        extra_negative: ``n`` [B, D] or None; row ``i`` is one more negative of anchor ``i`` only.
        tau: critic temperature (> 0).
        extra_weight: weight ``w >= 0`` of the extra negative in the denominator.

    Returns:
        ``(loss, bound)``: ``loss = L_pin`` (a mean over the batch, differentiable) and
        ``bound = log B - loss`` in nats (a lower bound on ``I(P; G)``).
    """
    if anchor.shape != positive.shape or anchor.dim() != 2:
        raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} must be equal [B, D]")
    batch = anchor.shape[0]
    p = F.normalize(anchor, dim=1)
    g = F.normalize(positive, dim=1)
    scores = p @ g.T / tau  # [B, B]; the diagonal holds the positives
    if extra_negative is not None and extra_weight > 0:
        n = F.normalize(extra_negative, dim=1)
        extra = (p * n).sum(dim=1, keepdim=True) / tau + math.log(extra_weight)  # [B, 1]
        candidates = torch.cat([scores, extra], dim=1)
    else:
        candidates = scores
    loss = (torch.logsumexp(candidates, dim=1) - scores.diagonal()).mean()
    return loss, math.log(batch) - loss.detach()
