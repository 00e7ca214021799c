import json
import os
import stat

import pytest
import torch

from cloudedge.checkpoint import (
    atomic_write_text,
    check_state_dict,
    load_latest,
    load_tensors,
    save_checkpoint,
)
from cloudedge.errors import InputError


def test_round_trip_and_latest(tmp_path):
    assert load_latest(tmp_path) is None
    t = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)[1:]}  # a view: saved as its own tensor
    save_checkpoint(tmp_path, 1, t, {"round": 1, "rng": [1, 2]})
    save_checkpoint(tmp_path, 2, {k: v * 2 for k, v in t.items()}, {"round": 2})
    tensors, state = load_latest(tmp_path)
    assert state["round"] == 2 and state["step"] == 2
    assert torch.equal(tensors["w"], 2 * t["w"]) and tensors["b"].shape == (2,)


def test_keeps_last_k(tmp_path):
    for s in range(5):
        save_checkpoint(tmp_path, s, {"x": torch.tensor([float(s)])}, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["step-000003.safetensors", "step-000004.safetensors"]


def test_interrupted_write_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)}, {"round": 1})
    import cloudedge.checkpoint as ck

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(2)}, {"round": 2})
    tensors, state = load_latest(tmp_path)
    assert state["round"] == 1 and torch.equal(tensors["x"], torch.ones(2))
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_truncated_and_foreign_files(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(100)}, {})
    f = tmp_path / "step-000001.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(InputError, match="step-000001.safetensors"):
        load_latest(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(InputError, match="bad.safetensors"):
        load_tensors(tmp_path / "bad.safetensors")
    (tmp_path / "step-000001.json").write_text("{oops")
    save_checkpoint(tmp_path, 1, {"x": torch.ones(1)}, {})
    assert json.loads((tmp_path / "step-000001.json").read_text())["step"] == 1


def test_check_state_dict():
    model = torch.nn.Linear(3, 2)
    good = {f"m.{k}": v for k, v in model.state_dict().items()}
    assert set(check_state_dict(good, model, "ck", prefix="m.")) == {"weight", "bias"}
    with pytest.raises(InputError, match="missing key 'm.bias'"):
        check_state_dict({"m.weight": model.weight}, model, "ck", prefix="m.")
    with pytest.raises(InputError, match=r"'weight' has shape \(4, 3\)"):
        check_state_dict({"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}, model, "ck")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_atomic_writes_get_the_mode_a_plain_write_gets(tmp_path, umask):
    old = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        save_checkpoint(tmp_path, 1, {"x": torch.ones(1)}, {})
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == expected
    for name in ("config.yaml", "step-000001.safetensors", "step-000001.json", "latest"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
