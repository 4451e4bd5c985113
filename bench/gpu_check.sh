#!/usr/bin/env bash
# The GPU check (make gpu-check): device and versions, SDPA kernels, backbone speed and
# precision, the real extraction pipeline, training steps, a loader-fed epoch, the loader bench
# and the collectives, each figure on its own line. Under 8 minutes on one H100/H200; without
# CUDA a reduced version at toy sizes (tests/test_gpu_path.py runs it, so CI covers the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
"$PY" bench/gpu_check.py "$@"
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    && [[ " $* " != *" --reduced "* ]]; then
    "$PY" bench/loader.py
else
    "$PY" bench/loader.py --dim 32 --videos 2 --batches 2 --length 128 --workers 1
fi
echo "gpu_check: $(( $(date +%s) - started )) s in all"
