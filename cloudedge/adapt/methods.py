"""Test-time adaptation methods for a frozen CLIP, by name: zeroshot, coop, tpt, swapprompt, tda,
template-select.

Every method is a class with the same few verbs:

- ``predict_batch(images) -> logits [B, n_classes]``: predicts, and adapts as the method dictates;
- ``reset()``: back to the state before any test data was seen;
- ``prompt_state()`` / ``load_prompt_state(tensors)``: the shareable prompt (federated prompts);
- ``state_dict()`` / ``load_state_dict(tensors)``: everything needed to resume mid-stream.

Text features for all classes are computed once per prompt update, never per image.

==========  ========  ==========================================================================
method      regime    what adapts
==========  ========  ==========================================================================
zeroshot    static    nothing: hand-written "a photo of a {class}." (single template by default)
coop        static    context learned with labels on clean source data (:meth:`CoOp.fit`), then fixed
tpt         episodic  context, one AdamW step per image on the marginal entropy of its confident
                      views; prompt and optimizer state are reset before every image
swapprompt  online    online context by gradient, target context as its EMA; swapped prediction
tda         online    nothing learned: positive / negative caches of test features (training-free)
template-   online    nothing learned: each batch uses the candidate template whose predictions
select                on the stream so far score best by information maximisation
==========  ========  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from cloudedge.adapt.augment import AugmentSpec, augment, make_views
from cloudedge.adapt.clip_model import ClipAdapter
from cloudedge.adapt.prompts import DEFAULT_CTX_INIT, PromptLearner
from cloudedge.errors import InputError
from cloudedge.registry import Params, Registry

ZEROSHOT_TEMPLATE = "a photo of a {}."


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last dimension."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean prediction over the first dimension (TPT's objective)."""
    logp = logits.log_softmax(dim=-1)
    mean_logp = logp.logsumexp(dim=0) - math.log(logits.shape[0])
    return -(mean_logp.exp() * mean_logp).sum()


METHODS: Registry[type[TTAMethod]] = Registry("test-time method")


@dataclass
class CloudContext:
    """What the cloud holds before the edges stream (:meth:`TTAMethod.cloud_phase`).

    ``load_clip()`` loads the frozen CLIP at the cloud (only a method that needs it pays);
    ``adapt`` is the config's ``adapt`` section; ``source`` the labelled clean source split
    ``(images, labels)``; ``labelled`` per shift (in stream order) the labelled images of that shift
    that no edge streams (None unless the config asks for them: CoOp's ``coop_fit: shift``).
    """

    load_clip: Callable[[], ClipAdapter]
    classnames: list[str]
    seed: int
    adapt: Any
    source: tuple[torch.Tensor, torch.Tensor]
    labelled: dict[str, tuple[torch.Tensor, torch.Tensor] | None]


class TTAMethod:
    """Base class: holds the frozen CLIP, the class names, the method's seed and its knobs.

    A method registers in :data:`METHODS` with its parameter model; ``__init__`` validates the
    keyword knobs with it into ``self.params`` (an InputError naming ``adapt.method.<knob>``).
    """

    name: ClassVar[str] = "base"
    episodic: ClassVar[bool] = False
    # Whether the prompt changes with the stream, so that sharing it between edges means anything.
    shares_prompt: ClassVar[bool] = False

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        try:
            self.params: Any = METHODS.validate_params(self.name, knobs)
        except ValueError as err:
            raise InputError(f"adapt.method.{err}") from None
        self.clip = clip
        self.classnames = list(classnames)
        self.seed = int(seed)
        self.scale = clip.logit_scale

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    @classmethod
    def cloud_phase(cls, context: CloudContext) -> dict[str, dict[str, torch.Tensor]] | None:
        """Work the cloud does before the edges stream (once, not again on resume): the prompt to
        send down to the edges of each shift, by shift name; None (the default): nothing to send.
        The stage charges the transfers to the virtual clock and loads the prompts on the edges."""
        return None

    def reset(self) -> None:
        """Forget everything learned from test data."""

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The prompt tensors an edge may share with the cloud (empty: nothing to share)."""
        return {}

    def load_prompt_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the shareable prompt with ``tensors`` (e.g. the cloud's average)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that changes while streaming, for resume."""
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""

    def _logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        return self.scale * image_feats @ text_feats.T


