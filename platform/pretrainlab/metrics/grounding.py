"""Visual grounding metrics: element-wise box IoU, accuracy at IoU >= 0.5 and mean IoU."""

from collections.abc import Sequence

import torch
from torchvision.ops import box_area


def _as_boxes(boxes, name: str) -> torch.Tensor:
    t = torch.as_tensor(boxes, dtype=torch.float64)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"{name} must be N x 4 boxes (x1, y1, x2, y2), got shape {tuple(t.shape)}")
    bad = (~torch.isfinite(t).all(dim=1)) | (t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {t[i].tolist()} is not a finite box with x2 >= x1 and y2 >= y1")
    return t


def box_iou(pred, target) -> torch.Tensor:
    """IoU of ``pred[i]`` with ``target[i]`` for N x 4 pixel boxes (x1, y1, x2, y2); returns N float64 values.

    Element-wise, unlike ``torchvision.ops.box_iou`` which builds the N x N matrix. Two boxes whose
    union has zero area get IoU 0.
    """
    p, t = _as_boxes(pred, "pred"), _as_boxes(target, "target")
    if len(p) != len(t):
        raise ValueError(f"got {len(p)} predicted boxes but {len(t)} target boxes")
    wh = (torch.minimum(p[:, 2:], t[:, 2:]) - torch.maximum(p[:, :2], t[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(p) + box_area(t) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def grounding_scores(pred_boxes, target_boxes, groups: Sequence[str] | None = None) -> dict[str, float]:
    """``{"acc_iou50": % of pairs with IoU >= 0.5, "miou": mean IoU in %}`` for one box per expression.

    With ``groups`` (one name per pair, e.g. the kind of each expression) the result also has
    ``acc_iou50/<group>``, ``miou/<group>`` and ``samples/<group>`` (how many pairs) for every group.
    """
    iou = box_iou(pred_boxes, target_boxes)
    if len(iou) == 0:
        raise ValueError("no boxes to score")
    if groups is not None and len(groups) != len(iou):
        raise ValueError(f"got {len(groups)} groups for {len(iou)} box pairs")
    scores = _scores("", iou)
    for group in sorted(set(groups or ())):
        member = torch.tensor([g == group for g in groups])
        scores |= _scores(f"/{group}", iou[member]) | {f"samples/{group}": float(member.sum())}
    return scores


def _scores(suffix: str, iou: torch.Tensor) -> dict[str, float]:
    accuracy = 100.0 * float((iou >= 0.5).double().mean())
    return {f"acc_iou50{suffix}": accuracy, f"miou{suffix}": 100.0 * float(iou.mean())}
