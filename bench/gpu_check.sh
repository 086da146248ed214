#!/usr/bin/env bash
# The GPU measurements this repository still owes (issue 14: the fast mode on a GPU, GPU sizing),
# as one prepared run for a machine that has CUDA and can fetch nothing: its python3 must hold
# torch (CUDA), transformers, numpy, pillow and torchvision; segment-anything, ftfy (CLIP's text
# cleaning, with wcwidth) and pytest (with pluggy, iniconfig, packaging), pure-Python packages, come
# as wheels in .gpu-wheels. Prepare them here, then run it there:
#
#   pip download --no-deps -d .gpu-wheels segment-anything==1.0 ftfy wcwidth pytest pluggy iniconfig \
#     packaging && echo /.gpu-wheels/ >> .git/info/exclude
#   bash bench/gpu_check.sh                      # on the GPU machine, with .gpu-wheels beside it
#
# It prints (and writes under $OUT, default /tmp/gpu-check) the GPU; tests/test_cuda.py's results
# (our SAM generator against segment-anything's on the GPU, the golden cases in both modes, the
# whole pipeline); the golden cases' figures in the exact and fast modes (bench/golden_check.py);
# the fast mode's agreement sweep in float16 (bench/bench_fast_agreement.py); then bench_speed on
# the full-size architectures with random weights: SAM ViT-H (the default model), the exact mode,
# the fast mode (float16 SAM encoder and CLIP passes), and sam16 alone, with images/s, ms per
# expression, peak GPU memory and the fast mode's agreement with the exact mode. PYTHON and DEVICE
# override the interpreter and the device (a dry run on CPU: DEVICE=cpu PYTHON=.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

for package in segment-anything ftfy pytest; do
  if ! "$PYTHON" -c "import ${package//-/_}" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --find-links .gpu-wheels "$package"
  fi
done
"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
# the tests' checks with the code's CUDA branches running (tests/test_cuda.py; skipped on CPU)
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" \
  || echo "tests/test_cuda.py failed: the measurements follow"
# the golden cases on the device: the exact mode's IEEE float32 (and torch's own TF32 defaults beside
# it), the fast mode's float16 choices; then the fast mode's agreement sweep in float16
"$PYTHON" bench/golden_check.py --device "$DEVICE" --torch-defaults 2>&1 | grep -v "^Loading weights" \
  | tee "$OUT/golden_check.txt"
"$PYTHON" bench/bench_fast_agreement.py --device "$DEVICE" 2>&1 | grep -v "^Loading weights" \
  | tee "$OUT/fast_agreement.txt"
SAM=${SAM:-vit_h}
IMAGES=${IMAGES:-4}
"$PYTHON" bench/bench_speed.py --device "$DEVICE" --sam "$SAM" --images "$IMAGES" --expressions 3 \
  --modes exact,fast,sam16 --rounds 2 2>&1 | grep -v "^Loading weights" | tee "$OUT/bench_speed.txt"
