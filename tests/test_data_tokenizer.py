"""Tokenizers: byte round trip, special ids, batching, LM blocks, local BPE."""

from __future__ import annotations

import pytest
import torch

from cloudedge.data import BPETokenizer, ByteTokenizer, lm_blocks, load_pydocs, train_bpe
from cloudedge.errors import InputError

SAMPLES = ["hello", "héllo wörld", "日本語のテキスト", "emoji 🚀 and tabs\tand\nnewlines", ""]


def test_byte_ids_contract():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.eos_id == tok.vocab_size - 1


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_batch_encode_layout_truncation_and_mask():
    tok = ByteTokenizer()
    ids, mask = tok.batch_encode(["ab", "abcdefghij"], max_len=6)
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (2, 6)
    assert ids[0].tolist() == [257, 97, 98, 258, 256, 256]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    # Truncated keeping BOS and EOS: argmax finds the EOS at the last real position.
    assert ids[1].tolist() == [257, 97, 98, 99, 100, 258]
    assert int(ids[1].argmax()) == 5 and mask[1].tolist() == [1] * 6
    raw, raw_mask = tok.batch_encode(["abc"], max_len=2, add_special=False)
    assert raw.tolist() == [[97, 98]] and raw_mask.tolist() == [[1, 1]]
    longest, _ = tok.batch_encode(["a", "abc"], max_len=50, pad_to="longest")
    assert longest.shape == (2, 5)
    with pytest.raises(InputError, match="max_len"):
        tok.batch_encode(["a"], max_len=1)


def test_lm_blocks_shape_and_content():
    tok = ByteTokenizer()
    texts = ["abc", "de", "fghij"]
    blocks = lm_blocks(texts, tok, block_size=4)
    stream = [97, 98, 99, 258, 100, 101, 258, 102, 103, 104, 105, 106, 258]
    assert blocks.shape == (3, 4) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == stream[:12]
    docs = load_pydocs(max_docs=50)
    big = lm_blocks(docs.texts, tok, 128)
    total = sum(len(t.encode()) + 1 for t in docs.texts)
    assert big.shape == (total // 128, 128)
    with pytest.raises(InputError, match="too short"):
        lm_blocks(["ab"], tok, 10)


def test_bpe_trained_locally_round_trips(tmp_path):
    docs = load_pydocs(max_docs=400)
    tok = train_bpe(docs.texts, vocab_size=600)
    assert tok.vocab_size == 600 and tok.eos_id == 599 and {tok.pad_id, tok.bos_id} == {597, 598}
    for text in [*SAMPLES, docs.texts[3]]:
        assert tok.decode(tok.encode(text)) == text
    # It learned merges: the corpus takes fewer tokens than bytes.
    n_bytes = sum(len(t.encode()) for t in docs.texts[:50])
    n_tokens = sum(len(tok.encode(t)) for t in docs.texts[:50])
    assert n_tokens < 0.6 * n_bytes
    ids, mask = tok.batch_encode(["return the value"], max_len=16)
    assert ids[0, 0] == tok.bos_id and tok.eos_id in ids[0].tolist()
    path = tmp_path / "tok.json"
    tok.save(str(path))
    again = BPETokenizer.load(str(path))
    assert again.encode(docs.texts[5]) == tok.encode(docs.texts[5])
    assert train_bpe(docs.texts, vocab_size=600).encode(docs.texts[7]) == tok.encode(docs.texts[7])


def test_bpe_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        BPETokenizer.load(str(bad))
