"""Where the room of `adapt-tta` is, and whether an unsupervised objective on the prompt can reach it.

A diagnostic, not a benchmark: it prints what docs/prompt-tuning.md ("What is missing") quotes.
Run it from the repository root with the glyph CLIP built (`cloudedge bench adapt-tta` builds it):

    python benchmarks/diagnostics/adapt_room.py [--quick] [--images 512]

On the streams of `adapt-tta` (the first ``--images`` of each, the benchmark's seeded order):

1. ``values``: on each style stream, the mean entropy (TPT's objective), the entropy of the
   stream's mean prediction, and their difference (the information-maximisation objective; lower
   is better) under the plain prompt and under each prompt that names a style. An objective that
   prefers the named prompt could in principle find the room.
2. ``offline``: the ideal of the online methods. The 4-token context starts from "a photo of a"
   and takes 300 full-batch AdamW steps on the frozen features of the *whole* stream at once, with
   no views. Objectives: mean entropy, information maximisation, and Sinkhorn-balanced
   self-labelling from an EMA target context (m 0.99, temperature 0.5, SwapPrompt's targets).
   Prints the accuracy every 50 steps. A test-time method sees less than this.
3. ``swap-views``: SwapPrompt's swapped loss offline (150 steps, EMA targets as above), its two
   views drawn with the benchmark's views, the augment module's mild defaults, none (both views
   the image itself), or one of each (the image and a benchmark view); or "view targets": the two
   benchmark views give the targets and the online prompt learns to predict them from the image
   itself. 4 fixed pairs per image, one pair per step. What the views do to the prompt.
4. ``prototypes``: information maximisation with the 36 class text features free (one shift vector
   each, from the plain prompt's; 300 full-batch Adam steps at lr 0.01).
5. ``confusions``: on each style stream, the plain prompt's commonest mistakes and its mean
   confidence when right and when wrong.
6. ``views``: TPT's signal without tuning. The prediction is the mean log-probability of the 6 most
   confident of 64 views (63 augmented + the original), under the plain prompt, with the
   benchmark's views and with TPT's published crops (area 0.08 to 1, no rotation or jitter).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import torch

from cloudedge.adapt.augment import AugmentSpec, augment, make_views
from cloudedge.adapt.edges import build_streams, clip_source, load_clip_source
from cloudedge.adapt.glyph_clip import GLYPH_VIEWS, glyph_clip
from cloudedge.adapt.methods import entropy, sinkhorn
from cloudedge.adapt.prompts import PromptLearner
from cloudedge.bench import adapt_tta
from cloudedge.data.glyph_styles import STYLES, style_template

STEPS, REPORT_EVERY, LR = 300, 50, 0.1


def info_max(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy minus the entropy of the mean prediction (lower: confident and balanced)."""
    mean = logits.softmax(-1).mean(0)
    return entropy(logits).mean() + (mean * mean.clamp_min(1e-12).log()).sum()


