"""Hyperparameter sweeps with Ray Tune over the same training entry point as ``jobs/pretrain.py``."""
