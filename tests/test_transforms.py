"""Image pipelines, multi-view batches, masks, mixup, and the Preprocessor that joins them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2

from pretrainlab.config import DataConfig, MaskConfig, MixupConfig, validate
from pretrainlab.data.masks import block_patch_mask, make_masks, random_patch_mask
from pretrainlab.data.pipeline import Preprocessor, build_mixup, to_model_inputs
from pretrainlab.data.transforms import ImagePipeline, PipelineError, normalize, resized_crop_boxes, train_views


def rows(images: np.ndarray, labels=None) -> dict[str, np.ndarray]:
    """A numpy batch of raw shard rows, as Ray Data hands it over."""
    n, h, w, c = images.shape
    image = np.empty(n, dtype=object)
    image[:] = [im.tobytes() for im in images]
    return {
        "image": image,
        "image_format": np.array(["raw"] * n, dtype=object),
        "height": np.full(n, h),
        "width": np.full(n, w),
        "channels": np.full(n, c),
        "label": np.arange(n) % 10 if labels is None else labels,
    }


def test_each_image_gets_its_own_random_parameters():
    images = torch.arange(64 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(64, 1, 8, 8)
    images = images[:1].expand(64, 1, 8, 8).contiguous()  # 64 copies of one image
    out = ImagePipeline([{"type": "RandomCrop", "size": 8, "padding": 2}, {"type": "RandomHorizontalFlip"}])(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert len({o.numpy().tobytes() for o in out}) > 10


BATCHED_OPS = [
    {"type": "Resize", "size": 12},
    {"type": "CenterCrop", "size": 8},
    {"type": "Pad", "padding": 1, "fill": 7},
    {"type": "RandomCrop", "size": 8, "padding": 2, "padding_mode": "reflect"},
    {"type": "RandomCrop", "size": 12, "pad_if_needed": True},
    {"type": "RandomHorizontalFlip"},
    {"type": "RandomVerticalFlip", "p": 0.3},
]


@pytest.mark.parametrize("spec", BATCHED_OPS, ids=lambda spec: spec["type"])
def test_batched_ops_give_what_torchvision_gives_per_image(spec):
    pipeline = ImagePipeline([spec])
    assert pipeline.batch_ops[0] is not None
    images = torch.randint(0, 256, (48, 3, 9, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    per_image = torch.stack([pipeline.ops[0](image) for image in images])
    torch.manual_seed(5)
    assert torch.equal(pipeline(images), per_image)


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [(9, 11, (0.2, 1.0), (0.5, 2.0)), (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)), (8, 30, (0.9, 1.0), (0.9, 1.1))],
)
def test_batched_random_resized_crop_samples_boxes_like_torchvision(height, width, scale, ratio):
    op = v2.RandomResizedCrop(4, scale=scale, ratio=ratio)
    image = torch.zeros(1, height, width, dtype=torch.uint8)
    torch.manual_seed(0)
    theirs = torch.tensor(
        [[p[k] for k in ("top", "left", "height", "width")] for p in (op.make_params([image]) for _ in range(4000))]
    ).double()
    ours = resized_crop_boxes(4000, height, width, scale, ratio)
    assert (
        (ours[:, 2:] > 0).all()
        and (ours[:, 0] + ours[:, 2] <= height).all()
        and (ours[:, 1] + ours[:, 3] <= width).all()
    )
    ours = ours.double()
    torch.testing.assert_close(ours.mean(0), theirs.mean(0), atol=0.25, rtol=0.03)
    torch.testing.assert_close(ours.std(0), theirs.std(0), atol=0.25, rtol=0.06)


def test_batched_random_resized_crop_resizes_the_sampled_box():
    pipeline = ImagePipeline([{"type": "RandomResizedCrop", "size": 10, "scale": [0.2, 1.0]}])
    images = torch.randint(0, 256, (16, 3, 9, 11), dtype=torch.uint8)
    torch.manual_seed(2)
    boxes = resized_crop_boxes(16, 9, 11, (0.2, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(2)
    out = pipeline(images)
    for image, crop, box in zip(images, out, boxes.tolist(), strict=True):
        assert torch.equal(crop, v2.functional.resized_crop(image, *box, [10, 10], antialias=True))


def test_per_image_ops_between_batched_ones():
    pipeline = ImagePipeline(
        [
            {"type": "RandomResizedCrop", "size": 12},
            {"type": "RandomRotation", "degrees": 30},  # per image
            {"type": "RandomHorizontalFlip"},  # on the whole batch again: the rotation kept one size
        ]
    )
    assert [op is None for op in pipeline.batch_ops] == [False, True, False]
    out = pipeline(torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8))
    assert out.shape == (16, 1, 12, 12) and out.dtype == torch.uint8


def test_unknown_op_and_bad_arguments_are_named():
    with pytest.raises(PipelineError, match=r"pipeline\[1\]: unknown op 'Flip'; valid ops: .*RandomHorizontalFlip"):
        ImagePipeline([{"type": "Resize", "size": 8}, {"type": "Flip"}])
    with pytest.raises(PipelineError, match=r"pipeline\[0\]: RandomCrop: .*sise"):
        ImagePipeline([{"type": "RandomCrop", "sise": 8}])
    with pytest.raises(PipelineError, match="mapping with a 'type'"):
        ImagePipeline(["RandomCrop"])


def test_pipeline_must_end_at_one_size():
    sometimes_smaller = ImagePipeline(
        [{"type": "RandomApply", "p": 0.5, "transforms": [{"type": "Resize", "size": 6}]}]
    )
    torch.manual_seed(0)
    with pytest.raises(PipelineError, match="several sizes"):
        sometimes_smaller(torch.zeros(32, 1, 8, 8, dtype=torch.uint8))


def test_timm_rand_augment_and_torchvision_ops_run_on_grey_and_rgb():
    for channels in (1, 3):
        images = torch.randint(0, 256, (4, channels, 16, 16), dtype=torch.uint8)
        pipeline = ImagePipeline(
            [
                {"type": "TimmRandAugment", "config": "rand-m9-mstd0.5"},
                {"type": "RandomResizedCrop", "size": 12, "scale": [0.5, 1.0]},
                {"type": "RandomErasing", "p": 1.0},
            ]
        )
        out = pipeline(images)
        assert out.shape == (4, channels, 12, 12) and out.dtype == torch.uint8


def test_multi_view_pipelines_from_config():
    cfg = DataConfig(
        views=[
            {"pipeline": [{"type": "RandomResizedCrop", "size": 8}], "count": 2},
            {"pipeline": [{"type": "RandomResizedCrop", "size": 4}], "count": 3},
        ]
    )
    assert len(train_views(cfg)) == 5
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    out = Preprocessor(cfg, train=True)(rows(images))
    assert sorted(out) == ["label", "view0", "view1", "view2", "view3", "view4"]
    assert out["view0"].shape == (6, 1, 8, 8) and out["view4"].shape == (6, 1, 4, 4)


def test_masks_have_the_exact_ratio():
    rng = np.random.default_rng(0)
    for generate in (random_patch_mask, block_patch_mask):
        for _ in range(20):
            mask = generate((7, 7), 0.6, rng)
            assert mask.shape == (7, 7) and mask.sum() == round(0.6 * 49)
    masks = make_masks(MaskConfig(kind="block", ratio=0.4, patch_size=4), 3, 16, 32, rng)
    assert masks.shape == (3, 4, 8) and (masks.sum(axis=(1, 2)) == round(0.4 * 32)).all()
    with pytest.raises(ValueError, match="does not divide"):
        make_masks(MaskConfig(patch_size=5), 1, 16, 16, rng)


def test_preprocessor_adds_masks_and_handles_unlabelled_rows():
    cfg = DataConfig(mask=MaskConfig(kind="random", ratio=0.5, patch_size=4))
    images = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    labels = np.array([2, None, 5], dtype=object)
    out = Preprocessor(cfg, train=True)(rows(images, labels))
    assert out["label"].tolist() == [2, -1, 5]
    assert out["mask"].shape == (3, 2, 2) and out["mask"].sum() == 6
    assert "mask" not in Preprocessor(cfg, train=False)(rows(images, labels))


def test_normalize_and_model_inputs():
    cfg = DataConfig(mean=[0.5], std=[0.25])
    images = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(normalize(images, cfg), torch.full((2, 1, 4, 4), 2.0))
    inputs = to_model_inputs({"image": images.numpy(), "label": np.array([1, 2])}, cfg, torch.device("cpu"))
    assert inputs["image"].dtype == torch.float32 and inputs["label"].dtype == torch.int64


def test_mixup_gives_soft_targets_that_sum_to_one():
    cfg = DataConfig(mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0))
    mixup = build_mixup(cfg, num_classes=10, label_smoothing=0.1)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    mixed, targets = mixup(images.clone(), labels)  # timm mixes in place
    assert targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1.0).all() and ((targets > 0.02).sum(1) >= 2).all()
    assert not torch.equal(mixed, images)
    assert build_mixup(DataConfig(), 10, 0.0) is None


def test_mixup_config_is_checked():
    with pytest.raises(Exception, match="both 0"):
        validate({"name": "x", "data": {"mixup": {"mixup_alpha": 0, "cutmix_alpha": 0}}})
    with pytest.raises(Exception, match="even train.batch_size"):
        validate({"name": "x", "data": {"mixup": {}}, "train": {"batch_size": 33}})
    with pytest.raises(Exception, match="not to data.views"):
        validate({"name": "x", "data": {"mixup": {}, "views": [{"pipeline": []}]}})
