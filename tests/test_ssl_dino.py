"""DINO: the loss on hand-built logits, centring, schedules, the teacher, 2 workers against 1, and a few real steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from timm.layers import DropPath

from conftest import CONFIGS, on_gloo_workers
from pretrainlab.config import ConfigError, load_config, validate
from pretrainlab.data.transforms import train_views
from pretrainlab.strategies.dino import (
    build_model,
    dino_loss,
    embed_crops,
    teacher_temperature,
    updated_center,
)

LN2 = math.log(2)
P = torch.tensor([0.5, 0.25, 0.125, 0.125])
UNIFORM = torch.full((4,), 0.25)


def dino_config(counts: tuple[int, ...] = (2, 2), dynamic: bool = True, drop_path: float = 0.0, **params):
    """A validated DINO config on timm's test ViT (16 px, 4 px patches): global 16 px crops, then local 8 px ones."""
    sizes = [16] + [8] * (len(counts) - 1)
    return validate(
        {
            "name": "dino-test",
            "strategy": "dino",
            "strategy_params": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, **params},
            "model": {
                "backbone": "test_vit",
                "backbone_kwargs": {"img_size": 16, "patch_size": 4, "dynamic_img_size": dynamic},
                "drop_path_rate": drop_path,
            },
            "data": {
                "views": [
                    {"pipeline": [{"type": "RandomResizedCrop", "size": size}], "count": count}
                    for size, count in zip(sizes, counts, strict=True)
                ]
            },
        }
    )


def fake_batch(n: int = 4, local: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [16, 16] + [8] * local
    return {f"view{i}": torch.randn(n, 1, s, s, generator=generator) for i, s in enumerate(sizes)}


def as_logits(probabilities: torch.Tensor, temp: float, rows: int = 2) -> torch.Tensor:
    """Logits whose softmax at ``temp`` is ``probabilities``, repeated for ``rows`` images."""
    return (temp * probabilities.log()).expand(rows, -1)


def test_loss_is_the_entropy_when_every_crop_agrees():
    teacher = torch.stack([as_logits(P, 1.0)] * 2)
    student = torch.stack([as_logits(P, 1.0)] * 3)
    # CE(p, p) = H(p) = 0.5 ln 2 + 0.25 ln 4 + 2 * 0.125 ln 8 = 1.75 ln 2
    loss = dino_loss(student, teacher, torch.zeros(1, 4), student_temp=1.0, teacher_temp=1.0)
    assert loss.item() == pytest.approx(1.75 * LN2, rel=1e-6)


def test_loss_skips_the_same_crop_and_applies_centre_and_temperatures():
    center = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    teacher = torch.stack([as_logits(P, 0.5), as_logits(UNIFORM, 0.5)]) + center
    student = torch.stack([as_logits(UNIFORM, 0.2), as_logits(P, 0.2), as_logits(P, 0.2)])
    # pairs (0,1) (0,2): H(p) = 1.75 ln2; (1,0): H(u) = 2 ln2; (1,2): CE(u, p) = 0.25 (1 + 2 + 3 + 3) ln2 = 2.25 ln2
    expected = (1.75 + 1.75 + 2.0 + 2.25) / 4 * LN2
    loss = dino_loss(student, teacher, center, student_temp=0.2, teacher_temp=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_gives_the_teacher_no_gradient():
    teacher = torch.randn(2, 3, 5, requires_grad=True)
    student = torch.randn(3, 3, 5, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(1, 5), 0.1, 0.04).backward()
    assert teacher.grad is None and student.grad is not None


def test_center_moves_towards_the_mean_of_every_teacher_output():
    center = torch.tensor([[1.0, 2.0]])
    teacher = torch.tensor([[[0.0, 4.0], [2.0, 0.0]], [[4.0, 8.0], [2.0, 0.0]]])
    # mean over 2 crops x 2 images: [2, 3]; 0.9 * [1, 2] + 0.1 * [2, 3] = [1.1, 2.1]
    assert torch.allclose(updated_center(center, teacher, 0.9), torch.tensor([[1.1, 2.1]]))


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.04), (15, 0.055), (30, 0.07), (99, 0.07)],  # linear 0.04 -> 0.07 over 0.3 x 100 steps, then flat
)
def test_teacher_temperature_warms_up_linearly(step, expected):
    assert teacher_temperature(step, 100, 0.04, 0.07, 0.3) == pytest.approx(expected)


def test_teacher_temperature_without_warmup_is_final():
    assert teacher_temperature(0, 100, 0.04, 0.07, 0.0) == 0.07


