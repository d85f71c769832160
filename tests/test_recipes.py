"""The supervised recipe switches, each checked for what it changes: mixup / cutmix targets, EMA,
layer-wise lr decay, weight-decay exclusion, LARS / LAMB, clipping, accumulation, lr scaling,
repeated augmentation."""

from __future__ import annotations

import copy
import platform
import random
import warnings

import numpy as np
import pytest
import torch
from timm.optim import Lamb, Lars

from pretrainlab.config import (
    ClipGradConfig,
    DataConfig,
    EmaConfig,
    ExperimentConfig,
    MixupConfig,
    OptimConfig,
    TrainConfig,
    validate,
)
from pretrainlab.data.pipeline import Preprocessor, build_mixup, repeat_rows
from pretrainlab.data.transforms import ImagePipeline
from pretrainlab.strategies import supervised
from pretrainlab.train.optim import build_optimizer, parameter_groups, scaled_lr
from pretrainlab.train.schedule import build_scheduler
from pretrainlab.train.steps import Stepper, autocast_for, build_ema, compile_forward, cpu_has_bf16_kernels

CPU = torch.device("cpu")


def vit_classifier(num_classes: int = 5) -> supervised.ImageClassifier:
    """timm's test ViT (6 blocks, 64 wide, LayerNorm only) on 1 x 16 x 16 images, with a linear head."""
    torch.manual_seed(0)
    cfg = ExperimentConfig(
        name="t", model={"backbone": "test_vit", "backbone_kwargs": {"img_size": 16, "patch_size": 4}}
    )
    return supervised.build_model(cfg, num_classes, in_chans=1)


def batch(n: int = 8, num_classes: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Noise images whose brightness tells the class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=generator)
    noise = torch.randn(n, 1, 16, 16, generator=generator)
    return {"image": noise + labels.view(-1, 1, 1, 1) - num_classes / 2, "label": labels}


def stepper_for(model, optim: OptimConfig, train: TrainConfig, ema=None) -> Stepper:
    optimizer = build_optimizer(model, optim, optim.lr)
    scheduler = build_scheduler(optimizer, ExperimentConfig(name="t").schedule, steps_per_epoch=100, epochs=1)
    return Stepper(model, optimizer, scheduler, train, CPU, ema=ema)


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_in_bfloat16_and_learns():
    model = vit_classifier()
    seen = []
    model.backbone.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    stepper = stepper_for(model, OptimConfig(name="adamw", lr=1e-3), TrainConfig(amp="bf16"))
    losses = [float(stepper.micro_batch(batch(n=32))[0]) for _ in range(30)]
    assert set(seen) == {torch.bfloat16} and stepper.scaler is None
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32
    assert losses[-1] < 0.5 * losses[0], losses
    seen.clear()
    stepper_for(model, OptimConfig(), TrainConfig(amp="auto")).micro_batch(batch())  # auto: fp32 on CPU
    stepper_for(model, OptimConfig(), TrainConfig(amp="off")).micro_batch(batch())
    assert seen == [torch.float32, torch.float32]


def x86_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        return {flag for line in info if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads the x86 flags of /proc/cpuinfo")
def test_bf16_on_a_cpu_without_bf16_kernels_warns_that_it_is_slow():
    has_kernels = {"avx512bw", "avx512vl", "avx512dq"} <= x86_flags()
    assert cpu_has_bf16_kernels() is has_kernels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autocast_for(CPU, "bf16")
        autocast_for(CPU, "off")
    slow = [str(w.message) for w in caught if "train.amp: bf16 on a CPU without AVX-512 or AMX" in str(w.message)]
    assert len(slow) == (0 if has_kernels else 1), slow


def test_fp16_is_refused_on_cpu():
    with pytest.raises(ValueError, match="amp: fp16 needs a GPU and use_gpu is false"):
        TrainConfig(amp="fp16", use_gpu=False)
    with pytest.raises(ValueError, match=r"train.amp: fp16 needs a GPU \(this worker runs on cpu\)"):
        stepper_for(vit_classifier(), OptimConfig(), TrainConfig(amp="fp16"))


def test_mixup_and_cutmix_give_soft_targets_that_sum_to_one():
    cfg = DataConfig(mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0))
    mixup = build_mixup(cfg, num_classes=10, label_smoothing=0.1)
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    mixed_images, targets = mixup(images.clone(), labels)
    assert targets.shape == (16, 10) and targets.dtype.is_floating_point
    assert torch.allclose(targets.sum(dim=1), torch.ones(16))
    assert targets.min() >= 0.1 / 10 - 1e-6  # label smoothing folded in: no class below smoothing / classes
    assert (targets.max(dim=1).values < 1 - 0.1 + 0.1 / 10 - 1e-3).all()  # two classes share the mass
    assert not torch.equal(mixed_images, images)
    loss = supervised.classification_loss(torch.zeros(16, 10), targets)
    assert loss.item() == pytest.approx(np.log(10), rel=1e-5)


