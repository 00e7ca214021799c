"""Objectives: each loss on tiny hand-checkable cases, schedules, server math, state round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cloudedge.config.model import ModelConfig
from cloudedge.errors import InputError
from cloudedge.pretrain.mi import info_nce
from cloudedge.pretrain.objectives import (
    OBJECTIVES,
    FedSRHead,
    annealed_weight,
    get_objective,
    irm_penalty,
)
from cloudedge.pretrain.tasks import build_classifier

N_CLASSES = 3
# Assertions read scalar losses with float(); the graph they still hold is irrelevant there.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")


def tiny_classifier(seed: int = 0):
    cfg = ModelConfig(kind="gpt", hidden=8, layers=1, heads=1, channels=1, image_size=4)
    return build_classifier(cfg, N_CLASSES, seed, kind="mlp")


def tiny_batch(seed: int, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=gen), torch.randint(0, N_CLASSES, (n,), generator=gen)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


# -- registry ----------------------------------------------------------------------------------
def test_registry_names_and_unknown_name_lists_known():
    assert list(OBJECTIVES) == ["erm", "irm", "vrex", "fedsr", "fediir", "pin"]
    with pytest.raises(InputError, match="unknown objective 'foo'.*erm, irm, vrex, fedsr, fediir, pin"):
        get_objective("foo")


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match=r"objective.beta: not a parameter of objective 'irm' \(known: l2, penalty_weight"):
        get_objective("irm", beta=1.0)
    with pytest.raises(InputError, match="objective.gamma: Input should be greater than or equal to 0"):
        get_objective("fediir", gamma=-1.0)
    with pytest.raises(InputError, match="objective.tau: Input should be greater than 0"):
        get_objective("pin", tau=0.0)
    assert get_objective("irm", penalty_weight=10).params["penalty_weight"] == 10.0


def test_the_config_names_an_objective_with_its_knobs_and_l2_is_shared():
    from cloudedge.config import config_from_dict

    cfg = config_from_dict({"name": "x", "pretrain": {"task": "classify",
                                                      "objective": {"name": "fediir", "gamma": 0.5, "l2": 1e-3}}})
    assert cfg.pretrain.objective.kwargs() == {"l2": 1e-3, "gamma": 0.5, "ema": 0.95}
    for name in OBJECTIVES:  # l2 is one knob of the shared base, with one default
        assert get_objective(name).params["l2"] == 0.0
    with pytest.raises(InputError, match=r"c.yaml: pretrain.objective: beta: not a parameter of objective 'irm'"):
        config_from_dict({"name": "x", "pretrain": {"objective": {"name": "irm", "beta": 1}}}, source="c.yaml")
    with pytest.raises(InputError, match=r"c.yaml: pretrain: 'objective_args' is no longer a key here"):
        config_from_dict({"name": "x", "pretrain": {"objective": "irm", "objective_args": {"l2": 1}}}, source="c.yaml")


def test_erm_is_cross_entropy():
    model, (x, y) = tiny_classifier(), tiny_batch(1)
    loss, logs = get_objective("erm").local_loss(model, x, y, {}, {}, 0)
    assert torch.allclose(loss, F.cross_entropy(model(x), y))
    assert logs["ce"] == pytest.approx(float(loss.detach()))


# -- IRMv1 -------------------------------------------------------------------------------------
def test_irm_penalty_equals_hand_and_finite_difference_gradient_squared():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    # d/ds CE(s l) = mean_i (sum_k softmax(l_i)_k l_ik - l_iy)
    hand = ((logits.softmax(1) * logits).sum(1) - logits.gather(1, y[:, None]).squeeze(1)).mean()
    eps = 1e-6
    fd = (F.cross_entropy(logits * (1 + eps), y) - F.cross_entropy(logits * (1 - eps), y)) / (2 * eps)
    penalty = irm_penalty(logits, y).detach()
    assert float(penalty) == pytest.approx(float(hand) ** 2, rel=1e-9)
    assert float(penalty) == pytest.approx(float(fd) ** 2, rel=1e-6)


def test_irm_penalty_is_differentiable_and_zero_at_calibrated_scale():
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    irm_penalty(logits, y).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # Uniform logits: CE(s*0) is constant in s, so the penalty is exactly zero.
    assert float(irm_penalty(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])).detach()) == 0.0


def test_irm_annealing_schedule_and_loss_division():
    assert [annealed_weight(s, 3, 500.0) for s in range(5)] == [1.0, 1.0, 1.0, 500.0, 500.0]
    irm = get_objective("irm", penalty_weight=500, anneal_steps=3)
    model, (x, y) = tiny_classifier(), tiny_batch(2)
    logits = model(x)
    ce, pen = F.cross_entropy(logits, y).detach(), irm_penalty(logits, y).detach()
    early, logs_early = irm.local_loss(model, x, y, {}, {}, step=2)
    late, logs_late = irm.local_loss(model, x, y, {}, {}, step=3)
    assert float(early.detach()) == pytest.approx(float(ce + pen), rel=1e-6)
    assert float(late.detach()) == pytest.approx(float((ce + 500 * pen) / 500), rel=1e-6)
    assert logs_early["penalty_weight"] == 1.0 and logs_late["penalty_weight"] == 500.0


# -- V-REx -------------------------------------------------------------------------------------
def _vrex_case(seed: int, beta: float = 7.0, weights: tuple[float, ...] = (12.0, 12.0, 6.0)):
    """V-REx, three environments of sizes ``weights``: the objective, a double-precision model, the
    environments, normalized weights, and the centralized V-REx gradient (divided by beta)."""
    vrex = get_objective("vrex", penalty_weight=beta, anneal_steps=0)
    model = tiny_classifier().double()
    envs = [tuple(t.double() if t.is_floating_point() else t for t in tiny_batch(seed + e, n=int(w)))
            for e, w in enumerate(weights)]
    # Centralized: L = sum w R + beta sum w (R - R_bar)^2 (weights normalized), divided by beta.
    model.zero_grad()
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    risks = torch.stack([F.cross_entropy(model(x), y) for x, y in envs])
    r_bar = (w * risks).sum()
    ((w * risks).sum() + beta * (w * (risks - r_bar) ** 2).sum()).div(beta).backward()
    return vrex, model, envs, w, risks, r_bar, flat_grad(model)


def test_vrex_federated_gradient_equals_centralized_vrex_gradient():
    weights = [12.0, 12.0, 6.0]
    vrex, model, envs, w, risks, r_bar, central = _vrex_case(10)

    # Federated: server broadcasts R_bar from the reports; sample-weighted mean of client grads.
    msg = vrex.server_update({}, [vrex.client_report(model, x, y, {}) for x, y in envs], weights)
    assert msg["mean_risk"] == pytest.approx(float(r_bar.detach()), rel=1e-12)
    assert msg["risk_var"] == pytest.approx(float((w * (risks - r_bar) ** 2).sum().detach()), rel=1e-9)
    federated = torch.zeros_like(central)
    for wi, (x, y) in zip(w, envs, strict=True):
        model.zero_grad()
        loss, _ = vrex.local_loss(model, x, y, {}, msg, step=5)
        loss.backward()
        federated += wi * flat_grad(model)
    assert torch.allclose(federated, central, rtol=1e-9, atol=1e-12)


def test_vrex_sync_server_combination_uses_this_steps_risks_exactly():
    """sync: clients send plain risk gradients; the server combines them with the current R_bar."""
    weights, step = [12.0, 12.0, 6.0], 5
    vrex, model, envs, _, _, _, central = _vrex_case(20)

    stale = {"mean_risk": 123.0, "combine_at_server": True}  # a stale mean must play no part
    grads, client_risks = [], []
    for x, y in envs:
        model.zero_grad()
        loss, logs = vrex.local_loss(model, x, y, {}, stale, step=step)
        assert "vrex_coef" not in logs  # the plain risk
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        client_risks.append(float(loss.detach()))
    combined = vrex.combine_gradients(grads, weights, client_risks, step)
    flat = torch.cat([combined[n].flatten() for n, _ in model.named_parameters()])
    assert torch.allclose(flat, central, rtol=1e-9, atol=1e-12)


def test_vrex_local_mode_states_staleness():
    vrex = get_objective("vrex", anneal_steps=0, penalty_weight=10)
    model, (x, y) = tiny_classifier(), tiny_batch(4)
    assert vrex.local_loss(model, x, y, {}, {}, step=3)[1]["vrex_mean_age_rounds"] == 0.0
    assert vrex.local_loss(model, x, y, {}, {"mean_risk": 1.0}, step=3)[1]["vrex_mean_age_rounds"] == 1.0


def test_anneal_fraction_resolves_against_the_runs_objective_steps():
    irm = get_objective("irm", anneal_fraction=0.38, total_steps=501)
    assert irm.params["anneal_steps"] == 190.0
    quick = get_objective("vrex", anneal_fraction=0.38, total_steps=120)
    assert quick.params["anneal_steps"] == 46.0  # the penalty is on for most of a short run too
    with pytest.raises(InputError, match="anneal_fraction.*length"):
        get_objective("irm", anneal_fraction=0.5)
    with pytest.raises(InputError, match="anneal_fraction: must be < 1"):
        get_objective("irm", anneal_fraction=1.5, total_steps=10)


def test_vrex_is_erm_before_first_broadcast():
    vrex = get_objective("vrex")
    model, (x, y) = tiny_classifier(), tiny_batch(4)
    loss, logs = vrex.local_loss(model, x, y, {}, {}, step=0)
    assert torch.allclose(loss, F.cross_entropy(model(x), y)) and logs["vrex_coef"] == 1.0


# -- FedSR -------------------------------------------------------------------------------------
def test_fedsr_kl_matches_torch_distributions():
    head = FedSRHead(dim=4, n_classes=3)
    with torch.no_grad():
        head.r_mu.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
        head.r_rho.add_(0.3)
    mu = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) + 0.1
    y = torch.tensor([0, 2, 1, 1, 0])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(head.r_mu[y], head.r_sigma()[y])
    ).sum(1).mean()
    assert float(head.kl_to_prior(mu, sigma, y)) == pytest.approx(float(ref), rel=1e-5)
    # Identical distributions: zero divergence.
    assert float(head.kl_to_prior(head.r_mu[y], head.r_sigma()[y], y)) == pytest.approx(0.0, abs=1e-6)


def test_fedsr_loss_terms_and_prepare_model_is_idempotent_and_deterministic():
    fedsr = get_objective("fedsr", l2r=0.1, cmi=0.01)
    a, b = fedsr.prepare_model(tiny_classifier(0)), fedsr.prepare_model(tiny_classifier(0))
    head = a.fedsr
    assert fedsr.prepare_model(a).fedsr is head  # idempotent
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    x, y = tiny_batch(5)
    loss, logs = fedsr.local_loss(a, x, y, fedsr.init_client(a, "c0", seed=9), {}, 0)
    # Recompute by hand with the same noise draw.
    mu = a.features(x)
    sigma = head.sigma(mu)
    z = mu + sigma * torch.randn(mu.shape, generator=torch.Generator().manual_seed(9))
    l2 = (z**2).sum(1).mean()
    kl = head.kl_to_prior(mu, sigma, y)
    assert logs["l2r"] == pytest.approx(float(l2), rel=1e-5) and logs["cmi"] == pytest.approx(float(kl), rel=1e-5)
    assert float(loss) == pytest.approx(float(F.cross_entropy(a.head(z), y) + 0.1 * l2 + 0.01 * kl), rel=1e-5)
    loss.backward()  # gradients reach the variance head and the prior
    assert head.sigma_layer.weight.grad.abs().sum() > 0 and head.r_mu.grad.abs().sum() > 0


def test_fedsr_client_state_round_trip_resumes_the_noise_stream():
    fedsr = get_objective("fedsr")
    model = fedsr.prepare_model(tiny_classifier())
    x, y = tiny_batch(6)
    state = fedsr.init_client(model, "c0", seed=1)
    fedsr.local_loss(model, x, y, state, {}, 0)
    saved = st_load(st_save(fedsr.client_state_dict(state)))
    expected, _ = fedsr.local_loss(model, x, y, state, {}, 1)
    restored = fedsr.init_client(model, "c0", seed=123)
    fedsr.load_client_state_dict(restored, saved)
    got, _ = fedsr.local_loss(model, x, y, restored, {}, 1)
    assert torch.equal(got, expected)


# -- FedIIR ------------------------------------------------------------------------------------
def test_fediir_penalty_matches_hand_computed_head_gradient():
    fediir = get_objective("fediir", gamma=0.5)
    model, (x, y) = tiny_classifier(), tiny_batch(7)
    z = model.features(x)
    p = model.head(z).softmax(1)
    delta = (p - F.one_hot(y, N_CLASSES).float()) / len(y)
    g_w, g_b = delta.T @ z, delta.sum(0)  # grad of mean CE w.r.t. a linear head
    g_bar = {"weight": torch.full_like(g_w, 0.01), "bias": torch.full_like(g_b, -0.02)}
    loss, logs = fediir.local_loss(model, x, y, {}, {"g_bar": g_bar}, 0)
    hand = ((g_w - 0.01) ** 2).sum() + ((g_b + 0.02) ** 2).sum()
    assert logs["iir_penalty"] == pytest.approx(float(hand), rel=1e-5)
    assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y) + 0.5 * hand), rel=1e-5)
    report = fediir.client_report(model, x, y, {})
    assert torch.allclose(report["head_grad"]["weight"], g_w, atol=1e-6)
    assert torch.allclose(report["head_grad"]["bias"], g_b, atol=1e-6)
    loss.backward()  # the penalty reaches the encoder (it depends on the features)
    assert next(model.encoder.parameters()).grad.abs().sum() > 0


def test_fediir_server_update_is_ema_of_weighted_mean_from_zero():
    """The authors' rule: g_bar starts at zero; each round ema * g_bar + (1 - ema) * mean."""
    fediir = get_objective("fediir", ema=0.9)
    reports = [{"head_grad": {"weight": torch.tensor([1.0, 3.0])}}, {"head_grad": {"weight": torch.tensor([4.0, 0.0])}}]
    first = fediir.server_update({}, reports, [1.0, 2.0])
    mean = torch.tensor([3.0, 1.0])  # (1*r1 + 2*r2) / 3
    assert torch.allclose(first["g_bar"]["weight"], 0.1 * mean)
    second = fediir.server_update(first, [{"head_grad": {"weight": torch.tensor([13.0, 11.0])}}], [5.0])
    assert torch.allclose(second["g_bar"]["weight"], 0.9 * 0.1 * mean + 0.1 * torch.tensor([13.0, 11.0]))


