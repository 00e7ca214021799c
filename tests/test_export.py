"""Exported models load with the Hugging Face Auto classes alone; `cloudedge generate` samples from them."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, CLIPModel

from cloudedge.cli import main
from cloudedge.config import ModelConfig
from cloudedge.data import ByteTokenizer, train_bpe
from cloudedge.data.hf_tokenizer import save_tokenizer_files, to_hf_tokenizer
from cloudedge.errors import InputError
from cloudedge.generate import Sampling, generate_text
from cloudedge.models import build_model, save_local

TEXTS = ["plain ascii", " leading and  double spaces\n\ttabs", "héllo wörld — naïve café", "日本語のテキスト",
         "emoji 🙂👍🏽", "<eos> <pad><bos> look like specials", "", "\x00\x7f control"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_as_hf_gives_identical_ids_and_round_trips(text, tmp_path):
    save_tokenizer_files(tmp_path, ByteTokenizer(), model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ours = ByteTokenizer()
    ids = hf(text)["input_ids"]
    assert ids == ours.encode(text) == list(text.encode("utf-8"))
    assert hf.decode(ids) == ours.decode(ids) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, len(hf)) == (256, 257, 258, 259)


def test_byte_tokenizer_decodes_cut_characters_like_the_project():
    hf = to_hf_tokenizer(ByteTokenizer(), model_max_length=16)
    cut = list("é!".encode())[1:]  # a continuation byte without its lead byte
    assert hf.decode(cut) == ByteTokenizer().decode(cut) == "\ufffd!"
    assert hf.decode([104, 105, 258, 256], skip_special_tokens=True) == "hi"


def test_bpe_tokenizer_as_hf_gives_identical_ids(tmp_path):
    bpe = train_bpe(["the cat sat on the mat"] * 20 + ["naïve café"] * 5, vocab_size=280)
    save_tokenizer_files(tmp_path, bpe, model_max_length=32)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in ("the cat sat", "naïve café 日本", "<eos>"):
        assert hf(text)["input_ids"] == bpe.encode(text)
        assert hf.decode(bpe.encode(text)) == text
    assert hf.eos_token_id == bpe.eos_id == len(hf) - 1


GPT = ModelConfig(kind="gpt", hidden=16, layers=1, heads=2, context=32)
CLIP = ModelConfig(kind="clip", hidden=16, layers=1, heads=2, context=16, image_size=8, patch_size=4, channels=3,
                   projection_dim=8)


def test_exported_gpt_loads_with_auto_classes_and_scores_like_the_original(tmp_path):
    model = build_model(GPT, seed=0).eval()
    save_local(model, tmp_path / "gpt")
    tok = AutoTokenizer.from_pretrained(tmp_path / "gpt", local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt", local_files_only=True).eval()
    batch = tok(["héllo", "hi"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1].tolist() == [104, 105, 256, 256, 256, 256]  # right-padded with pad 256
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)


def test_causal_lm_loss_warns_nothing(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").warning_once.cache_clear()  # transformers warns once per process
    model = build_model(GPT, seed=0)
    ids = torch.arange(8).view(1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert "loss_type" not in caplog.text


def test_exported_clip_loads_with_its_processor_and_feeds_like_the_project(tmp_path):
    from PIL import Image

    from cloudedge.adapt.clip_model import adapter_for_bundled, fit_pixels, load_clip

    model = build_model(CLIP, seed=0).eval()
    save_local(model, tmp_path / "clip")
    processor = AutoProcessor.from_pretrained(tmp_path / "clip", local_files_only=True)
    pixels = (torch.rand(8, 8, 3) * 255).to(torch.uint8)
    batch = processor(text=["a 3", "ünï"], images=[Image.fromarray(pixels.numpy())], return_tensors="pt",
                      padding=True)
    assert batch["input_ids"][0].tolist()[:5] == [257, 97, 32, 51, 258]  # BOS "a 3" EOS, as the text tower learnt
    # The processor keeps pixels in [0, 1], as the project feeds them.
    assert torch.allclose(batch["pixel_values"][0], pixels.permute(2, 0, 1).float() / 255, atol=1e-6)
    loaded = CLIPModel.from_pretrained(tmp_path / "clip", local_files_only=True).eval()
    with torch.no_grad():
        assert loaded(**batch).logits_per_image.shape == (1, 2)
    # Adaptation reads the exported directory exactly as it reads the bundled model.
    exported, bundled = load_clip(tmp_path / "clip"), adapter_for_bundled(model)
    images = torch.rand(2, 1, 8, 8)
    assert torch.equal(fit_pixels(images, exported.image_spec), fit_pixels(images, bundled.image_spec))
    assert all(exported.tokenizer.ids(t) == bundled.tokenizer.ids(t) for t in ("a 7", "héllo"))
    assert (exported.tokenizer.bos_id, exported.tokenizer.eos_id) == (257, 258)


def test_generate_is_deterministic_under_a_seed_and_reaches_the_cli(tmp_path, capsys):
    model = build_model(GPT, seed=0)
    save_local(model, tmp_path / "run" / "model")
    run = tmp_path / "run"
    sampled = generate_text(run, "héllo", Sampling(max_new_tokens=12, temperature=1.0, top_k=20, seed=3))
    assert sampled.startswith("héllo")
    assert generate_text(run, "héllo", Sampling(max_new_tokens=12, temperature=1.0, top_k=20, seed=3)) == sampled
    assert len(sampled) <= len("héllo") + 12  # at most one character per new byte
    greedy = generate_text(run / "model", "ab", Sampling(max_new_tokens=5, temperature=0))
    assert greedy == generate_text(run, "ab", Sampling(max_new_tokens=5, temperature=0, seed=99))
    assert main(["generate", str(run), "--prompt", "héllo", "--max-new-tokens", "12", "--temperature", "1.0",
                 "--top-k", "20", "--seed", "3"]) == 0
    assert capsys.readouterr().out == sampled + "\n"


def test_generate_refuses_what_it_cannot_sample(tmp_path, capsys):
    with pytest.raises(InputError, match="no exported model"):
        generate_text(tmp_path, "x")
    save_local(build_model(CLIP, seed=0), tmp_path / "clip")
    with pytest.raises(InputError, match="does not generate text"):
        generate_text(tmp_path / "clip", "x")
    save_local(build_model(GPT, seed=0), tmp_path / "gpt")
    with pytest.raises(InputError, match="no room"):
        generate_text(tmp_path / "gpt", "x" * 40)
    assert main(["generate", str(tmp_path / "gpt"), "--top-k", "-1"]) == 2
    assert "--top-k" in capsys.readouterr().err


def test_exported_vit_loads_with_its_image_processor(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = build_model(ModelConfig(kind="vit", hidden=16, layers=1, heads=2, image_size=8, patch_size=4, channels=3),
                        seed=0).eval()
    save_local(model, tmp_path / "vit")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit", local_files_only=True)
    pixels = (torch.rand(8, 8, 3) * 255).to(torch.uint8)
    batch = processor(images=[Image.fromarray(pixels.numpy())], return_tensors="pt")
    assert torch.allclose(batch["pixel_values"][0], pixels.permute(2, 0, 1).float() / 255, atol=1e-6)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "vit", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)
