"""BYOL, SimSiam and Barlow Twins: losses on hand-built tensors, stop-gradients, the momentum target,
Barlow Twins' cross-correlation over 2 gloo workers, short training runs and the fmnist configs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CONFIGS, on_gloo_workers
from pretrainlab.config import ConfigError, load_config, validate
from pretrainlab.data.transforms import normalize, train_views
from pretrainlab.strategies import barlowtwins, byol, get_strategy, simsiam
from pretrainlab.strategies.common import cosine_momentum

SIAMESE = ("byol", "simsiam", "barlowtwins")
TINY_PARAMS = {
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16},
    "simsiam": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 8},
    "barlowtwins": {"proj_hidden_dim": 32, "proj_dim": 16},
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and the tests share 2 cores with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(strategy: str, views: int = 2, **params):
    """timm's test ResNet (stem stride 1) with ``views`` identity views per image."""
    return validate(
        {
            "name": "tiny",
            "strategy": strategy,
            "strategy_params": {**TINY_PARAMS[strategy], **params},
            "model": {"backbone": "test_resnet", "stem_stride": 1},
            "data": {"views": [{"pipeline": [], "count": views}]},
        }
    )


def two_view_batch(rows: int = 8, side: int = 16, channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"view{i}": torch.randn(rows, channels, side, side, generator=generator) for i in range(2)}


# --- BYOL ---------------------------------------------------------------------------------------------------


