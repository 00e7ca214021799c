"""LoRA aggregation modes against a brute-force reference: the average of the full delta-W."""

from __future__ import annotations

import pytest
import torch

from cloudedge.finetune.lora import (
    A_SUFFIX,
    B_SUFFIX,
    BASE_DELTA_SUFFIX,
    aggregate_lora,
    effective_deltas,
    sent_keys,
    with_base_deltas,
)

LAYERS = ("enc.0.q", "enc.0.v")
SCALING = 2.0


def _client_state(gen: torch.Generator, shared_a: dict[str, torch.Tensor] | None = None, rank: int = 2) -> dict:
    state = {}
    for layer in LAYERS:
        state[layer + A_SUFFIX] = (shared_a[layer] if shared_a else torch.randn(rank, 6, generator=gen)).clone()
        state[layer + B_SUFFIX] = torch.randn(5, rank, generator=gen)
    state["head.weight"] = torch.randn(3, 5, generator=gen)
    return state


def _reference(states: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """Brute force: each client's full delta-W, averaged."""
    deltas = [effective_deltas(s, SCALING) for s in states]
    return {layer: sum(w * d[layer] for w, d in zip(weights, deltas, strict=True)) for layer in LAYERS}


def _states(n: int, shared: bool, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    a = {layer: torch.randn(2, 6, generator=gen) for layer in LAYERS} if shared else None
    return [_client_state(gen, a) for _ in range(n)]


def test_ffa_is_exact_average_of_products():
    states = _states(4, shared=True)
    w = [0.1, 0.2, 0.3, 0.4]
    out = aggregate_lora(states, w, "ffa", scaling=SCALING)
    got = effective_deltas(out, SCALING)
    ref = _reference(states, w)
    for layer in LAYERS:
        torch.testing.assert_close(got[layer], ref[layer], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["head.weight"], sum(wi * s["head.weight"] for wi, s in zip(w, states, strict=True)))


def test_fedavg_of_factors_is_not_the_average_of_products():
    states = _states(4, shared=False)
    w = [0.25] * 4
    got = effective_deltas(aggregate_lora(states, w, "fedavg", scaling=SCALING), SCALING)
    ref = _reference(states, w)
    assert (got[LAYERS[0]] - ref[LAYERS[0]]).abs().max() > 1e-2  # why ffa / product exist


def test_product_merge_is_exact_and_reinitialises():
    states = [with_base_deltas(s) for s in _states(3, shared=False)]
    w = [0.5, 0.3, 0.2]
    out = aggregate_lora(states, w, "product", scaling=SCALING, refactor="merge", reinit_seed=7)
    got = effective_deltas(out, SCALING)
    ref = _reference(states, w)
    for layer in LAYERS:
        torch.testing.assert_close(got[layer], ref[layer], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(out[layer + B_SUFFIX]) == 0
        assert out[layer + A_SUFFIX].abs().sum() > 0
    again = aggregate_lora(states, w, "product", scaling=SCALING, refactor="merge", reinit_seed=7)
    assert all(torch.equal(out[k], again[k]) for k in out)  # every node re-initialises alike


def test_product_svd_exact_when_rank_allows_and_best_rank_r_otherwise():
    # Clients share A: the average of products has rank <= r, so the SVD refactor is exact.
    states = _states(3, shared=True)
    w = [0.2, 0.3, 0.5]
    got = effective_deltas(aggregate_lora(states, w, "product", scaling=SCALING, refactor="svd"), SCALING)
    ref = _reference(states, w)
    for layer in LAYERS:
        torch.testing.assert_close(got[layer], ref[layer], rtol=1e-5, atol=1e-5)
    # Different A's: the average has rank up to n*r; the refactor is the best rank-r approximation.
    states = _states(3, shared=False, seed=1)
    got = effective_deltas(aggregate_lora(states, w, "product", scaling=SCALING, refactor="svd"), SCALING)
    ref = _reference(states, w)
    for layer in LAYERS:
        s = torch.linalg.svdvals(ref[layer])
        err = torch.linalg.matrix_norm(got[layer] - ref[layer])
        assert err == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-6)  # Eckart-Young


def test_async_merge_weights_are_exact():
    # global + w (edge - pulled), with weights [1, w, -w], in product/merge mode.
    g, e, p = (with_base_deltas(s) for s in _states(3, shared=False, seed=2))
    out = aggregate_lora([g, e, p], [1.0, 0.4, -0.4], "product", scaling=SCALING, refactor="merge")
    ref = _reference([g, e, p], [1.0, 0.4, -0.4])
    for layer, d in effective_deltas(out, SCALING).items():
        torch.testing.assert_close(d, ref[layer], rtol=1e-5, atol=1e-5)


def test_ffa_rejects_diverged_a_and_sends_only_b():
    states = _states(2, shared=False)
    with pytest.raises(ValueError, match="A must stay frozen"):
        aggregate_lora(states, [0.5, 0.5], "ffa", scaling=SCALING)
    keys = sent_keys(list(with_base_deltas(states[0])), "ffa")
    assert keys and not any(k.endswith(A_SUFFIX) or k.endswith(BASE_DELTA_SUFFIX) for k in keys)


def test_the_config_names_the_mode_with_its_knobs():
    from cloudedge.config import config_from_dict
    from cloudedge.errors import InputError
    from cloudedge.finetune.lora import LORA_MODES
    from cloudedge.finetune.stage import settings_from_config

    def load(lora):
        return config_from_dict({"name": "x", "finetune": {"lora": lora}}, source="c.yaml")

    assert list(LORA_MODES) == ["fedavg", "ffa", "product"]
    merge = settings_from_config(load({"mode": {"name": "product", "refactor": "merge"}}))
    assert (merge.lora_mode, merge.refactor) == ("product", "merge")
    assert settings_from_config(load({"mode": "product"})).refactor == "svd"
    assert settings_from_config(load({"mode": "ffa"})).lora_mode == "ffa"
    with pytest.raises(InputError, match=r"c.yaml: finetune.lora.mode: refactor: not a parameter of LoRA aggregation "
                                         r"mode 'ffa' \(known: none\)"):
        load({"mode": {"name": "ffa", "refactor": "merge"}})
    with pytest.raises(InputError, match=r"c.yaml: finetune.lora: 'refactor' is no longer a key here"):
        load({"mode": "product", "refactor": "merge"})


@pytest.fixture
def alias_modes():
    """Plug-in modes that behave as ffa and as product under other names."""
    from cloudedge.finetune.lora import LORA_MODES, FFAMode, ProductMode, ProductParams

    class FrozenA(FFAMode):
        pass

    class Refactoring(ProductMode):
        pass

    LORA_MODES.add("test-frozen-a", FrozenA)
    LORA_MODES.add("test-refactoring", Refactoring, ProductParams)
    yield
    for name in ("test-frozen-a", "test-refactoring"):
        LORA_MODES._entries.pop(name)


def test_what_the_loop_does_with_a_mode_comes_from_its_class_not_its_name(alias_modes) -> None:
    from cloudedge.config import config_from_dict
    from cloudedge.errors import InputError
    from cloudedge.finetune.churn import Churn
    from cloudedge.finetune.lora import lora_mode

    keys = list(with_base_deltas(_client_state(torch.Generator().manual_seed(0))))
    assert sent_keys(keys, "test-frozen-a") == sent_keys(keys, "ffa") != sent_keys(keys, "fedavg")
    assert lora_mode("test-refactoring", "merge").merges and lora_mode("test-refactoring").describe() == \
        "test-refactoring/svd"
    assert Churn({"max_staleness": 3}, 0, "test-refactoring").stale_reason(1).startswith(
        "stale: test-refactoring mode refactors")
    assert Churn({"max_staleness": 3}, 0, "test-frozen-a").stale_reason(1) is None
    raw = {"fleet": {"edges": [{"count": 1}]}, "data": {"source": "digits"},
           "finetune": {"lora": {"mode": "test-refactoring"}, "server_optimizer": "fedadam"}}
    with pytest.raises(InputError, match="lora.mode 'test-refactoring' needs server_optimizer 'fedavg'"):
        config_from_dict(raw)
    raw["finetune"]["lora"]["mode"] = "test-frozen-a"
    assert config_from_dict(raw).finetune.lora.mode.name == "test-frozen-a"
    from cloudedge.finetune.model import build_lora_classifier

    spec = {"model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                      "channels": 1}, "seed": 0, "n_classes": 3, "rank": 2, "alpha": 4.0, "base_tensors": None}
    for mode, a_trains in (("test-frozen-a", False), ("ffa", False), ("fedavg", True)):
        clf = build_lora_classifier({**spec, "mode": mode})
        assert {p.requires_grad for n, p in clf.named_parameters() if "lora_A" in n} == {a_trains}, mode
