#!/usr/bin/env bash
# GPU training throughput and model-FLOPs utilisation: ResNet-50, ViT-B/16 (supervised) and MAE ViT-B/16
# at 224 px on synthetic images, PretrainLab's Ray Train loop against a plain PyTorch loop on one GPU.
#
#   benchmarks/gpu_train.sh                 # from the repository root; about 4-6 minutes on one H100
#   STEPS=60 benchmarks/gpu_train.sh        # longer timed runs
#   benchmarks/gpu_train.sh --cases resnet50
#
# Starts its own single-node Ray bound to 127.0.0.1 (a running `ray start` head would be joined instead,
# so stop it first). What each side measures: the docstring of benchmarks/gpu_train.py.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_train.sh: no NVIDIA GPU here (nvidia-smi finds none); this benchmark needs one." >&2
    echo "To check the script on a CPU: $PYTHON benchmarks/gpu_train.py --device cpu --tiny --plain-only --steps 3" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_train.sh: nvidia-smi sees a GPU but $PYTHON's torch does not (a CPU-only torch build?)." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d /tmp/pretrainlab-ray.XXXXXX)}

# The whole run stops at 8 minutes, whatever happens.
exec timeout --signal=INT --kill-after=30 480 "$PYTHON" benchmarks/gpu_train.py --steps "${STEPS:-40}" "$@"
