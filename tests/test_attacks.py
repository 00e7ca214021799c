import math

import pytest
import torch

from cloudedge.aggregate import global_norm
from cloudedge.attacks import ATTACKS, apply_attack, choose_attackers
from cloudedge.errors import InputError


def delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(50, 20, generator=g), "b": torch.randn(20, generator=g),
            "count": torch.tensor([4], dtype=torch.int64)}


def test_signflip_and_scaled():
    d = delta()
    flipped = apply_attack("signflip", d)
    torch.testing.assert_close(flipped["w"], -d["w"])
    torch.testing.assert_close(apply_attack("signflip", d, scale=3.0)["b"], -3.0 * d["b"])
    torch.testing.assert_close(apply_attack("scaled", d)["w"], 10.0 * d["w"])
    torch.testing.assert_close(apply_attack("scaled", d, scale=0.5)["w"], 0.5 * d["w"])
    assert torch.equal(flipped["count"], d["count"])  # integer keys untouched
    assert torch.equal(d["w"], delta()["w"])  # input not modified


def test_random_matches_honest_norm_and_is_seeded():
    d = delta()
    floats = {k: v for k, v in d.items() if v.is_floating_point()}
    r1 = apply_attack("random", d, seed=7)
    r2 = apply_attack("random", d, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1["w"], r2["w"])
    assert global_norm({k: r1[k] for k in floats}) == pytest.approx(global_norm(floats), rel=1e-5)
    # Direction unrelated to the honest one: cosine near 0 for 1020 coordinates.
    cos = (r1["w"] * d["w"]).sum() / (r1["w"].norm() * d["w"].norm())
    assert abs(float(cos)) < 0.15
    assert not torch.equal(apply_attack("random", d, seed=8)["w"], r1["w"])


def test_random_with_std():
    big = {"w": torch.zeros(200, 200)}
    r = apply_attack("random", big, seed=0, std=0.3)["w"]
    assert float(r.std()) == pytest.approx(0.3, rel=0.02) and abs(float(r.mean())) < 0.01


def test_nan_attack():
    d = delta()
    bad = apply_attack("nan", d)
    assert torch.isnan(bad["w"]).all() and torch.isnan(bad["b"]).all() and torch.equal(bad["count"], d["count"])
    assert torch.isinf(apply_attack("nan", d, value=-math.inf)["w"]).all()


def test_bad_attack_names_and_options():
    d = delta()
    with pytest.raises(InputError, match="unknown attack 'flip'"):
        apply_attack("flip", d)
    with pytest.raises(InputError, match="attack 'scaled': std: not a parameter of attack 'scaled' .known: scale."):
        apply_attack("scaled", d, std=1.0)
    with pytest.raises(InputError, match="attack 'scaled': scale: Input should be greater than 0"):
        apply_attack("scaled", d, scale=-1.0)
    with pytest.raises(InputError, match="NaN or"):
        apply_attack("nan", d, value=1.0)
    with pytest.raises(ValueError, match="generator or a seed"):
        apply_attack("random", d)
    assert set(ATTACKS) == {"signflip", "scaled", "random", "nan"}


def test_choose_attackers():
    ids = [f"edge{e}/dev{i}" for e in range(3) for i in range(10)]
    picked = choose_attackers(ids, 0.2, seed=1)
    assert len(picked) == 6 and len(set(picked)) == 6 and set(picked) <= set(ids)
    assert picked == sorted(picked, key=ids.index)  # in the clients' order
    assert choose_attackers(ids, 0.2, seed=1) == picked
    assert choose_attackers(ids, 0.2, seed=2) != picked
    assert choose_attackers(ids, 0.0, seed=1) == [] and choose_attackers(ids, 1.0, seed=1) == ids
    assert len(choose_attackers(list(range(5)), 0.5, seed=0)) == 3  # 2.5 rounds half up
    with pytest.raises(InputError, match="attack.fraction"):
        choose_attackers(ids, 1.5, seed=0)


def test_the_config_names_the_attack_with_its_knobs() -> None:
    from cloudedge.config import config_from_dict
    from cloudedge.finetune.stage import attack_settings

    def load(attack: dict) -> object:
        return config_from_dict({"name": "x", "finetune": {"attack": attack}}, source="c.yaml")

    cfg = load({"kind": {"name": "signflip", "scale": 4.0}, "fraction": 0.3})
    assert attack_settings(cfg.finetune.attack) == {"kind": "signflip", "scale": 4.0, "fraction": 0.3, "seed": 0}
    assert attack_settings(load({"kind": "nan"}).finetune.attack) == {"kind": "nan", "fraction": 0.2, "seed": 0}
    with pytest.raises(InputError, match=r"c.yaml: finetune.attack.kind: std: not a parameter of attack 'scaled'"):
        load({"kind": {"name": "scaled", "std": 1.0}})
    with pytest.raises(InputError, match=r"c.yaml: finetune.attack: 'scale' is no longer a key here: give it with "
                                         r"the attack, e.g. kind: \{name: scaled, scale: 10\}"):
        load({"kind": "scaled", "scale": 10.0})
