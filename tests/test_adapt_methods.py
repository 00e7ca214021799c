"""TTA methods on a tiny random CLIP: EMA, swapped loss gradients, TPT resets, TDA caches, augmentations."""

from __future__ import annotations

import pytest
import torch

from cloudedge.adapt.augment import AugmentSpec, augment, make_views
from cloudedge.adapt.clip_model import adapter_for_bundled
from cloudedge.adapt.memory import TensorPeak
from cloudedge.adapt.methods import TDA, TPT, SwapPrompt, build_method
from cloudedge.config.model import ModelConfig
from cloudedge.errors import InputError
from cloudedge.models import build_model

CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def clip():
    model = build_model(ModelConfig(kind="clip", hidden=32, layers=1, heads=4, context=24, image_size=8,
                                    patch_size=4, channels=1, projection_dim=16), seed=0)
    return adapter_for_bundled(model)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_augment_is_seeded_and_keeps_shape():
    x = _images(4)
    a = augment(x, AugmentSpec(), torch.Generator().manual_seed(1))
    b = augment(x, AugmentSpec(), torch.Generator().manual_seed(1))
    c = augment(x, AugmentSpec(), torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    views = make_views(x, 63, AugmentSpec(), torch.Generator().manual_seed(0))
    assert views.shape == (4, 64, 1, 8, 8)
    assert torch.equal(views[:, 0], x)  # the original comes first


def test_identity_augment_is_exact():
    x = _images(3)
    spec = AugmentSpec(crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, brightness=0.0, contrast=0.0)
    torch.testing.assert_close(augment(x, spec, torch.Generator().manual_seed(0)), x, atol=1e-6, rtol=0)


def test_flip_mirrors_when_certain():
    x = _images(2)
    spec = AugmentSpec(crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, brightness=0.0, contrast=0.0,
                       flip_prob=1.0)
    torch.testing.assert_close(augment(x, spec, torch.Generator().manual_seed(0)), x.flip(-1), atol=1e-6, rtol=0)


def test_ema_update(clip):
    m = SwapPrompt(clip, CLASSES, momentum=0.9)
    online = torch.randn(m.learner.ctx.shape, generator=torch.Generator().manual_seed(0))
    target = m.target_ctx.clone()
    with torch.no_grad():
        m.learner.ctx.copy_(online)
    m.ema_update()
    torch.testing.assert_close(m.target_ctx, 0.9 * target + 0.1 * online)


def test_swapped_loss_gradient_reaches_only_online_prompt(clip):
    m = SwapPrompt(clip, CLASSES, temperature=0.5, balance="none")
    with torch.no_grad():  # online and target differ, so the two roles are distinguishable
        m.learner.ctx.add_(0.1 * torch.randn(m.learner.ctx.shape, generator=torch.Generator().manual_seed(3)))
    target_before = m.target_ctx.clone()
    f = clip.image_features(_images(5))
    f2 = clip.image_features(_images(5, seed=1))
    loss = m.swapped_loss(f, f2)
    loss.backward()
    assert m.learner.ctx.grad is not None and m.learner.ctx.grad.abs().sum() > 0
    assert not m.target_ctx.requires_grad and torch.equal(m.target_ctx, target_before)
    assert all(p.grad is None and not p.requires_grad for p in clip.model.parameters())
    # tiny case by hand: L = CE(q_t(v2), P(.|v1)) + CE(q_t(v1), P(.|v2))
    with torch.no_grad():
        t_on, t_tg = m._text(), m._text(m.target_ctx)
        q1 = (m.scale * f @ t_tg.T / 0.5).softmax(-1)
        q2 = (m.scale * f2 @ t_tg.T / 0.5).softmax(-1)
        want = (-(q2 * (m.scale * f @ t_on.T).log_softmax(-1)).sum(-1)
                - (q1 * (m.scale * f2 @ t_on.T).log_softmax(-1)).sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), want)


def test_swapprompt_step_moves_online_then_target(clip):
    m = SwapPrompt(clip, CLASSES, momentum=0.5, lr=1e-2)
    init = m.ctx_init.clone()
    logits = m.predict_batch(_images(6))
    assert logits.shape == (6, 3)
    delta_online = m.learner.ctx.detach() - init
    assert delta_online.abs().max() > 0
    torch.testing.assert_close(m.target_ctx, init + 0.5 * delta_online)
    m.reset()
    assert torch.equal(m.learner.ctx.detach(), init) and torch.equal(m.target_ctx, init)


def test_swapprompt_resume_continues_identically(clip):
    a = SwapPrompt(clip, CLASSES, lr=1e-2)
    a.predict_batch(_images(4, 0))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    next_a = a.predict_batch(_images(4, 1))
    b = SwapPrompt(clip, CLASSES, lr=1e-2)
    b.load_state_dict(state)
    torch.testing.assert_close(b.predict_batch(_images(4, 1)), next_a)


def test_tpt_resets_prompt_and_optimizer_per_image(clip):
    m = TPT(clip, CLASSES, n_views=7, lr=0.05)
    seen_states = []
    original_reset = m.reset

    def spying_reset():
        original_reset()
        seen_states.append((m.learner.ctx.detach().clone(), len(m.optimizer.state)))

    m.reset = spying_reset
    x = _images(3)
    m.predict_batch(x)
    assert len(seen_states) >= 3
    for ctx, n_opt_state in seen_states:
        assert torch.equal(ctx, m.ctx_init) and n_opt_state == 0
    assert torch.equal(m.learner.ctx.detach(), m.ctx_init)  # left clean after the batch


