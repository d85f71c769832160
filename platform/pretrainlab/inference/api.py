"""The Python inference API: ``list_models``, ``get_model`` and ``inference_model``.

::

    import pretrainlab

    pretrainlab.list_models("*digits*", task="classification")
    model = pretrainlab.get_model("test-resnet_2xb32_digits", pretrained=True)
    pretrainlab.inference_model(model, "seven.png")[0]["pred_class"]
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from pretrainlab.inference.inferencers import inferencer_for
from pretrainlab.inference.zoo import get_model, list_models, model_info

__all__ = ["get_model", "inference_model", "list_models"]


def inference_model(
    model: nn.Module | str | os.PathLike,
    *inputs: Any,
    batch_size: int = 8,
    pretrained: bool | str | os.PathLike = False,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run the inferencer of the model's task on ``inputs``; one result per input.

    Args:
        model: A model from :func:`get_model`, or what :func:`get_model` takes (with
            ``pretrained`` and ``device``).
        inputs: Images (or one list of images).
        batch_size: Inputs per forward pass.
        kwargs: Options of the task's inferencer, e.g. ``topk`` for classification.
    """
    if not isinstance(model, nn.Module):
        model = get_model(model, pretrained, device)
    items = inputs[0] if len(inputs) == 1 else list(inputs)
    return inferencer_for(model_info(model).task)(model)(items, batch_size=batch_size, **kwargs)
