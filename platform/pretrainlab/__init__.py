"""PretrainLab: visual pretraining on Ray Train, tracked in MLflow, served by Ray Serve."""

import os as _os

# Ray reads these when it is first imported: keep a single-node Ray on 127.0.0.1 and
# keep it from reporting usage, unless the user decided otherwise.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