def test_ema_follows_the_decay_and_differs_from_the_raw_weights():
    model = vit_classifier()
    decay = 0.9
    ema = build_ema(model, EmaConfig(decay=decay))
    stepper = stepper_for(model, OptimConfig(name="sgd", lr=0.05, momentum=0.0), TrainConfig(), ema=ema)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        stepper.micro_batch(batch(seed=step))
        current = model.state_dict()
        weight = 1.0 if step == 1 else 1 - decay  # timm's first update copies the weights
        expected = {k: expected[k] + weight * (current[k] - expected[k]) for k in expected}
    name = "backbone.blocks.0.attn.qkv.weight"
    assert torch.allclose(ema.module.state_dict()[name], expected[name], atol=1e-6)
    assert not torch.allclose(ema.module.state_dict()[name], model.state_dict()[name], atol=1e-4)
    assert stepper.step == 5


def test_ema_warmup_ramps_the_decay_up():
    ema = build_ema(torch.nn.Linear(2, 2), EmaConfig(decay=0.999, warmup=True, warmup_gamma=1.0, warmup_power=0.75))
    decays = [ema.get_decay(step) for step in (2, 10, 1000, 10**6)]
    assert decays[:3] == pytest.approx([1 - 2**-0.75, 1 - 10**-0.75, 1 - 1000**-0.75])
    assert decays[3] == 0.999


def test_layer_decay_gives_each_layer_its_lr():
    model = vit_classifier()
    lr, layer_decay = 0.1, 0.5
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=lr, layer_decay=layer_decay), lr)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    # timm's grouping of test_vit: the stem (patch_embed, pos_embed, cls_token) is layer 0, blocks.i layer
    # i + 1; the final norm shares the top layer (6) with the last block and the head
    assert lr_of[id(params["backbone.patch_embed.proj.weight"])] == pytest.approx(lr * 0.5**6)
    assert lr_of[id(params["backbone.pos_embed"])] == pytest.approx(lr * 0.5**6)
    for block in range(6):
        assert lr_of[id(params[f"backbone.blocks.{block}.mlp.fc1.weight"])] == pytest.approx(lr * 0.5 ** (5 - block))
    assert lr_of[id(params["backbone.norm.weight"])] == pytest.approx(lr)
    assert lr_of[id(params["head.fc.weight"])] == pytest.approx(lr)


def test_norms_biases_and_position_embeddings_get_no_weight_decay():
    model = vit_classifier()
    decay_of = {
        id(p): group["weight_decay"]
        for group in parameter_groups(model, OptimConfig(weight_decay=0.05))
        for p in group["params"]
    }
    params = dict(model.named_parameters())
    no_decay = {n for n, p in params.items() if decay_of[id(p)] == 0.0}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "head.fc.bias"} <= no_decay
    assert all(params[n].ndim <= 1 or n.endswith(("pos_embed", "cls_token")) for n in no_decay)
    assert decay_of[id(params["backbone.blocks.0.attn.qkv.weight"])] == 0.05
    assert decay_of[id(params["head.fc.weight"])] == 0.05
    every = parameter_groups(model, OptimConfig(weight_decay=0.05, decay_norm_and_bias=True))
    assert {g["weight_decay"] for g in every} == {0.05}
    assert sum(len(g["params"]) for g in every) == len(params)


@pytest.mark.parametrize(("name", "kind", "lr"), [("lars", Lars, 0.3), ("lamb", Lamb, 0.005)])
def test_lars_and_lamb_train(name, kind, lr):
    """LARS on a CNN (its use: large-batch ResNets), LAMB on a ViT."""
    if name == "lars":
        torch.manual_seed(0)
        cfg = ExperimentConfig(name="t", model={"backbone": "test_resnet", "stem_stride": 1})
        model = supervised.build_model(cfg, 5, in_chans=1)
    else:
        model = vit_classifier()
    stepper = stepper_for(model, OptimConfig(name=name, lr=lr, weight_decay=1e-4), TrainConfig())
    assert isinstance(stepper.optimizer, kind)
    losses = [stepper.micro_batch(batch(n=32, seed=step))[0] for step in range(20)]
    assert max(losses[-3:]) < 0.5 * losses[0], losses


