"""Engines: how a coordinator reaches workers (in-process, or Ray actors)."""

from cloudedge.engine.base import Engine, Task, WorkerError, WorkerSpec, check_plain, copy_plain
from cloudedge.engine.local import LocalEngine

__all__ = ["Engine", "LocalEngine", "Task", "WorkerError", "WorkerSpec", "check_plain", "copy_plain", "make_engine"]


def make_engine(kind: str = "local", address: str | None = None) -> Engine:
    """The engine a config or CLI flag names."""
    if kind == "local":
        return LocalEngine()
    if kind == "ray":
        from cloudedge.engine.ray import RayEngine  # optional extra: cloudedge[ray]

        return RayEngine(address=address)
    from cloudedge.errors import InputError

    raise InputError(f"engine.kind: unknown engine {kind!r} (known: local, ray)")