def offline(clip, classnames, feats, labels, objective: str, pairs: list | None = None, steps: int = STEPS,
            learn_on_image: bool = False) -> list[str]:
    """Accuracy on ``feats`` every REPORT_EVERY steps of full-batch AdamW on the context. ``pairs``:
    for ``swap``, the (view 1, view 2) features cycled through, one pair per step;
    ``learn_on_image``: the views give the targets, the online prompt predicts them from the image."""
    learner = PromptLearner(clip, classnames, seed=0)
    target = learner.ctx.detach().clone()
    opt = torch.optim.AdamW([learner.ctx], lr=LR, weight_decay=0.0)
    scale, out = clip.logit_scale, []
    for step in range(steps + 1):
        logits = scale * feats @ learner.normalized_text_features().T
        if step % REPORT_EVERY == 0:
            out.append(f"{step}:{100 * (logits.argmax(-1) == labels).float().mean():.1f}")
        if objective == "entropy":
            loss = entropy(logits).mean()
        elif objective == "info-max":
            loss = info_max(logits)
        else:  # Sinkhorn-balanced targets from the EMA context; "swap": SwapPrompt's loss on views
            v1, v2 = pairs[step % len(pairs)] if objective == "swap" else (feats, feats)
            with torch.no_grad():
                target_text = learner.normalized_text_features(target)
                q1, q2 = (sinkhorn(scale * v @ target_text.T / 0.5, 3) for v in (v1, v2))
            text = learner.normalized_text_features()
            if learn_on_image:
                logp = (scale * feats @ text.T).log_softmax(-1)
                loss = (-(q1 * logp).sum(-1) - (q2 * logp).sum(-1)).mean()
            else:
                logp1, logp2 = ((scale * v @ text.T).log_softmax(-1) for v in (v1, v2))
                loss = (-(q2 * logp1).sum(-1) - (q1 * logp2).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            target.mul_(0.99).add_(learner.ctx.detach(), alpha=0.01)
    return out


def free_prototypes(clip, plain_text, feats, labels) -> list[str]:
    """Information maximisation with the class text features themselves free (a shift per class,
    from the plain prompt's): far more freedom than a 4-token context has. 300 full-batch Adam steps."""
    delta = torch.zeros_like(plain_text, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.01)
    out = []
    for step in range(STEPS + 1):
        logits = clip.logit_scale * feats @ torch.nn.functional.normalize(plain_text + delta, dim=-1).T
        if step % REPORT_EVERY == 0:
            out.append(f"{step}:{100 * (logits.argmax(-1) == labels).float().mean():.1f}")
        loss = info_max(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return out


def confident_views(clip, text, images, labels, spec: AugmentSpec) -> float:
    correct = 0
    for start in range(0, len(images), 32):
        views = make_views(images[start:start + 32], 63, spec, torch.Generator().manual_seed(start))
        b, v = views.shape[:2]
        logits = clip.logit_scale * clip.image_features(views.flatten(0, 1)).view(b, v, -1) @ text.T
        keep = entropy(logits).argsort(dim=1)[:, :6]
        chosen = torch.gather(logits, 1, keep[..., None].expand(-1, -1, logits.shape[-1]))
        pred = (chosen.log_softmax(-1).logsumexp(1) - math.log(6)).argmax(-1)
        correct += int((pred == labels[start:start + 32]).sum())
    return 100 * correct / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick CLIP (default: the full one)")
    ap.add_argument("--images", type=int, default=512, help="images per stream")
    ap.add_argument("--parts", default="values,offline,views,swap-views,prototypes,confusions")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    clip_dir, _ = glyph_clip(args.quick)
    shifts = adapt_tta.SHIFTS
    cfg = adapt_tta._config(clip_dir, shifts, args.images, 1)
    streams, _, classnames = build_streams(cfg, cfg.adapt, [f"edge{i}" for i in range(len(shifts))])
    clip = load_clip_source(clip_source(cfg.adapt, cfg, None))
    text = {name: torch.nn.functional.normalize(clip.text_features([tpl.format(c) for c in classnames]), dim=-1)
            for name, tpl in [("plain", "a photo of a {}."), *[(s, style_template(s)) for s in STYLES]]}
    print(f"CLIP {clip_dir.name}, {args.images} images per stream")
    for s in streams:
        with torch.no_grad():
            feats = clip.image_features(s.images)
        if "values" in parts and s.shift in STYLES:
            cells = []
            for name, t in text.items():
                logits = clip.logit_scale * feats @ t.T
                acc = 100 * (logits.argmax(-1) == s.labels).float().mean()
                cells.append(f"{name} acc {acc:.1f} H {entropy(logits).mean():.3f} IM {info_max(logits):.3f}")
            print(f"values  {s.shift:18s} " + " | ".join(cells), flush=True)
        if "offline" in parts:
            for objective in ("entropy", "info-max", "sinkhorn-ema"):
                print(f"offline {s.shift:18s} {objective:12s} " + " ".join(offline(clip, classnames, feats, s.labels,
                                                                                  objective)), flush=True)
        if "swap-views" in parts:
            for label, spec in (("benchmark views", AugmentSpec(**GLYPH_VIEWS)), ("mild views", AugmentSpec()),
                                ("no views", None), ("image + view", AugmentSpec(**GLYPH_VIEWS)),
                                ("view targets", AugmentSpec(**GLYPH_VIEWS))):
                gen = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    if spec is None:
                        pairs = [(feats, feats)]
                    elif label == "image + view":  # one view is the test image, the other a benchmark view
                        pairs = [(feats, clip.image_features(augment(s.images, spec, gen))) for _ in range(4)]
                    else:
                        pairs = [tuple(clip.image_features(augment(s.images, spec, gen)) for _ in range(2))
                                 for _ in range(4)]
                print(f"swap    {s.shift:18s} {label:15s} " + " ".join(offline(
                    clip, classnames, feats, s.labels, "swap", pairs, steps=150,
                    learn_on_image=label == "view targets")), flush=True)
        if "prototypes" in parts:
            print(f"protos  {s.shift:18s} info-max     " + " ".join(free_prototypes(clip, text["plain"], feats,
                                                                                   s.labels)), flush=True)
        if "confusions" in parts and s.shift in STYLES:
            with torch.no_grad():
                logits = clip.logit_scale * feats @ text["plain"].T
            pred, conf = logits.argmax(-1), logits.softmax(-1).max(-1).values
            wrong = pred != s.labels
            pairs = Counter((classnames[int(a)], classnames[int(b)]) for a, b in zip(s.labels[wrong], pred[wrong], strict=True))
            print(f"confuse {s.shift:18s} mean confidence right {conf[~wrong].mean():.2f} wrong {conf[wrong].mean():.2f}; "
                  + ", ".join(f"{a} -> {b} x{n}" for (a, b), n in pairs.most_common(8)), flush=True)
        if "views" in parts and s.shift not in STYLES:
            with torch.no_grad():
                ours = confident_views(clip, text["plain"], s.images, s.labels, AugmentSpec(**GLYPH_VIEWS))
                tpt = confident_views(clip, text["plain"], s.images, s.labels, AugmentSpec(crop_scale=(0.08, 1.0),
                                      degrees=0.0, brightness=0.0, contrast=0.0))
                zs = 100 * ((clip.logit_scale * feats @ text["plain"].T).argmax(-1) == s.labels).float().mean()
            print(f"views   {s.shift:18s} zero-shot {zs:.1f} | confident views (ours) {ours:.1f} | "
                  f"(TPT's crops) {tpt:.1f}", flush=True)


if __name__ == "__main__":
    main()