def template_features(clip: ClipAdapter, classnames: list[str], templates: Sequence[str]) -> torch.Tensor:
    """``[K, C, D]``: the text features of every class under each template ('{}': the class name)."""
    return torch.stack([clip.text_features([t.format(c) for c in classnames]) for t in templates])


class ZeroShotParams(Params):
    templates: tuple[str, ...] = Field(default=(ZEROSHOT_TEMPLATE,), min_length=1,
                                       description="prompt templates ('{}': the class name), averaged per class")


@METHODS.register("zeroshot", ZeroShotParams)
class ZeroShot(TTAMethod):
    """Zero-shot CLIP. ``templates``: one (default, no ensemble) or several, averaged per class."""

    name = "zeroshot"

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)
        self.text_feats = F.normalize(template_features(clip, self.classnames, self.params.templates).mean(dim=0), dim=-1)

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(self.clip.image_features(images), self.text_feats)


class PromptParams(Params):
    """Knobs of every method with a learnable context."""

    ctx_init: str | None = Field(default=DEFAULT_CTX_INIT, description="words the context starts from; null: random")
    n_ctx: int = Field(default=4, ge=1, description="context tokens when ctx_init is null")
    lr: float = Field(default=5e-3, gt=0, description="AdamW's learning rate on the context")


class AugmentParams(PromptParams):
    """Prompt methods that train on augmented views."""

    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="ranges of the random views")

    @model_validator(mode="before")
    @classmethod
    def _strict_augment(cls, data: Any) -> Any:
        # AugmentSpec is a plain dataclass: name its unknown fields here rather than drop them.
        aug = data.get("augment") if isinstance(data, dict) else None
        if isinstance(aug, dict):
            bad = sorted(set(aug) - set(AugmentSpec.__dataclass_fields__))
            if bad:
                raise ValueError(f"augment.{bad[0]}: unknown field (known: {', '.join(AugmentSpec.__dataclass_fields__)})")
        return data


