"""Masked image modelling: MAE and SimMIM losses, patch helpers, training, configs, the reconstruction figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS
from pretrainlab.analysis.reconstructions import DPI, PANEL_INCHES, save_reconstructions
from pretrainlab.config import ConfigError, load_config, validate
from pretrainlab.data.masks import make_masks
from pretrainlab.models.backbones import create_backbone
from pretrainlab.strategies import mae, simmim
from pretrainlab.strategies.mae import (
    masked_mse_loss,
    normalized_patches,
    patchify,
    place_tokens,
    select_tokens,
    unpatchify,
    visible_indices,
)
from pretrainlab.strategies.simmim import mask_patches, masked_l1_loss

MODULES = {"mae": mae, "simmim": simmim}
MASKS = {
    "mae": {"kind": "random", "ratio": 0.75, "patch_size": 4},
    "simmim": {"kind": "block", "ratio": 0.6, "patch_size": 4},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(strategy: str, **overrides):
    """``strategy`` on timm's test_vit at 16 x 16 pixels, 4 x 4 patches (a 4 x 4 grid), one channel."""
    data = {
        "name": "tiny",
        "strategy": strategy,
        "model": {"backbone": "test_vit", "backbone_kwargs": {"img_size": 16, "patch_size": 4}},
        "data": {"mask": MASKS[strategy], "train_pipeline": [{"type": "RandomResizedCrop", "size": 16}]},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return validate(data)


def fixed_batch(cfg, count: int = 8, side: int = 16) -> dict[str, torch.Tensor]:
    images = torch.randn(count, 1, side, side, generator=torch.Generator().manual_seed(0))
    masks = make_masks(cfg.data.mask, count, side, side, np.random.default_rng(0))
    return {"image": images, "mask": torch.from_numpy(masks), "label": torch.zeros(count, dtype=torch.long)}


# --- losses on hand-built tensors --------------------------------------------------------------------------


def test_masked_mse_ignores_visible_patches():
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    pred = target.clone()
    pred[0, 1] = torch.tensor([30.0, -40.0])  # a visible patch far off
    mask = torch.tensor([[True, False, True]])
    assert masked_mse_loss(pred, target, mask).item() == 0.0


def test_masked_mse_by_hand():
    target = torch.zeros(1, 3, 2)
    pred = torch.tensor([[[1.0, 3.0], [9.0, 9.0], [2.0, 0.0]]])
    mask = torch.tensor([[True, False, True]])
    # masked patches: mean(1, 9) = 5 and mean(4, 0) = 2; (5 + 2) / 2 masked patches = 3.5 (the visible 81s ignored)
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx(3.5)


def test_masked_l1_ignores_visible_patches():
    target = torch.arange(12.0).reshape(2, 3, 2)
    pred = target.clone()
    pred[1, 0] += 7.0
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert masked_l1_loss(pred, target, mask).item() == 0.0


def test_masked_l1_by_hand():
    target = torch.zeros(2, 2, 2)
    pred = torch.tensor([[[1.0, -3.0], [5.0, 5.0]], [[0.0, 0.0], [2.0, 0.5]]])
    mask = torch.tensor([[True, False], [True, True]])
    # masked pixel values: |1| + |-3| + 0 + 0 + |2| + |0.5| = 6.5 over 3 masked patches x 2 values = 6 -> 13/12
    assert masked_l1_loss(pred, target, mask).item() == pytest.approx(13 / 12)


def test_normalized_patches_by_hand():
    patches = torch.tensor([[[1.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]]])
    # first patch: mean 2, biased var 1 -> (x - 2) / sqrt(1 + eps); a flat patch -> all 0
    out = normalized_patches(patches, eps=1e-6)
    expected = torch.tensor([[[-1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]) / (1 + 1e-6) ** 0.5
    torch.testing.assert_close(out, expected)


# --- patch and token helpers --------------------------------------------------------------------------------


def test_visible_selection_keeps_the_unmasked_tokens_in_order():
    tokens = torch.arange(2 * 6).float().reshape(2, 6, 1).expand(2, 6, 3)  # token value = its flat index
    mask = torch.tensor([[True, False, True, False, False, True], [False, True, True, True, False, False]])
    indices = visible_indices(mask)
    assert indices.tolist() == [[1, 3, 4], [0, 4, 5]]
    visible = select_tokens(tokens, indices)
    assert visible[..., 0].tolist() == [[1.0, 3.0, 4.0], [6.0, 10.0, 11.0]]
    filler = torch.full((3,), -1.0)
    full = place_tokens(visible, indices, filler, 6)
    expected = torch.where(mask.unsqueeze(-1), filler, tokens)
    torch.testing.assert_close(full, expected)


def test_visible_selection_needs_equal_counts():
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="mask: every image must keep as many patches visible"):
        visible_indices(mask)


def test_patchify_round_trip_and_order():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 4 * 4 * 3)
    # token 1 is row 0, column 1: pixels [0:4, 4:8], laid out (row, column, channel)
    torch.testing.assert_close(patches[:, 1], images[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(unpatchify(patches, 4, (2, 3), 3), images)


def test_mask_token_replaces_masked_patches_only():
    tokens = torch.randn(2, 4, 5)
    token = torch.arange(5.0)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    out = mask_patches(tokens, mask, token)
    torch.testing.assert_close(out[0, 0], token)
    torch.testing.assert_close(out[0, 3], token)
    torch.testing.assert_close(out[~mask], tokens[~mask])


def test_mae_encoder_on_every_patch_is_the_vit():
    torch.manual_seed(0)
    model = mae.build_model(tiny_config("mae"), 10, 1).eval()
    images = torch.randn(3, 1, 16, 16)
    prefix, patches = model.encode_visible(images, torch.arange(16).expand(3, 16))
    torch.testing.assert_close(torch.cat([prefix, patches], dim=1), model.backbone.forward_features(images))


# --- models -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["mae", "simmim"])
def test_two_sgd_steps(strategy):
    torch.manual_seed(0)
    cfg = tiny_config(strategy)
    model = MODULES[strategy].build_model(cfg, 10, 1)
    batch = fixed_batch(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(2):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[0] != losses[1]
    assert model.backbone(batch["image"]).shape == (8, model.backbone.num_features)


@pytest.fixture(scope="module", params=["mae", "simmim"])
def trained(request, one_thread):
    """``(strategy, cfg, model, batch, losses)``: 10 AdamW steps on one fixed batch and its masks."""
    torch.manual_seed(0)
    cfg = tiny_config(request.param)
    model = MODULES[request.param].build_model(cfg, 10, 1)
    batch = fixed_batch(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return request.param, cfg, model, batch, losses


def test_loss_decreases_on_a_fixed_batch(trained):
    _, _, _, _, losses = trained
    assert losses[-1] < 0.9 * losses[0], losses


def test_reconstruction_keeps_visible_patches(trained):
    _, _, model, batch, _ = trained
    rebuilt = model.reconstruct(batch["image"], batch["mask"])
    visible = ~batch["mask"].repeat_interleave(4, dim=1).repeat_interleave(4, dim=2).unsqueeze(1)
    assert rebuilt.shape == batch["image"].shape
    torch.testing.assert_close(rebuilt[visible], batch["image"][visible])
    assert not torch.allclose(rebuilt[~visible], batch["image"][~visible])


def test_reconstruction_figure_is_a_png_of_the_expected_size(trained, tmp_path):
    strategy, _, model, batch, _ = trained
    model.train()
    rows = 3
    path = save_reconstructions(
        model, batch["image"][:rows], batch["mask"][:rows], tmp_path / "fig" / f"{strategy}.png"
    )
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(3 * PANEL_INCHES * DPI), round(rows * PANEL_INCHES * DPI))
    assert model.training  # put back as it was


@pytest.mark.parametrize("strategy", ["mae", "simmim"])
def test_backbone_state_dict_is_a_plain_timm_vit(strategy):
    cfg = tiny_config(strategy)
    model = MODULES[strategy].build_model(cfg, 10, 1)
    plain = create_backbone(cfg.model, 1)
    assert list(model.backbone.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.backbone.state_dict(), strict=True)


# --- config checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["mae", "simmim"])
def test_configs_load_and_run_one_forward(strategy):
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / f"{strategy}_vit-d6w96-p4_fmnist.yaml")
    assert cfg.train.checkpoint.score_metric == "val/knn_top1"
    assert cfg.runtime.experiment == "fmnist-ssl"
    model = MODULES[strategy].build_model(cfg, 10, 1)
    out = model(fixed_batch(cfg, count=4, side=28))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize(
    ("strategy", "overrides", "message"),
    [
        (
            "mae",
            {"data": {"mask": {"patch_size": 2}}},
            r"data.mask.patch_size 2 must equal .*backbone_kwargs.patch_size",
        ),
        ("simmim", {"data": {"mask": None}}, "data.mask: simmim needs patch masks"),
        (
            "mae",
            {"data": {"train_pipeline": [{"type": "RandomResizedCrop", "size": 20}]}},
            r"20x20 images but the ViT takes 16x16 \(model.backbone_kwargs.img_size\)",
        ),
        (
            "simmim",
            {"model": {"backbone": "test_resnet", "backbone_kwargs": {}}},
            "model.backbone: simmim needs a timm",
        ),
        ("mae", {"data": {"views": [{"count": 2}]}}, "data.views: mae trains on one image per row"),
    ],
)
def test_config_that_does_not_fit_fails_naming_the_key(strategy, overrides, message):
    cfg = tiny_config(strategy, **overrides)
    with pytest.raises(ValueError, match=message):
        MODULES[strategy].build_model(cfg, 10, 1)


def test_batch_of_the_wrong_size_fails_naming_img_size():
    model = simmim.build_model(tiny_config("simmim"), 10, 1)
    with pytest.raises(ValueError, match="model.backbone_kwargs.img_size: the ViT takes 16x16"):
        model({"image": torch.zeros(2, 1, 20, 20), "mask": torch.zeros(2, 5, 5, dtype=torch.bool)})


@pytest.mark.parametrize(
    ("strategy", "params", "message"),
    [
        ("mae", {"decoder_dims": 64}, "strategy_params.decoder_dims: unknown key"),
        ("mae", {"decoder_dim": 64, "decoder_heads": 5}, "strategy_params.decoder_heads 5 must divide decoder_dim 64"),
        ("mae", {"decoder_dim": 66, "decoder_heads": 3}, "strategy_params.decoder_dim 66 must be a multiple of 4"),
        ("simmim", {"norm_pix_loss": True}, "strategy_params.norm_pix_loss: unknown key"),
    ],
)
def test_wrong_strategy_params_fail_naming_the_key(strategy, params, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(strategy, strategy_params=params)
