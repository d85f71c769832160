"""Backbones (from timm, headless) and the heads PretrainLab puts on them."""
