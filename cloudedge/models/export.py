"""What an exported model directory holds besides its weights: the files that turn text and images
into the model's inputs, so ``AutoTokenizer`` / ``AutoProcessor`` + ``AutoModel...`` load it unchanged.

* a causal LM (``gpt``): the tokenizer it was trained with (``tokenizer.json`` and its config); no
  special tokens are added to a text, as in the training stream;
* ``clip``: the tokenizer (adding ``BOS ... EOS``, what the text tower was trained on) and a
  ``CLIPImageProcessor`` whose mean 0 / std 1 keep pixels in [0, 1], as the project feeds them
  (a model loaded from a HF directory keeps the mean / std it came with); together they load as
  ``CLIPProcessor``;
* ``vit``: a ``ViTImageProcessor`` with the same pixel convention.

The image processors are the PIL ones: the default (torchvision) backend is not a dependency, and
asking for it without torchvision makes transformers warn on every save and load.

A model whose vocabulary is not the byte tokenizer's gets tokenizer files only when its tokenizer
is passed (a local HF checkpoint keeps the files it came with: they are copied by the caller).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cloudedge.data.tokenizer import BPETokenizer, ByteTokenizer


def _image_processor_kwargs(model: nn.Module) -> dict[str, object]:
    """Size and mean / std as the project feeds ``model``: pixels in [0, 1] as they are for a model
    built here, the processor statistics it was loaded with for a HF checkpoint (``model_image_spec``)."""
    from cloudedge.models.inputs import model_image_spec

    spec = model_image_spec(model)
    per_channel = lambda v: [float(x) for x in v] * (spec.channels if len(v) == 1 else 1)  # noqa: E731
    return {"size": {"height": spec.size, "width": spec.size}, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": per_channel(spec.mean),
            "image_std": per_channel(spec.std)}


def write_processing_files(model: nn.Module, directory: str | Path,
                           tokenizer: ByteTokenizer | BPETokenizer | None = None) -> list[str]:
    """Write the tokenizer / image processor files that belong beside ``model``'s weights.

    Returns the names of the files written (nothing for a model this does not know how to feed).
    """
    from transformers import CLIPImageProcessorPil, CLIPModel, PreTrainedModel, ViTForImageClassification

    from cloudedge.data.hf_tokenizer import to_hf_tokenizer

    directory = Path(directory)
    if not isinstance(model, PreTrainedModel):
        return []
    before = set(p.name for p in directory.iterdir())
    config = model.config
    if isinstance(model, CLIPModel):
        text = config.text_config
        tok = tokenizer or (ByteTokenizer() if text.vocab_size == ByteTokenizer.vocab_size else None)
        vision = config.vision_config
        images = CLIPImageProcessorPil(**_image_processor_kwargs(model),
                                    crop_size={"height": vision.image_size, "width": vision.image_size},
                                    do_center_crop=False, do_convert_rgb=vision.num_channels == 3)
        if tok is not None:
            from transformers import CLIPProcessor

            hf_tok = to_hf_tokenizer(tok, model_max_length=text.max_position_embeddings, add_bos_eos=True)
            CLIPProcessor(image_processor=images, tokenizer=hf_tok).save_pretrained(str(directory))
        else:
            images.save_pretrained(str(directory))
    elif isinstance(model, ViTForImageClassification):
        from transformers import ViTImageProcessorPil

        ViTImageProcessorPil(**_image_processor_kwargs(model)).save_pretrained(
            str(directory))
    elif model.can_generate():
        tok = tokenizer or (ByteTokenizer() if config.vocab_size == ByteTokenizer.vocab_size else None)
        if tok is not None:
            positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
            to_hf_tokenizer(tok, model_max_length=int(positions)).save_pretrained(str(directory))
    return sorted(set(p.name for p in directory.iterdir()) - before)