def test_fediir_reports_the_head_gradient_at_the_received_model():
    """Training moves the head; the report is the gradient on the first batch before any update."""
    fediir = get_objective("fediir", gamma=0.1)
    model, (x, y) = tiny_classifier(), tiny_batch(9)
    params = dict(model.head.named_parameters())
    at_global = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    state = fediir.init_client(model, "c0", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        loss, logs = fediir.local_loss(model, x, y, state, {}, 0)
        assert logs["iir_penalty"] > 0  # zero g_bar: the penalty is on from round 0
        loss.backward()
        opt.step()
    report = fediir.client_report(model, x, y, state)
    for (name, _), g in zip(params.items(), at_global, strict=True):
        assert torch.allclose(report["head_grad"][name], g, atol=1e-6)
    moved = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    assert not torch.allclose(moved[0], at_global[0], atol=1e-4)


# -- PIN ---------------------------------------------------------------------------------------
def test_infonce_bound_on_constructed_features():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # cos(p_i, g_j) = identity
    n = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # cos(p_0, n_0) = 0, cos(p_1, n_1) = 1/sqrt(2)
    loss, bound = info_nce(p, g, n, tau=1.0, extra_weight=0.5)
    l0 = -1 + math.log(math.e + 1 + 0.5 * 1)
    l1 = -1 + math.log(1 + math.e + 0.5 * math.exp(1 / math.sqrt(2)))
    assert float(loss) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert float(bound) == pytest.approx(math.log(2) - (l0 + l1) / 2, rel=1e-6)
    # Without the extra negative it is the standard InfoNCE, whose bound is never lower.
    plain, plain_bound = info_nce(p, g, tau=1.0)
    assert float(plain) == pytest.approx(-1 + math.log(math.e + 1), rel=1e-6)
    assert float(plain_bound) > float(bound)


def test_pin_personal_gradients_reach_only_the_personalized_model():
    pin = get_objective("pin", lam=2.0)
    model, (x, y) = tiny_classifier(0), tiny_batch(8)
    state = pin.init_client(model, "c0", seed=0)
    with torch.no_grad():  # make the three models differ
        for p in state["local"].parameters():
            p.add_(0.1)
    loss, logs = pin.personal_loss(model, x, y, state)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in state["local"].parameters())
    assert all(p.grad is not None for p in state["personal"].parameters())
    z_p = state["personal"].features(x)
    nce, _ = info_nce(z_p, model.features(x), state["local"].features(x), tau=0.5)
    assert logs["infonce"] == pytest.approx(float(nce), rel=1e-6)
    assert float(loss) == pytest.approx(float(F.cross_entropy(state["personal"](x), y) + 2.0 * nce), rel=1e-6)


