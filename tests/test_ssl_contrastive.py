"""SimCLR and MoCo v3: their losses on hand-built embeddings, across 2 workers, and their models on tiny backbones."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CONFIGS, on_gloo_workers
from pretrainlab.config import ConfigError, load_config, validate
from pretrainlab.data.transforms import normalize, train_views
from pretrainlab.strategies import get_strategy
from pretrainlab.strategies.common import cosine_momentum
from pretrainlab.strategies.mocov3 import contrastive_loss
from pretrainlab.strategies.simclr import nt_xent

TINY_PARAMS = {
    "simclr": {"proj_hidden_dim": 16, "proj_dim": 8},
    "mocov3": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
}
BACKBONES = {
    "test_resnet": {"backbone": "test_resnet", "stem_stride": 1},
    "test_vit": {"backbone": "test_vit", "backbone_kwargs": {"img_size": 16, "patch_size": 4}},
}


def tiny_config(strategy: str, backbone: str = "test_resnet", views: int = 2, **params):
    return validate(
        {
            "name": f"{strategy}-test",
            "strategy": strategy,
            "strategy_params": {**TINY_PARAMS[strategy], **params},
            "model": BACKBONES[backbone],
            "data": {"views": [{"pipeline": [], "count": views}]},
        }
    )


def fake_views(n: int = 8, size: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"view{i}": torch.randn(n, 1, size, size, generator=generator) for i in range(2)}


# --- NT-Xent --------------------------------------------------------------------------------------------------------


def test_nt_xent_identical_views():
    z = torch.eye(3)
    # each view: positive logit 1/t = 2, 4 negatives (the other 2 images' views, orthogonal) at 0, self left out
    expected = math.log(1 + 4 * math.exp(-2))
    assert nt_xent(z, z.clone(), temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_orthogonal_views():
    basis = torch.eye(6)
    # every view is orthogonal to the other 5: all logits 0, so -log(1/5)
    assert nt_xent(basis[:3], basis[3:], temperature=0.1).item() == pytest.approx(math.log(5), rel=1e-6)


def test_nt_xent_ignores_scale_and_is_symmetric():
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 5, 4, generator=generator)
    loss = nt_xent(z1, z2, 0.2)
    assert nt_xent(z2, z1, 0.2).item() == pytest.approx(loss.item(), rel=1e-6)
    assert nt_xent(3 * z1, 0.5 * z2, 0.2).item() == pytest.approx(loss.item(), rel=1e-6)


# --- MoCo v3 ctr ----------------------------------------------------------------------------------------------------


def test_mocov3_loss_matching_keys():
    z = torch.eye(3)
    # positive logit 1/t = 5, 2 other keys at 0: 2t * log(1 + 2 exp(-5))
    expected = 0.4 * math.log(1 + 2 * math.exp(-5))
    assert contrastive_loss(z, z.clone(), temperature=0.2).item() == pytest.approx(expected, rel=1e-6)


def test_mocov3_loss_orthogonal_keys():
    basis = torch.eye(6)
    # every logit 0: 2t * log(3)
    assert contrastive_loss(basis[:3], basis[3:], 0.2).item() == pytest.approx(0.4 * math.log(3), rel=1e-6)


def test_mocov3_loss_gives_keys_no_gradient():
    q, k = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    contrastive_loss(q, k, 0.2).backward()
    assert q.grad is not None and k.grad is None


# --- 2 workers vs 1 -------------------------------------------------------------------------------------------------

WORLD = 2


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 8, 6, generator=generator, dtype=torch.float64).unbind(0)


def _losses_and_grads(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """NT-Xent of (a, b) with gradients of both; MoCo v3's ctr(q=a, k=b) with the gradient of a."""
    out = {}
    z1, z2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = nt_xent(z1, z2, 0.2)
    loss.backward()
    out.update(nt_xent=loss.detach(), nt_xent_grad1=z1.grad, nt_xent_grad2=z2.grad)
    q = a.clone().requires_grad_(True)
    loss = contrastive_loss(q, b, 0.2)
    loss.backward()
    out.update(ctr=loss.detach(), ctr_grad=q.grad)
    return out


