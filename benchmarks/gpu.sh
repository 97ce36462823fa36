#!/bin/sh
# The prepared GPU check of issue 3: training throughput of the HySAC step on CUDA, the reference
# setting against ours (ViT-L-14-quickgelu at batch 32 and 128 unless arguments say otherwise; about
# 3 minutes on an H200). It is meant for the device tool, whose machine has PyTorch but not open_clip
# and cannot reach PyPI, so open_clip and its two missing dependencies travel as wheels in .whl/:
#
#   here, once:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux2014_x86_64 -d .whl \
#                  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
#   device tool: run(command="sh benchmarks/gpu.sh", carry=[".whl"], timeout_s=480)
#
# Results land in $OUT (train_throughput-cuda.json, the log, the GPU's name); copy the JSON to
# benchmarks/results/ and its table to RESULTS.md ("Training throughput").
# A dry run on the CPU: OUT=/tmp/gpu PYTHON=.venv/bin/python sh benchmarks/gpu.sh --arch tiny --batch 8
set -eu
: "${OUT:?set OUT to the folder the results should go to}"
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
fi
"$PYTHON" -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'open_clip', open_clip.__version__)"
"$PYTHON" benchmarks/train_throughput.py --out "$OUT/train_throughput-cuda.json" "$@" 2>&1 | tee "$OUT/train_throughput.log"
