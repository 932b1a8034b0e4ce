#!/usr/bin/env bash
# One prepared run on a lent GPU box (a plain checkout copied there, no network): install the checkout
# without dependencies (the box brings torch, timm, peft, onnx, onnxruntime), run ami-bench gpu-check,
# then the whole test suite. Everything it writes goes under $OUT (default: ./device-run).
#
#   bash bench/device_run.sh [CROPS_DIR]      # CROPS_DIR: a small folder of crops for the end-to-end row
#
# Time: gpu-check gets GPU_BUDGET seconds (default 200), the suite SUITE_BUDGET (default 230); the two
# run one after the other so that the suite's CPU load does not disturb the check's host timings.
set -uo pipefail
OUT=${OUT:-device-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
crops=${1:-}

{
  nvidia-smi
  python3 -c "import platform, torch, timm, peft, onnx, onnxruntime as ort; \
print('python', platform.python_version(), 'torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__, \
'onnx', onnx.__version__, 'onnxruntime', ort.__version__, ort.get_available_providers())"
  nproc
} > "$OUT/environment.log" 2>&1

python3 -m pip install --no-deps --no-build-isolation --no-index -q -e . > "$OUT/pip.log" 2>&1 || echo "pip install -e . failed (see pip.log)"

check_args=(--out "$OUT/check" --budget "${GPU_BUDGET:-200}")
[ -n "$crops" ] && check_args+=(--crops "$crops")
timeout $(( ${GPU_BUDGET:-200} + 40 )) python3 bench/gpu_check.py "${check_args[@]}" > "$OUT/gpu-check.log" 2>&1
echo "gpu-check exit code $?" | tee -a "$OUT/gpu-check.log"

xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)
timeout "${SUITE_BUDGET:-230}" python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" -rs tests/ > "$OUT/pytest-full-suite.log" 2>&1
echo "pytest exit code $?" | tee -a "$OUT/pytest-full-suite.log"
tail -n 3 "$OUT/pytest-full-suite.log"
