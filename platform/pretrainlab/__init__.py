"""PretrainLab: visual pretraining on Ray Train, tracked in MLflow, served by Ray Serve."""

import importlib as _importlib
import os as _os

# Ray reads these when it is first imported: keep a single-node Ray on 127.0.0.1 and
# keep it from reporting usage, unless the user decided otherwise.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

# The inference API, imported on first use so that `import pretrainlab` stays light (no torch, no Ray).
_LAZY = {
    "list_models": "pretrainlab.inference.api",
    "get_model": "pretrainlab.inference.api",
    "inference_model": "pretrainlab.inference.api",
    "ImageClassificationInferencer": "pretrainlab.inference.inferencers",
    "FeatureExtractor": "pretrainlab.inference.inferencers",
    "ImageRetrievalInferencer": "pretrainlab.inference.inferencers",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """The lazily imported names of ``_LAZY``."""
    if name not in _LAZY:
        raise AttributeError(f"module 'pretrainlab' has no attribute {name!r}")
    return getattr(_importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