@pytest.mark.parametrize(("trust_coeff", "trust_clip"), [(0.001, False), (0.02, False), (1000.0, True)])
def test_lars_trust_coefficient_scales_the_step_and_clipping_caps_it(trust_coeff, trust_clip):
    """One LARS step without momentum: a decayed weight moves by ``lr x r x (g + wd w)``, with the trust ratio
    ``r = eta |w| / (|g| + wd |w|)``, clipped to ``min(r / lr, 1)``; the bias (no weight decay) takes a plain
    SGD step."""
    lr, wd = 0.5, 1e-3
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(8, 4)})
    optim = OptimConfig(
        name="lars", lr=lr, momentum=0.0, weight_decay=wd, trust_coeff=trust_coeff, trust_clip=trust_clip
    )
    optimizer = build_optimizer(model, optim, lr)
    model.backbone(torch.randn(16, 8)).pow(2).sum().backward()
    weight, grad = model.backbone.weight.detach().clone(), model.backbone.weight.grad.clone()
    bias, bias_grad = model.backbone.bias.detach().clone(), model.backbone.bias.grad.clone()
    optimizer.step()
    ratio = trust_coeff * weight.norm() / (grad.norm() + wd * weight.norm())
    if trust_clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
        assert ratio == 1.0  # eta 1000 would step far past lr: clipping makes it plain SGD
    expected = weight - lr * ratio * (grad + wd * weight)
    assert torch.allclose(model.backbone.weight.detach(), expected, atol=1e-7)
    assert torch.allclose(model.backbone.bias.detach(), bias - lr * bias_grad, atol=1e-7)


def test_gradient_clipping_bounds_the_update():
    lr, bound = 1.0, 0.01
    model = vit_classifier()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optim = OptimConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0)
    stepper_for(model, optim, TrainConfig(clip_grad=ClipGradConfig(max=bound))).micro_batch(batch())
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(lr * bound, rel=1e-3)


