"""Configuration: YAML files validated by pydantic models, one file per section.

`load_config(path)` is the one entry point that reads user configs. Every problem becomes an
`InputError` naming the file, the field path and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cloudedge.config.adapt import AdaptConfig
from cloudedge.config.base import BOOL_FOR_NUMBER
from cloudedge.config.data import DataConfig, PartitionConfig
from cloudedge.config.finetune import FinetuneConfig
from cloudedge.config.fleet import DeviceGroup, EdgeSpec, FleetConfig
from cloudedge.config.model import ModelConfig
from cloudedge.config.pretrain import PretrainConfig
from cloudedge.config.profiles import check_fleet_profiles
from cloudedge.config.run import EngineConfig, RunConfig
from cloudedge.config.track import TrackConfig
from cloudedge.errors import InputError, shown_input

__all__ = [
    "AdaptConfig", "DataConfig", "DeviceGroup", "EdgeSpec", "EngineConfig", "FinetuneConfig",
    "FleetConfig", "ModelConfig", "PartitionConfig", "PretrainConfig", "RunConfig", "TrackConfig",
    "format_validation_error", "load_config", "config_from_dict", "dump_config", "with_overrides",
]


def format_validation_error(err: ValidationError, source: str) -> str:
    """First problem of a pydantic error as `source: a.b.0.c: what was expected (got X)`. Our own
    validators (a ``value_error``) say what they got in their message, so nothing is appended."""
    first = err.errors()[0]
    path = [str(p) for p in first["loc"]]
    msg = first["msg"]
    if first["type"] == BOOL_FOR_NUMBER:
        # Raised by the section for one of its fields: the field belongs in the location.
        path.append(first["ctx"]["field"])
        msg = msg.removeprefix(f"{first['ctx']['field']}: ")
    loc = ".".join(path) or "(top level)"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    shown = "" if first["type"] in ("value_error", BOOL_FOR_NUMBER) else shown_input(first.get("input"))
    more = len(err.errors()) - 1
    tail = f" [+{more} more]" if more > 0 else ""
    return f"{source}: {loc}: {msg}{shown}{tail}"


def config_from_dict(raw: dict[str, Any], source: str = "<config>", base_dir: str | Path = ".") -> RunConfig:
    if not isinstance(raw, dict):
        raise InputError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = {**raw, "base_dir": str(Path(base_dir).resolve())}
    plugins = raw.get("plugins") or []
    if not (isinstance(plugins, list) and all(isinstance(p, str) for p in plugins)):
        raise InputError(f"{source}: plugins: expected a list of module names or .py files")
    # Plug-ins register their names before any field that names them is validated.
    from cloudedge.registry import load_plugins

    try:
        load_plugins(plugins, raw["base_dir"])
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    # Plug-in files as absolute paths, so the config a run directory keeps loads from anywhere.
    raw["plugins"] = [str(Path(raw["base_dir"]) / p) if p.endswith(".py") and not Path(p).is_absolute() else p
                      for p in plugins]
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise InputError(format_validation_error(err, source)) from None
    _check_names(cfg, source)
    _resolve_fleet_files(cfg)
    return cfg


def _resolve_fleet_files(cfg: RunConfig) -> None:
    """Trace and speed files named relative to the config resolve against its directory."""
    for spec in (cfg.fleet.availability, cfg.fleet.speed):
        if spec is not None and spec.path and not Path(spec.path).is_absolute():
            spec.path = str(Path(cfg.base_dir) / spec.path)


def _check_names(cfg: RunConfig, source: str) -> None:
    """Names that only the profile table knows; checked here so the error names the field."""
    check_fleet_profiles(cfg.fleet, source)


def with_overrides(section: Any, overrides: dict[str, Any], label: str) -> Any:
    """A copy of a config section with ``overrides`` applied and validated (API keyword overrides).

    A bad override is an InputError naming ``label`` and the field, like a bad config file.
    """
    if not overrides:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **overrides})
    except ValidationError as err:
        raise InputError(format_validation_error(err, f"{label} overrides")) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: plain YAML keeps the last one
    silently, so `rounds: 6` followed by `rounds: 9` would run 9 rounds with nobody told."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            # Keys a merge (`<<: *base`) brings in may be overridden here: that is what merges are for.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if seen:
                raise _DuplicateKey(key, line, first_line[key])
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except _DuplicateKey as err:
        raise InputError(f"{path}: line {err.line}: duplicate key '{err.key}' (first given on line "
                         f"{err.first_line}); give each key once") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if raw is None:
        raise InputError(f"{path}: the file is empty")
    return config_from_dict(raw, source=str(path), base_dir=path.parent)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run directory keeps)."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    return yaml.safe_dump(data, sort_keys=False)