def test_tpt_prediction_does_not_depend_on_earlier_images(clip):
    x = _images(2)
    other = _images(2, seed=9)
    a = TPT(clip, CLASSES, n_views=7, lr=0.05).predict_batch(torch.cat([x[:1], x[1:]]))
    b = TPT(clip, CLASSES, n_views=7, lr=0.05).predict_batch(torch.cat([other[:1], x[1:]]))
    torch.testing.assert_close(a[1], b[1])  # same stream position, different first image
    zs = build_method("zeroshot", clip, CLASSES).predict_batch(x)
    assert (a - zs).abs().max() > 1e-6  # and the step did change the prediction


def test_tda_caches_keep_lowest_entropy(clip):
    m = TDA(clip, CLASSES, pos_capacity=2)
    m._insert(m.pos_cache, 0, (0.5, torch.zeros(16)), 2)
    m._insert(m.pos_cache, 0, (0.3, torch.ones(16)), 2)
    m._insert(m.pos_cache, 0, (0.9, torch.ones(16)), 2)  # worse than both: ignored
    assert [e[0] for e in m.pos_cache[0]] == [0.3, 0.5]
    m._insert(m.pos_cache, 0, (0.1, torch.ones(16)), 2)  # replaces the worst
    assert [e[0] for e in m.pos_cache[0]] == [0.1, 0.3]


def test_tda_stream_fills_caches_and_changes_logits(clip):
    m = TDA(clip, CLASSES, pos_capacity=3, neg_entropy=(0.0, 1.0))
    x = _images(12)
    zs = build_method("zeroshot", clip, CLASSES).predict_batch(x)
    out = m.predict_batch(x)
    pos, neg = m.cache_sizes()
    assert 1 <= pos <= 3 * len(CLASSES) and neg >= 1
    assert (out - zs).abs().max() > 0
    # the first image sees only itself in the cache: its logits move toward its own pseudo-label
    assert out[0].argmax() == zs[0].argmax()
    state = m.state_dict()
    m2 = TDA(clip, CLASSES, pos_capacity=3, neg_entropy=(0.0, 1.0))
    m2.load_state_dict(state)
    assert m2.cache_sizes() == (pos, neg)
    more = _images(3, seed=5)
    torch.testing.assert_close(m2.predict_batch(more), m.predict_batch(more))
    m.reset()
    assert m.cache_sizes() == (0, 0)


def test_coop_fit_learns_labels(clip):
    x = _images(30)
    y = torch.arange(30) % 3
    m = build_method("coop", clip, CLASSES, epochs=30, lr=0.05, batch_size=30)
    losses = m.fit(x, y)
    assert losses[-1] < losses[0]


def test_unknown_method_or_parameter_is_input_error(clip):
    with pytest.raises(InputError, match="unknown test-time method"):
        build_method("nope", clip, CLASSES)
    with pytest.raises(InputError, match="adapt.method.lrr: not a parameter of test-time method 'swapprompt'"):
        build_method("swapprompt", clip, CLASSES, lrr=1.0)
    with pytest.raises(InputError, match="predict_with"):
        build_method("swapprompt", clip, CLASSES, predict_with="best")


def test_tensor_peak_counts_live_tensors():
    with TensorPeak() as tp:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more, both alive
        del a, b
        c = torch.ones(500) + 1  # noqa: F841 - 2000 + 2000, after the first pair died
    assert tp.peak_bytes == 8000


def test_template_select_predicts_with_the_template_best_by_information_maximisation(clip):
    templates = ("a photo of a {}.", "a dark {}.", "{}")
    m = build_method("template-select", clip, CLASSES, templates=templates)
    zs = {t: build_method("zeroshot", clip, CLASSES, templates=[t]) for t in templates}
    seen = []
    for seed in range(3):  # the score runs over the whole stream so far, this batch included
        x = _images(5, seed=seed)
        seen.append(x)
        out = m.predict_batch(x)
        stream = torch.cat(seen)
        ims = []
        for t in templates:
            logits = zs[t].predict_batch(stream)
            p = logits.softmax(-1)
            mean = p.mean(0)
            ims.append(float(-(p * p.log()).sum(-1).mean() + (mean * mean.log()).sum()))
        best = templates[min(range(3), key=ims.__getitem__)]
        torch.testing.assert_close(m.scores().float(), torch.tensor(ims), rtol=1e-4, atol=1e-5)
        assert m.chosen == best
        torch.testing.assert_close(out, zs[best].predict_batch(x))
    # Resume continues identically; reset forgets the stream.
    m2 = build_method("template-select", clip, CLASSES, templates=templates)
    m2.load_state_dict(m.state_dict())
    more = _images(4, seed=9)
    torch.testing.assert_close(m2.predict_batch(more), m.predict_batch(more))
    m.reset()
    assert m.seen == 0 and float(m.prob_sum.abs().sum()) == 0.0
    # One template: zero-shot.
    one = build_method("template-select", clip, CLASSES)
    torch.testing.assert_close(one.predict_batch(more), build_method("zeroshot", clip, CLASSES).predict_batch(more))
