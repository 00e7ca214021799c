"""LoRA adapters: which modules get them, the classifier a device trains, and how adapters aggregate.

A device trains only the LoRA factors (``lora_A`` [r, in], ``lora_B`` [out, r], through ``peft``) and
a linear task head; the frozen base never leaves it. The effective weight of an adapted layer is
``W + s * B @ A`` with ``s = lora_alpha / r``.

Averaging A and B separately is not the average of the products ``B @ A``: ``mean(B) mean(A) !=
mean(B A)``. :func:`aggregate_lora` offers three modes, registered in :data:`LORA_MODES` (a config
says ``lora.mode: ffa`` or ``lora.mode: {name: product, refactor: merge}``; docs/finetuning.md,
"LoRA aggregation"):

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
from typing import ClassVar, Literal

import torch
from pydantic import Field

from cloudedge.registry import Params, Registry

Tensors = dict[str, torch.Tensor]

LORA_MODES: Registry[type[LoraMode]] = Registry("LoRA aggregation mode")
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
    """Keys a device sends up: every trained tensor. A mode with a frozen A (``ffa``) never sends A."""
    if mode_class(mode).frozen_a:
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


class LoraMode:
    """How one LoRA layer's factors from several states combine (a config's ``lora.mode``).

    What the fine-tuning loop needs to know about a mode is said here, never by its name:
    ``frozen_a`` (A never changes, so it is never sent), ``refactors`` (aggregation rewrites the
    factors, so no server optimizer, robust aggregator or DP noise applies to them and an update
    from an older model does not apply) and ``merges`` (the product goes into a dense ``base_delta``
    and the factors restart).
    """

    name: ClassVar[str] = "base"
    frozen_a: ClassVar[bool] = False
    refactors: ClassVar[bool] = False
    merges: bool = False

    def describe(self) -> str:
        """The mode as a run's summary names it."""
        return self.name

    def combine(self, layer: str, a_list: list[torch.Tensor], b_list: list[torch.Tensor], w: list[float],
                states: Sequence[Mapping[str, torch.Tensor]], keys: list[str], scaling: float,
                gen: torch.Generator) -> Tensors:
        """The layer's new tensors (its A and B keys; merge: also its ``base_delta``)."""
        raise NotImplementedError


@LORA_MODES.register("fedavg")
class FedAvgMode(LoraMode):
    """Per-tensor weighted mean of A and of B (the common, inexact practice)."""

    name = "fedavg"

    def combine(self, layer, a_list, b_list, w, states, keys, scaling, gen):  # noqa: D102
        return {layer + A_SUFFIX: _wsum(a_list, w), layer + B_SUFFIX: _wsum(b_list, w)}


@LORA_MODES.register("ffa")
class FFAMode(LoraMode):
    """A frozen at its shared initialisation, only B averaged: exact, half the bytes up."""

    name = "ffa"
    frozen_a = True

    def combine(self, layer, a_list, b_list, w, states, keys, scaling, gen):  # noqa: D102
        ka = layer + A_SUFFIX
        for a in a_list[1:]:
            if not torch.equal(a, a_list[0]):
                raise ValueError(f"ffa: {ka} differs between states (A must stay frozen)")
        return {ka: a_list[0].clone(), layer + B_SUFFIX: _wsum(b_list, w)}


class ProductParams(Params):
    refactor: Literal["svd", "merge"] = Field(
        default="svd", description="svd: best rank-r factors of the mean product; merge: into a dense base_delta")


@LORA_MODES.register("product", ProductParams)
class ProductMode(LoraMode):
    """The exact weighted mean of the products ``B_i A_i``, refactored (svd) or merged."""

    name = "product"
    refactors = True

    def __init__(self, refactor: str):
        self.refactor = ProductParams(refactor=refactor).refactor  # a ValueError names the known ones
        self.merges = refactor == "merge"

    def describe(self) -> str:  # noqa: D102
        return f"{self.name}/{self.refactor}"

    def combine(self, layer, a_list, b_list, w, states, keys, scaling, gen):  # noqa: D102
        ka, kb = layer + A_SUFFIX, layer + B_SUFFIX
        prod = sum(wi * (b.double() @ a.double()) for wi, a, b in zip(w, a_list, b_list, strict=True))
        rank = a_list[0].shape[0]
        if self.refactor == "svd":
            u, s, vh = torch.linalg.svd(prod, full_matrices=False)
            root = s[:rank].sqrt()
            return {kb: (u[:, :rank] * root).to(b_list[0].dtype), ka: (root[:, None] * vh[:rank]).to(a_list[0].dtype)}
        kd = layer + BASE_DELTA_SUFFIX
        old = sum(wi * s[kd].double() for wi, s in zip(w, states, strict=True)) if kd in keys else 0.0
        return {kd: (old + scaling * prod).float(), ka: init_lora_a(a_list[0].shape, gen).to(a_list[0].dtype),
                kb: torch.zeros_like(b_list[0])}


def mode_class(name: str) -> type[LoraMode]:
    """The class registered as ``name`` (its ``frozen_a`` / ``refactors`` need no instance)."""
    if name not in LORA_MODES:
        raise ValueError(f"unknown LoRA aggregation mode {name!r} (known: {tuple(LORA_MODES)})")
    return LORA_MODES.get(name)


def lora_mode(name: str, refactor: str = "svd") -> LoraMode:
    """The mode called ``name``; ``refactor`` applies to the modes that take it (``product``)."""
    cls = mode_class(name)
    takes_refactor = "refactor" in LORA_MODES.params_model(name).model_fields
    return cls(**({"refactor": refactor} if takes_refactor else {}))


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
    how = lora_mode(mode, refactor)
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
    for k in keys:
        if k in lora_keys:
            continue
        if how.merges and k.endswith(BASE_DELTA_SUFFIX):
            continue  # filled below, together with the new products
        out[k] = _wsum([s[k] for s in states], w)
    gen = torch.Generator().manual_seed(int(reinit_seed))
    for layer in layers:
        a_list, b_list = [s[layer + A_SUFFIX] for s in states], [s[layer + B_SUFFIX] for s in states]
        out.update(how.combine(layer, a_list, b_list, w, states, keys, scaling, gen))
    return {k: out[k] for k in _ordered_keys(keys, layers, how.merges)}


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


