"""The training loop: what each Ray Train worker runs (``train_loop_per_worker``), and
what a Ray Tune PBT trial runs by itself (``run_loop`` with a ``TuneTrialSession``).

Every worker builds the same model, iterates its own shard of the training split, and
evaluates its shard of the validation split; validation sums are added across workers.
Rank 0 logs to MLflow and writes the checkpoint that every worker reports at the end of
each epoch. On restart the session's checkpoint restores model, optimizer, scheduler,
epoch, step and RNG state; the config's learning rate, weight decay and momentum then
apply again, so a PBT trial that copied another trial's checkpoint trains with its own
new hyperparameters (the copy is recorded in MLflow).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.pipeline import Preprocessor, build_mixup, to_model_inputs, training_batches
from pretrainlab.models.backbones import uses_convolutions
from pretrainlab.strategies import get_strategy
from pretrainlab.tracking.mlflow import MetricLogger, client_for
from pretrainlab.train.checkpoint import checkpoint_meta, load_checkpoint, save_checkpoint
from pretrainlab.train.evaluate import all_reduce_sums, classification_sums, metrics_from_sums
from pretrainlab.train.optim import apply_hyperparameters, build_optimizer
from pretrainlab.train.schedule import build_scheduler
from pretrainlab.train.session import LoopSession, TrainWorkerSession


def steps_per_epoch(train_count: int, batch_size: int, num_workers: int) -> int:
    """Full batches each worker runs per epoch (every worker gets an equal shard, last batch dropped)."""
    steps = (train_count // num_workers) // batch_size
    if steps == 0:
        raise ValueError(
            f"train split has {train_count} rows: too few for {num_workers} workers x batch_size {batch_size}"
        )
    return steps


def autocast_for(device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """AMP on GPU (bf16 where supported, else fp16 with a grad scaler); full precision on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train one strategy for ``config.train.epochs`` epochs; the entry point given to ``TorchTrainer``.

    Args:
        loop_config: ``{"config": resolved ExperimentConfig dict, "dataset": {"num_classes",
            "in_chans", "class_names", "train_count"}, "tracking": {"uri", "run_id"}}``.
    """
    run_loop(loop_config, TrainWorkerSession())


def run_loop(loop_config: dict[str, Any], session: LoopSession) -> None:
    """The loop of :func:`train_loop_per_worker`, in whichever ``session`` runs it."""
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    info = loop_config["dataset"]
    rank, world = session.rank, session.world_size
    torch.set_num_threads(cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.runtime.seed)
    device = session.device

    model = get_strategy(cfg.strategy).build_model(cfg, info["num_classes"], info["in_chans"])
    channels_last = device.type == "cuda" and uses_convolutions(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    per_epoch = steps_per_epoch(info["train_count"], cfg.train.batch_size, world)
    scheduler = build_scheduler(optimizer, cfg.schedule, per_epoch, cfg.train.epochs)
    autocast, scaler = autocast_for(device)

    start_epoch, step, run_id = 0, 0, loop_config["tracking"]["run_id"]
    client = client_for(loop_config["tracking"]["uri"]) if rank == 0 else None
    restored = session.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            ckpt = load_checkpoint(folder, with_training_state=True)
        model.load_state_dict(ckpt.weights)
        optimizer.load_state_dict(ckpt.training_state["optimizer"])
        scheduler.load_state_dict(ckpt.training_state["scheduler"])
        apply_hyperparameters(optimizer, scheduler, cfg.optim)
        if scaler is not None and "scaler" in ckpt.training_state:
            scaler.load_state_dict(ckpt.training_state["scaler"])
        torch.set_rng_state(ckpt.training_state["rng"]["torch"])
        start_epoch, step = ckpt.meta["epoch"], ckpt.meta["step"]
        print(f"[rank {rank}] resumed from epoch {start_epoch}, step {step}")
        source_run = ckpt.meta["mlflow_run_id"]
        if client is not None and source_run != run_id:  # PBT: this trial copied a better one's checkpoint
            client.set_tag(run_id, "pretrainlab.exploited_from", f"run {source_run} at epoch {start_epoch}")
            MetricLogger(client, run_id).log({"pbt/exploit": 1.0}, step)

    model = session.prepare_model(model)
    logger = MetricLogger(client, run_id) if client is not None else None
    augment = Preprocessor(cfg.data, train=True) if cfg.data.augment_on == "worker" else None
    prepare_eval = Preprocessor(cfg.data, train=False)
    mixup = build_mixup(cfg.data, info["num_classes"], cfg.model.label_smoothing)
    global_batch = cfg.train.batch_size * world

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        epoch_start = window_start = time.perf_counter()
        window_loss, window_steps = 0.0, 0
        shard = session.dataset("train")
        for rows in training_batches(shard, cfg, epoch):
            batch = to_model_inputs(augment(rows) if augment else rows, cfg.data, device)
            if mixup is not None:
                batch["image"], batch["label"] = mixup(batch["image"], batch["label"])
            if channels_last:
                batch = {
                    k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()
                }
            with autocast:
                loss = model(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            step += 1
            window_loss += loss.item()
            window_steps += 1
            if logger is not None and step % cfg.train.log_every_n_steps == 0:
                elapsed = time.perf_counter() - window_start
                logger.log(
                    {
                        "train/loss": window_loss / window_steps,
                        "train/lr": optimizer.param_groups[0]["lr"],
                        "train/throughput": window_steps * global_batch / elapsed,
                    },
                    step,
                )
                window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
        epoch_time = time.perf_counter() - epoch_start

        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad(), autocast:
            val_shard = session.dataset("val")
            for rows in val_shard.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="numpy"):
                batch = to_model_inputs(prepare_eval(rows), cfg.data, device)
                sums += classification_sums(model({"image": batch["image"]})["logits"], batch["label"])
        val = metrics_from_sums(all_reduce_sums(sums))
        metrics = {f"val/{k}": v for k, v in val.items()}
        metrics.update({"epoch": epoch + 1, "step": step, "train/epoch_time_s": epoch_time})
        if logger is not None:
            logger.log(metrics, step)

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                folder = save_checkpoint(
                    Path(tmp) / "checkpoint",
                    _unwrap(model).state_dict(),
                    meta=checkpoint_meta(cfg, info, epoch + 1, step, metrics, run_id),
                    training_state={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": {"torch": torch.get_rng_state()},
                        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                    },
                )
                checkpoint = session.checkpoint_from(folder)
            session.report(metrics, checkpoint)
