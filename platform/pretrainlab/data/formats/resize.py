"""``--image-size``: resize a row so its shorter side is S pixels, re-encoded as PNG.

Resizing decodes the image, so the row's bytes can no longer be kept as they are: the
result is always PNG (lossless, so no second JPEG loss). Grounding boxes are scaled with
the image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pretrainlab.data.formats.common import Row

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def resize_row(row: Row, size: int) -> Row:
    """Returns ``row`` with its image resized (bicubic) so that the shorter side is ``size``.

    Args:
        row: a row with the image fields, as a converter loads it (already checked).
        size: the shorter side in pixels, >= 1.

    Returns:
        A new row: PNG bytes, new height and width, and ``refs[].box`` scaled when present.
    """
    image = _decode(row)
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    buffer = io.BytesIO()
    image.resize((new_width, new_height), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    out = {**row, "image": buffer.getvalue(), "image_format": "png", "height": new_height, "width": new_width}
    if "refs" in row:
        sx, sy = new_width / width, new_height / height
        out["refs"] = [{**ref, "box": _scale(ref["box"], sx, sy, new_width, new_height)} for ref in row["refs"]]
    return out


def _decode(row: Row) -> Image.Image:
    mode = _MODES[row["channels"]]
    if row["image_format"] == "raw":
        pixels = np.frombuffer(row["image"], np.uint8).reshape(row["height"], row["width"], row["channels"])
        return Image.fromarray(pixels[..., 0] if row["channels"] == 1 else pixels, mode)
    with Image.open(io.BytesIO(row["image"])) as image:
        return image.convert(mode)


def _scale(box: list[float], sx: float, sy: float, width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 * sx, y1 * sy, min(x2 * sx, float(width)), min(y2 * sy, float(height))]