def test_two_accumulated_half_batches_step_like_one_full_batch():
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    full, halves = vit_classifier(), vit_classifier()
    data = batch(n=16)
    assert stepper_for(full, optim, TrainConfig()).micro_batch(data)[1]
    accumulating = stepper_for(halves, optim, TrainConfig(accumulate_steps=2))
    first = accumulating.micro_batch({k: v[:8] for k, v in data.items()})
    assert first[1] is False and accumulating.step == 0
    assert all(p.grad is not None for p in halves.parameters())
    assert accumulating.micro_batch({k: v[8:] for k, v in data.items()})[1] and accumulating.step == 1
    for (name, a), b in zip(full.named_parameters(), halves.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert all(p.grad is None for p in halves.parameters())


def test_lr_scales_with_the_global_batch():
    data = {
        "name": "t",
        "optim": {"lr": 0.1, "base_batch_size": 256},
        "train": {"batch_size": 64, "num_workers": 2, "accumulate_steps": 4},
    }
    cfg = validate(data)
    assert scaled_lr(cfg, world_size=2) == pytest.approx(0.1 * 64 * 2 * 4 / 256)
    assert scaled_lr(cfg, world_size=1) == pytest.approx(0.1 * 64 * 4 / 256)
    unscaled = validate({**data, "optim": {"lr": 0.1}})
    assert scaled_lr(unscaled, world_size=2) == 0.1


def test_repeated_augmentation_repeats_rows_and_augments_each_copy():
    rng = np.random.default_rng(0)
    rows = {"image": np.arange(12), "label": np.arange(12) % 3}
    repeated = repeat_rows(rows, 3, rng)
    assert len(repeated["image"]) == 12
    assert len(set(repeated["image"])) == 4
    assert (repeated["image"].reshape(4, 3) == repeated["image"][::3, None]).all()
    assert (repeated["label"] == repeated["image"] % 3).all()

    pixels = np.random.default_rng(1).integers(0, 255, (8, 12, 12, 1), dtype=np.uint8)
    encoded = {
        "image": np.array([p.tobytes() for p in pixels], dtype=object),
        "image_format": np.array(["raw"] * 8),
        "height": np.full(8, 12),
        "width": np.full(8, 12),
        "channels": np.ones(8, dtype=np.int64),
        "label": np.arange(8),
    }
    cfg = DataConfig(repeated_augmentation=2, train_pipeline=[{"type": "RandomCrop", "size": 12, "padding": 4}])
    out = Preprocessor(cfg, train=True, seed=0)(encoded)
    assert out["image"].shape == (8, 1, 12, 12)
    assert (out["label"][::2] == out["label"][1::2]).all()
    copies_differ = [not np.array_equal(out["image"][i], out["image"][i + 1]) for i in range(0, 8, 2)]
    assert sum(copies_differ) >= 3
    evaluation = Preprocessor(cfg, train=False)(encoded)
    assert list(evaluation["label"]) == list(range(8))


def test_recipe_config_errors_name_the_key():
    with pytest.raises(ValueError, match="repeated_augmentation 3 must divide train.batch_size 64"):
        validate({"name": "t", "data": {"repeated_augmentation": 3}, "train": {"batch_size": 64}})
    with pytest.raises(ValueError, match=r"train\.clip_grad\.mode"):
        validate({"name": "t", "train": {"clip_grad": {"max": 1.0, "mode": "l3"}}})
    with pytest.raises(ValueError, match=r"optim\.layer_decay"):
        validate({"name": "t", "optim": {"layer_decay": 1.5}})
    with pytest.raises(ValueError, match=r"train\.ema\.decay"):
        validate(copy.deepcopy({"name": "t", "train": {"ema": {"decay": 1.0}}}))
    with pytest.raises(ValueError, match="optim trust_clip: a lars setting, but optim.name is sgd"):
        validate({"name": "t", "optim": {"name": "sgd", "trust_clip": True}})
    sgd = validate({"name": "t", "optim": {"name": "sgd"}})
    assert validate(sgd.model_dump()).optim == sgd.optim  # how workers receive it: every field, defaults too


@pytest.mark.parametrize(
    "op",
    [
        {"type": "TimmRandAugment", "config": "rand-m9-n2-mstd0.5"},
        {"type": "TimmAutoAugment", "config": "v0"},
        {"type": "RandAugment", "num_ops": 2, "magnitude": 9},
        {"type": "RandomErasing", "p": 1.0, "value": 0},
    ],
    ids=lambda op: op["type"],
)
def test_policy_augmentations_change_each_image_on_its_own(op):
    images = torch.from_numpy(np.random.default_rng(0).integers(30, 226, (32, 1, 28, 28), dtype=np.uint8))
    pipeline = ImagePipeline([op])
    for seed in range(21):  # every operation and level the policy draws works (Posterize at 0 bits included)
        random.seed(seed)  # timm's policies draw from Python's and NumPy's global generators
        np.random.seed(seed)
        torch.manual_seed(seed)
        out = pipeline(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    changes = [(o != i) for o, i in zip(out, images, strict=True)]
    changed = [o for o, change in zip(out, changes, strict=True) if change.any()]
    # A policy applied to the batch as a whole would change all images or none; per image, each op fires with its
    # own probability (about 22 of 32 images change on average, never fewer than 15 over 200 seeds).
    assert 12 <= len(changed), len(changed)
    amounts = {
        round((o.float() - i.float()).abs().mean().item(), 2)
        for o, i, change in zip(out, images, changes, strict=True)
        if change.any()
    }
    assert len(amounts) >= 12, amounts  # each changed image got its own operations and magnitudes
    if op["type"] == "RandomErasing":  # a rectangle of zeros in every image
        for image, change in zip(out, changes, strict=True):
            rows, cols = change[0].any(dim=1).nonzero(), change[0].any(dim=0).nonzero()
            box = image[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert (box == 0).all()


class TinyClassifier(torch.nn.Module):
    """A backbone and a linear head with the strategies' dict interface."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 5)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.head(self.backbone(batch["image"]))
        return {"loss": torch.nn.functional.cross_entropy(logits, batch["label"]), "logits": logits}


def test_train_compile_gives_the_eager_losses_and_state_dict():
    optim = OptimConfig(name="sgd", lr=0.1)
    eager, compiled = TinyClassifier(), compile_forward(TinyClassifier(), "default")
    assert compile_forward(eager, None) is eager and list(compiled.state_dict()) == list(eager.state_dict())
    steppers = [stepper_for(model, optim, TrainConfig()) for model in (eager, compiled)]
    for step in range(3):
        losses = [float(stepper.micro_batch(batch(seed=step))[0]) for stepper in steppers]
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), step
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5)
