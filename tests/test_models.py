"""The model zoo and its FLOP formulas: built offline, exact counts, EOS pooling, local checkpoints."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cloudedge.config.model import ModelConfig
from cloudedge.errors import InputError
from cloudedge.models import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TRAINING_FLOPS_FACTOR,
    build_model,
    build_uninitialised,
    clip_forward_flops,
    flops_per_sample,
    gpt_forward_flops,
    measure_flops,
    model_bytes,
    param_count,
    save_local,
    training_flops_per_sample,
    vit_forward_flops,
)

TINY = {
    "hidden": 16,
    "layers": 2,
    "heads": 2,
    "context": 12,
    "image_size": 8,
    "patch_size": 4,
    "projection_dim": 8,
}
SIZES = [
    TINY,
    {
        "hidden": 48,
        "layers": 3,
        "heads": 6,
        "context": 20,
        "image_size": 12,
        "patch_size": 3,
        "channels": 1,
        "num_labels": 7,
        "projection_dim": 24,
    },
]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: the zoo must work with no hub."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _cfg(kind: str, **overrides: object) -> ModelConfig:
    return ModelConfig(kind=kind, **{**TINY, **overrides})


def _text_ids(texts: list[bytes], length: int) -> torch.Tensor:
    """BOS text EOS, right-padded with PAD: the ByteTokenizer's layout."""
    rows = [[BOS_ID, *t, EOS_ID] + [PAD_ID] * (length - len(t) - 2) for t in texts]
    return torch.tensor(rows, dtype=torch.long)


