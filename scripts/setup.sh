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
