import json
import math

import numpy as np
import pytest
import torch

from cloudedge.aggregate import global_norm
from cloudedge.errors import InputError
from cloudedge.privacy import DPFedAvg, PrivacyAccountant, clip_and_noise, clip_update, dp_mean


def upd(seed: int, scale: float = 1.0, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, generator=g) * scale, "b": torch.randn(4, 4, generator=g) * scale}


def zeros(n: int) -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(n), "b": torch.zeros(n)}


# --- clipping and noise ----------------------------------------------------------------------------


def test_clip_bound_and_direction():
    big, small = upd(0, scale=10.0), upd(1, scale=0.01)
    clipped, norm = clip_update(big, 1.5)
    assert norm == pytest.approx(global_norm(big)) and global_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    torch.testing.assert_close(clipped["a"], big["a"] * (1.5 / norm))  # same direction
    same, _ = clip_update(small, 1.5)
    assert torch.equal(same["a"], small["a"])  # below the bound: unchanged
    with pytest.raises(ValueError, match="floating tensors only"):
        clip_update({"n": torch.ones(2, dtype=torch.int64)}, 1.0)


def test_local_clip_and_noise_std():
    g = torch.Generator().manual_seed(0)
    out = clip_and_noise(zeros(100_000), clip_norm=2.0, noise_multiplier=0.5, generator=g)
    noise = torch.cat([out["a"], out["b"]])
    assert float(noise.std()) == pytest.approx(1.0, rel=0.01) and abs(float(noise.mean())) < 0.01
    # Deterministic given the generator; the signal is clipped before the noise is added.
    again = clip_and_noise(zeros(100_000), 2.0, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again["a"], out["a"])
    noiseless = clip_and_noise(upd(0, scale=10.0), 2.0, 0.0, g)
    assert global_norm(noiseless) == pytest.approx(2.0, rel=1e-6)


def test_central_dp_mean_noise_std_and_fixed_denominator():
    n = 10
    ups = [zeros(50_000) for _ in range(n)]
    mean, stats = dp_mean(ups, clip_norm=1.0, noise_multiplier=2.0, generator=torch.Generator().manual_seed(1))
    noise = torch.cat([mean["a"], mean["b"]])
    assert float(noise.std()) == pytest.approx(2.0 / n, rel=0.01)
    assert stats["noise_std"] == pytest.approx(0.2)
    # Without noise: sum of clipped updates over the fixed denominator.
    raw = [upd(i, scale=s) for i, s in enumerate([0.01, 5.0, 20.0])]
    clean, st = dp_mean(raw, 1.0, 0.0, torch.Generator(), expected_count=4)
    want = sum(clip_update(u, 1.0)[0]["a"] for u in raw) / 4
    torch.testing.assert_close(clean["a"], want)
    assert st["clipped_fraction"] == pytest.approx(2 / 3)


def test_central_sensitivity_bounded_by_clip_norm():
    # One user's update, however large, moves the (noise-free) released mean by at most S / n.
    others = [upd(i) for i in range(7)]
    with_user, _ = dp_mean([*others, upd(99, scale=1e4)], 0.5, 0.0, torch.Generator(), expected_count=8)
    without, _ = dp_mean([*others, zeros(64) | {"b": torch.zeros(4, 4)}], 0.5, 0.0, torch.Generator(), expected_count=8)
    diff = {k: with_user[k] - without[k] for k in with_user}
    assert global_norm(diff) <= 0.5 / 8 * (1 + 1e-6)


def test_dpfedavg_modes():
    central = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0)
    sent = central.client(upd(0, scale=10.0))
    assert central.mode == "central" and global_norm(sent) == pytest.approx(1.0, rel=1e-6)
    _, stats = central.aggregate([sent, sent], torch.Generator().manual_seed(0))
    assert stats["noise_std"] == pytest.approx(0.5)
    local = DPFedAvg(1.0, 1.0, mode="local")
    noisy = local.client(zeros(20_000), torch.Generator().manual_seed(0))
    assert float(noisy["a"].std()) == pytest.approx(1.0, rel=0.03)
    _, lstats = local.aggregate([noisy] * 4, torch.Generator())
    assert lstats["noise_std"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="privacy.mode"):
        DPFedAvg(1.0, 1.0, mode="shuffle")
    with pytest.raises(InputError, match="privacy.clip_norm"):
        DPFedAvg(0.0, 1.0)


