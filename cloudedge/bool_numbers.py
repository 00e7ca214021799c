"""Booleans given for numbers: pydantic's lax mode reads true/false as 1/0 for an int or a float,
so `global_batch: true` would run with batch 1. YAML spells booleans in so many ways (yes, on,
True) that one is never meant as a number. Config sections (``StrictModel``) and plug-in knobs
(``registry.Params``) both refuse them with :func:`refuse_bool_numbers`."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic_core import PydanticCustomError

# The pydantic error type of a boolean given for a number; formatters put ``ctx["field"]`` into
# the error's location.
BOOL_FOR_NUMBER = "bool_for_number"


def refuse_bool_numbers(model: Any, data: Any) -> Any:
    """A ``mode="before"`` model validator: ``data`` unchanged, or a :data:`BOOL_FOR_NUMBER` error
    naming the first field (or list / dict item) of ``model`` given a boolean for a number."""
    if isinstance(data, dict):
        for name, field in model.model_fields.items():
            found = _bool_for_number(data[name], field.annotation) if name in data else None
            if found is not None:
                where, flag = found
                raise PydanticCustomError(BOOL_FOR_NUMBER, "{field}: expected a number, got a boolean ({flag})",
                                          {"field": f"{name}{where}", "flag": str(flag).lower()})
    return data


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _takes_bool(tp: Any) -> bool:
    if get_origin(tp) is Annotated:
        return _takes_bool(get_args(tp)[0])
    if _is_union(tp):
        return any(_takes_bool(arm) for arm in get_args(tp))
    return tp is bool or tp is Any


def _numeric(tp: Any) -> bool:
    """Whether ``tp`` would read a boolean as a number: it takes int or float but not bool (a
    ``Literal`` of numbers too: ``Literal[1, 3]`` reads ``true`` as 1)."""
    if get_origin(tp) is Annotated:
        return _numeric(get_args(tp)[0])
    if get_origin(tp) is Literal:
        return any(isinstance(a, int | float) and not isinstance(a, bool) for a in get_args(tp)) and \
            not any(isinstance(a, bool) for a in get_args(tp))
    if _is_union(tp):
        return not _takes_bool(tp) and any(_numeric(arm) for arm in get_args(tp))
    return tp in (int, float)


def _bool_for_number(value: Any, tp: Any) -> tuple[str, bool] | None:
    """A boolean in ``value`` that type ``tp`` would read as a number, and where: ``""`` for the
    value itself, ``".2"`` for an item of a list or a dict. None when there is none."""
    if isinstance(value, bool):
        return ("", value) if _numeric(tp) else None
    if get_origin(tp) is Annotated:
        return _bool_for_number(value, get_args(tp)[0])
    if _is_union(tp):
        arms = [arm for arm in get_args(tp) if arm is not type(None)]
        return _bool_for_number(value, arms[0]) if len(arms) == 1 else None
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(value, list) and origin in (list, tuple, set, frozenset) and args:
        # tuple[int, float] types each position; list[int] and tuple[int, ...] every item alike.
        per_position = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        items = zip(value, args, strict=False) if per_position else ((item, args[0]) for item in value)
        for i, (item, item_tp) in enumerate(items):
            if isinstance(item, bool) and _numeric(item_tp):
                return f".{i}", item
    if isinstance(value, dict) and origin is dict and len(args) == 2:
        for key, item in value.items():
            if isinstance(item, bool) and _numeric(args[1]):
                return f".{key}", item
    return None
