"""The project's tokenizers as Hugging Face tokenizers, so exported models load with ``AutoTokenizer``.

:class:`~cloudedge.data.tokenizer.ByteTokenizer` becomes a ``tokenizers`` BPE with no merges over
the 256 byte symbols of the byte-level alphabet (byte ``b`` has id ``b``) plus ``<pad>`` (256),
``<bos>`` (257) and ``<eos>`` (258); :class:`~cloudedge.data.tokenizer.BPETokenizer` already is
one. Either is written as ``tokenizer.json`` + ``tokenizer_config.json`` (+ the special tokens),
which ``PreTrainedTokenizerFast`` / ``AutoTokenizer`` read without any project code.

Two choices keep the ids identical to the project's own ``encode``:

* ``split_special_tokens`` for the byte tokenizer: the text ``"<eos>"`` is five bytes, as
  ``ByteTokenizer.encode`` says, never the EOS id (the BPE backend, like ``BPETokenizer.encode``,
  reads it as EOS);
* specials are added only where the model was trained with them: a causal LM's stream is plain
  text with EOS between documents (so ``tokenizer(text)`` adds nothing), CLIP's text tower reads
  ``BOS text EOS`` (so its tokenizer adds them, as CLIP's own tokenizer does).
"""

from __future__ import annotations

import os
from pathlib import Path

from cloudedge.data.tokenizer import BPETokenizer, ByteTokenizer

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}


def byte_backend() -> object:
    """ByteTokenizer as a ``tokenizers.Tokenizer`` (ids 0..255 bytes, 256 pad, 257 bos, 258 eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # The byte-level pre-tokenizer shows byte b as the printable character bytes_to_unicode()[b];
    # giving that character id b makes every id the byte itself.
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tok = ByteTokenizer()
    assert [backend.token_to_id(t) for t in SPECIAL_TOKENS.values()] == [tok.pad_id, tok.bos_id, tok.eos_id]
    return backend


def to_hf_tokenizer(tokenizer: ByteTokenizer | BPETokenizer, *, model_max_length: int,
                    add_bos_eos: bool = False) -> object:
    """A ``PreTrainedTokenizerFast`` that gives the same ids as ``tokenizer.encode``.

    Args:
        tokenizer: the project tokenizer a model was trained with.
        model_max_length: the model's positions (saved, so pipelines truncate right).
        add_bos_eos: wrap every text in BOS ... EOS (CLIP's text tower); off for causal LMs.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, BPETokenizer):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend.to_str())  # a copy: the post-processor below is ours
    else:
        backend = byte_backend()
    if add_bos_eos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
            special_tokens=[("<bos>", tokenizer.bos_id), ("<eos>", tokenizer.eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                   split_special_tokens=isinstance(tokenizer, ByteTokenizer), padding_side="right", clean_up_tokenization_spaces=False,
                                   **SPECIAL_TOKENS)


def save_tokenizer_files(directory: str | os.PathLike[str], tokenizer: ByteTokenizer | BPETokenizer, *,
                         model_max_length: int, add_bos_eos: bool = False) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and the special tokens into ``directory``."""
    hf = to_hf_tokenizer(tokenizer, model_max_length=model_max_length, add_bos_eos=add_bos_eos)
    return [Path(p) for p in hf.save_pretrained(str(directory))]  # type: ignore[attr-defined]
