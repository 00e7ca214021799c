"""Where stages run: `pretrain.device` / `precision`, `finetune.device`, and what crosses the engine.

CI has no GPU: the CUDA tests here run only where one is present (the prepared accelerator run in
benchmarks/gpu/ runs this file first). Everything else runs on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from cloudedge.cli import main
from cloudedge.config import config_from_dict
from cloudedge.engine import LocalEngine
from cloudedge.errors import InputError
from cloudedge.pretrain.stage import pretrain

CUDA = torch.cuda.is_available()


def _cfg(**pretrain_fields: object) -> object:
    return config_from_dict({
        "seed": 1,
        "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid"}]}]},
        "data": {"source": "pydocs", "max_docs": 120},
        "model": {"kind": "gpt", "hidden": 16, "layers": 1, "heads": 2, "context": 16},
        "pretrain": {"task": "lm", "rounds": 3, "global_batch": 12, "eval_every": 1, "eval_samples": 16,
                     "lr": 3e-3, **pretrain_fields},
    })


@pytest.mark.skipif(CUDA, reason="checks the error raised where no CUDA device exists")
def test_asking_for_cuda_without_one_names_the_field() -> None:
    with pytest.raises(InputError, match=r"pretrain\.device: 'cuda'"):
        pretrain(_cfg(device="cuda"))


def test_bf16_autocast_trains_float32_weights_close_to_fp32() -> None:
    fp32 = pretrain(_cfg(precision="fp32"))
    bf16 = pretrain(_cfg(precision="bf16"))
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # mixed precision, not bf16 weights
    losses = [(a["val_loss"], b["val_loss"]) for a, b in zip(fp32.rows, bf16.rows, strict=True)]
    assert all(b == pytest.approx(a, abs=0.05) for a, b in losses)
    assert any(a != b for a, b in losses)  # the forward really ran in bfloat16
    assert bf16.rows[-1]["val_loss"] < bf16.rows[0]["train_loss"]


def test_rows_separate_compute_time_from_engine_time() -> None:
    rows = pretrain(_cfg(algorithm="local", local_steps=2)).rows
    for row in rows:
        # Workers run one after another inside the engine call: their own compute fits in it.
        assert 0 < row["compute_wall_s"] <= row["work_wall_s"]
        assert row["mfu_measured"] > 0 and row["peak_flops_measured"] > 0
        # The same FLOPs over the shorter time.
        assert row["mfu_compute"] == pytest.approx(row["mfu_measured"] * row["work_wall_s"] / row["compute_wall_s"])


def test_bench_set_options_reach_the_benchmark(tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path)]
    assert main(["bench", "pretrain-hetero", "--set", "size=gpt-1t", *out]) == 2
    assert "size must be one of" in capsys.readouterr().err
    assert main(["bench", "pretrain-hetero", "--set", "nope=1", *out]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "pretrain-hetero", "--set", "rounds", *out]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_run_matches_the_cpu_run_and_resumes(tmp_path) -> None:
    cpu = pretrain(_cfg())
    gpu = pretrain(_cfg(device="cuda"), tmp_path / "gpu")
    assert next(gpu.model.parameters()).device.type == "cuda"
    for a, b in zip(cpu.rows, gpu.rows, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-3)

    def stop(round_idx: int, row: dict) -> None:  # interrupted after round 1 (a resume keeps the config)
        if round_idx == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(device="cuda", checkpoint_every=1), tmp_path / "cut", on_round=stop)
    assert (tmp_path / "cut" / "checkpoints" / "pretrain" / "step-000001.json").exists()
    redone: list[int] = []
    resumed = pretrain(_cfg(device="cuda", checkpoint_every=1), tmp_path / "cut", resume=True,
                       on_round=lambda r, row: redone.append(r))
    assert redone == [2] and [r["round"] for r in resumed.rows] == [0, 1, 2]  # from the checkpoint, on the GPU
    assert [r["val_loss"] for r in resumed.rows] == pytest.approx([r["val_loss"] for r in gpu.rows], abs=1e-3)


def _finetune_cfg(**finetune_fields: object) -> object:
    return config_from_dict({
        "seed": 3,
        "fleet": {"edges": [{"count": 2, "devices": [{"count": 2, "profile": "phone-mid",
                                                       "overrides": {"availability": 1.0}}]}]},
        "data": {"source": "digits", "partition": {"kind": "dirichlet", "alpha": 1.0}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0, "mode": {"name": "product", "refactor": "merge"}},
                     "sync": {"name": "hierfavg", "k1": 3, "k2": 1, "deadline_factor": None},
                     "batch_size": 8, "lr": 2e-2, "time_budget_s": 1e9, "max_cloud_rounds": 2, "eval_max": 64,
                     **finetune_fields},
    })


@pytest.mark.skipif(CUDA, reason="checks the error raised where no CUDA device exists")
def test_finetune_on_cuda_without_one_names_the_field() -> None:
    from cloudedge.finetune import finetune

    with pytest.raises(InputError, match=r"finetune\.device: 'cuda'"):
        finetune(_finetune_cfg(device="cuda"), None, LocalEngine())


def test_finetune_bf16_autocast_trains_close_to_fp32_on_the_same_clock() -> None:
    from cloudedge.finetune import finetune

    fp32 = finetune(_finetune_cfg(), None, LocalEngine())
    bf16 = finetune(_finetune_cfg(precision="bf16"), None, LocalEngine())
    assert [r["virtual_time_s"] for r in bf16.rows] == [r["virtual_time_s"] for r in fp32.rows]  # same FLOPs
    pairs = [(a["loss"], b["loss"]) for a, b in zip(fp32.rows, bf16.rows, strict=True)]
    assert all(b == pytest.approx(a, rel=0.05) for a, b in pairs)
    assert any(a != b for a, b in pairs)  # the forward really ran in bfloat16
    assert all(v.dtype == torch.float32 for v in bf16.artefacts["adapters"].values())  # adapters stay float32


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_finetune_bf16_on_cuda_keeps_the_cpu_clock() -> None:
    from cloudedge.finetune import finetune

    cpu = finetune(_finetune_cfg(precision="bf16"), None, LocalEngine()).rows
    gpu = finetune(_finetune_cfg(device="cuda", precision="bf16"), None, LocalEngine()).rows
    assert [r["virtual_time_s"] for r in gpu] == pytest.approx([r["virtual_time_s"] for r in cpu], rel=1e-12)
    assert all(b["loss"] == pytest.approx(a["loss"], rel=0.05) for a, b in zip(cpu, gpu, strict=True))


def test_finetune_bf16_memory_need_counts_the_autocast_copy_and_halves_activations() -> None:
    from cloudedge.finetune.reliability import memory_need

    info = {"params": 1000, "model_bytes": 4000, "trainable_bytes": 400, "activation_bytes": 8000}
    fp32, bf16 = memory_need(info, "adamw"), memory_need(info, "adamw", precision="bf16")
    assert fp32 == {"weights": 4000, "training_state": 1200, "activations": 8000, "total": 13200}
    assert bf16 == {"weights": 4000 + 2 * 1000, "training_state": 1200, "activations": 4000, "total": 11200}


def test_finetune_precision_is_checked_by_name() -> None:
    with pytest.raises(InputError, match=r"finetune\.precision"):
        _finetune_cfg(precision="fp16")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_finetune_on_cuda_matches_the_cpu_run() -> None:
    from cloudedge.finetune import finetune

    cpu = finetune(_finetune_cfg(), None, LocalEngine()).rows
    gpu = finetune(_finetune_cfg(device="cuda"), None, LocalEngine()).rows
    assert [r["round"] for r in gpu] == [r["round"] for r in cpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3) and b["virtual_time_s"] == pytest.approx(a["virtual_time_s"])


def _adapt_cfg(clip_dir, **adapt_fields: object) -> object:
    return config_from_dict({
        "seed": 0, "fleet": {"edges": [{"count": 1}]}, "data": {"source": "digits", "test_fraction": 0.5},
        "model": _ADAPT_CLIP,
        "adapt": {"checkpoint": str(clip_dir), "stream_samples": 8, "batch_size": 4,
                  "method": {"name": "swapprompt", "lr": 0.05}, "streams": [{"corruption": "gaussian_noise"}],
                  **adapt_fields},
    })


_ADAPT_CLIP = {"kind": "clip", "hidden": 32, "layers": 1, "heads": 4, "context": 32, "image_size": 8,
               "patch_size": 4, "channels": 1, "projection_dim": 16}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adapt_on_cuda_predicts_as_the_cpu_run(tmp_path, precision) -> None:
    from cloudedge.adapt.stage import adapt
    from cloudedge.config.model import ModelConfig
    from cloudedge.models import build_model, save_local

    clip_dir = save_local(build_model(ModelConfig(**_ADAPT_CLIP), seed=0), tmp_path / "clip")
    cpu = adapt(_adapt_cfg(clip_dir, precision=precision), None)
    gpu = adapt(_adapt_cfg(clip_dir, precision=precision, device="cuda"), None)
    assert [r["seen"] for r in gpu.rows] == [r["seen"] for r in cpu.rows]
    want, got = cpu.artefacts["prompts"]["edge0"], gpu.artefacts["prompts"]["edge0"]  # what SwapPrompt learned
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in got.values())  # back in host memory
    if precision == "fp32":
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-4, rtol=0)
    else:  # bfloat16 kernels differ between the two hosts: the same learning, not the same bits
        # (on the CPU, fp32 and bf16 runs of this test's stream move the prompt in directions 0.98 alike)
        moved = [(p["online"] - p["target"]).flatten() for p in (want, got)]
        assert float(torch.nn.functional.cosine_similarity(*moved, dim=0)) > 0.9


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_adapt_tta_prompt_methods_run_on_cuda_with_a_hugging_face_clip(tmp_path, monkeypatch) -> None:
    """``cloudedge bench adapt-tta --set checkpoint=<HF CLIP> --set device=cuda --set precision=bf16``:
    every kind of method (a prompt fitted at the cloud, per-image, online) on the GPU."""
    pytest.importorskip("matplotlib")  # the glyphs are rendered from its fonts
    from cloudedge.bench.adapt_tta import METHODS, run_methods
    from tests.test_adapt_prompts import save_tiny_hf_clip

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hf = save_tiny_hf_clip(tmp_path / "hf", context=64)
    specs = {"coop": METHODS["coop"], "tpt": {"method": {"name": "tpt", "n_views": 3}},
             "swapprompt": METHODS["swapprompt"], "template-select": METHODS["template-select"]}
    got = run_methods(hf, [{"shift": "inverted"}], 36, specs, "local", 1, where=("cuda", "bf16"))
    assert list(got) == list(specs)
    assert all(0.0 <= r["acc_per_shift"]["inverted"] <= 1.0 and r["timed_images"] > 0 for r in got.values())