def test_after_step_moves_the_teacher_by_the_cosine_momentum():
    torch.manual_seed(0)
    model = build_model(dino_config(), 10, 1)
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.head.parameters()]:
            p.add_(torch.randn_like(p))
    student = [p.clone() for p in [*model.backbone.parameters(), *model.head.parameters()]]
    teacher = [p.clone() for p in [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]]
    model.after_step(3, 30)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 3 / 30) + 1) / 2
    moved = [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]
    for new, old, online in zip(moved, teacher, student, strict=True):
        torch.testing.assert_close(new, m * old + (1 - m) * online)
    assert model.teacher_temp.item() == pytest.approx(0.04 + 0.03 * 3 / 9)  # warmup over 0.3 x 30 = 9 steps


def test_teacher_gets_no_gradients_and_is_kept_outside_the_backbone():
    model = build_model(dino_config(drop_path=0.1), 10, 1)
    model(fake_batch())["loss"].backward()
    teacher = [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert {k for k in model.state_dict() if k.startswith("backbone.")} == {
        f"backbone.{k}" for k in model.backbone.state_dict()
    }
    assert {"center", "teacher_temp"} <= set(model.state_dict())
    assert all(m.drop_prob == 0 for m in model.teacher_backbone.modules() if isinstance(m, DropPath))
    assert any(m.drop_prob > 0 for m in model.backbone.modules() if isinstance(m, DropPath))


def test_crops_of_one_size_share_a_pass_with_the_same_result():
    model = build_model(dino_config(), 10, 1).eval()
    crops = list(fake_batch().values())
    together = embed_crops(model.backbone, model.head, crops)
    one_by_one = torch.stack([model.head(model.backbone(crop)) for crop in crops])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)


def test_two_sgd_steps_run_with_a_finite_changing_loss():
    torch.manual_seed(0)
    model = build_model(dino_config(), 10, 1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = fake_batch(n=8)
    losses = []
    for step in range(1, 3):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_step(step, 10)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] != losses[1]
    assert model.center.abs().sum() > 0


@pytest.mark.parametrize("counts", [(1, 4), (3,), (4, 2)])
def test_views_must_start_with_two_global_crops(counts):
    with pytest.raises(ValueError, match="data.views"):
        build_model(dino_config(counts), 10, 1)


def test_fixed_size_vit_cannot_take_local_crops():
    with pytest.raises(ValueError, match="dynamic_img_size"):
        build_model(dino_config(dynamic=False), 10, 1)


def test_unknown_strategy_params_key_is_named():
    with pytest.raises(ConfigError, match="strategy_params.out_dims"):
        dino_config(out_dims=64)


def test_fmnist_config_builds_and_runs_on_its_view_shapes():
    cfg = load_config(CONFIGS / "dino_vit-d6w96-p4_fmnist.yaml")
    assert cfg.train.checkpoint.score_metric == "val/knn_top1"
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    batch = {f"view{i}": view(images).float() / 255 for i, view in enumerate(train_views(cfg.data))}
    assert [v.shape[-1] for v in batch.values()] == [28, 28, 12, 12, 12, 12]
    out = build_model(cfg, 10, 1)(batch)
    assert torch.isfinite(out["loss"])


def _half_batch(rank: int, world: int) -> dict[str, torch.Tensor]:
    """One of the workers: the loss, gradient and centre update on its half of the fixed batch."""
    return _loss_grad_center(rows=slice(4 * rank, 4 * rank + 4))


def _loss_grad_center(rows: slice) -> dict[str, torch.Tensor]:
    """Loss, weight gradient (averaged over workers, as DDP does) and new centre of a linear student on ``rows``."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 8, 6, generator=generator)[:, rows]
    teacher = torch.randn(2, 8, 5, generator=generator)[:, rows]
    weight = torch.randn(6, 5, generator=generator).requires_grad_()
    center = torch.randn(1, 5, generator=generator)
    loss = dino_loss(inputs @ weight, teacher, center, 0.1, 0.04)
    loss.backward()
    grad, mean_loss = weight.grad.clone(), loss.detach().clone()
    if dist.is_initialized():
        for value in (grad, mean_loss):
            dist.all_reduce(value)
            value /= dist.get_world_size()
    return {"loss": mean_loss, "grad": grad, "center": updated_center(center, teacher, 0.9)}


@pytest.mark.slow
def test_two_workers_match_one_on_the_whole_batch():
    single = _loss_grad_center(rows=slice(0, 8))
    for workers in on_gloo_workers(_half_batch):
        for key in ("loss", "grad", "center"):
            torch.testing.assert_close(workers[key], single[key], atol=1e-5, rtol=1e-5)
