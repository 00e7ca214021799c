import dataclasses

import pytest
import torch

from cloudedge.engine import LocalEngine, Task, WorkerError, WorkerSpec, check_plain, make_engine
from cloudedge.errors import InputError


class Counter:
    built = 0

    def __init__(self, start: int, weight: torch.Tensor | None = None):
        Counter.built += 1
        self.value = start
        self.weight = weight if weight is not None else torch.zeros(2)

    def add(self, n: int) -> int:
        self.value += n
        return self.value

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        t.mul_(2)  # mutates its argument: must not reach the caller's tensor
        return t

    def keep(self) -> torch.Tensor:
        return self.weight

    def boom(self) -> None:
        raise RuntimeError("disk on fire")

    def leak(self) -> object:
        return object()


@dataclasses.dataclass
class Msg:
    step: int
    grads: dict


def test_lazy_build_state_and_release():
    Counter.built = 0
    eng = LocalEngine()
    eng.register("d0", WorkerSpec(Counter, {"start": 10}))
    eng.register("d1", WorkerSpec(Counter, {"start": 0}))
    assert Counter.built == 0 and eng.live_workers == 0
    assert eng.run([Task("d0", "add", {"n": 1}), Task("d0", "add", {"n": 2})]) == [11, 13]
    assert Counter.built == 1
    eng.release("d0")
    assert eng.call("d0", "add", n=1) == 11  # rebuilt from its spec


def test_no_shared_mutable_tensors():
    eng = LocalEngine()
    eng.register("w", WorkerSpec(Counter, {"start": 0}))
    x = torch.ones(3)
    out = eng.call("w", "scale", t=x)
    assert torch.equal(x, torch.ones(3)) and torch.equal(out, 2 * torch.ones(3))
    kept = eng.call("w", "keep")
    kept.add_(5)
    assert torch.equal(eng.call("w", "keep"), torch.zeros(2))


def test_worker_failure_names_worker():
    eng = LocalEngine()
    eng.register("edge0/dev3", WorkerSpec(Counter, {"start": 0}))
    with pytest.raises(WorkerError, match=r"edge0/dev3\.boom.*disk on fire"):
        eng.call("edge0/dev3", "boom")
    res = eng.run_tolerant([Task("edge0/dev3", "add", {"n": 1}), Task("edge0/dev3", "boom")])
    assert res[0] == 1 and isinstance(res[1], WorkerError)


def test_only_plain_data_crosses():
    eng = LocalEngine()
    eng.register("w", WorkerSpec(Counter, {"start": 0}))
    with pytest.raises(TypeError, match="not plain data"):
        eng.call("w", "leak")
    with pytest.raises(TypeError):
        eng.register("x", WorkerSpec(Counter, {"start": object()}))
    check_plain(Msg(1, {"a": torch.zeros(1), "b": [1.0, "x"]}))
    with pytest.raises(KeyError):
        eng.call("nobody", "add", n=1)


def test_make_engine():
    assert isinstance(make_engine("local"), LocalEngine)
    with pytest.raises(InputError, match="unknown engine"):
        make_engine("mpi")