def test_pin_private_step_trains_private_models_and_predict_uses_personal():
    pin = get_objective("pin", private_lr=1e-2)
    model, (x, y) = tiny_classifier(0), tiny_batch(9)
    global_before = {k: v.clone() for k, v in model.state_dict().items()}
    state = pin.init_client(model, "c0", seed=0)
    first = pin.personal_loss(model, x, y, state)[0].item()
    local_first = F.cross_entropy(state["local"](x), y).item()
    for step in range(30):
        pin.local_private_step(model, x, y, state, step)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in global_before.items())
    assert pin.personal_loss(model, x, y, state)[0].item() < first
    assert F.cross_entropy(state["local"](x), y).item() < local_first
    assert torch.equal(pin.predict(model, x, state), state["personal"](x))
    assert not torch.equal(pin.predict(model, x, state), model(x))
    assert torch.equal(pin.predict(model, x, {}), model(x))


def test_pin_global_loss_is_irm_and_reset_recopies_global_weights():
    pin, irm = get_objective("pin", personal_reset=1, anneal_steps=0), get_objective("irm", anneal_steps=0)
    model, (x, y) = tiny_classifier(0), tiny_batch(10)
    state = pin.init_client(model, "c0", seed=0)
    assert torch.allclose(pin.local_loss(model, x, y, state, {}, 3)[0], irm.local_loss(model, x, y, {}, {}, 3)[0])
    pin.local_private_step(model, x, y, state, 0)
    assert not torch.equal(state["personal"].head.weight, model.head.weight)
    assert pin.client_report(model, x, y, state) == {} and state["reset_pending"]
    pin.local_loss(model, x, y, state, {}, 4)
    assert torch.equal(state["personal"].head.weight, model.head.weight) and not state["reset_pending"]


