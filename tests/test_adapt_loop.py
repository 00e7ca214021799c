"""The prompt-tuning stage: edges behind the engine, federated prompt averaging, resume, loading."""

from __future__ import annotations

import pytest
import torch

from cloudedge.adapt.edges import AdaptWorker, Stream, clip_source
from cloudedge.adapt.stage import _share_prompts, adapt
from cloudedge.aggregate import weighted_mean
from cloudedge.config import config_from_dict
from cloudedge.config.model import ModelConfig
from cloudedge.engine import LocalEngine, Task, WorkerSpec
from cloudedge.errors import InputError
from cloudedge.models import build_model, save_local

MODEL = {"kind": "clip", "hidden": 32, "layers": 1, "heads": 4, "context": 32, "image_size": 8,
         "patch_size": 4, "channels": 1, "projection_dim": 16}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_local(build_model(ModelConfig(**MODEL), seed=0), tmp_path_factory.mktemp("clip") / "model")


def _cfg(clip_dir, **adapt_section):
    return config_from_dict({
        "seed": 0, "fleet": {"edges": [{"count": 2}]}, "data": {"source": "digits", "test_fraction": 0.5},
        "model": MODEL,
        "adapt": {"checkpoint": str(clip_dir), "stream_samples": 12, "batch_size": 4,
                  "method": {"name": "swapprompt", "lr": 0.05},
                  "streams": [{"corruption": "gaussian_noise", "severity": 3}, {"corruption": "contrast", "severity": 5}],
                  **adapt_section},
    })


def _worker_spec(clip_dir, n_images: int, seed: int) -> WorkerSpec:
    x = torch.rand(n_images, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return WorkerSpec(AdaptWorker, {
        "edge_id": f"edge{seed}", "source": {"path": str(clip_dir), "model_cfg": None}, "method": "swapprompt",
        "method_args": {"lr": 0.05}, "classnames": ["zero", "one", "two"], "images": x,
        "labels": torch.zeros(n_images, dtype=torch.long), "batch_size": 4, "seed": seed})


def test_federated_prompt_average_is_sample_weighted(clip_dir):
    from cloudedge.config.adapt import AdaptConfig
    from cloudedge.fleet import Fleet, VirtualClock

    cfg = _cfg(clip_dir)
    engine = LocalEngine()
    streams = [Stream("edge0", "a", torch.zeros(1), torch.zeros(1)),
               Stream("edge1", "b", torch.zeros(1), torch.zeros(1))]
    engine.register("edge0", _worker_spec(clip_dir, 8, 0))
    engine.register("edge1", _worker_spec(clip_dir, 4, 1))
    engine.run([Task("edge0", "step"), Task("edge0", "step"), Task("edge1", "step")])  # 8 vs 4 images seen
    before = engine.run([Task("edge0", "get_prompt"), Task("edge1", "get_prompt")])
    assert not torch.equal(before[0]["online"], before[1]["online"])
    clock = VirtualClock(Fleet.from_config(cfg.fleet, 0))
    totals = {"prompt_bytes_up": 0, "prompt_bytes_down": 0, "shares": 0}
    last = {"edge0": {"seen": 8}, "edge1": {"seen": 4}}
    _share_prompts(AdaptConfig(), streams, last, engine, clock, totals)
    after = engine.run([Task("edge0", "get_prompt"), Task("edge1", "get_prompt")])
    want = weighted_mean(before, [8.0, 4.0])
    for prompt in after:
        torch.testing.assert_close(prompt["online"], want["online"])
        torch.testing.assert_close(prompt["target"], want["target"])
    assert totals["prompt_bytes_up"] > 2 * before[0]["online"].numel() * 4  # both keys, both edges
    assert clock.summary()["bytes_total"] == totals["prompt_bytes_up"] + totals["prompt_bytes_down"]


def test_stage_runs_every_edge_and_shares(clip_dir, tmp_path):
    res = adapt(_cfg(clip_dir, share_every=1), tmp_path / "run", method={"name": "swapprompt", "lr": 0.05})
    s = res.summary
    assert set(s["acc_per_shift"]) == {"gaussian_noise@3", "contrast@5"}
    assert all(e["images"] == 12 for e in s["acc_per_edge"].values())
    assert s["prompt_shares"] == 3 and s["prompt_bytes_up"] > 0 and s["peak_mem_mb"] > 0
    assert len(res.rows) == 2 * 3  # two edges, three batches each
    # Both clocks time the same spans (every batch but the first, which measures memory).
    assert s["ms_per_image"] > 0 and s["cpu_ms_per_image"] > 0
    z = adapt(_cfg(clip_dir, share_every=1), None, method="zeroshot").summary
    assert z["prompt_shares"] == 0 and z["prompt_bytes_up"] == 0  # nothing to share


def test_bf16_autocast_adapts_close_to_fp32_with_float32_prompts_and_less_memory(clip_dir):
    from cloudedge.adapt.edges import load_clip_source
    from cloudedge.adapt.prompts import PromptLearner

    source = {"path": str(clip_dir), "model_cfg": None}
    clips = {p: load_clip_source(source, precision=p) for p in ("fp32", "bf16")}
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    feats = {p: (c.image_features(images), c.text_features(["a photo of a one.", "a photo of a two."]),
                 PromptLearner(c, ["one", "two"]).normalized_text_features()) for p, c in clips.items()}
    for full, half in zip(feats["fp32"], feats["bf16"], strict=True):
        assert half.dtype == torch.float32 and not torch.equal(full, half)
        assert bool(((full * half).sum(-1) > 0.99).all())  # the same directions, to bfloat16's precision
    fp32 = adapt(_cfg(clip_dir), None)
    bf16 = adapt(_cfg(clip_dir, precision="bf16"), None)
    assert fp32.summary["peak_mem_mb"] > bf16.summary["peak_mem_mb"] > 0  # activations kept in bfloat16, measured
    assert all(t.dtype == torch.float32 for p in bf16.artefacts["prompts"].values() for t in p.values())
    differs = [not torch.equal(p[k], bf16.artefacts["prompts"][e][k])
               for e, p in fp32.artefacts["prompts"].items() for k in p]
    assert any(differs)  # the forward really ran in bfloat16


def test_resume_matches_an_uninterrupted_run(clip_dir, tmp_path):
    cfg = _cfg(clip_dir, checkpoint_every=1)
    full = adapt(cfg, tmp_path / "full").summary

    class Stop(Exception):
        pass

    def stop_after_two(r, rows):
        if r == 2:
            raise Stop

    with pytest.raises(Stop):
        adapt(cfg, tmp_path / "cut", on_round=stop_after_two)
    resumed = adapt(cfg, tmp_path / "cut", resume=True)
    assert resumed.summary["acc_per_edge"] == full["acc_per_edge"]
    rounds = [r["round"] for r in resumed.run_dir.read_metrics()]
    assert sorted(rounds) == sorted([1, 1, 2, 2, 3, 3])


def test_missing_checkpoint_and_bad_corruption_are_input_errors(clip_dir, tmp_path):
    cfg = config_from_dict({"model": MODEL, "adapt": {}})
    with pytest.raises(InputError, match="adapt.checkpoint"):
        clip_source(cfg.adapt, cfg)
    bad = _cfg(clip_dir, streams=[{"corruption": "fog", "severity": 3}])
    with pytest.raises(InputError, match="unknown corruption 'fog'"):
        adapt(bad, None)


def test_weights_file_with_model_config(clip_dir, tmp_path):
    from safetensors.torch import save_file

    from cloudedge.adapt.clip_model import load_clip

    model = build_model(ModelConfig(**MODEL), seed=0)
    path = tmp_path / "step-000001.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    clip = load_clip(path, ModelConfig(**MODEL))
    ref = load_clip(clip_dir)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip.image_features(x), ref.image_features(x))
    with pytest.raises(InputError, match="needs the model config"):
        load_clip(path)


