#!/usr/bin/env bash
# The accelerator figures of issues #5 (Model X-ray >= 10x), #6 (batched inversion >= 5x) and
# #8 (stacked training >= 5x) in one run, for a machine with a CUDA GPU:
#     bash bench/gpu.sh          # about 5-10 minutes; writes bench/results/{modelxray,
#                                # stacked_training,inversion}.json (and copies them to $OUT)
# The inversion bench needs the demo round: it builds it under /tmp/demo-bench if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PY:-python3}; fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
$PY bench/modelxray.py --device cuda
$PY bench/stacked_training.py --device cuda --models 16 --epochs 2
$PY bench/inversion.py --device cuda
if [ -n "${OUT:-}" ]; then
    cp bench/results/modelxray.json bench/results/stacked_training.json \
       bench/results/inversion.json "$OUT"/
fi