# --- accountant ------------------------------------------------------------------------------------


def rdp_integer_order(q: float, sigma: float, alpha: int) -> float:
    """RDP of one subsampled Gaussian step at an integer order (Mironov, Talwar, Zhang 2019, Sec. 3.3):
    log(sum_k C(a, k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))) / (a - 1). Independent of Opacus."""
    terms = [math.comb(alpha, k) * (1 - q) ** (alpha - k) * q**k * math.exp((k * k - k) / (2 * sigma**2))
             for k in range(alpha + 1)]
    return math.log(math.fsum(terms)) / (alpha - 1)


def test_rdp_matches_closed_form_at_integer_orders():
    orders = [2, 3, 5, 8, 16, 32]
    acc = PrivacyAccountant(noise_multiplier=1.3, sample_rate=0.05, orders=orders)
    acc.step(rounds=40)
    want = [40 * rdp_integer_order(0.05, 1.3, a) for a in orders]
    np.testing.assert_allclose(acc.rdp(), want, rtol=1e-6)


def test_epsilon_matches_published_values():
    # Abadi et al. 2016, Sec. 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10000 -> eps ~ 1.26 (moments accountant).
    acc = PrivacyAccountant(noise_multiplier=4.0, sample_rate=0.01)
    acc.step(rounds=10_000)
    assert acc.epsilon(1e-5, conversion="classic") == pytest.approx(1.26, abs=0.01)
    assert acc.epsilon(1e-5) < acc.epsilon(1e-5, conversion="classic")  # Balle et al. 2020 is tighter
    # TensorFlow Privacy's MNIST tutorial: N = 60000, batch 256, z = 0.7, 45 epochs, delta 1e-5 -> eps = 7.10.
    mnist = PrivacyAccountant(0.7, 256 / 60000)
    mnist.step(rounds=math.ceil(45 * 60000 / 256))
    assert mnist.epsilon(1e-5, conversion="classic") == pytest.approx(7.10, abs=0.01)


def test_epsilon_monotone_in_rounds_and_noise():
    acc = PrivacyAccountant.for_fleet(noise_multiplier=1.0, participants=10, population=100)
    assert acc.sample_rate == 0.1 and acc.epsilon(1e-5) == 0.0
    eps = []
    for _ in range(6):
        acc.step(rounds=20)
        eps.append(acc.epsilon(1e-5))
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False)) and acc.rounds == 120
    noisier = PrivacyAccountant(2.0, 0.1)
    noisier.step(rounds=120)
    assert noisier.epsilon(1e-5) < eps[-1]
    assert acc.epsilon(1e-3) < acc.epsilon(1e-6)


def test_accountant_state_round_trip_and_changing_rate():
    acc = PrivacyAccountant(1.1, 0.02)
    acc.step(rounds=30)
    acc.step(rounds=10, sample_rate=0.05)
    acc.step(rounds=5, sample_rate=0.05)
    assert acc.history == [[1.1, 0.02, 30], [1.1, 0.05, 15]]
    state = json.loads(json.dumps(acc.state_dict()))  # goes through a checkpoint's JSON file
    resumed = PrivacyAccountant(1.1, 0.02)
    resumed.load_state_dict(state)
    assert resumed.epsilon(1e-5) == acc.epsilon(1e-5) and resumed.rounds == 45
    acc.step(rounds=5)
    resumed.step(rounds=5)
    assert resumed.epsilon(1e-5) == acc.epsilon(1e-5)


def test_accountant_bad_input():
    with pytest.raises(InputError, match="privacy.sample_rate"):
        PrivacyAccountant(1.0, 1.5)
    with pytest.raises(InputError, match="privacy.noise_multiplier"):
        PrivacyAccountant(0.0, 0.1)
    with pytest.raises(InputError, match="participants"):
        PrivacyAccountant.for_fleet(1.0, participants=20, population=10)
    acc = PrivacyAccountant(1.0, 0.1)
    with pytest.raises(InputError, match="privacy.delta"):
        acc.epsilon(0.0)
    with pytest.raises(InputError, match="ckpt.json: malformed privacy accountant state"):
        acc.load_state_dict({"history": [[1.0, 0.1]]}, source="ckpt.json")
    with pytest.raises(InputError, match="ckpt.json: .*sample_rate"):
        acc.load_state_dict({**acc.state_dict(), "history": [[1.0, 7.0, 3]]}, source="ckpt.json")
