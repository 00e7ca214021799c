import math

import pytest
import torch

from cloudedge.aggregate import coordinate_median, global_norm, weighted_mean
from cloudedge.attacks import apply_attack
from cloudedge.errors import InputError
from cloudedge.robust import UpdateGate, robust_aggregate

REF = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "steps": torch.zeros((), dtype=torch.int64)}


def honest(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g) * scale, "b": torch.randn(3, generator=g) * scale,
            "steps": torch.tensor(1)}


def honest_round(n: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    return {f"dev{i}": honest(i) for i in range(n)}


def test_each_structural_reason():
    ups = honest_round(5)
    ups["dev0"] = {k: v for k, v in ups["dev0"].items() if k != "b"}
    ups["dev1"] = {**ups["dev1"], "extra": torch.zeros(1)}
    ups["dev2"] = {**ups["dev2"], "w": torch.zeros(3, 4)}
    ups["dev3"] = {**ups["dev3"], "b": torch.tensor([0.0, math.inf, 0.0])}
    ups["dev5"] = {**honest(5), "b": [0.0, 0.0, 0.0]}
    ups["dev6"] = "garbage"
    res = UpdateGate(REF).check(ups)
    assert "missing keys" in res.rejected["dev0"] and "'b'" in res.rejected["dev0"]
    assert "unexpected keys" in res.rejected["dev1"] and "extra" in res.rejected["dev1"]
    assert "shape [3, 4] != expected [4, 3]" in res.rejected["dev2"]
    assert res.rejected["dev3"] == "key 'b': non-finite values"
    assert "not a tensor" in res.rejected["dev5"]
    assert "not a mapping" in res.rejected["dev6"]
    assert list(res.accepted) == ["dev4"]
    assert all("\n" not in line for line in res.log_lines())
    assert res.log_lines()[0].startswith("rejected update from dev0: ")


def test_absolute_cap():
    ups = {"a": honest(0), "b": honest(1, scale=100.0)}
    res = UpdateGate(REF, max_norm=50.0).check(ups)
    assert list(res.accepted) == ["a"] and "> max_norm 50" in res.rejected["b"]


def test_mad_rule_keeps_honest_and_rejects_boosted():
    ups = honest_round(10)
    norms = [global_norm(u) for u in ups.values()]
    ups["evil"] = apply_attack("scaled", honest(99), scale=10.0)
    res = UpdateGate(REF).check(ups)
    assert set(res.accepted) == {f"dev{i}" for i in range(10)}
    assert list(res.rejected) == ["evil"] and "median + 5 x MAD" in res.rejected["evil"]
    # The threshold is exactly median + 5 * MAD of all 11 norms.
    all_norms = torch.tensor([*norms, res.norms["evil"]], dtype=torch.float64)
    med = all_norms.median().item()
    mad = (all_norms - med).abs().median().item()
    assert res.threshold == pytest.approx(med + 5 * mad)
    assert max(norms) < res.threshold < res.norms["evil"]


def test_mad_rule_keeps_every_honest_update_over_many_rounds():
    # Honest updates of one distribution (norms spread by random data) are never rejected.
    gate = UpdateGate(REF)
    for rnd in range(30):
        ups = {f"d{i}": honest(1000 * rnd + i) for i in range(12)}
        assert not gate.check(ups).rejected


def test_mad_floor_when_norms_are_identical():
    base = honest(0)
    ups = {f"d{i}": base for i in range(5)}
    ups["slightly"] = {k: v * 1.02 if v.is_floating_point() else v for k, v in base.items()}
    ups["boosted"] = {k: v * 1.2 if v.is_floating_point() else v for k, v in base.items()}
    res = UpdateGate(REF).check(ups)  # mad = 0; floor 0.01 * median -> threshold 1.05 * median
    assert "slightly" in res.accepted and list(res.rejected) == ["boosted"]
    assert res.threshold == pytest.approx(1.05 * global_norm(base))


def test_norm_rule_needs_three_updates_and_can_be_off():
    two = {"a": honest(0), "b": honest(1, scale=1000.0)}
    assert not UpdateGate(REF).check(two).rejected
    many = {**honest_round(6), "evil": honest(9, scale=1000.0)}
    assert not UpdateGate(REF, norm_rule="none").check(many).rejected
    ratio = UpdateGate(REF, norm_rule="ratio", max_norm_ratio=3.0).check(many)
    assert list(ratio.rejected) == ["evil"] and "3 x median" in ratio.rejected["evil"]


def test_non_finite_rejected_before_norm_statistics():
    ups = {**honest_round(6), "nan": apply_attack("nan", honest(7))}
    res = UpdateGate(REF).check(ups)
    assert "nan" not in res.norms and "non-finite" in res.rejected["nan"] and len(res.accepted) == 6


@pytest.mark.parametrize("kw, field", [({"norm_rule": "bogus"}, "norm_rule"), ({"max_norm_ratio": -1}, "max_norm_ratio"),
                                       ({"max_norm": 0.0}, "max_norm"), ({"min_updates": 2}, "min_updates"),
                                       ({"norm_rule": "ratio", "max_norm_ratio": 1.0}, "max_norm_ratio")])
def test_bad_gate_options(kw, field):
    with pytest.raises(InputError, match=f"gate.{field}"):
        UpdateGate(REF, **kw)


def test_robust_aggregate_mean_excludes_rejected():
    ups = honest_round(6)
    ups["evil"] = apply_attack("scaled", honest(50), scale=100.0)
    ups["broken"] = apply_attack("nan", honest(51))
    weights = {cid: float(i + 1) for i, cid in enumerate(ups)}
    out = robust_aggregate(ups, weights, "mean", reference_state=REF)
    ids = [f"dev{i}" for i in range(6)]
    expected = weighted_mean([ups[c] for c in ids], [weights[c] for c in ids])
    assert set(out.gate.rejected) == {"evil", "broken"} and out.aggregator == "mean" and out.note is None
    for k in expected:
        torch.testing.assert_close(out.delta[k], expected[k])


def test_robust_aggregate_uses_named_aggregator_and_krum_fallback():
    ups = honest_round(5)
    med = robust_aggregate(ups, None, "median", reference_state=REF)
    torch.testing.assert_close(med.delta["w"], coordinate_median(list(ups.values()))["w"])
    # krum with f = 2 needs 7 updates; 5 accepted -> coordinate median, noted.
    kr = robust_aggregate(ups, None, "krum", reference_state=REF, n_byzantine=2)
    assert kr.aggregator == "median" and "needs >= 7" in kr.note
    torch.testing.assert_close(kr.delta["w"], med.delta["w"])
    ok = robust_aggregate(ups, None, "krum", reference_state=REF, n_byzantine=1)
    assert ok.aggregator == "krum" and any(torch.equal(ok.delta["w"], u["w"]) for u in ups.values())


def test_robust_aggregate_nothing_accepted_and_bad_names():
    out = robust_aggregate({"a": apply_attack("nan", honest(0))}, None, "mean", reference_state=REF)
    assert out.delta is None and "skipped" in out.note and "a" in out.gate.rejected
    with pytest.raises(InputError, match="unknown aggregator"):
        robust_aggregate(honest_round(3), None, "avg", reference_state=REF)
    with pytest.raises(InputError, match="beta: not a parameter of aggregator .median."):
        robust_aggregate(honest_round(3), None, "median", reference_state=REF, beta=0.1)
