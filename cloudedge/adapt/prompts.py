"""A prompt learner: learnable context vectors inside a frozen CLIP text tower (CoOp / TPT style).

For every class the prompt is ``[SOS] ctx_1 .. ctx_n <class>. [EOS] [PAD]..``. The token ids of
that template are fixed; the embeddings of SOS (the *prefix*) and of the class name, '.', EOS and
padding (the *suffix*) come from the frozen token embedding, and the ``n`` context vectors between
them are the only thing that learns. One context is shared by all classes (CoOp's unified context).

``transformers``' ``CLIPTextTransformer.forward`` only takes ids, so :meth:`PromptLearner.text_features`
runs its parts itself: position embeddings added to the assembled token embeddings, the encoder
under the causal + padding mask, the final layer norm, pooling at the template's EOS position (the
same rule the model uses), and the text projection. With a context equal to the embeddings of
"a photo of a" it reproduces ``get_text_features`` of "a photo of a <class>." exactly (tested).

The number of context vectors is the number of tokens of the initial text: 4 for CLIP's BPE
("a photo of a"), 12 for the bundled byte tokenizer (one per byte), or ``n_ctx`` random vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from cloudedge.adapt.clip_model import ClipAdapter
from cloudedge.errors import InputError

DEFAULT_CTX_INIT = "a photo of a"


class PromptLearner(nn.Module):
    """Context vectors ``ctx`` [n_ctx, D] and the fixed parts of each class's prompt.

    Args:
        clip: the frozen model and its tokenizer.
        classnames: one name per class, in label order.
        ctx_init: text whose token embeddings initialise the context (``None``: ``n_ctx`` vectors
            drawn from N(0, 0.02^2), seeded by ``seed``).
        n_ctx: number of context vectors when ``ctx_init`` is ``None``.
    """

    def __init__(self, clip: ClipAdapter, classnames: list[str], ctx_init: str | None = DEFAULT_CTX_INIT,
                 n_ctx: int = 4, seed: int = 0):
        super().__init__()
        if not classnames:
            raise InputError("class names: at least one class is needed")
        self.clip = clip
        self.classnames = list(classnames)
        tok = clip.tokenizer
        text_model = clip.model.text_model
        embed = text_model.embeddings.token_embedding
        if ctx_init:
            ctx_ids = tok.ids(ctx_init)
            if not ctx_ids:
                raise InputError(f"ctx_init: {ctx_init!r} has no tokens")
            with torch.no_grad():
                init = embed(torch.tensor(ctx_ids, device=embed.weight.device)).clone()
        else:
            ctx_ids = [tok.pad_id] * n_ctx  # placeholders; their embeddings are replaced
            gen = torch.Generator().manual_seed(seed)
            init = torch.randn(n_ctx, embed.embedding_dim, generator=gen) * 0.02
        self.n_ctx = len(ctx_ids)
        self.ctx = nn.Parameter(init)
        self.ctx_init_text = ctx_init

        # " <class>." after the context: a leading space keeps byte-level words apart; CLIP's BPE
        # splits on whitespace, so the ids equal those of the whole sentence tokenized at once.
        rows = [[tok.bos_id, *ctx_ids, *tok.ids(f" {name}."), tok.eos_id] for name in self.classnames]
        length = max(len(r) for r in rows)
        if length > tok.max_len:
            raise InputError(f"class names: prompt of {length} tokens exceeds the text tower's {tok.max_len}")
        ids = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad():  # the ids where the embedding is (the CLIP may already be on a GPU)
            token_embeds = embed(ids.to(embed.weight.device))
        self.register_buffer("template_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.register_buffer("prefix", token_embeds[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", token_embeds[:, 1 + self.n_ctx:].clone(), persistent=False)
        self.register_buffer("eos_position", _eos_positions(ids, text_model.config.eos_token_id), persistent=False)
        self.to(clip.device)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def text_features(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) text features ``[n_classes, P]`` for context ``ctx``.

        ``ctx`` defaults to this learner's parameter; gradients flow into whatever ``ctx`` is given.
        """
        ctx = self.ctx if ctx is None else ctx
        n_cls = self.n_classes
        embeds = torch.cat([self.prefix, ctx.unsqueeze(0).expand(n_cls, -1, -1), self.suffix], dim=1)
        with self.clip.autocast():
            out = encode_prompt_embeddings(self.clip.model, embeds, self.attention_mask, self.eos_position)
        return out.float()

    def normalized_text_features(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_features(ctx), dim=-1)


def _eos_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where the text tower pools, by its own rule (legacy id 2: argmax of ids; else first EOS)."""
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def encode_prompt_embeddings(model: nn.Module, token_embeds: torch.Tensor, attention_mask: torch.Tensor,
                             eos_position: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower on token embeddings ``[T, L, D]``: pooled, projected features ``[T, P]``."""
    text_model = model.text_model
    hidden = text_model.embeddings(inputs_embeds=token_embeds)
    mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              cache=None)
    hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    hidden = text_model.final_layer_norm(hidden)
    pooled = hidden[torch.arange(hidden.shape[0]), eos_position]
    return model.text_projection(pooled)
