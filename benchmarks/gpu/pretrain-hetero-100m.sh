#!/usr/bin/env bash
# The prepared accelerator run of issue 8 (docs/performance.md, "A ~100M-parameter GPT, and the
# prepared GPU run"): pre-training a GPT of ~100M parameters through the `pretrain-hetero` stage on
# one GPU: tokens/s and MFU.
#
# Where a session is lent a GPU machine (its image has torch and transformers, not pydantic):
#   1. here, once:    bash benchmarks/gpu/pretrain-hetero-100m.sh prepare   (wheels into .whl/)
#   2. device tool:   run(command="bash benchmarks/gpu/pretrain-hetero-100m.sh", carry=[".whl"],
#                         timeout_s=540)
# It writes under $OUT: gpu.txt, tests.txt, peaks.json, hetero.log, profile.txt, hetero/results.json
# (or, when the stage is stopped, hetero/partial.json: every method run that finished).
# Run on an H200 on 2026-11-30 (docs/performance.md): the tests and peaks took ~40 s; the stage
# did not finish in its 270 s then, because every device worker spent ~1 s of CPU randomly
# initialising a model it then overwrote (fixed since) and sync-reweighted needs ~18x the rounds
# of sync-uniform at this size, not 3x. Hence 4 baseline rounds now, and progress.py: each round
# prints a line and a profile is written even if the timeout stops the stage. About 4-5 minutes
# in all; each step has its own timeout, 480 s in all.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "prepare" ]]; then
  # The versions the project's venv resolved, as wheels for the device image's Python 3.12.
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  prep_py=python3
  [[ -x .venv/bin/python ]] && prep_py=.venv/bin/python
  "$prep_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  ls .whl
  exit 0
fi

DEVICE="${CE_DEVICE:-cuda}"
SIZE="${CE_SIZE:-gpt-100m}"
PY="${CE_PYTHON:-python3}"
OUT="${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
if ! "$PY" -c "import pydantic" 2>/dev/null; then  # the device image lacks it: install the carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
            "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'; } | tee "$OUT/gpu.txt"

# 1. The device tests (their CUDA cases run only here).
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_engine.py -k "cuda or gpu" 2>&1 | tee "$OUT/tests.txt" || true

# 2. Matmul peaks on this device, the denominators of MFU.
timeout 60 "$PY" - "$DEVICE" > "$OUT/peaks.json" <<'PYEOF'
import json, sys
import torch
from cloudedge.perf import measure_matmul_peak, stage_peak_size
dev = sys.argv[1]
size = stage_peak_size(dev)  # the matmul the stage's rows use as their MFU denominator
out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "size": size}
for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    out[f"{name}_flops"] = measure_matmul_peak(size=size, dtype=dtype, device=dev)
torch.backends.cuda.matmul.allow_tf32 = True
out["tf32_flops"] = measure_matmul_peak(size=size, dtype=torch.float32, device=dev, repeats=4) if dev == "cuda" else None
print(json.dumps(out, indent=1))
PYEOF
cat "$OUT/peaks.json"

# 3. The stage, compute-bound regime: sync-uniform (4 rounds: the budget) and sync-reweighted (until
#    the budget is spent: ~18x the rounds at this size, each far cheaper), bf16 autocast, one seed.
#    progress.py prints every round as it ends and writes profile.txt, also when the timeout hits.
# A stage stopped by its timeout is reported here, not as the script's exit code (124 would read as
# the device tool's own timeout): the log and profile.txt still say how far it got.
timeout -s TERM 300 "$PY" benchmarks/gpu/progress.py bench pretrain-hetero --quick --out "$OUT/hetero" \
  --set size="$SIZE" --set device="$DEVICE" --set precision=bf16 \
  --set methods=compute/sync-reweighted --set rounds=4 --set seeds=1 2>&1 | tee "$OUT/hetero.log" \
  || echo "the stage stopped early (exit $?): see hetero.log and profile.txt"
[[ -f "$OUT/hetero/results.json" ]] || exit 0
"$PY" - "$OUT/hetero/results.json" <<'PYEOF'
import json, sys
res = json.load(open(sys.argv[1]))
for name, m in res["methods"].items():
    print(name, {k: m.get(k) for k in ("rounds", "wall_s", "tokens", "tokens_per_s", "tokens_per_s_engine",
                                      "tokens_per_s_compute", "mfu_measured_median", "mfu_compute_median",
                                      "peak_flops_measured", "peak_gpu_mb", "final_val_loss")})
PYEOF
