"""Hostile client updates for the robustness benchmark (and for testing the update gate).

Each attack turns the honest delta a compromised client computed into what it sends instead. Only
floating tensors are attacked; integer/bool keys are sent unchanged (copied).

- ``signflip``: ``-scale * delta`` (scale 1: the plain sign flip; larger pushes harder uphill).
- ``scaled``: ``scale * delta`` (default 10: a boosted update that dominates a mean).
- ``random``: Gaussian noise with the honest update's global L2 norm (so a norm rule cannot tell it
  apart), or i.i.d. ``N(0, std^2)`` entries when ``std`` is given.
- ``nan``: every floating entry set to ``value`` (NaN by default; inf works too): a crashed or
  corrupted client, which the gate must reject.

Each registers in :data:`ATTACKS` with its parameter model (a config says ``kind: scaled`` or
``kind: {name: scaled, scale: 10}``). ``apply_attack(name, delta, generator=..., seed=..., **kw)``
dispatches by name;
``choose_attackers(client_ids, fraction, seed)`` picks who is hostile.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field, field_validator

from cloudedge.aggregate import global_norm
from cloudedge.errors import InputError
from cloudedge.registry import Params, Registry

Tensors = dict[str, torch.Tensor]


def _map_floats(delta: Mapping[str, torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> Tensors:
    return {k: fn(v.detach()) if v.dtype.is_floating_point else v.detach().clone() for k, v in delta.items()}


ATTACKS: Registry[Callable[..., Tensors]] = Registry("attack")


class SignflipParams(Params):
    scale: float = Field(default=1.0, gt=0, description="1: the plain sign flip; larger pushes harder uphill")


class ScaledParams(Params):
    scale: float = Field(default=10.0, gt=0, description="boost of the honest update")


class RandomParams(Params):
    std: float | None = Field(default=None, gt=0, description="entry std; null: the honest update's global norm")


class NanParams(Params):
    model_config = ConfigDict(allow_inf_nan=True)
    value: float = Field(default=math.nan, description="NaN, or +-inf")

    @field_validator("value")
    @classmethod
    def _not_finite(cls, value: float) -> float:
        if math.isfinite(value):
            raise ValueError(f"must be NaN or +-inf, got {value}")
        return value


@ATTACKS.register("signflip", SignflipParams)
def signflip(delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> Tensors:
    """``-scale * delta``."""
    return _map_floats(delta, lambda t: t * (-float(scale)))


@ATTACKS.register("scaled", ScaledParams)
def scaled(delta: Mapping[str, torch.Tensor], scale: float = 10.0) -> Tensors:
    """``scale * delta``."""
    return _map_floats(delta, lambda t: t * float(scale))


@ATTACKS.register("random", RandomParams)
def random_update(delta: Mapping[str, torch.Tensor], generator: torch.Generator,
                  std: float | None = None) -> Tensors:
    """Gaussian noise shaped like ``delta``: rescaled to ``delta``'s global norm, or with entry std
    ``std``. Draws from ``generator`` key by key in ``delta``'s order (deterministic)."""
    noise = _map_floats(delta, lambda t: torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype))
    if std is not None:
        floats = [t for t in noise.values() if t.dtype.is_floating_point]
        torch._foreach_mul_(floats, float(std))
        return noise
    target = global_norm({k: v for k, v in delta.items() if v.dtype.is_floating_point})
    current = global_norm({k: v for k, v in noise.items() if v.dtype.is_floating_point})
    if current > 0:
        floats = [t for t in noise.values() if t.dtype.is_floating_point]
        torch._foreach_mul_(floats, target / current)
    return noise


@ATTACKS.register("nan", NanParams)
def nan_update(delta: Mapping[str, torch.Tensor], value: float = math.nan) -> Tensors:
    """Every floating entry replaced by ``value`` (NaN, or +-inf)."""
    return _map_floats(delta, lambda t: torch.full_like(t, float(value)))


def apply_attack(name: str, delta: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                 seed: int | None = None, **kw: Any) -> Tensors:
    """What a hostile client sends instead of ``delta`` under attack ``name`` with its knobs ``kw``.

    Randomized attacks (those taking a ``generator``) draw from ``generator``, else from a fresh
    generator seeded with ``seed`` (one of the two is then required). Unknown names/knobs and
    out-of-range values (they come from config) raise :class:`InputError`. ``delta`` is not modified.
    """
    if name not in ATTACKS:
        raise InputError(f"attack: unknown attack {name!r} (known: {', '.join(ATTACKS)})")
    try:
        params = ATTACKS.validate_params(name, kw)
    except ValueError as err:
        raise InputError(f"attack '{name}': {err}") from None
    fn = ATTACKS.get(name)
    knobs = {k: getattr(params, k) for k in type(params).model_fields}
    if "generator" not in inspect.signature(fn).parameters:
        return fn(delta, **knobs)
    if generator is None:
        if seed is None:
            raise ValueError(f"apply_attack('{name}'): pass a generator or a seed")
        generator = torch.Generator().manual_seed(int(seed))
    return fn(delta, generator=generator, **knobs)


def choose_attackers(client_ids: Sequence[Hashable], fraction: float, seed: int) -> list[Hashable]:
    """``floor(fraction * n + 1/2)`` distinct clients chosen uniformly with ``seed``, in the order of
    ``client_ids`` (the same ids, fraction and seed always give the same attackers)."""
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise InputError(f"attack.fraction: must be in [0, 1], got {fraction}")
    ids = list(client_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("choose_attackers: client ids must be distinct")
    count = int(math.floor(fraction * len(ids) + 0.5))  # half up, not Python's half-even
    picked = np.random.default_rng(seed).choice(len(ids), size=count, replace=False)
    return [ids[i] for i in sorted(picked.tolist())]