def test_pin_infonce_uses_the_first_nce_samples_rows_and_the_ablation_skips_it():
    model, (x, y) = tiny_classifier(0), tiny_batch(8, n=12)
    pin = get_objective("pin", lam=1.0, nce_samples=5)
    state = pin.init_client(model, "c0", seed=0)
    with torch.no_grad():
        for p in state["local"].parameters():
            p.add_(0.1)
    loss, logs = pin.personal_loss(model, x, y, state)
    z_p = state["personal"].features(x)
    nce, _ = info_nce(z_p[:5], model.features(x)[:5], state["local"].features(x)[:5], tau=0.5)
    assert logs["infonce"] == pytest.approx(float(nce), rel=1e-6)
    assert float(loss) == pytest.approx(float(F.cross_entropy(state["personal"](x), y) + nce), rel=1e-6)
    ablation = get_objective("pin", lam=0.0)
    loss0, logs0 = ablation.personal_loss(model, x, y, ablation.init_client(model, "c0", seed=0))
    assert set(logs0) == {"personal_ce"}
    assert float(loss0) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-6)  # personal == global copy


def test_pin_warm_start_copies_the_trained_global_model_at_the_start_step():
    pin = get_objective("pin", personal_start_fraction=0.5, total_steps=10, anneal_steps=0)
    model, (x, y) = tiny_classifier(0), tiny_batch(12)
    state = pin.init_client(model, "c0", seed=0)
    personal_before = state["personal"].head.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(5):  # before the start: only the global and local models train
        opt.zero_grad()
        pin.local_loss(model, x, y, state, {}, step)[0].backward()
        opt.step()
        logs = pin.local_private_step(model, x, y, state, step)
        assert set(logs) == {"local_ce"}
    assert torch.equal(state["personal"].head.weight, personal_before)
    assert torch.equal(pin.predict(model, x, state), model(x))  # the global model predicts meanwhile
    pin.local_loss(model, x, y, state, {}, 5)  # start step: copy of the trained global model
    assert torch.equal(state["personal"].head.weight, model.head.weight) and state["started"]
    assert "infonce" in pin.local_private_step(model, x, y, state, 5)
    restored = pin.init_client(tiny_classifier(3), "c0", seed=0)
    pin.load_client_state_dict(restored, st_load(st_save(pin.client_state_dict(state))))
    assert restored["started"]
    with pytest.raises(InputError, match="personal_start_fraction"):
        get_objective("pin", personal_start_fraction=0.5)


