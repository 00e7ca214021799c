"""The `adapt` section: test-time prompt adaptation on every edge's unlabeled stream (docs/prompt-tuning.md)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from cloudedge.config.base import StrictModel
from cloudedge.config.clock import ClockConfig
from cloudedge.config.data import DataConfig
from cloudedge.config.model import ModelConfig
from cloudedge.registry import plugin_choice


class StreamSpec(StrictModel):
    """The shift one edge sees: a glyph shift and/or a corruption of the test images at a severity
    (neither: clean). Edges given the same spec stream disjoint slices of its images."""

    shift: str | None = Field(
        default=None, description="glyphs: a label-preserving shift (held_out_font, inverted, palette, texture, "
                                  "upside_down, mirrored, sideways; cloudedge.data.glyph_shifts); none: as rendered")
    corruption: str | None = Field(default=None, description="a name from cloudedge.data.CORRUPTIONS; none: clean")
    severity: int = Field(default=3, ge=1, le=5)

    @field_validator("shift")
    @classmethod
    def _known_shift(cls, name: str | None) -> str | None:
        # Imported here: the shifts live with the data (cloudedge.data imports config).
        from cloudedge.data.glyph_shifts import GLYPH_SHIFTS

        if name is not None and name not in GLYPH_SHIFTS:
            raise ValueError(f"unknown shift '{name}' (known: {', '.join(GLYPH_SHIFTS)})")
        return name


class AdaptConfig(StrictModel):
    """One adaptation run: which CLIP, which method, which stream on which edge, prompt sharing."""

    moved_keys: ClassVar[dict[str, str]] = {
        "method_args": "give the knobs with the method, e.g. method: {name: swapprompt, lr: 0.05}"}

    data: DataConfig | None = None
    model: ModelConfig | None = None
    clock: ClockConfig | None = Field(default=None, description="this stage's own clock section (charge_as, "
                                                                "seq_len); none: the top-level one")
    checkpoint: str | None = Field(
        default=None,
        description="CLIP to adapt: a HF checkpoint dir (e.g. a downloaded ViT-B/16, or a pretrain run's "
                    "'model' dir), a pretrain run dir, or a .safetensors file of a kind-clip model; "
                    "default: model.path")
    method: plugin_choice("cloudedge.adapt.methods:METHODS") = Field(  # type: ignore[valid-type]
        default="swapprompt", description="a name (zeroshot coop tpt swapprompt tda template-select), or {name: ..., its knobs}")
    streams: list[StreamSpec] = Field(
        default_factory=lambda: [StreamSpec(corruption="gaussian_noise", severity=3)],
        description="edge i streams streams[i % len(streams)]")
    stream_samples: int | None = Field(default=None, ge=1, description="images per edge stream (default: all test images)")
    edges: list[int] | None = Field(
        default=None, description="run only these edges (indices into the fleet's edges); every stream is dealt as "
                                  "in the whole run, so each edge streams the same images (split a run over machines)")
    batch_size: int = Field(default=32, ge=1, description="test images per batch (one adaptation step for online methods)")
    share_every: int = Field(default=0, ge=0, description="edges upload prompts every N batches for a cloud average; 0: never")
    share_groups: Literal["all", "shift"] = Field(
        default="all", description="who averages prompts: all edges, or only edges streaming the same shift")
    compression: Literal["none", "fp16", "int8"] = Field(default="none", description="prompt payloads on the wire")
    coop_epochs: int = Field(default=20, ge=1, description="coop: epochs on the labelled clean source split (cloud)")
    coop_fit: Literal["source", "shift"] = Field(
        default="source", description="coop: fit on the clean source split (the supervised reference) or, per "
                                      "stream, on labelled images of its own shift disjoint from the stream (the oracle)")
    coop_samples: int | None = Field(default=None, ge=1,
                                     description="coop: labelled images to fit on (default: the whole source split; "
                                                 "for coop_fit shift: stream_samples)")
    checkpoint_every: int = Field(default=10, ge=1, description="rounds (batches per edge) between checkpoints")
    device: Literal["cpu", "cuda", "auto"] = Field(default="cpu", description="where edges run the model")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: the CLIP's forward passes under bfloat16 autocast (weights, prompts and "
                                    "optimizer state stay float32; features and logits are float32)")

    @field_validator("streams")
    @classmethod
    def _some_stream(cls, streams: list[StreamSpec]) -> list[StreamSpec]:
        # Edges are dealt streams[i % len(streams)]: an empty list leaves an edge nothing to stream.
        if not streams:
            raise ValueError("needs at least one stream spec, e.g. [{corruption: gaussian_noise}] "
                             "(leave the key out for that default; [{}] streams clean images)")
        return streams
