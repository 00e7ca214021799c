"""Plug-ins by name, each with its own pydantic parameter model: the one registry mechanism.

Every family of interchangeable parts (batch controllers, pre-training algorithms, objectives, sync
policies, LoRA aggregation modes, aggregators, attacks, test-time methods, benchmarks) is a
:class:`Registry`. A plug-in registers under a name together with a :class:`Params` model that
holds its knobs, their defaults and their ranges, in one place::

    CONTROLLERS = Registry("batch controller")

    class GoodputParams(Params):
        lr_power: float = Field(default=0.5, ge=0.0, le=1.0)

    @CONTROLLERS.register("goodput", GoodputParams)
    class GoodputController(BatchController): ...

A config names a plug-in either bare (``controller: goodput``) or as a mapping with ``name`` and
the parameters (``controller: {name: goodput, lr_power: 0.5}``). A config field of type
``plugin_choice(ref)`` parses either form into a :class:`Choice` (name + validated parameters) when
the config loads, so a misspelt name or knob fails at load time with the field path, the wrong key
and the known names. ``ref`` is ``"module:ATTRIBUTE"``: the registry is imported only when a
config is validated, so ``cloudedge.config`` stays free of torch imports.

Plug-ins outside the package register the same way; a config's top-level ``plugins:`` lists the
modules (dotted names, or ``.py`` files relative to the config) to import before validation
(:func:`load_plugins`).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from cloudedge.bool_numbers import BOOL_FOR_NUMBER, refuse_bool_numbers
from cloudedge.errors import InputError, shown_input

T = TypeVar("T")


class Params(BaseModel):
    """A plug-in's parameters: unknown keys are errors, inf/nan and booleans for numbers rejected,
    frozen once built."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_bool_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)


