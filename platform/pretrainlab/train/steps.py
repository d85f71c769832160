"""One training step: micro-batch forward/backward, gradient accumulation, clipping, AMP, optimizer, EMA."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn

from pretrainlab.config import EmaConfig, TrainConfig


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def compile_forward(model: nn.Module, mode: str | None) -> nn.Module:
    """``model`` with its forward compiled by ``torch.compile`` in ``mode``, in place (its names and state dict
    stay as they were); unchanged for None."""
    if mode is not None:
        model.compile(mode=mode)
    return model


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (x86: AVX-512 BW/VL/DQ, or AMX; Arm: BF16)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_for(
    device: torch.device, amp: str = "auto"
) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """The autocast context and grad scaler of ``train.amp`` on ``device``: ``auto`` is bf16 on a GPU that
    supports it, fp16 with a grad scaler on other GPUs, full precision on CPU; ``bf16`` and ``fp16`` ask for
    that type (fp16 only on GPU, with a grad scaler); ``off`` is full precision."""
    cuda = device.type == "cuda"
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    if amp == "off":
        return contextlib.nullcontext(), None
    if amp == "fp16":
        if not cuda:
            raise ValueError(f"train.amp: fp16 needs a GPU (this worker runs on {device.type}); use bf16 or off")
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    if cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("train.amp: bf16 is not supported by this GPU; use fp16 or auto")
    if not cuda and not cpu_has_bf16_kernels():
        warnings.warn(
            f"train.amp: bf16 on a CPU without AVX-512 or AMX ({torch.backends.cpu.get_cpu_capability()}): "
            "matrix products fall back to generic code, tens of times slower than full precision; "
            "set train.amp=off on this machine",
            stacklevel=2,
        )
    return torch.autocast(device.type, dtype=torch.bfloat16), None


def build_ema(model: nn.Module, cfg: EmaConfig | None) -> ModelEmaV3 | None:
    """timm's ``ModelEmaV3`` of ``model`` (unwrapped, before DDP), or None when ``train.ema`` is off."""
    if cfg is None:
        return None
    return ModelEmaV3(
        model, decay=cfg.decay, use_warmup=cfg.warmup, warmup_gamma=cfg.warmup_gamma, warmup_power=cfg.warmup_power
    )


class Stepper:
    """Feeds micro-batches to the model; every ``train.accumulate_steps`` of them makes one optimizer step.

    Losses are divided by the number of micro-batches per step, so the accumulated gradient
    is that of their mean. Under DDP the gradients are only all-reduced on the last
    micro-batch of a step. Before the step, gradients are unscaled (fp16 AMP) and clipped
    (``train.clip_grad``); after it the schedule advances, the model's ``after_step(step,
    total_steps)`` runs when it has one, and the EMA follows the weights.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        cfg: TrainConfig,
        device: torch.device,
        ema: ModelEmaV3 | None = None,
        step: int = 0,
        total_steps: int | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.cfg, self.device = cfg, device
        self.autocast, self.scaler = autocast_for(device, cfg.amp)
        self.step, self.total_steps = step, total_steps
        self.pending = 0
        self.logs: dict[str, float] = {}

    def _no_sync(self) -> contextlib.AbstractContextManager:
        last = self.pending + 1 == self.cfg.accumulate_steps
        if last or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def micro_batch(self, batch: dict[str, torch.Tensor]) -> tuple[float, bool]:
        """Forward and backward one micro-batch; ``(its loss, whether an optimizer step followed)``.

        The model's other ``log/<name>`` outputs are kept in :attr:`logs` as ``train/<name>``. Both stay
        detached tensors: reading a value waits for the GPU, so the loop reads them only when it logs.
        """
        with self._no_sync():
            with self.autocast:
                out = self.model(batch)
            loss = out["loss"]
            self.logs = {
                f"train/{k.removeprefix('log/')}": torch.as_tensor(v).detach()
                for k, v in out.items()
                if k.startswith("log/")
            }
            scaled = loss / self.cfg.accumulate_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.pending += 1
        if self.pending < self.cfg.accumulate_steps:
            return loss.detach(), False
        self._optimizer_step()
        return loss.detach(), True

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), self.cfg.clip_grad.max, mode=self.cfg.clip_grad.mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.pending = 0
        after_step = getattr(unwrap(self.model), "after_step", None)
        if after_step is not None:  # momentum encoders, teachers: the same update on every worker
            after_step(self.step, self.total_steps)
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=self.step)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule, grad scaler and EMA state, for a checkpoint's training state."""
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (without EMA state, the EMA keeps the weights it was built from)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
