"""Aggregators against brute-force numpy references; clipping; server optimizers by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import trim_mean

from cloudedge import aggregate as agg
from cloudedge.errors import InputError

SHAPES = {"w": (4, 3), "b": (5,), "s": ()}


def _updates(n: int, seed: int = 0, shapes: dict = SHAPES) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(shape, generator=g) for k, shape in shapes.items()} for _ in range(n)]


def _np_stack(updates: list[dict[str, torch.Tensor]], key: str) -> np.ndarray:
    return np.stack([u[key].double().numpy().reshape(-1) for u in updates])


def _flat(update: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.double().numpy().reshape(-1) for t in update.values()])


def test_weighted_mean_matches_numpy() -> None:
    ups = _updates(6)
    w = [3.0, 1.0, 0.0, 2.5, 7.0, 1.5]
    out = agg.weighted_mean(ups, w)
    for k, shape in SHAPES.items():
        ref = np.average(_np_stack(ups, k), axis=0, weights=w).reshape(shape)
        assert out[k].shape == shape and out[k].dtype == torch.float32
        np.testing.assert_allclose(out[k].numpy(), ref, rtol=1e-5, atol=1e-6)
    uniform = agg.weighted_mean(ups)
    np.testing.assert_allclose(uniform["b"].numpy(), _np_stack(ups, "b").mean(0), rtol=1e-5, atol=1e-6)
    # Weights given as counts or as a tensor give the same normalized result.
    torch.testing.assert_close(agg.weighted_mean(ups, torch.tensor(w)), out)


def test_weighted_mean_rejects_bad_weights() -> None:
    ups = _updates(3)
    with pytest.raises(ValueError, match="sum to zero"):
        agg.weighted_mean(ups, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        agg.weighted_mean(ups, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="3 updates"):
        agg.weighted_mean(ups, [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        agg.weighted_mean([ups[0], {**ups[1], "b": torch.zeros(6)}])


def test_weighted_mean_keeps_dtypes() -> None:
    ups = [{"h": torch.full((3,), float(i), dtype=torch.bfloat16), "n": torch.tensor(i)} for i in (1, 2, 4)]
    out = agg.weighted_mean(ups, [1, 1, 2])
    assert out["h"].dtype == torch.bfloat16 and torch.equal(out["h"].float(), torch.full((3,), 2.75))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3  # round(2.75)


@pytest.mark.parametrize(("n", "beta"), [(5, 0.2), (10, 0.1), (10, 0.25), (7, 0.0), (9, 0.45)])
def test_trimmed_mean_matches_scipy(n: int, beta: float) -> None:
    ups = _updates(n, seed=n)
    out = agg.trimmed_mean(ups, beta)
    for k, shape in SHAPES.items():
        ref = trim_mean(_np_stack(ups, k), beta, axis=0).reshape(shape)
        np.testing.assert_allclose(out[k].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_drops_outliers_per_coordinate() -> None:
    honest = [{"x": torch.tensor([1.0, 2.0])} for _ in range(4)]
    attack = [{"x": torch.tensor([1e6, -1e6])}, {"x": torch.tensor([-1e6, 1e6])}]
    assert torch.equal(agg.trimmed_mean(honest + attack, 0.2)["x"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        agg.trimmed_mean(honest, 0.5)


@pytest.mark.parametrize("n", [1, 4, 5, 8])
def test_coordinate_median_matches_numpy(n: int) -> None:
    ups = _updates(n, seed=10 + n)
    out = agg.coordinate_median(ups)
    for k, shape in SHAPES.items():
        np.testing.assert_allclose(out[k].numpy(), np.median(_np_stack(ups, k), axis=0).reshape(shape),
                                   rtol=1e-6, atol=1e-7)


def _np_krum_scores(ups: list[dict[str, torch.Tensor]], f: int) -> np.ndarray:
    vecs = [_flat(u) for u in ups]
    n = len(vecs)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vecs[i] - vecs[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


def test_krum_scores_match_brute_force() -> None:
    ups = _updates(9, seed=3)
    np.testing.assert_allclose(agg.krum_scores(ups, 2).numpy(), _np_krum_scores(ups, 2), rtol=1e-9)


def test_krum_and_multi_krum_pick_honest_cluster() -> None:
    g = torch.Generator().manual_seed(4)
    n_honest, f = 8, 3
    center = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    honest = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in center.items()} for _ in range(n_honest)]
    attackers = [{k: v + 50.0 + 5.0 * torch.randn(v.shape, generator=g) for k, v in center.items()}
                 for _ in range(f)]
    # Interleave so the attackers are not simply the last indices.
    ups = [honest[0], attackers[0], honest[1], honest[2], attackers[1], *honest[3:6], attackers[2], *honest[6:]]
    attacker_ids = {1, 4, 8}
    chosen = agg.krum_select(ups, f, 1)[0]
    assert chosen not in attacker_ids
    assert all(torch.equal(agg.krum(ups, f)[k], ups[chosen][k]) for k in SHAPES)
    picked = agg.krum_select(ups, f, n_honest)
    assert set(picked).isdisjoint(attacker_ids)
    out = agg.multi_krum(ups, f, n_honest)
    ref = agg.weighted_mean(honest)
    for k in SHAPES:
        torch.testing.assert_close(out[k], ref[k])
    with pytest.raises(ValueError, match="2f"):
        agg.krum(ups[:8], 3)


def test_global_norm_and_clip() -> None:
    up = _updates(1, seed=5)[0]
    norm = agg.global_norm(up)
    assert norm == pytest.approx(float(np.linalg.norm(_flat(up))), rel=1e-12)
    clipped = agg.clip_by_norm(up, norm / 4)
    assert agg.global_norm(clipped) == pytest.approx(norm / 4, rel=1e-6)
    for k in SHAPES:  # same direction
        torch.testing.assert_close(clipped[k] * 4, up[k])
    same = agg.clip_by_norm(up, norm * 2)
    assert all(torch.equal(same[k], up[k]) and same[k] is not up[k] for k in SHAPES)
    with pytest.raises(ValueError):
        agg.clip_by_norm(up, 0.0)


def test_validate_update_reasons() -> None:
    ref = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    assert agg.validate_update({"w": torch.ones(2, 2), "b": torch.ones(2)}, ref) is None
    assert "missing keys: ['b']" in agg.validate_update({"w": torch.ones(2, 2)}, ref)
    assert "unexpected keys: ['x']" in agg.validate_update({**ref, "x": torch.zeros(1)}, ref)
    assert "key 'b': shape [3]" in agg.validate_update({"w": torch.ones(2, 2), "b": torch.ones(3)}, ref)
    bad = {"w": torch.ones(2, 2), "b": torch.tensor([1.0, float("inf")])}
    assert agg.validate_update(bad, ref) == "key 'b': non-finite values"
    big = {"w": torch.full((2, 2), 3.0), "b": torch.zeros(2)}  # norm 6
    assert "norm 6 > max_norm 5" in agg.validate_update(big, ref, max_norm=5.0)
    assert agg.validate_update(big, ref, max_norm=6.5) is None


def test_get_aggregator_registry() -> None:
    ups = _updates(7, seed=6)
    w = [1, 2, 3, 4, 5, 6, 7]
    torch.testing.assert_close(agg.get_aggregator("mean")(ups, w), agg.weighted_mean(ups, w))
    torch.testing.assert_close(agg.get_aggregator("trimmed_mean", beta=0.3)(ups, w), agg.trimmed_mean(ups, 0.3))
    torch.testing.assert_close(agg.get_aggregator("median")(ups, None), agg.coordinate_median(ups))
    torch.testing.assert_close(agg.get_aggregator("krum", n_byzantine=2)(ups, w), agg.krum(ups, 2))
    torch.testing.assert_close(agg.get_aggregator("multi_krum", n_byzantine=1, m=3)(ups, w),
                               agg.multi_krum(ups, 1, 3, w))
    with pytest.raises(InputError, match="unknown aggregator 'avg' .known: mean, trimmed_mean, median, krum, multi_krum"):
        agg.get_aggregator("avg")
    with pytest.raises(InputError, match="aggregator 'krum': f: not a parameter of aggregator 'krum' .known: n_byzantine."):
        agg.get_aggregator("krum", f=1)
    with pytest.raises(InputError, match="aggregator 'trimmed_mean': beta: Input should be less than 0.5"):
        agg.get_aggregator("trimmed_mean", beta=0.5)
    # multi_krum without m averages the n - f best-scored updates.
    torch.testing.assert_close(agg.get_aggregator("multi_krum", n_byzantine=2)(ups, w), agg.multi_krum(ups, 2, 5, w))


# ---- server optimizers ---------------------------------------------------------------------------


def test_fedavg_lr1_is_plain_weighted_average() -> None:
    g = _updates(1, seed=7)[0]
    clients = _updates(4, seed=8)
    w = [10, 20, 30, 40]
    d = agg.weighted_mean([{k: c[k] - g[k] for k in g} for c in clients], w)
    new = agg.get_server_optimizer("fedavg").step(g, d)
    ref = agg.weighted_mean(clients, w)
    for k in SHAPES:
        torch.testing.assert_close(new[k], ref[k])
    half = agg.FedAvg(lr=0.5).step(g, d)
    torch.testing.assert_close(half["w"], g["w"] + 0.5 * d["w"])


def _scalar(x: float) -> dict[str, torch.Tensor]:
    return {"p": torch.tensor([x], dtype=torch.float64)}


def test_fedavgm_steps_by_hand() -> None:
    opt = agg.FedAvgM(lr=0.5, momentum=0.9)
    x1 = opt.step(_scalar(1.0), _scalar(0.2))  # m = 0.2; x = 1 + 0.5 * 0.2
    assert float(x1["p"]) == pytest.approx(1.1)
    x2 = opt.step(x1, _scalar(-0.4))  # m = 0.9 * 0.2 + 0.1 * -0.4 = 0.14; x = 1.1 + 0.07
    assert float(x2["p"]) == pytest.approx(1.17)


def test_fedadam_first_and_second_step_by_hand() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 0.01
    opt = agg.get_server_optimizer("fedadam", lr=lr, beta1=b1, beta2=b2, tau=tau)
    x1 = opt.step(_scalar(1.0), _scalar(0.5))
    # m = 0.5; v = 0.99 * 1e-4 + 0.01 * 0.25 = 0.002599
    assert float(x1["p"]) == pytest.approx(1.0 + 0.1 * 0.5 / (math.sqrt(0.002599) + 0.01), rel=1e-12)
    x2 = opt.step(x1, _scalar(-0.1))
    m, v = 0.9 * 0.5 + 0.1 * -0.1, 0.99 * 0.002599 + 0.01 * 0.01
    assert float(x2["p"]) == pytest.approx(float(x1["p"]) + 0.1 * m / (math.sqrt(v) + 0.01), rel=1e-12)


def test_fedyogi_first_and_second_step_by_hand() -> None:
    opt = agg.FedYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    x1 = opt.step(_scalar(1.0), _scalar(0.5))
    # v0 = tau^2 = 1e-4 < delta^2 = 0.25, sign = -1: v = 1e-4 + 0.01 * 0.25 = 0.0026
    assert float(x1["p"]) == pytest.approx(1.0 + 0.1 * 0.5 / (math.sqrt(0.0026) + 0.01), rel=1e-12)
    x2 = opt.step(x1, _scalar(0.01))
    # v = 0.0026 > delta^2 = 1e-4, sign = +1: v = 0.0026 - 0.01 * 1e-4
    m, v = 0.9 * 0.5 + 0.1 * 0.01, 0.0026 - 0.01 * 1e-4
    assert float(x2["p"]) == pytest.approx(float(x1["p"]) + 0.1 * m / (math.sqrt(v) + 0.01), rel=1e-12)


def test_server_optimizer_dtypes_and_frozen_keys() -> None:
    state = {"lora": torch.ones(3, dtype=torch.bfloat16), "base": torch.full((2,), 5.0), "n": torch.tensor(3)}
    delta = {"lora": torch.full((3,), 0.5), "n": torch.tensor(2.0)}
    for name in agg.SERVER_OPTIMIZERS:
        new = agg.get_server_optimizer(name).step(state, delta)
        assert new["lora"].dtype == torch.bfloat16 and new["n"].dtype == torch.int64
        assert torch.equal(new["base"], state["base"]) and new["base"] is not state["base"]
        assert int(new["n"]) == 5
        assert bool((new["lora"].float() > 1.0).all())  # moved along the delta
    assert torch.equal(state["lora"], torch.ones(3, dtype=torch.bfloat16))  # input untouched


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_server_optimizer_state_dict_resume(name: str) -> None:
    g, d1, d2, d3 = _updates(4, seed=9)
    full = agg.get_server_optimizer(name)
    x = full.step(full.step(g, d1), d2)
    saved = full.state_dict()
    assert saved["scalars"]["name"] == name and saved["scalars"]["steps"] == 2
    resumed = agg.get_server_optimizer(name)
    resumed.load_state_dict(saved)
    a, b = full.step(x, d3), resumed.step(x, d3)
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    other = "fedadam" if name != "fedadam" else "fedyogi"
    with pytest.raises(InputError, match="server optimizer state is for"):
        agg.get_server_optimizer(other).load_state_dict(saved)
    agg.get_server_optimizer(name, lr=0.5).load_state_dict(saved)  # a new lr is fine
    knob = {"fedavgm": {"momentum": 0.5}, "fedadam": {"tau": 0.01}, "fedyogi": {"beta2": 0.9}}.get(name)
    if knob:  # buffers built under other knobs are not continued under these
        with pytest.raises(InputError, match=f"was saved with {next(iter(knob))} .* resume with the knobs"):
            agg.get_server_optimizer(name, **knob).load_state_dict(saved)


def test_get_server_optimizer_errors() -> None:
    with pytest.raises(InputError, match="unknown server optimizer 'adam' .known: fedavg, fedavgm, fedadam, fedyogi"):
        agg.get_server_optimizer("adam")
    with pytest.raises(InputError, match="momentum: not a parameter of server optimizer 'fedadam' .known: beta1, beta2, tau"):
        agg.get_server_optimizer("fedadam", momentum=0.9)
    with pytest.raises(InputError, match="lr must be > 0"):
        agg.get_server_optimizer("fedavg", lr=0.0)
    with pytest.raises(InputError, match="momentum: Input should be less than 1"):
        agg.get_server_optimizer({"name": "fedavgm", "momentum": 1.0})


def test_server_optimizer_knobs_from_a_name_a_mapping_or_a_config() -> None:
    from cloudedge.config import config_from_dict
    from cloudedge.finetune.stage import settings_from_config

    assert agg.get_server_optimizer("fedadam", lr=0.1, tau=0.01).hparams() == {
        "lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.01}
    assert agg.get_server_optimizer({"name": "fedavgm", "momentum": 0.5}).hparams() == {"lr": 1.0, "momentum": 0.5}
    raw = {"fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid"}]}]},
           "data": {"source": "digits"}, "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2,
                                                   "image_size": 8, "patch_size": 4, "channels": 1}}
    cfg = config_from_dict({**raw, "finetune": {"server_optimizer": {"name": "fedyogi", "beta2": 0.9}, "server_lr": 0.05}})
    settings = settings_from_config(cfg)
    assert settings.server_optimizer == {"name": "fedyogi", "beta1": 0.9, "beta2": 0.9, "tau": 1e-3}
    opt = agg.get_server_optimizer(settings.server_optimizer, lr=settings.server_lr)
    assert isinstance(opt, agg.FedYogi) and opt.hparams() == {"lr": 0.05, "beta1": 0.9, "beta2": 0.9, "tau": 1e-3}
    assert settings_from_config(config_from_dict({**raw, "finetune": {}})).server_optimizer == "fedavg"
    with pytest.raises(InputError, match=r"finetune\.server_optimizer.*tau"):
        config_from_dict({**raw, "finetune": {"server_optimizer": {"name": "fedadam", "tau": 0}}})


def test_a_registered_server_optimizer_is_usable_by_name() -> None:
    class SignSGD(agg.ServerOptimizer):
        """x <- x + lr * sign(delta)."""

        def _update(self, keys, params, deltas):
            torch._foreach_add_(params, torch._foreach_sign(deltas), alpha=self.lr)

    agg.SERVER_OPTIMIZERS.add("test-signsgd", SignSGD)
    try:
        new = agg.get_server_optimizer("test-signsgd", lr=0.5).step(_scalar(1.0), _scalar(-3.0))
        assert float(new["p"]) == 0.5 and SignSGD.name == "test-signsgd"
    finally:
        agg.SERVER_OPTIMIZERS._entries.pop("test-signsgd")


# ---- properties ----------------------------------------------------------------------------------

_values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=8)


@settings(max_examples=50, deadline=None)
@given(values=_values, weights=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=6))
def test_aggregators_of_identical_updates_return_it(values: list[float], weights: list[float]) -> None:
    upd = {"x": torch.tensor(values, dtype=torch.float32)}
    ups = [upd] * len(weights)
    torch.testing.assert_close(agg.weighted_mean(ups, weights)["x"], upd["x"], rtol=1e-5, atol=1e-4)
    assert torch.equal(agg.coordinate_median(ups)["x"], upd["x"])
    torch.testing.assert_close(agg.trimmed_mean(ups, 0.2)["x"], upd["x"], rtol=1e-6, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9), data=st.data())
def test_robust_aggregators_are_permutation_invariant(seed: int, n: int, data: st.DataObject) -> None:
    ups = _updates(n, seed=seed, shapes={"x": (6,)})
    perm = data.draw(st.permutations(range(n)))
    shuffled = [ups[i] for i in perm]
    assert torch.equal(agg.coordinate_median(ups)["x"], agg.coordinate_median(shuffled)["x"])
    torch.testing.assert_close(agg.trimmed_mean(ups, 0.2)["x"], agg.trimmed_mean(shuffled, 0.2)["x"])