class _FailsOnce(AdaptWorker):
    """An edge worker whose first step crashes (an edge server that rebooted), then works."""

    crashed = False

    def step(self):
        if not _FailsOnce.crashed:
            _FailsOnce.crashed = True
            raise RuntimeError("edge server rebooted")
        return super().step()


def test_a_failed_edge_is_restored_and_finishes_its_stream(clip_dir, tmp_path):
    cfg = _cfg(clip_dir)
    engine = LocalEngine()
    full = adapt(cfg, None, LocalEngine()).summary

    def break_edge1(r, rows):
        if r == 1:  # the replacement worker starts from its spec; the loop restores its state
            engine.register("edge1", WorkerSpec(_FailsOnce, engine._specs["edge1"].kwargs))

    res = adapt(cfg, tmp_path / "run", engine, on_round=break_edge1)
    failures = [row for row in res.rows if row.get("failed")]
    assert len(failures) == 1 and "edge server rebooted" in failures[0]["failures"]["edge1"]
    # Every image of both streams was still adapted on and counted, from the restored state.
    assert all(e["images"] == 12 for e in res.summary["acc_per_edge"].values())
    assert res.summary["acc_per_edge"]["edge0"] == full["acc_per_edge"]["edge0"]
    assert max(row["round"] for row in res.rows) == 4  # one extra round for the skipped batch


def test_coops_cloud_phase_fits_once_and_every_edge_streams_with_that_context(clip_dir):
    from cloudedge.adapt.methods import CoOp

    res = adapt(_cfg(clip_dir, coop_epochs=1, coop_samples=10), None, method="coop")
    prompts = res.artefacts["prompts"]
    assert set(prompts) == {"edge0", "edge1"}
    for k, v in prompts["edge0"].items():
        assert torch.equal(v, prompts["edge1"][k])  # one context, fitted on the source split, sent to both
    unfitted = CoOp(adapt_clip(clip_dir), ["x"] * 10, seed=0, lr=0.05).prompt_state()
    assert any(not torch.equal(v, unfitted[k]) for k, v in prompts["edge0"].items())  # it was fitted
    assert res.summary["prompt_bytes_down"] > 0 and res.summary["prompt_bytes_up"] == 0
    assert res.summary["bytes_total"] == res.summary["prompt_bytes_down"]


def adapt_clip(clip_dir):
    from cloudedge.adapt.clip_model import load_clip

    return load_clip(str(clip_dir))


def test_a_resume_keeps_the_round_a_failure_added_and_shares_with_a_failed_edge(clip_dir, tmp_path):
    cfg = _cfg(clip_dir, checkpoint_every=1, share_every=1)
    engine = LocalEngine()

    class Stop(Exception):
        pass

    def break_then_stop(r, rows):
        if r == 1:  # edge1's next step crashes: the share of round 2 runs without its figures of that round
            _FailsOnce.crashed = False
            engine.register("edge1", WorkerSpec(_FailsOnce, engine._specs["edge1"].kwargs))
        if r == 3:
            raise Stop

    with pytest.raises(Stop):
        adapt(cfg, tmp_path / "run", engine, on_round=break_then_stop)
    resumed = adapt(cfg, tmp_path / "run", resume=True)
    # The failure's extra round survives the restart: every image of both streams is adapted on.
    assert all(e["images"] == 12 for e in resumed.summary["acc_per_edge"].values())
    assert max(r["round"] for r in resumed.run_dir.read_metrics()) == 4