def test_normalized_mse_is_zero_for_aligned_and_two_for_orthogonal_vectors():
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    orthogonal = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.8, -0.6]])
    # |a/|a| - b/|b||^2 = 2 - 2 cos: cos 1 -> 0, cos 0 -> 2, cos 1/2 -> 1; the length of p does not matter
    assert byol.normalized_mse(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol.normalized_mse(3 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol.normalized_mse(orthogonal, z).item() == pytest.approx(2.0)
    sixty_degrees = torch.tensor([[0.5, math.sqrt(3) / 2, 0.0]])
    assert byol.normalized_mse(sixty_degrees, z[:1]).item() == pytest.approx(1.0)


def test_byol_loss_adds_both_directions():
    z = torch.eye(2)
    orthogonal = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # each direction: 2 per orthogonal pair, averaged over rows -> 2; the two directions add up to 4
    assert byol.byol_loss(orthogonal, orthogonal, z, z).item() == pytest.approx(4.0)
    assert byol.byol_loss(z, z, z, z).item() == pytest.approx(0.0, abs=1e-6)
    # view 1's prediction matches view 2's target, view 2's is orthogonal to view 1's: 0 + 2
    assert byol.byol_loss(z, orthogonal, z, z).item() == pytest.approx(2.0)


def test_byol_target_gets_no_gradient_and_stays_out_of_the_backbone_keys():
    model = byol.build_model(tiny_config("byol"), num_classes=10, in_chans=1)
    model(two_view_batch())["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    state = model.state_dict()
    backbone_keys = {k for k in state if k.startswith("backbone.")}
    assert backbone_keys == {f"backbone.{k}" for k in model.backbone.state_dict()}
    assert any(k.startswith("target.backbone.") for k in state)
    assert not set(model.target.parameters()) & set(model.backbone.parameters())


def test_byol_cosine_momentum_schedule_values():
    # 1 - (1 - 0.99) * (cos(pi * t / T) + 1) / 2: t = 0 -> 0.99, t = T / 2 -> 0.995, t = T -> 1
    assert cosine_momentum(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_momentum(5, 10, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_momentum(10, 10, 0.99, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("step", "momentum"), [(0, 0.99), (5, 0.995), (10, 1.0)])
def test_byol_after_step_moves_the_target_by_the_schedule(step, momentum):
    torch.manual_seed(0)
    model = byol.build_model(tiny_config("byol", base_momentum=0.99), num_classes=10, in_chans=1)
    with torch.no_grad():
        for p in (*model.backbone.parameters(), *model.projector.parameters()):
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in (*model.backbone.parameters(), *model.projector.parameters())]
    before = [p.detach().clone() for p in model.target.parameters()]
    model.after_step(step, 10)
    assert model.momentum == pytest.approx(momentum)
    for after, old, new in zip(model.target.parameters(), before, online, strict=True):
        torch.testing.assert_close(after, momentum * old + (1 - momentum) * new)


def test_byol_without_total_steps_keeps_the_base_momentum():
    model = byol.build_model(tiny_config("byol", base_momentum=0.9), num_classes=10, in_chans=1)
    model.after_step(3, None)
    assert model.momentum == pytest.approx(0.9)
    assert model(two_view_batch())["log/momentum"] == pytest.approx(0.9)


def test_byol_final_momentum_below_base_fails():
    with pytest.raises(ConfigError, match="final_momentum"):
        tiny_config("byol", base_momentum=0.99, final_momentum=0.9)


# --- SimSiam ------------------------------------------------------------------------------------------------


def test_simsiam_loss_values():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # -(cos + cos) / 2: aligned -> -1, opposite -> 1, orthogonal -> 0
    assert simsiam.simsiam_loss(z, z, z, z).item() == pytest.approx(-1.0)
    assert simsiam.simsiam_loss(-z, -z, z, z).item() == pytest.approx(1.0)
    assert simsiam.simsiam_loss(z.flip(1), z.flip(1), z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_simsiam_stop_gradient_leaves_z_only_the_path_through_p():
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(4, 3, generator=generator, requires_grad=True)
    z2 = torch.randn(4, 3, generator=generator, requires_grad=True)
    weight = torch.randn(3, 3, generator=generator)
    p1, p2 = z1 @ weight, z2 @ weight
    loss = simsiam.simsiam_loss(p1, p2, z1, z2)
    grad_p1, grad_p2 = torch.autograd.grad(loss, [p1, p2], retain_graph=True)
    loss.backward()
    # with z stop-gradiented as a target, dL/dz = dL/dp dp/dz = dL/dp W^T exactly
    torch.testing.assert_close(z1.grad, grad_p1 @ weight.T)
    torch.testing.assert_close(z2.grad, grad_p2 @ weight.T)

    predictions = [torch.randn(4, 3, generator=generator, requires_grad=True) for _ in range(2)]
    targets_only = [torch.randn(4, 3, generator=generator, requires_grad=True) for _ in range(2)]
    simsiam.simsiam_loss(*predictions, *targets_only).backward()
    assert all(p.grad is not None for p in predictions)
    assert all(z.grad is None for z in targets_only)


# --- Barlow Twins -------------------------------------------------------------------------------------------

HADAMARD_4 = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])


def decorrelated_features() -> torch.Tensor:
    """4 rows x 3 features: Hadamard columns (zero mean, variance 1, orthogonal), scaled and shifted."""
    return HADAMARD_4[:, 1:] * torch.tensor([3.0, 0.5, 7.0]) + torch.tensor([10.0, -2.0, 0.0])


def test_cross_correlation_of_identical_decorrelated_views_is_the_identity():
    z = decorrelated_features()
    c = barlowtwins.cross_correlation(z, z.clone(), eps=0.0)
    # standardised columns are the Hadamard columns h_i: C_ij = h_i . h_j / 4 = [i == j]
    torch.testing.assert_close(c, torch.eye(3))
    assert barlowtwins.invariance_term(c).item() == pytest.approx(0.0, abs=1e-10)
    assert barlowtwins.redundancy_term(c).item() == pytest.approx(0.0, abs=1e-10)
    assert barlowtwins.barlow_twins_loss(c, 0.0051).item() == pytest.approx(0.0, abs=1e-10)


def test_barlow_twins_loss_of_anti_correlated_and_swapped_features():
    z = decorrelated_features()
    anti = barlowtwins.cross_correlation(z, -z, eps=0.0)
    # C = -I: each of 3 diagonal terms (1 - (-1))^2 = 4 -> 12, no off-diagonal
    assert barlowtwins.barlow_twins_loss(anti, 0.5).item() == pytest.approx(12.0)
    swapped = barlowtwins.cross_correlation(z, z[:, [1, 0, 2]], eps=0.0)
    # C = [[0,1,0],[1,0,0],[0,0,1]]: diagonal (1-0)^2 + (1-0)^2 + 0 = 2; off-diagonal 1^2 + 1^2 = 2, times 0.5
    assert barlowtwins.invariance_term(swapped).item() == pytest.approx(2.0)
    assert barlowtwins.redundancy_term(swapped).item() == pytest.approx(2.0)
    assert barlowtwins.barlow_twins_loss(swapped, 0.5).item() == pytest.approx(3.0)


def _barlow_half_batch(rank: int, world: int, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = slice(rank * len(z1) // world, (rank + 1) * len(z1) // world)
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    loss = barlowtwins.barlow_twins_loss(barlowtwins.cross_correlation(a, b), 0.05)
    loss.backward()
    return {"loss": loss.detach(), "grad1": a.grad, "grad2": b.grad}


@pytest.mark.slow
def test_barlow_twins_on_two_workers_matches_one_worker_on_the_whole_batch():
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 5, generator=generator) * 2 + 1
    z2 = z1 + torch.randn(8, 5, generator=generator)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = barlowtwins.barlow_twins_loss(barlowtwins.cross_correlation(a, b), 0.05)
    loss.backward()

    results = on_gloo_workers(_barlow_half_batch, z1, z2)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["loss"], loss.detach())
        rows = slice(rank * 4, (rank + 1) * 4)
        # each worker's backward sums the gradients of both workers' (equal) losses; DDP's mean halves them
        torch.testing.assert_close(result["grad1"] / 2, a.grad[rows])
        torch.testing.assert_close(result["grad2"] / 2, b.grad[rows])


def test_barlow_twins_null_off_diagonal_weight_is_one_over_proj_dim():
    model = barlowtwins.build_model(tiny_config("barlowtwins", off_diagonal_weight=None), 10, 1)
    assert model.off_diagonal_weight == pytest.approx(1 / 16)


def test_barlow_twins_loss_scale_multiplies_the_loss_and_leaves_the_logged_terms():
    batch = two_view_batch()
    outputs = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = barlowtwins.build_model(tiny_config("barlowtwins", loss_scale=scale), 10, 1)
        outputs[scale] = model(batch)
    unscaled, scaled = outputs[1.0], outputs[0.1]
    assert unscaled["loss"].item() > 0
    torch.testing.assert_close(scaled["loss"], 0.1 * unscaled["loss"])
    torch.testing.assert_close(scaled["log/invariance"], unscaled["log/invariance"])
    torch.testing.assert_close(scaled["log/redundancy"], unscaled["log/redundancy"])


# --- all three ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", SIAMESE)
def test_two_sgd_steps_change_a_finite_loss(strategy):
    torch.manual_seed(0)
    model = get_strategy(strategy).build_model(tiny_config(strategy), num_classes=10, in_chans=1)
    assert get_strategy(strategy).TASK == "embedding"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = two_view_batch()
    losses = []
    for step in range(1, 3):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if hasattr(model, "after_step"):
            model.after_step(step, 2)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] != losses[1]


@pytest.mark.parametrize("strategy", SIAMESE)
def test_unknown_strategy_param_fails_naming_it(strategy):
    with pytest.raises(ConfigError, match="strategy_params.temprature"):
        tiny_config(strategy, temprature=0.1)


@pytest.mark.parametrize("strategy", SIAMESE)
@pytest.mark.parametrize("views", [1, 3])
def test_build_model_needs_exactly_two_views(strategy, views):
    with pytest.raises(ValueError, match=f"data.views: {strategy} needs 2 views, got {views}"):
        get_strategy(strategy).build_model(tiny_config(strategy, views=views), num_classes=10, in_chans=1)


@pytest.mark.parametrize("strategy", SIAMESE)
def test_fmnist_config_builds_and_runs_one_forward(strategy):
    cfg = load_config(CONFIGS / f"{strategy}_resnet10t_fmnist.yaml")
    assert cfg.strategy == strategy
    assert cfg.train.checkpoint.score_metric == "val/knn_top1"
    assert sum(view.count for view in cfg.data.views) == 2
    model = get_strategy(strategy).build_model(cfg, num_classes=10, in_chans=1)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)  # Fashion-MNIST's shape
    batch = {f"view{i}": normalize(view(images), cfg.data) for i, view in enumerate(train_views(cfg.data))}
    assert all(v.shape == (4, 1, 28, 28) for v in batch.values())
    out = model(batch)
    assert math.isfinite(out["loss"].item())
