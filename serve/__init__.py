"""The Ray Serve application: chosen checkpoints behind HTTP endpoints (``serve run serve/config.yaml``)."""