class _PromptMethod(TTAMethod):
    """A method with one learnable context (initialised from ``ctx_init``)."""

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)
        p = self.params
        self.lr = p.lr
        self.learner = PromptLearner(clip, self.classnames, ctx_init=p.ctx_init, n_ctx=p.n_ctx, seed=seed)
        self.ctx_init = self.learner.ctx.detach().clone()

    def _text(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        return self.learner.normalized_text_features(ctx)


class CoOpParams(PromptParams):
    epochs: int = Field(default=20, ge=1, description="epochs on the labelled split")
    batch_size: int = Field(default=64, ge=1)
    augment_train: bool = Field(default=False, description="train on augmented views")


@METHODS.register("coop", CoOpParams)
class CoOp(_PromptMethod):
    """CoOp: the context is learned with labels on source data (:meth:`fit`), then kept fixed.

    The supervised reference: it sees labelled clean data, never the shifted test stream. Trained
    without augmentation by default: on 8x8 digits even mild crops lose labels (see ``augment``),
    and training on them cost CoOp 8 points of clean accuracy in our runs.
    """

    name = "coop"

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)
        p = self.params
        self.epochs, self.batch_size, self.augment_train = p.epochs, p.batch_size, p.augment_train
        self.text_feats = self._text_now()

    def _text_now(self) -> torch.Tensor:
        with torch.no_grad():
            return self._text()

    @classmethod
    def cloud_phase(cls, context: CloudContext) -> dict[str, dict[str, torch.Tensor]]:
        """The cloud learns the context with labels; every edge gets it before streaming.

        ``coop_fit: source``: one context fitted on the labelled clean source split
        (``coop_samples`` of it, a seeded subset), sent to every edge; ``shift`` (the oracle): one
        context per shift, fitted on labelled images of that shift that its edges never stream."""
        acfg = context.adapt
        args = {k: v for k, v in acfg.method.kwargs().items() if k != "epochs"}
        clip = context.load_clip()
        if acfg.coop_fit == "source":
            x, y = context.source
            if acfg.coop_samples is not None and acfg.coop_samples < len(x):
                pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(context.seed))[: acfg.coop_samples]
                x, y = x[pick], y[pick]
            fits = {shift: (x, y) for shift in context.labelled}
        else:
            fits = {shift: data for shift, data in context.labelled.items() if data is not None}
        fitted: dict[int, dict[str, torch.Tensor]] = {}  # by the fitted tensor's identity: the source is fitted once
        prompts: dict[str, dict[str, torch.Tensor]] = {}
        for shift, (x, y) in fits.items():
            if id(x) not in fitted:
                coop = cls(clip, context.classnames, seed=context.seed, epochs=acfg.coop_epochs, **args)
                coop.fit(x, y)
                fitted[id(x)] = coop.prompt_state()
            prompts[shift] = fitted[id(x)]
        return prompts

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Learn the context on labelled source images; returns the mean loss of each epoch."""
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.AdamW([self.learner.ctx], lr=self.lr, weight_decay=0.0)
        labels = labels.to(self.clip.device)
        clean_feats = self.clip.image_features(images)
        losses = []
        for _ in range(self.epochs):
            order = torch.randperm(len(images), generator=gen)
            total = 0.0
            for start in range(0, len(images), self.batch_size):
                idx = order[start:start + self.batch_size]
                if self.augment_train:
                    feats = self.clip.image_features(augment(images[idx], AugmentSpec(), gen))
                else:
                    feats = clean_feats[idx.to(clean_feats.device)]
                loss = F.cross_entropy(self._logits(feats, self._text()), labels[idx.to(labels.device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(images))
        self.text_feats = self._text_now()
        return losses

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(self.clip.image_features(images), self.text_feats)

    def prompt_state(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.learner.ctx.detach().clone()}

    def load_prompt_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.learner.ctx.copy_(tensors["ctx"])
        self.text_feats = self._text_now()

    state_dict = prompt_state
    load_state_dict = load_prompt_state


class TPTParams(AugmentParams):
    n_views: int = Field(default=63, ge=1, description="augmented views per image (plus the original)")
    select_frac: float = Field(default=0.1, gt=0, le=1, description="share of the views kept (lowest entropy)")
    steps: int = Field(default=1, ge=1, description="AdamW steps per image")


@METHODS.register("tpt", TPTParams)
class TPT(_PromptMethod):
    """Test-time prompt tuning (Shu et al., NeurIPS 2022), episodic.

    Per image: ``n_views`` augmented views + the original; keep the ``select_frac`` of them with the
    lowest prediction entropy; ``steps`` AdamW step(s) (lr ``lr``) on the entropy of their mean
    prediction; predict the original with the tuned context; then reset context and optimizer.
    Views of the i-th image of the stream come from a generator seeded by (seed, i), so one
    image's result never depends on the images before it.
    """

    name = "tpt"
    episodic = True

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)
        p = self.params
        self.n_views, self.select_frac, self.steps = p.n_views, p.select_frac, p.steps
        self.spec = p.augment
        self.images_seen = 0
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW([self.learner.ctx], lr=self.lr, weight_decay=0.0)

    def reset(self) -> None:
        """Context back to its initial value, a fresh optimizer (no moments, step 0)."""
        with torch.no_grad():
            self.learner.ctx.copy_(self.ctx_init)
        self._new_optimizer()

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        n_keep = max(1, int(round(self.select_frac * (self.n_views + 1))))
        out = []
        for i in range(images.shape[0]):
            # One image at a time, as the method is defined (its memory is that of one image's views).
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.images_seen + i)
            feats = self.clip.image_features(make_views(images[i:i + 1], self.n_views, self.spec, gen)[0])
            self.reset()
            for _ in range(self.steps):
                logits = self._logits(feats, self._text())
                keep = entropy(logits.detach()).argsort()[:n_keep]
                loss = marginal_entropy(logits[keep])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            with torch.no_grad():
                out.append(self._logits(feats[:1], self._text())[0])
        self.images_seen += images.shape[0]
        self.reset()
        return torch.stack(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"images_seen": torch.tensor(self.images_seen)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.images_seen = int(tensors["images_seen"])


def sinkhorn(logits: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignments of a batch (SwAV's Sinkhorn-Knopp): ``[B, K]`` rows summing to 1.

    Starts from ``softmax(logits)`` and alternately rescales so that every class receives the same
    total mass over the batch (``B / K``) and every sample a mass of 1; ``iters`` rounds of both.
    A batch cannot then put all its samples in one class, which is what keeps a self-trained prompt
    from collapsing onto a few classes.
    """
    q = (logits - logits.max()).exp().T  # [K, B]
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / b
    return (q * b).T