def _half_batch(rank: int, world: int) -> dict[str, torch.Tensor]:
    a, b = (t.chunk(world)[rank] for t in _embeddings())
    return _losses_and_grads(a, b)


@pytest.mark.slow
def test_two_workers_match_one_on_the_whole_batch():
    per_worker = on_gloo_workers(_half_batch, world=WORLD)
    single = _losses_and_grads(*_embeddings())
    for name in ("nt_xent", "ctr"):  # the training loop logs and DDP averages over workers
        mean = sum(r[name] for r in per_worker) / WORLD
        torch.testing.assert_close(mean, single[name])
    for name in ("nt_xent_grad1", "nt_xent_grad2", "ctr_grad"):  # DDP averages gradients: divide by the workers
        gathered = torch.cat([r[name] for r in per_worker]) / WORLD
        torch.testing.assert_close(gathered, single[name])


# --- models ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("strategy", ["simclr", "mocov3"])
def test_two_sgd_steps_change_a_finite_loss(strategy, backbone):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = get_strategy(strategy).build_model(tiny_config(strategy, backbone), num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = fake_views()
    losses = []
    for step in range(1, 3):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if hasattr(model, "after_step"):
            model.after_step(step, 10)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[0] != losses[1]
    assert model.backbone(batch["view0"]).shape == (8, model.backbone.num_features)


def test_mocov3_momentum_encoder_follows_the_cosine_schedule():
    model = get_strategy("mocov3").build_model(tiny_config("mocov3"), num_classes=10, in_chans=1)
    with torch.no_grad():
        for p in model.online_encoder().parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in model.online_encoder().parameters()]
    before = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    model.after_step(0, 10)
    assert cosine_momentum(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    for target, old, new in zip(model.momentum_encoder.parameters(), before, online, strict=True):
        torch.testing.assert_close(target, 0.99 * old + 0.01 * new)
    moved = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    model.after_step(10, 10)  # m = 1 at the last step
    for target, old in zip(model.momentum_encoder.parameters(), moved, strict=True):
        torch.testing.assert_close(target, old, rtol=0, atol=0)


def test_mocov3_keeps_the_momentum_encoder_out_of_backbone():
    model = get_strategy("mocov3").build_model(tiny_config("mocov3"), num_classes=10, in_chans=1)
    backbone_keys = {k for k in model.state_dict() if k.startswith("backbone.")}
    assert backbone_keys == {f"backbone.{k}" for k in model.backbone.state_dict()}
    assert any(k.startswith("momentum_encoder.") for k in model.state_dict())
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())


# --- config errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["simclr", "mocov3"])
def test_build_model_needs_two_views(strategy):
    with pytest.raises(ValueError, match=f"data.views: {strategy} needs 2 views, got 3"):
        get_strategy(strategy).build_model(tiny_config(strategy, views=3), num_classes=10, in_chans=1)


@pytest.mark.parametrize("strategy", ["simclr", "mocov3"])
def test_strategy_params_are_checked(strategy):
    with pytest.raises(ConfigError, match="strategy_params.temprature: unknown key"):
        tiny_config(strategy, temprature=0.1)
    with pytest.raises(ConfigError, match="strategy_params.temperature"):
        tiny_config(strategy, temperature=0)


# --- shipped configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simclr_resnet10t_fmnist", "mocov3_resnet10t_fmnist"])
def test_config_builds_and_runs_on_its_views(name):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.train.checkpoint.score_metric == "val/knn_top1" and cfg.runtime.experiment == "fmnist-ssl"
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    batch = {f"view{i}": normalize(view(images), cfg.data) for i, view in enumerate(train_views(cfg.data))}
    model = get_strategy(cfg.strategy).build_model(cfg, num_classes=10, in_chans=1)
    out = model(batch)
    assert set(batch) == {"view0", "view1"} and torch.isfinite(out["loss"])
