"""Engines: how a coordinator reaches workers (in-process, or Ray actors)."""

from collections.abc import Iterator
from contextlib import contextmanager

from cloudedge.engine.base import Engine, Task, WorkerError, WorkerSpec, check_plain, copy_plain, to_host
from cloudedge.engine.local import LocalEngine

__all__ = ["configure_threads", "torch_threads", "Engine", "LocalEngine", "Task", "WorkerError", "WorkerSpec", "check_plain", "copy_plain", "make_engine", "to_host"]


def make_engine(kind: str = "local", address: str | None = None, threads: int | None = None) -> Engine:
    """The engine a config or CLI flag names; ``threads`` is torch's thread count in Ray's actors."""
    if kind == "local":
        return LocalEngine()
    if kind == "ray":
        from cloudedge.engine.ray import RayEngine  # optional extra: cloudedge[ray]

        return RayEngine(address=address, torch_threads=threads or 1)
    from cloudedge.errors import InputError

    raise InputError(f"engine.kind: unknown engine {kind!r} (known: local, ray)")


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for this process and return the number set.

    ``None`` picks 1 on machines with 2 or fewer cores: the simulated workers run small ops, and on
    such a host a second intra-op thread mostly waits to be scheduled (measured in
    docs/performance.md: 0.45x throughput with 2 threads on a loaded 2-core machine, 0.97x with 1).
    """
    import os

    import torch

    if threads is None:
        threads = 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """torch's intra-op threads set to ``threads`` inside the block and restored after it.

    For one large job in a process that otherwise keeps one thread (:func:`configure_threads`): the
    glyph CLIP's build is a single model on batches of 64, whose matmuls do use a second core when
    it is free (1.28x for the whole quick build on an idle 2-core machine, docs/performance.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