class SwapPromptParams(AugmentParams):
    momentum: float = Field(default=0.99, ge=0, le=1, description="EMA of the target prompt (0: none)")
    temperature: float = Field(default=0.5, gt=0, description="< 1 sharpens the target assignment")
    balance: Literal["none", "sinkhorn"] = Field(default="sinkhorn", description="balance assignments over the batch")
    sinkhorn_iters: int = Field(default=3, ge=1)
    swap: bool = Field(default=True, description="false: each view predicts its own target (ablation)")
    steps: int = Field(default=1, ge=1, description="optimizer steps per batch")
    entropy_weight: float = Field(default=0.0, ge=0, description="weight of the marginal entropy term")
    confident_frac: float = Field(default=1.0, gt=0, le=1, description="share of the most confident samples used")
    predict_with: Literal["online", "target", "both"] = "both"


@METHODS.register("swapprompt", SwapPromptParams)
class SwapPrompt(_PromptMethod):
    """SwapPrompt (Ma et al., NeurIPS 2023), reconstructed from the paper's abstract; online.

    Two contexts: ``online`` (trained) and ``target`` (its EMA, ``momentum``; 0: no EMA, the target
    is the online prompt). For each test batch, two augmented views v1, v2 of every image; the
    target prompt's assignment of a view is sharpened (``temperature`` < 1) and/or balanced over the
    batch (``balance: sinkhorn``, SwAV's Sinkhorn-Knopp, ``sinkhorn_iters``):
    ``q_t(v) = stopgrad assign(scale * cos(f(v), g(target)) / temperature)``, and the swapped loss
    ``L = CE(q_t(v2), P(.|v1, online)) + CE(q_t(v1), P(.|v2, online))`` (``swap: false``, the
    ablation: each view predicts its own target) (+ ``entropy_weight`` x the marginal entropy of the
    online predictions, TPT's term). Only samples whose target prediction is among the
    ``confident_frac`` least uncertain contribute (1.0: all). ``steps`` optimizer steps per batch,
    then ``target <- m target + (1-m) online``. Prediction on the original images after the step,
    with ``predict_with`` = ``target``, ``online`` or ``both`` (mean of the two probability vectors).
    """

    name = "swapprompt"
    shares_prompt = True

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)
        p = self.params
        self.momentum, self.temperature = p.momentum, p.temperature
        self.balance, self.sinkhorn_iters, self.swap, self.steps = p.balance, p.sinkhorn_iters, p.swap, p.steps
        self.entropy_weight, self.confident_frac, self.predict_with = p.entropy_weight, p.confident_frac, p.predict_with
        self.spec = p.augment
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            self.learner.ctx.copy_(self.ctx_init)
        self.target_ctx = self.ctx_init.clone()
        self.optimizer = torch.optim.AdamW([self.learner.ctx], lr=self.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.batches_seen = 0

    def assign(self, logits: torch.Tensor) -> torch.Tensor:
        """Target assignments of a batch of target-prompt logits: sharpened and/or balanced."""
        logits = logits / self.temperature
        return sinkhorn(logits, self.sinkhorn_iters) if self.balance == "sinkhorn" else logits.softmax(dim=-1)

    def swapped_loss(self, feats_v1: torch.Tensor, feats_v2: torch.Tensor) -> torch.Tensor:
        """The swapped-prediction loss of one batch (gradient reaches only the online context)."""
        with torch.no_grad():
            target_text = self._text(self.target_ctx)
            q1 = self.assign(self._logits(feats_v1, target_text))
            q2 = self.assign(self._logits(feats_v2, target_text))
        online_text = self._text()
        logp1 = self._logits(feats_v1, online_text).log_softmax(dim=-1)
        logp2 = self._logits(feats_v2, online_text).log_softmax(dim=-1)
        if self.swap:
            per_sample = -(q2 * logp1).sum(-1) - (q1 * logp2).sum(-1)
        else:
            per_sample = -(q1 * logp1).sum(-1) - (q2 * logp2).sum(-1)
        if self.confident_frac < 1.0:
            uncertainty = -(q1 * q1.clamp_min(1e-12).log()).sum(-1) - (q2 * q2.clamp_min(1e-12).log()).sum(-1)
            n_keep = max(1, int(round(self.confident_frac * len(per_sample))))
            per_sample = per_sample[uncertainty.argsort()[:n_keep]]
        loss = per_sample.mean()
        if self.entropy_weight:
            loss = loss + self.entropy_weight * marginal_entropy(torch.cat([logp1, logp2]))
        return loss

    @torch.no_grad()
    def ema_update(self) -> None:
        """``target <- m target + (1 - m) online``."""
        self.target_ctx.mul_(self.momentum).add_(self.learner.ctx.detach(), alpha=1.0 - self.momentum)

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        views = torch.cat([images, augment(images, self.spec, self.generator), augment(images, self.spec, self.generator)])
        feats = self.clip.image_features(views)
        orig, v1, v2 = feats[:b], feats[b:2 * b], feats[2 * b:]
        for _ in range(self.steps):
            loss = self.swapped_loss(v1, v2)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.ema_update()
        self.batches_seen += 1
        with torch.no_grad():
            if self.predict_with == "online":
                return self._logits(orig, self._text())
            if self.predict_with == "target":
                return self._logits(orig, self._text(self.target_ctx))
            probs = 0.5 * (self._logits(orig, self._text()).softmax(-1)
                           + self._logits(orig, self._text(self.target_ctx)).softmax(-1))
            return probs.log()

    def prompt_state(self) -> dict[str, torch.Tensor]:
        return {"online": self.learner.ctx.detach().clone(), "target": self.target_ctx.clone()}

    def load_prompt_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.learner.ctx.copy_(tensors["online"])
        self.target_ctx = tensors["target"].detach().clone().to(self.ctx_init.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = self.prompt_state()
        opt_state = self.optimizer.state.get(self.learner.ctx, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opt_state:
                out[f"opt.{key}"] = opt_state[key].detach().clone()
        out["opt.step"] = torch.as_tensor(float(opt_state.get("step", 0.0)))
        out["generator"] = self.generator.get_state()
        out["batches_seen"] = torch.tensor(self.batches_seen)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_prompt_state(tensors)
        self.optimizer = torch.optim.AdamW([self.learner.ctx], lr=self.lr, weight_decay=0.0)
        if "opt.exp_avg" in tensors:
            self.optimizer.state[self.learner.ctx] = {
                "step": tensors["opt.step"].clone().float(),
                "exp_avg": tensors["opt.exp_avg"].clone(),
                "exp_avg_sq": tensors["opt.exp_avg_sq"].clone(),
            }
        self.generator.set_state(tensors["generator"])
        self.batches_seen = int(tensors["batches_seen"])


class TemplateSelectParams(Params):
    templates: tuple[str, ...] = Field(default=(ZEROSHOT_TEMPLATE,), min_length=1,
                                       description="candidate templates ('{}': the class name)")


@METHODS.register("template-select", TemplateSelectParams)
class TemplateSelect(TTAMethod):
    """Stream-level template selection, training-free and online.

    Each candidate template gives zero-shot predictions. Over the stream seen so far (the current
    batch included), each is scored by information maximisation: the mean entropy of its
    predictions minus the entropy of their mean (confident, and spread over the classes; lower is
    better). Each batch is predicted with the best-scoring template. This is a stream-level
    hypothesis ("this stream is upside down"), which no single image can support: on a stream whose
    errors are relabellings (an upside-down 6 reads as a 9) a per-image or gradient method cannot
    reach it (docs/prompt-tuning.md, "Where the room is"). With one template it is zero-shot.
    """

    name = "template-select"

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)
        self.templates = list(self.params.templates)
        with torch.no_grad():
            self.text_feats = template_features(clip, self.classnames, self.templates)
        self.reset()

    def reset(self) -> None:
        k = len(self.templates)
        self.seen = 0
        self.entropy_sum = torch.zeros(k, dtype=torch.float64)
        self.prob_sum = torch.zeros(k, self.n_classes, dtype=torch.float64)

    def scores(self) -> torch.Tensor:
        """Each template's objective over the stream so far (lower: better); ``[K]``."""
        mean = self.prob_sum / max(self.seen, 1)
        return self.entropy_sum / max(self.seen, 1) + (mean * mean.clamp_min(1e-12).log()).sum(-1)

    @property
    def chosen(self) -> str:
        """The template the last batch was predicted with."""
        return self.templates[int(self.scores().argmin())]

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.clip.image_features(images)
            logits = self.scale * torch.einsum("bd,kcd->kbc", feats, self.text_feats.to(feats.device))
            self.entropy_sum += entropy(logits).sum(-1).double().cpu()
            self.prob_sum += logits.softmax(-1).sum(1).double().cpu()
            self.seen += images.shape[0]
            return logits[int(self.scores().argmin())]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"seen": torch.tensor(self.seen), "entropy_sum": self.entropy_sum.clone(),
                "prob_sum": self.prob_sum.clone()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.seen = int(tensors["seen"])
        self.entropy_sum = tensors["entropy_sum"].clone().double()
        self.prob_sum = tensors["prob_sum"].clone().double()


class TDAParams(Params):
    pos_capacity: int = Field(default=3, ge=0, description="positive cache entries per class")
    pos_alpha: float = Field(default=2.0, ge=0)
    pos_beta: float = Field(default=5.0, ge=0)
    neg_capacity: int = Field(default=2, ge=0, description="negative cache entries per class")
    neg_alpha: float = Field(default=0.117, ge=0)
    neg_beta: float = Field(default=1.0, ge=0)
    neg_entropy: tuple[float, float] = Field(default=(0.2, 0.5), description="normalised-entropy band of the "
                                                                            "negative cache")
    neg_mask: float = Field(default=0.03, ge=0, description="classes with zero-shot p below this are ruled out")


@METHODS.register("tda", TDAParams)
class TDA(TTAMethod):
    """Training-free dynamic adapter (Karmanov et al., CVPR 2024), online.

    Zero-shot logits ``z = scale * f T^T`` with the hand-written prompt, plus two caches of test
    features keyed by pseudo-label, updated image by image:

    - positive cache: per predicted class the ``pos_capacity`` lowest-entropy features seen;
      ``z += pos_alpha * A(f K_pos^T) onehot(labels)``;
    - negative cache: features whose normalised entropy lies in ``neg_entropy`` (uncertain but not
      hopeless), at most ``neg_capacity`` per predicted class, each with a negative pseudo-label
      marking the classes its zero-shot probability rules out (``p < neg_mask``);
      ``z -= neg_alpha * A(f K_neg^T) mask``;

    with affinity ``A(s) = exp(-beta (1 - s))``. Cache terms are multiplied by ``scale / 100`` so
    the alphas mean what they mean with CLIP's scale of 100. Defaults are TDA's ImageNet settings
    (pos 3 / 2.0 / 5.0, neg 2 / 0.117 / 1.0, entropy band (0.2, 0.5), mask 0.03); our reading of the
    paper's negative pseudo-label, not a port of its code. Single view per image (no augmentation).
    """

    name = "tda"

    def __init__(self, clip: ClipAdapter, classnames: list[str], seed: int = 0, **knobs: Any):
        super().__init__(clip, classnames, seed, **knobs)
        p = self.params
        self.text_feats = ZeroShot(clip, classnames).text_feats
        self.pos_capacity, self.pos_alpha, self.pos_beta = p.pos_capacity, p.pos_alpha, p.pos_beta
        self.neg_capacity, self.neg_alpha, self.neg_beta = p.neg_capacity, p.neg_alpha, p.neg_beta
        self.neg_entropy, self.neg_mask = p.neg_entropy, p.neg_mask
        self.reset()

    def reset(self) -> None:
        # Per class: list of (entropy, feature[, negative mask]) sorted by entropy.
        self.pos_cache: dict[int, list[tuple[float, torch.Tensor]]] = {}
        self.neg_cache: dict[int, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}

    @staticmethod
    def _insert(cache: dict[int, list], label: int, item: tuple, capacity: int) -> None:
        """Keep the ``capacity`` lowest-entropy items of ``label`` (item[0] is the entropy)."""
        entries = cache.setdefault(label, [])
        if len(entries) < capacity:
            entries.append(item)
        elif item[0] < entries[-1][0]:
            entries[-1] = item
        else:
            return
        entries.sort(key=lambda e: e[0])

    def _cache_logits(self, feat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.n_classes, device=feat.device)
        pos = [(lab, e[1]) for lab, entries in self.pos_cache.items() for e in entries]
        if pos:
            keys = torch.stack([k for _, k in pos])
            values = F.one_hot(torch.tensor([lab for lab, _ in pos]), self.n_classes).float().to(feat.device)
            out += self.pos_alpha * torch.exp(-self.pos_beta * (1 - keys @ feat)) @ values
        neg = [e for entries in self.neg_cache.values() for e in entries]
        if neg:
            keys = torch.stack([e[1] for e in neg])
            masks = torch.stack([e[2] for e in neg])
            out -= self.neg_alpha * torch.exp(-self.neg_beta * (1 - keys @ feat)) @ masks
        return out * (self.scale / 100.0)

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.clip.image_features(images)
        clip_logits = self._logits(feats, self.text_feats)
        probs = clip_logits.softmax(-1)
        norm_entropy = entropy(clip_logits) / math.log(self.n_classes)
        out = []
        for i in range(len(feats)):
            label = int(probs[i].argmax())
            h = float(norm_entropy[i])
            self._insert(self.pos_cache, label, (h, feats[i]), self.pos_capacity)
            if self.neg_entropy[0] < h < self.neg_entropy[1]:
                mask = (probs[i] < self.neg_mask).float()
                self._insert(self.neg_cache, label, (h, feats[i], mask), self.neg_capacity)
            out.append(clip_logits[i] + self._cache_logits(feats[i]))
        return torch.stack(out)

    def cache_sizes(self) -> tuple[int, int]:
        return (sum(len(v) for v in self.pos_cache.values()), sum(len(v) for v in self.neg_cache.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for kind, cache in (("pos", self.pos_cache), ("neg", self.neg_cache)):
            for label, entries in cache.items():
                for j, entry in enumerate(entries):
                    out[f"{kind}.{label}.{j}.entropy"] = torch.tensor(entry[0])
                    out[f"{kind}.{label}.{j}.feature"] = entry[1].detach().clone()
                    if kind == "neg":
                        out[f"{kind}.{label}.{j}.mask"] = entry[2].clone()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.reset()
        for key in sorted(k for k in tensors if k.endswith(".entropy")):
            kind, label, j, _ = key.split(".")
            base = f"{kind}.{label}.{j}"
            item: tuple = (float(tensors[key]), tensors[f"{base}.feature"])
            if kind == "neg":
                item = (*item, tensors[f"{base}.mask"])
            cache = self.pos_cache if kind == "pos" else self.neg_cache
            cache.setdefault(int(label), []).append(item)
        for cache in (self.pos_cache, self.neg_cache):
            for entries in cache.values():
                entries.sort(key=lambda e: e[0])


def build_method(name: str, clip: ClipAdapter, classnames: list[str], seed: int = 0,
                 **params: Any) -> TTAMethod:
    """The method called ``name`` with its knobs ``params`` (validated by its parameter model).

    Raises:
        InputError: unknown method or parameter.
    """
    if name not in METHODS:
        raise InputError(f"adapt.method: unknown test-time method {name!r} (known: {', '.join(METHODS)})")
    return METHODS.get(name)(clip, classnames, seed=seed, **params)
