"""LoRA adapters: which modules get them, the classifier a device trains, and how adapters aggregate.

A device trains only the LoRA factors (``lora_A`` [r, in], ``lora_B`` [out, r], through ``peft``) and
a linear task head; the frozen base never leaves it. The effective weight of an adapted layer is
``W + s * B @ A`` with ``s = lora_alpha / r``.

Averaging A and B separately is not the average of the products ``B @ A``: ``mean(B) mean(A) !=
mean(B A)``. :func:`aggregate_lora` offers three modes (docs/finetuning.md, "LoRA aggregation"):

- ``fedavg``: per-tensor weighted mean of A and of B (the common, inexact practice).
- ``ffa``: A is frozen at its shared initialisation and only B is trained and averaged; then
  ``mean(B_i) A = mean(B_i A)`` exactly, and devices send half the adapter bytes.
- ``product``: the exact weighted mean ``P = sum_i w_i B_i A_i`` per layer, then either
  ``refactor="svd"``: truncated SVD of P back into rank-r factors (exact when rank(P) <= r, else the
  best rank-r approximation), or ``refactor="merge"``: ``s * P`` is added to a dense per-layer
  ``<layer>.base_delta`` that devices add to their frozen base, and the factors are re-initialised
  (B = 0, A fresh): exact, as FLoRA does, at the price of sending the dense delta downstream.

Every function here is pure: tensors in, new tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]

LORA_MODES = ("fedavg", "ffa", "product")
REFACTORS = ("svd", "merge")
A_SUFFIX = ".lora_A.default.weight"
B_SUFFIX = ".lora_B.default.weight"
BASE_DELTA_SUFFIX = ".base_delta"

# Target modules per architecture (the attention projections that LoRA papers adapt: query and
# value; GPT-2 fuses q, k, v into one Conv1D `c_attn`).
TARGETS: dict[str, list[str]] = {
    "vit": ["query", "value", "q_proj", "v_proj"],  # transformers 4 and 5 names
    "clip": ["q_proj", "v_proj"],
    "gpt": ["c_attn"],
    "llama": ["q_proj", "v_proj"],  # a charged architecture only (clock.charge_as)
}


def lora_layers(keys: Sequence[str] | Mapping[str, object]) -> list[str]:
    """Prefixes of the LoRA layers present in a state (those with both an A and a B key), sorted."""
    names = set(keys)
    return sorted(k[: -len(A_SUFFIX)] for k in names if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in names)


def sent_keys(keys: Sequence[str], mode: str) -> list[str]:
    """Keys a device sends up: every trained tensor. Under ``ffa`` A is frozen and never sent."""
    if mode == "ffa":
        return [k for k in keys if not k.endswith(A_SUFFIX) and not k.endswith(BASE_DELTA_SUFFIX)]
    return [k for k in keys if not k.endswith(BASE_DELTA_SUFFIX)]


def effective_deltas(state: Mapping[str, torch.Tensor], scaling: float) -> Tensors:
    """``{layer: base_delta + s * B @ A}`` ([out, in]) of every LoRA layer: what the state adds to W."""
    out: Tensors = {}
    for layer in lora_layers(state):
        a, b = state[layer + A_SUFFIX].double(), state[layer + B_SUFFIX].double()
        d = scaling * (b @ a)
        extra = state.get(layer + BASE_DELTA_SUFFIX)
        out[layer] = d if extra is None else d + extra.double()
    return out


def init_lora_a(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A fresh A as peft initialises it (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


def aggregate_lora(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    mode: str,
    *,
    scaling: float,
    refactor: str = "svd",
    reinit_seed: int = 0,
) -> Tensors:
    """``sum_i weights[i] * states[i]`` in the sense of ``mode`` (weights are used as given).

    Weights are not normalised, so callers can merge ``global + w (edge - pulled)`` with weights
    ``[1, w, -w]`` (exact for every mode: all three combine linearly in the effective weights).
    Non-LoRA tensors (the head, ``base_delta``) are always weighted sums. ``reinit_seed`` seeds
    the fresh A of ``product``/``merge`` so every node re-initialises identically.
    """
    if mode not in LORA_MODES:
        raise ValueError(f"unknown LoRA aggregation mode {mode!r} (known: {LORA_MODES})")
    if refactor not in REFACTORS:
        raise ValueError(f"unknown refactor {refactor!r} (known: {REFACTORS})")
    if len(states) != len(weights) or not states:
        raise ValueError("aggregate_lora: need one weight per state and at least one state")
    keys = list(states[0])
    for s in states[1:]:
        if s.keys() != set(keys):
            raise ValueError("aggregate_lora: states have different keys")
    layers = lora_layers(keys)
    w = [float(x) for x in weights]
    out: Tensors = {}
    lora_keys = {layer + sfx for layer in layers for sfx in (A_SUFFIX, B_SUFFIX)}
    merged = mode == "product" and refactor == "merge"
    for k in keys:
        if k in lora_keys:
            continue
        if merged and k.endswith(BASE_DELTA_SUFFIX):
            continue  # filled below, together with the new products
        out[k] = _wsum([s[k] for s in states], w)
    gen = torch.Generator().manual_seed(int(reinit_seed))
    for layer in layers:
        ka, kb = layer + A_SUFFIX, layer + B_SUFFIX
        a_list, b_list = [s[ka] for s in states], [s[kb] for s in states]
        if mode == "fedavg":
            out[ka], out[kb] = _wsum(a_list, w), _wsum(b_list, w)
        elif mode == "ffa":
            for a in a_list[1:]:
                if not torch.equal(a, a_list[0]):
                    raise ValueError(f"ffa: {ka} differs between states (A must stay frozen)")
            out[ka], out[kb] = a_list[0].clone(), _wsum(b_list, w)
        else:
            prod = sum(wi * (b.double() @ a.double()) for wi, a, b in zip(w, a_list, b_list, strict=True))
            rank = a_list[0].shape[0]
            if refactor == "svd":
                u, s, vh = torch.linalg.svd(prod, full_matrices=False)
                root = s[:rank].sqrt()
                out[kb] = (u[:, :rank] * root).to(b_list[0].dtype)
                out[ka] = (root[:, None] * vh[:rank]).to(a_list[0].dtype)
            else:
                kd = layer + BASE_DELTA_SUFFIX
                old = sum(wi * s[kd].double() for wi, s in zip(w, states, strict=True)) if kd in keys else 0.0
                out[kd] = (old + scaling * prod).float()
                out[ka] = init_lora_a(a_list[0].shape, gen).to(a_list[0].dtype)
                out[kb] = torch.zeros_like(b_list[0])
    return {k: out[k] for k in _ordered_keys(keys, layers, merged)}


def _ordered_keys(keys: list[str], layers: list[str], merged: bool) -> list[str]:
    extra = [layer + BASE_DELTA_SUFFIX for layer in layers if merged and layer + BASE_DELTA_SUFFIX not in keys]
    return keys + extra


def with_base_deltas(state: Mapping[str, torch.Tensor]) -> Tensors:
    """``state`` plus a zero ``base_delta`` for every LoRA layer that lacks one (merge mode's form)."""
    out = dict(state)
    for layer in lora_layers(state):
        kd = layer + BASE_DELTA_SUFFIX
        if kd not in out:
            a, b = state[layer + A_SUFFIX], state[layer + B_SUFFIX]
            out[kd] = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float32)
    return out


def _wsum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, wi in zip(tensors, weights, strict=True):
        acc += wi * t.double()
    return acc.to(tensors[0].dtype)


def state_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                   keys: Sequence[str] | None = None) -> float:
    """``|a - b|`` over ``keys`` (default the keys of ``a``)."""
    keys = list(a) if keys is None else keys
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys))


