"""The pydocs corpus walker: run alone in a clean interpreter (``python -I -S pydocs_walk.py``).

Reading docstrings means importing the standard library's modules, and what a module holds after
import depends on what the process did before (pytest patches modules, torch imports and
replaces some, a host swaps ``sys`` hooks). So cloudedge never walks its own process: it runs
this file, which imports nothing outside the standard library, in a fresh isolated interpreter
(no site-packages, no user site, no PYTHONPATH) and reads the corpus as JSON from its output.
The corpus is then a function of the Python installation alone.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from typing import Any

PYDOC_TOPICS_DOMAIN = "pydoc_data"

# Modules never imported: side effects on import (opening a browser, printing, starting a GUI or
# a REPL), GUI toolkits, test suites, and the codec zoo (hundreds of near-identical docstrings).
_SKIP_MODULES = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "lib2to3",
        "distutils",  # deprecated; setuptools may swap in its own copy, so the corpus would vary
        "pydoc_data",  # read separately below (it is data, not code)
    }
)
_SKIP_SUBMODULE_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
# Packages whose submodules are not walked (the package docstring is kept).
_NO_SUBMODULES = frozenset({"encodings"})


def _stdlib_top_level_names() -> list[str]:
    names = getattr(sys, "stdlib_module_names", frozenset())
    return sorted(n for n in names if not n.startswith("_") and n not in _SKIP_MODULES)


def _quiet_import(name: str) -> Any | None:
    """Import a module with warnings and stdout/stderr silenced; ``None`` when it fails."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any module that fails to import here is simply not in the corpus
            return None


def _module_names_to_walk() -> list[str]:
    """Top-level stdlib modules in sorted order, each followed by its public submodules (sorted)."""
    out: list[str] = []
    for top in _stdlib_top_level_names():
        module = _quiet_import(top)
        if module is None:
            continue
        out.append(top)
        path = getattr(module, "__path__", None)
        if path is None or top in _NO_SUBMODULES:
            continue
        # Sorted, so the corpus order does not depend on the filesystem's listing order.
        for info in sorted(pkgutil.walk_packages(path, prefix=top + ".", onerror=lambda _n: None), key=lambda i: i.name):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in _SKIP_SUBMODULE_PARTS for p in parts[1:]):
                continue
            out.append(info.name)
    return out


def _clean_doc(obj: Any) -> str | None:
    # obj.__doc__ rather than inspect.getdoc: getdoc inherits a base class's docstring, which would
    # repeat e.g. "Return str(self)." hundreds of times under unrelated modules.
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc).strip()
    return doc or None


def _public_members(obj: Any) -> list[tuple[str, Any]]:
    try:
        items = list(vars(obj).items())
    except TypeError:
        return []
    return sorted((k, v) for k, v in items if not k.startswith("_"))


def _docs_of_module(module_name: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) pairs: the module, its classes and their members, its functions."""
    module = _quiet_import(module_name)
    if module is None:
        return []
    out: list[tuple[str, str]] = []
    doc = _clean_doc(module)
    if doc:
        out.append((module_name, doc))
    for name, obj in _public_members(module):
        # Keep only objects defined here, so re-exports are not counted twice.
        if getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj):
            doc = _clean_doc(obj)
            if doc:
                out.append((f"{module_name}.{name}", doc))
            for member_name, member in _public_members(obj):
                target = member.fget if isinstance(member, property) else member
                if isinstance(target, (staticmethod, classmethod)):
                    target = target.__func__
                if not (inspect.isroutine(target) or isinstance(member, property)):
                    continue
                doc = _clean_doc(target)
                if doc:
                    out.append((f"{module_name}.{name}.{member_name}", doc))
        elif inspect.isroutine(obj):
            doc = _clean_doc(obj)
            if doc:
                out.append((f"{module_name}.{name}", doc))
    return out


def _pydoc_topics() -> list[tuple[str, str]]:
    module = _quiet_import("pydoc_data.topics")
    topics = getattr(module, "topics", None) if module is not None else None
    if not isinstance(topics, dict):
        return []
    return [(f"{PYDOC_TOPICS_DOMAIN}.{k}", str(v).strip()) for k, v in sorted(topics.items()) if str(v).strip()]


def build_corpus() -> list[tuple[str, str, str]]:
    """All (domain, qualified name, text) docs in corpus order; identical texts kept once (first wins)."""
    seen: set[str] = set()
    rows: list[tuple[str, str, str]] = []
    # Reading some attributes warns (deprecated aliases such as typing.io); that is not news here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module_docs = [(m, _docs_of_module(m)) for m in _module_names_to_walk()]
    for module_name, docs in module_docs:
        domain = module_name.split(".")[0]
        for qualname, text in docs:
            if text not in seen:
                seen.add(text)
                rows.append((domain, qualname, text))
    for qualname, text in _pydoc_topics():
        if text not in seen:
            seen.add(text)
            rows.append((PYDOC_TOPICS_DOMAIN, qualname, text))
    return rows



if __name__ == "__main__":
    json.dump(build_corpus(), sys.stdout)
