# PretrainLab: `make train` runs the default job, `make test` the test suite (the import layers first), `make
# test-fast` the tests that start no Ray and no server. All set up .venv (and the Fashion-MNIST Debian package) first.
PY := .venv/bin/python
CONFIG ?= configs/resnet10t_1xb128_fmnist.yaml

export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1

# The tests that start neither Ray nor a server process and take seconds; the test files set the markers.
FAST_TESTS := not needs_ray and not needs_server and not slow

.PHONY: setup lint-imports train test test-fast benchmark mlflow-ui

setup:
	@bash scripts/setup.sh

train: setup
	$(PY) jobs/pretrain.py $(CONFIG) $(ARGS)

# The contract (the library's layers) is [tool.importlinter] in pyproject.toml.
lint-imports: setup
	PYTHONPATH=platform .venv/bin/lint-imports --no-logo

test: setup lint-imports
	PYTHONFAULTHANDLER=1 $(PY) -m pytest $(ARGS)

test-fast: setup lint-imports
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -m "$(FAST_TESTS)" -n 2 $(ARGS)

benchmark: setup
	$(PY) benchmarks/train_overhead.py

mlflow-ui: setup
	.venv/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000