def test_pin_client_state_round_trip_through_safetensors():
    pin = get_objective("pin")
    model, (x, y) = tiny_classifier(0), tiny_batch(11)
    state = pin.init_client(model, "c0", seed=0)
    for step in range(3):
        pin.local_private_step(model, x, y, state, step)
    saved = st_load(st_save(pin.client_state_dict(state)))
    restored = pin.init_client(tiny_classifier(5), "c0", seed=0)
    pin.load_client_state_dict(restored, saved)
    # Same models and optimizer moments: the next private step matches exactly.
    pin.local_private_step(model, x, y, state, 3)
    pin.local_private_step(model, x, y, restored, 3)
    for part in ("local", "personal"):
        for (k, a), b in zip(state[part].state_dict().items(), restored[part].state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{part}.{k}"


def test_pin_anchor_raises_information_about_global_features_and_leaves_the_local_ones():
    """The diagnostic of the benchmark, on a toy: with the anchor (lam > 0) the personalized
    features carry more information about the global model's features (InfoNCE bound) and sit
    farther from the local ERM features than with lam = 0, where personal == local exactly."""
    model, (x, y) = tiny_classifier(1), tiny_batch(11, n=48)
    stats = {}
    for lam in (0.0, 2.0):
        pin = get_objective("pin", lam=lam, private_lr=1e-2)
        state = pin.init_client(model, "c0", seed=0)
        for step in range(25):
            pin.local_private_step(model, x, y, state, step)
        with torch.no_grad():
            stats[lam] = pin.eval_stats(model, x, state)
            logits = pin.eval_logits(model, x, state)
        assert torch.equal(logits["global"], model(x)) and torch.equal(logits["local"], state["local"](x))
    assert stats[0.0]["cos_pl"] == pytest.approx(1.0, abs=1e-6)
    assert stats[2.0]["cos_pl"] < stats[0.0]["cos_pl"] - 0.05
    assert stats[2.0]["mi_pg"] > stats[0.0]["mi_pg"] + 0.1
    assert stats[2.0]["cos_lg"] == pytest.approx(stats[0.0]["cos_lg"], abs=1e-6)  # same local model
    assert get_objective("erm").eval_stats(model, x, {}) == {}


def test_l2_is_added_to_every_objective_and_scaled_like_irms_reference():
    """IRM's code: (nll + l2 * |w|^2 + w_pen * penalty) / w_pen once w_pen > 1."""
    model, (x, y) = tiny_classifier(0), tiny_batch(13)
    norm = sum(p.pow(2).sum() for p in model.parameters())
    erm = get_objective("erm", l2=0.01)
    assert float(erm.loss(model, x, y, {}, {}, 0)[0]) == pytest.approx(
        float(F.cross_entropy(model(x), y) + 0.01 * norm), rel=1e-6)
    irm = get_objective("irm", l2=0.01, penalty_weight=100, anneal_steps=2)
    logits = model(x)
    ce, pen = F.cross_entropy(logits, y), irm_penalty(logits, y)
    assert float(irm.loss(model, x, y, {}, {}, 0)[0]) == pytest.approx(float(ce + pen + 0.01 * norm), rel=1e-5)
    assert float(irm.loss(model, x, y, {}, {}, 5)[0]) == pytest.approx(
        float((ce + 100 * pen + 0.01 * norm) / 100), rel=1e-5)
    vrex = get_objective("vrex", l2=0.01, penalty_weight=100, anneal_steps=0)
    combined = vrex.loss(model, x, y, {}, {"combine_at_server": True}, 5)[0]  # the server divides it
    assert float(combined) == pytest.approx(float(ce + 0.01 * norm), rel=1e-5)
    with pytest.raises(InputError, match="not a parameter.*known: l2"):
        get_objective("erm", l3=1.0)