class Choice(BaseModel):
    """A named plug-in with its validated parameters, as a config holds it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    params: Params

    def kwargs(self) -> dict[str, Any]:
        """The parameters as keyword arguments (only the plug-in's own fields)."""
        return {k: getattr(self.params, k) for k in type(self.params).model_fields}

    def changed(self) -> dict[str, Any]:
        """The parameters set away from their defaults (NaN counts as equal to a NaN default)."""
        out: dict[str, Any] = {}
        for key, field in type(self.params).model_fields.items():
            value, default = getattr(self.params, key), field.get_default(call_default_factory=True)
            same = value == default or (isinstance(value, float) and isinstance(default, float)
                                        and math.isnan(value) and math.isnan(default))
            if not same:
                out[key] = value
        return out

    def as_config(self) -> str | dict[str, Any]:
        """What a config file would say: the bare name when every parameter is at its default."""
        return {"name": self.name, **self.params.model_dump()} if self.changed() else self.name


class Registry(Generic[T]):
    """Named plug-ins of one family, each with its :class:`Params` model."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, tuple[T, type[Params]]] = {}

    def register(self, name: str, params: type[Params] = Params) -> Callable[[T], T]:
        """Decorator: register a class or factory under ``name`` with its parameter model."""
        if not (isinstance(params, type) and issubclass(params, Params)):
            raise TypeError(f"{self.family} {name!r}: params must be a subclass of cloudedge.registry.Params")

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name][0] is not obj:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._entries[name] = (obj, params)
            if isinstance(obj, type):
                # A class knows the name it is registered under (a subclass of a built-in would
                # otherwise look up its knobs, and label its rows, under its parent's name).
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return add

    def add(self, name: str, obj: T, params: type[Params] = Params) -> T:
        """Register ``obj`` (not as a decorator)."""
        return self.register(name, params)(obj)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> T:
        """The registered class or factory; an unknown name is an InputError listing the known ones."""
        return self._entry(name)[0]

    def params_model(self, name: str) -> type[Params]:
        return self._entry(name)[1]

    def _entry(self, name: str) -> tuple[T, type[Params]]:
        try:
            return self._entries[name]
        except KeyError:
            raise InputError(f"unknown {self.family} {name!r} (known: {', '.join(self._entries)})") from None

    def choice(self, value: Any) -> Choice:
        """Parse a bare name, a ``{name: ..., **params}`` mapping or a :class:`Choice`.

        Errors are ValueErrors whose text names the bad key and the known names (pydantic adds the
        field path in front when this runs inside a config model).
        """
        if isinstance(value, Choice):
            value = {"name": value.name, **value.kwargs()}
        if isinstance(value, str):
            name, raw = value, {}
        elif isinstance(value, dict):
            if "name" not in value:
                raise ValueError(f"give the {self.family} as a name or a mapping with 'name' "
                                 f"(known: {', '.join(self._entries)})")
            raw = dict(value)
            name = raw.pop("name")
        else:
            raise ValueError(f"expected a {self.family} name or a mapping with 'name', got {type(value).__name__} "
                             f"{value!r}")
        if name not in self._entries:
            raise ValueError(f"unknown {self.family} {name!r} (known: {', '.join(self._entries)})")
        return Choice(name=name, params=self.validate_params(name, raw))

    def validate_params(self, name: str, raw: dict[str, Any]) -> Params:
        """``raw`` validated by the parameter model of ``name``; a ValueError reads ``key: problem``
        (an unknown key lists the known parameters)."""
        model = self._entry(name)[1]
        try:
            return model.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            if first["type"] == BOOL_FOR_NUMBER:  # raised for the model: it names its own field
                key, msg = first["ctx"]["field"], msg.removeprefix(f"{first['ctx']['field']}: ")
            elif first["type"] == "extra_forbidden":
                known = ", ".join(model.model_fields) or "none"
                msg = f"not a parameter of {self.family} {name!r} (known: {known})"
            if first["type"] not in ("value_error", BOOL_FOR_NUMBER):  # pydantic's own: not what it got
                msg += shown_input(first.get("input"))
            raise ValueError(f"{key}: {msg}" if key else msg) from None  # no key: a rule across knobs

    def build(self, choice: Choice | str | dict[str, Any], *args: Any, **context: Any) -> Any:
        """Instantiate: ``obj(*args, **context, **params)``; a bad choice is an InputError."""
        if not isinstance(choice, Choice):
            try:
                choice = self.choice(choice)
            except ValueError as err:
                raise InputError(str(err)) from None
        return self.get(choice.name)(*args, **context, **choice.kwargs())


def _resolve(ref: str) -> Registry[Any]:
    module, _, attr = ref.partition(":")
    registry = getattr(importlib.import_module(module), attr)
    if not isinstance(registry, Registry):
        raise TypeError(f"{ref} is not a cloudedge.registry.Registry")
    return registry


def plugin_choice(ref: str, optional: bool = False) -> Any:
    """A config field type: a plug-in of the registry at ``ref`` (``"module:ATTR"``), bare or with params.

    Validates into a :class:`Choice`; dumps back to what a config file says (:meth:`Choice.as_config`).
    ``optional``: ``None`` is allowed too (and kept).
    """
    if optional:
        return Annotated[
            Choice | None,
            BeforeValidator(lambda v: None if v is None else _resolve(ref).choice(v)),
            PlainSerializer(lambda c: None if c is None else c.as_config(), return_type=Any),
        ]
    return Annotated[
        Choice,
        Field(validate_default=True),  # a default written as a bare name becomes a Choice too
        BeforeValidator(lambda v: _resolve(ref).choice(v)),
        PlainSerializer(lambda c: c.as_config(), return_type=Any),
    ]


def load_plugins(modules: list[str], base_dir: str | Path = ".") -> None:
    """Import the modules that register a user's plug-ins: dotted names, or ``.py`` paths
    (relative to ``base_dir``). A missing module or one that fails to import is an InputError."""
    for entry, (path, text) in zip(modules, plugin_sources(modules, base_dir), strict=True):
        _load_plugin(entry, path, text)


PluginSource = tuple[str, str | None]


def plugin_sources(modules: list[str], base_dir: str | Path = ".") -> list[PluginSource]:
    """What another process needs to load the same plug-ins (:func:`load_plugin_sources`), as plain
    data: per entry, ``(absolute .py path, its source text)``, read here so that a machine without
    the file can run it, or ``(dotted module name, None)``, which must be installed there."""
    out: list[PluginSource] = []
    for entry in modules:
        if not entry.endswith(".py"):
            out.append((entry, None))
            continue
        path = Path(plugin_key(entry, base_dir))
        if not path.is_file():
            raise InputError(f"plugins: {entry}: file not found")
        try:
            out.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"plugins: {entry}: cannot read ({type(err).__name__}: {err})") from None
    return out


def plugin_key(entry: str, base_dir: str | Path = ".") -> str:
    """What names a plug-in in :func:`plugin_sources`: a file's resolved path, a module's name."""
    if not entry.endswith(".py"):
        return entry
    path = Path(entry)
    return str((path if path.is_absolute() else Path(base_dir) / path).resolve())


def plugin_module_name(path: str) -> str:
    """The module name a plug-in file is loaded under: the same in every process and on every
    machine for the same path (a digest, not ``hash()``, which differs between processes), so a
    plug-in class pickled by reference on one side is found on the other."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    return f"cloudedge_plugin_{Path(path).stem}_{digest}"


def load_plugin_sources(sources: list[PluginSource]) -> None:
    """Import plug-ins from :func:`plugin_sources`' data; each at most once per process."""
    for entry, text in sources:
        _load_plugin(entry, entry, text)


def _load_plugin(label: str, entry: str, text: str | None) -> None:
    """Import one plug-in (a module name, or a file's ``entry`` path and ``text``); errors name ``label``."""
    try:
        if text is None:
            importlib.import_module(entry)
            return
        name = plugin_module_name(entry)
        if name in sys.modules:
            return
        module = types.ModuleType(name)
        module.__file__ = entry
        sys.modules[name] = module
        try:
            exec(compile(text, entry, "exec", dont_inherit=True), module.__dict__)  # noqa: S102 - the user's plug-in
        except BaseException:
            sys.modules.pop(name, None)
            raise
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any import failure is the user's plug-in: name it
        raise InputError(f"plugins: {label}: could not import ({type(err).__name__}: {err})") from None
