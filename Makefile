# PretrainLab: `make train` runs the default job, `make test` the test suite.
# Both set up .venv (and the Fashion-MNIST Debian package) first.
PY := .venv/bin/python
CONFIG ?= configs/resnet10t_1xb128_fmnist.yaml

export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1

.PHONY: setup train test benchmark mlflow-ui

setup:
	@bash scripts/setup.sh

train: setup
	$(PY) jobs/pretrain.py $(CONFIG) $(ARGS)

test: setup
	PYTHONFAULTHANDLER=1 $(PY) -m pytest $(ARGS)

benchmark: setup
	$(PY) benchmarks/train_overhead.py

mlflow-ui: setup
	.venv/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000
