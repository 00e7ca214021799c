"""Tokenizers that need no download: UTF-8 bytes (``ByteTokenizer``) and a locally trained BPE.

Both share one interface: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``pad_id``, ``bos_id``, ``eos_id`` (EOS is the largest id, so CLIP's argmax pooling over input ids
finds it) and ``batch_encode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from cloudedge.errors import InputError


class _TokenizerBase:
    """Shared batching on top of ``encode``; subclasses set the ids and implement encode/decode."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset({self.pad_id, self.bos_id, self.eos_id})

    def batch_encode(
        self,
        texts: Sequence[str],
        max_len: int,
        add_special: bool = True,
        pad_to: Literal["max_len", "longest"] = "max_len",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both int64 ``[len(texts), L]``.

        With ``add_special`` each row is ``BOS tokens EOS``; a text too long is truncated keeping
        BOS and EOS (so the row still ends in EOS). Rows are right-padded with ``pad_id`` (mask 0).
        ``L`` is ``max_len`` (``pad_to="max_len"``, fixed shapes) or the longest row.
        """
        min_len = 2 if add_special else 1
        if max_len < min_len:
            raise InputError(f"max_len: must be >= {min_len}, got {max_len}")
        rows: list[list[int]] = []
        for text in texts:
            ids = self.encode(text)
            if add_special:
                ids = [self.bos_id, *ids[: max_len - 2], self.eos_id]
            else:
                ids = ids[:max_len]
            rows.append(ids)
        width = max_len if pad_to == "max_len" else max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return input_ids, attention_mask


class ByteTokenizer(_TokenizerBase):
    """UTF-8 bytes as tokens 0..255, plus ``pad_id=256``, ``bos_id=257``, ``eos_id=258``.

    ``decode`` drops special ids and replaces invalid UTF-8 (e.g. a multi-byte character cut by
    truncation) with U+FFFD.
    """

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(int(i) for i in values if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer(_TokenizerBase):
    """A byte-level BPE from the ``tokenizers`` package, trained locally (see :func:`train_bpe`).

    Ids ``0 .. vocab_size - 4`` are the BPE vocabulary; then ``pad_id``, ``bos_id`` and
    ``eos_id`` (the largest id), as for :class:`ByteTokenizer`.
    """

    def __init__(self, backend: object):
        from tokenizers import Tokenizer

        assert isinstance(backend, Tokenizer)
        self.backend = backend
        self.pad_id = backend.token_to_id("<pad>")
        self.bos_id = backend.token_to_id("<bos>")
        self.eos_id = backend.token_to_id("<eos>")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        assert self.eos_id == self.vocab_size - 1, "EOS must be the largest id"

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode([int(i) for i in values if int(i) not in self.special_ids], skip_special_tokens=True)

    def save(self, path: str) -> None:
        """Write the tokenizer as ``tokenizers`` JSON (no pickle)."""
        self.backend.save(path)

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        """Read a tokenizer written by :meth:`save`."""
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(path)
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception subclasses
            raise InputError(f"{path}: not a tokenizer file ({err})") from None
        return cls(backend)


def train_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (3 of them special) on ``texts``, locally.

    Every string can be encoded (the 256 byte symbols are always in the vocabulary), and
    ``decode(encode(s)) == s``. Deterministic for the same texts and settings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_byte_symbols = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_byte_symbols + 3:
        raise InputError(f"vocab_size: must be >= {n_byte_symbols + 3} for byte-level BPE, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    # Added after training so they take the last ids, EOS the very last.
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    return BPETokenizer(backend)


def lm_blocks(texts: Sequence[str], tokenizer: _TokenizerBase, block_size: int) -> torch.Tensor:
    """Causal-LM training blocks ``[n_blocks, block_size]`` (int64).

    The documents are encoded and concatenated, each followed by EOS, and the stream is cut into
    consecutive blocks; the incomplete tail is dropped. :class:`InputError` if not even one block
    fits.
    """
    if block_size < 1:
        raise InputError(f"block_size: must be >= 1, got {block_size}")
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_id)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise InputError(f"data: text too short for one block: {len(stream)} tokens < block_size {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
