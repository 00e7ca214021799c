"""Hostile client updates for the robustness benchmark (and for testing the update gate).

Each attack turns the honest delta a compromised client computed into what it sends instead. Only
floating tensors are attacked; integer/bool keys are sent unchanged (copied).

- ``signflip``: ``-scale * delta`` (scale 1: the plain sign flip; larger pushes harder uphill).
- ``scaled``: ``scale * delta`` (default 10: a boosted update that dominates a mean).
- ``random``: Gaussian noise with the honest update's global L2 norm (so a norm rule cannot tell it
  apart), or i.i.d. ``N(0, std^2)`` entries when ``std`` is given.
- ``nan``: every floating entry set to ``value`` (NaN by default; inf works too): a crashed or
  corrupted client, which the gate must reject.

``apply_attack(name, delta, generator=..., seed=..., **kw)`` dispatches by name;
``choose_attackers(client_ids, fraction, seed)`` picks who is hostile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cloudedge.aggregate import global_norm
from cloudedge.errors import InputError

Tensors = dict[str, torch.Tensor]


def _map_floats(delta: Mapping[str, torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> Tensors:
    return {k: fn(v.detach()) if v.dtype.is_floating_point else v.detach().clone() for k, v in delta.items()}


def signflip(delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> Tensors:
    """``-scale * delta``."""
    return _map_floats(delta, lambda t: t * (-float(scale)))


def scaled(delta: Mapping[str, torch.Tensor], scale: float = 10.0) -> Tensors:
    """``scale * delta``."""
    return _map_floats(delta, lambda t: t * float(scale))


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


def nan_update(delta: Mapping[str, torch.Tensor], value: float = math.nan) -> Tensors:
    """Every floating entry replaced by ``value`` (NaN, or +-inf)."""
    return _map_floats(delta, lambda t: torch.full_like(t, float(value)))


ATTACKS: dict[str, tuple[Callable[..., Tensors], tuple[str, ...], bool]] = {
    # name: (function, options a config may set, whether it draws random numbers)
    "signflip": (signflip, ("scale",), False),
    "scaled": (scaled, ("scale",), False),
    "random": (random_update, ("std",), True),
    "nan": (nan_update, ("value",), False),
}


def apply_attack(name: str, delta: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                 seed: int | None = None, **kw: Any) -> Tensors:
    """What a hostile client sends instead of ``delta`` under attack ``name`` with options ``kw``.

    Randomized attacks draw from ``generator``, else from a fresh generator seeded with ``seed``
    (one of the two is then required). Unknown names/options and out-of-range values (they come
    from config) raise :class:`InputError`. ``delta`` is not modified.
    """
    if name not in ATTACKS:
        raise InputError(f"attack: unknown attack {name!r} (known: {', '.join(ATTACKS)})")
    fn, options, random = ATTACKS[name]
    bad = [k for k in kw if k not in options]
    if bad:
        raise InputError(f"attack '{name}': unknown option '{bad[0]}' (known: {', '.join(options)})")
    for key in ("scale", "std"):
        if key in kw and kw[key] is not None and not (math.isfinite(float(kw[key])) and float(kw[key]) > 0):
            raise InputError(f"attack '{name}': {key} must be a finite number > 0, got {kw[key]}")
    if "value" in kw and math.isfinite(float(kw["value"])):
        raise InputError(f"attack 'nan': value must be NaN or +-inf, got {kw['value']}")
    if not random:
        return fn(delta, **kw)
    if generator is None:
        if seed is None:
            raise ValueError(f"apply_attack('{name}'): pass a generator or a seed")
        generator = torch.Generator().manual_seed(int(seed))
    return fn(delta, generator=generator, **kw)


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