def _sample_inputs(
    kind: str, cfg: ModelConfig, batch: int = 1, seq_len: int | None = None
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    if kind == "gpt":
        return {"input_ids": torch.randint(0, 256, (batch, seq_len or cfg.context), generator=gen)}
    if kind == "vit":
        return {"pixel_values": image}
    ids = _text_ids([bytes(range(65, 65 + 3 + i)) for i in range(batch)], seq_len or cfg.context)
    return {"input_ids": ids, "attention_mask": (ids != PAD_ID).long(), "pixel_values": image}


# --- building ------------------------------------------------------------------------------------


def _block_params(h: int, inter: int) -> int:
    """One transformer block: two LayerNorms, q/k/v/o with biases, a two-layer MLP with biases."""
    return 2 * 2 * h + 4 * (h * h + h) + (h * inter + inter) + (inter * h + h)


def test_gpt_param_count_and_token_ids() -> None:
    h, layers, ctx, vocab = TINY["hidden"], TINY["layers"], TINY["context"], 259
    model = build_model(_cfg("gpt"))
    # wte (tied with the LM head) + wpe + blocks + final LayerNorm.
    expected = vocab * h + ctx * h + layers * _block_params(h, 4 * h) + 2 * h
    assert param_count(model) == expected
    assert model_bytes(model) == 4 * expected
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    config = model.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (257, 258, 256)
    assert model.config._attn_implementation == "sdpa"
    logits = model(**_sample_inputs("gpt", _cfg("gpt"))).logits
    assert logits.shape == (1, ctx, vocab)


def test_vit_param_count_and_output_shape() -> None:
    cfg = _cfg("vit", num_labels=5)
    h, p, c = cfg.hidden, cfg.patch_size, cfg.channels
    patches = (cfg.image_size // p) ** 2
    model = build_model(cfg)
    expected = (
        h  # CLS token
        + (patches + 1) * h  # position embeddings
        + (c * p * p * h + h)  # patch projection (conv with bias)
        + cfg.layers * _block_params(h, 4 * h)
        + 2 * h  # final LayerNorm
        + (h * 5 + 5)  # classifier
    )
    assert param_count(model) == expected
    assert model(**_sample_inputs("vit", cfg, batch=3)).logits.shape == (3, 5)
    # The num_labels argument overrides the config.
    assert build_model(cfg, num_labels=3).classifier.out_features == 3


def test_clip_param_count() -> None:
    cfg = _cfg("clip")
    h, ctx, proj, p = cfg.hidden, cfg.context, cfg.projection_dim, cfg.patch_size
    patches = (cfg.image_size // p) ** 2
    # CLIP blocks have the same parameter layout as the ones above.
    text = 259 * h + ctx * h + cfg.layers * _block_params(h, 4 * h) + 2 * h
    vision = (
        h
        + cfg.channels * p * p * h
        + (patches + 1) * h
        + 2 * h
        + cfg.layers * _block_params(h, 4 * h)
        + 2 * h
    )
    expected = text + vision + 2 * h * proj + 1  # projections (no bias) + logit scale
    model = build_model(cfg)
    assert param_count(model) == expected
    assert model.text_model.eos_token_id == EOS_ID


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(_cfg("gpt"), seed=7)
    b = build_model(_cfg("gpt"), seed=7)
    c = build_model(_cfg("gpt"), seed=8)
    assert torch.equal(torch.rand(3), before)  # the seeded build did not consume global randomness
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


@pytest.mark.parametrize("kind", ["gpt", "vit", "clip"])
def test_uninitialised_build_draws_nothing_and_loads_to_the_same_model(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(kind)
    reference = build_model(cfg, seed=3)
    draws = []
    for name in ("normal_", "uniform_", "fill_"):  # what every init function ends in
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _n=name, **k: (draws.append(_n), _real(t, *a, **k))[1])
    empty = build_uninitialised(lambda: build_model(cfg, seed=3))
    assert draws == []
    monkeypatch.undo()
    # The same parameters under the same names, ties included (GPT's head is its embedding).
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for (name, buf), (_, ref_buf) in zip(empty.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(buf, ref_buf), name
    with torch.no_grad():
        for (_, p), (_, q) in zip(empty.named_parameters(), reference.named_parameters(), strict=True):
            p.copy_(q)
    if kind == "gpt":
        assert empty.lm_head.weight is empty.transformer.wte.weight
    inputs = _sample_inputs(kind, cfg)
    reference.eval(), empty.eval()
    out_ref, out = reference(**inputs), empty(**inputs)
    key = "logits_per_image" if kind == "clip" else "logits"
    assert torch.equal(out[key], out_ref[key])
    # Initialisation is back on for everyone else.
    for key, value in build_model(cfg, seed=3).state_dict().items():
        assert torch.equal(value, reference.state_dict()[key])


def test_seed_none_uses_global_rng() -> None:
    torch.manual_seed(5)
    a = build_model(_cfg("vit"), seed=None)
    torch.manual_seed(5)
    b = build_model(_cfg("vit"), seed=None)
    assert torch.equal(a.classifier.weight, b.classifier.weight)


def test_default_dropout_is_zero_so_training_mode_is_deterministic() -> None:
    model = build_model(_cfg("gpt"))
    assert model.training
    inputs = _sample_inputs("gpt", _cfg("gpt"))
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    noisy = build_model(_cfg("gpt", dropout=0.5))
    assert not torch.equal(noisy(**inputs).logits, noisy(**inputs).logits)


def test_param_count_trainable_only() -> None:
    model = build_model(_cfg("vit"))
    for param in model.vit.parameters():
        param.requires_grad_(False)
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    assert param_count(model, trainable_only=True) == head
    assert param_count(model) > head


# --- FLOPs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=["tiny", "small"])
@pytest.mark.parametrize("kind", ["gpt", "vit", "clip"])
def test_formula_equals_flop_counter(kind: str, size: dict[str, object]) -> None:
    cfg = ModelConfig(kind=kind, **size)
    model = build_model(cfg).eval()
    seq_len = cfg.context - 3 if kind == "gpt" else None  # gpt: a sequence shorter than the context
    formula = flops_per_sample(cfg, seq_len=seq_len)
    assert formula == measure_flops(model, _sample_inputs(kind, cfg, seq_len=seq_len))
    # Per sample: a batch of 3 costs 3x (CLIP also pays its 3x3 similarity matrix, 2*P per pair).
    batch = measure_flops(model, _sample_inputs(kind, cfg, batch=3, seq_len=seq_len))
    extra = 2 * cfg.projection_dim * (9 - 3) if kind == "clip" else 0
    assert batch == 3 * formula + extra
    # A built model uses the formula of its own config.
    assert flops_per_sample(model, seq_len=seq_len) == formula


@pytest.mark.parametrize("kind", ["gpt", "vit", "clip"])
def test_formula_equals_plain_flop_counter_with_eager_attention(kind: str) -> None:
    """Without the CPU-kernel formula that measure_flops adds, eager attention still matches."""
    cfg = ModelConfig(kind=kind, **SIZES[1])
    model = build_model(cfg).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**_sample_inputs(kind, cfg))
    assert counter.get_total_flops() == flops_per_sample(cfg)


@pytest.mark.parametrize("kind", ["gpt", "vit"])
def test_a_training_step_counts_the_fused_attention_backward(kind: str) -> None:
    """The fused kernel's backward (CPU here, CUDA elsewhere: the same formula) does eager's four
    products and recomputes the score matrix: one product more per layer, and nothing else differs."""
    from cloudedge.finetune.workers import step_info

    cfg = _cfg(kind)
    batch, seq = 4, (cfg.context if kind == "gpt" else (cfg.image_size // cfg.patch_size) ** 2 + 1)
    inputs = _sample_inputs(kind, cfg, batch=batch)
    counts = {}
    for impl in ("sdpa", "eager"):
        model = build_model(cfg)
        model.set_attn_implementation(impl)
        loss = (lambda m=model: m(**inputs, labels=inputs["input_ids"]).loss) if kind == "gpt" else \
            (lambda m=model: m(**inputs).logits.square().mean())
        counts[impl] = step_info(model, loss, batch, batch)["train_step_flops"]
    head_dim = cfg.hidden // cfg.heads
    assert counts["sdpa"] - counts["eager"] == cfg.layers * 2 * batch * cfg.heads * seq * seq * head_dim


def test_formulas_by_hand_for_tiny_gpt() -> None:
    cfg = _cfg("gpt")
    h, s, v = 16, 12, 259
    per_layer = 2 * s * h * 3 * h + 2 * s * h * h + 4 * s * s * h + 2 * 2 * s * h * 4 * h
    assert gpt_forward_flops(cfg) == 2 * per_layer + 2 * s * h * v
    assert gpt_forward_flops(cfg, 6, vocab_size=100) < gpt_forward_flops(cfg, 12, vocab_size=100)


def test_clip_towers_add_up() -> None:
    cfg = _cfg("clip")
    text, image = clip_forward_flops(cfg, tower="text"), clip_forward_flops(cfg, tower="image")
    assert clip_forward_flops(cfg) == text + image + 2 * cfg.projection_dim
    assert flops_per_sample(cfg, tower="text", seq_len=6) == clip_forward_flops(cfg, 6, tower="text")
    with pytest.raises(ValueError, match="tower"):
        clip_forward_flops(cfg, tower="audio")  # type: ignore[arg-type]


def test_training_flops_are_three_times_forward() -> None:
    for kind in ("gpt", "vit", "clip"):
        cfg = _cfg(kind)
        assert (
            training_flops_per_sample(cfg)
            == TRAINING_FLOPS_FACTOR * flops_per_sample(cfg)
            == 3 * flops_per_sample(cfg)
        )
    assert vit_forward_flops(_cfg("vit"), num_labels=3) < vit_forward_flops(_cfg("vit"), num_labels=30)


def test_model_without_formula_is_measured_per_sample() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    inputs = torch.ones(4, 10)
    assert measure_flops(model, inputs) == 4 * 2 * (10 * 20 + 20 * 5)
    assert flops_per_sample(model, inputs=inputs) == 2 * (10 * 20 + 20 * 5)
    assert flops_per_sample(model, inputs={"input": inputs}) == 2 * (10 * 20 + 20 * 5)
    with pytest.raises(ValueError, match="inputs"):
        flops_per_sample(model)
    with pytest.raises(ValueError, match="kind 'hf'"):
        flops_per_sample(ModelConfig(kind="hf", path="x"))
    with pytest.raises(ValueError, match="does not match"):
        flops_per_sample(build_model(_cfg("vit")), "gpt")


# --- CLIP pooling --------------------------------------------------------------------------------


def _text_features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # transformers 5: get_text_features returns an output object; the projection is its pooler_output.
    return model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


def test_clip_text_features_pool_at_eos() -> None:
    cfg = _cfg("clip")
    model = build_model(cfg).eval()
    ids = _text_ids([b"cat", b"a dog"], cfg.context)
    mask = (ids != PAD_ID).long()
    with torch.no_grad():
        base = _text_features(model, ids, mask)
        # Anything after the EOS (padding, junk, even another EOS) cannot change the features.
        after = ids.clone()
        after[0, 6:] = torch.tensor([7, 8, EOS_ID, 9, 10, 11])
        after[1, 8:] = 42
        assert torch.allclose(_text_features(model, after, mask), base, atol=1e-6)
        # A token before the EOS does.
        before = ids.clone()
        before[0, 2] = ord("h")
        assert not torch.allclose(_text_features(model, before, mask)[0], base[0])
        # And the pooled state is the final-LayerNorm state at the EOS position.
        out = model.text_model(input_ids=ids, attention_mask=mask)
        eos_positions = (ids == EOS_ID).int().argmax(dim=-1)
        assert eos_positions.tolist() == [4, 6]
        assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_positions])


# --- local checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt", "vit", "clip"])
def test_save_local_round_trip(kind: str, tmp_path: Path) -> None:
    cfg = _cfg(kind)
    model = build_model(cfg).eval()
    save_local(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert not list((tmp_path / "ckpt").glob("*.bin"))
    # A relative path resolves against base_dir.
    loaded = build_model(ModelConfig(kind="hf", path="ckpt"), base_dir=str(tmp_path)).eval()
    assert type(loaded) is type(model)
    assert loaded.config._attn_implementation == "sdpa"
    inputs = _sample_inputs(kind, cfg, batch=2)
    with torch.no_grad():
        expected, got = model(**inputs), loaded(**inputs)
    key = "logits" if kind != "clip" else "logits_per_image"
    assert torch.equal(getattr(got, key), getattr(expected, key))
    assert flops_per_sample(loaded) == flops_per_sample(cfg)


def test_local_vit_with_new_label_count(tmp_path: Path) -> None:
    model = build_model(_cfg("vit"))
    save_local(model, tmp_path)
    loaded = build_model(ModelConfig(kind="hf", path=str(tmp_path)), num_labels=3)
    assert loaded.classifier.out_features == 3
    assert torch.equal(loaded.vit.embeddings.cls_token, model.vit.embeddings.cls_token)


def _expect_input_error(path: Path | str, match: str, base_dir: str = ".") -> None:
    with pytest.raises(InputError, match=match) as info:
        build_model(ModelConfig(kind="hf", path=str(path)), base_dir=base_dir)
    assert "\n" not in str(info.value)


def test_missing_and_hub_named_dirs_raise_input_error(tmp_path: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") in (None, "1")
    missing = tmp_path / "nope"
    _expect_input_error(missing, f"{missing}: not a local checkpoint directory")
    # A hub name is only ever a (missing) local path: nothing is downloaded (network is blocked).
    _expect_input_error("openai/clip-vit-base-patch16", "openai/clip-vit-base-patch16: not a local")
    _expect_input_error("nope", f"{tmp_path / 'nope'}: not a local", base_dir=str(tmp_path))
    _expect_input_error(tmp_path, f"{tmp_path}: no config.json")


def test_bad_checkpoints_raise_input_error(tmp_path: Path) -> None:
    model = build_model(_cfg("vit"))
    save_local(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[:100])
    _expect_input_error(tmp_path, f"{tmp_path}: unreadable checkpoint")

    # A checkpoint missing a weight does not load half random.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = sorted(k for k in state if k.endswith("fc2.weight"))[-1]
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    _expect_input_error(tmp_path, f"{tmp_path}: checkpoint lacks weights .*{dropped}")

    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    _expect_input_error(tmp_path, f"{tmp_path}: unreadable checkpoint")

    (tmp_path / "config.json").write_text("{not json")
    _expect_input_error(tmp_path, f"{tmp_path / 'config.json'}: unreadable model config")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    _expect_input_error(tmp_path, "config.json: unreadable model config")


def test_save_local_needs_a_transformers_model(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_local(nn.Linear(2, 2), tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_formula_matches_the_flop_counter(tied: bool) -> None:
    """GQA attention (4 query heads, 2 key/value heads), SwiGLU MLP, tied or untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloudedge.models.flops import llama_forward_flops

    cfg = LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=tied,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (3, 10))
    assert measure_flops(model, {"input_ids": ids}) == 3 * llama_forward_flops(cfg, 10)
    assert flops_per_sample(model, seq_len=10) == llama_forward_flops(cfg, 10)
    # By hand: per layer q, o (32 x 32), k, v (32 x 16), scores and A V, three 32 x 88 MLP products; the head.
    s = 10
    layer = 2 * s * 32 * (2 * 32 + 2 * 16) + 2 * (2 * s * s * 32) + 3 * 2 * s * 32 * 88
    assert llama_forward_flops(cfg, s) == 2 * layer + 2 * s * 32 * 101
