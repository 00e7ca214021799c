"""Shared pieces of the config models."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from cloudedge.bool_numbers import BOOL_FOR_NUMBER, refuse_bool_numbers

__all__ = ["BOOL_FOR_NUMBER", "StrictModel"]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    # inf/nan are never a meaningful setting: reject them at the field that holds them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    # Keys a section no longer has -> where their setting went (an old config gets told, not just
    # "extra inputs are not permitted").
    moved_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, where in cls.moved_keys.items():
                if key in data:
                    raise ValueError(f"'{key}' is no longer a key here: {where}")
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_bool_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)
