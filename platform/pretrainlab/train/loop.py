"""The training loop: what each Ray Train worker runs (``train_loop_per_worker``), and
what a Ray Tune PBT trial runs by itself (``run_loop`` with a ``TuneTrialSession``).

Every worker builds the same model, iterates its own shard of the training split, and
evaluates its shard of the validation split; validation sums are added across workers.
Rank 0 logs to MLflow and writes the checkpoint that every worker reports at the end of
each epoch. With ``train.ema`` the moving average is evaluated next to the raw weights;
the checkpoint's weights are the better of the two by the score metric (``val/*`` are
their metrics, ``val_raw/*`` and ``val_ema/*`` both), and its training state keeps both.
On restart the session's checkpoint (or, when it fails verification, the newest good one
before it) restores model, EMA, optimizer, scheduler, epoch, step and RNG state; the
config's learning rate, weight decay and momentum then apply again, so a PBT trial that
copied another trial's checkpoint trains with its own new hyperparameters (the copy is
recorded in MLflow). The run's tag ``ray.worker_nodes`` lists each rank's Ray node.
Each worker first sets glibc's malloc to keep freed memory (:mod:`pretrainlab.train.allocator`).
A NaN or infinite training loss, which every rank checks at each logging step and at the
end of each epoch, stops the run (``TrainingDiverged``) before that epoch's checkpoint.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from torch import nn

from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint
from pretrainlab.config import CheckpointConfig, ExperimentConfig
from pretrainlab.data.pipeline import Preprocessor, build_mixup, to_model_inputs, training_batches
from pretrainlab.distributed import gather_from_workers
from pretrainlab.evaluation.tasks import EVALUATORS
from pretrainlab.models.backbones import uses_convolutions
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategies import build_model, task_of
from pretrainlab.tracking.mlflow import MetricLogger, client_for
from pretrainlab.train.allocator import keep_freed_memory
from pretrainlab.train.optim import apply_hyperparameters, build_optimizer, scaled_lr
from pretrainlab.train.resume import load_resumable
from pretrainlab.train.schedule import build_scheduler
from pretrainlab.train.session import LoopSession, TrainWorkerSession
from pretrainlab.train.steps import Stepper, build_ema, compile_forward, unwrap


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the run stops rather than train and checkpoint on."""


def finite_mean_loss(window_loss: torch.Tensor | float, micro_batches: int, step: int, epoch: int) -> float:
    """The mean loss of the last ``micro_batches`` micro-batches, up to optimizer step ``step`` of ``epoch``
    (1-based); raises ``TrainingDiverged`` when it is NaN or infinite (a NaN in any of them makes the sum NaN)."""
    mean = float(window_loss) / micro_batches
    if not math.isfinite(mean):
        raise TrainingDiverged(
            f"training diverged: train/loss is {mean} over the {micro_batches} micro-batches up to step {step} "
            f"(epoch {epoch}), so epoch {epoch} writes no checkpoint. Lower optim.lr or set optim.clip_grad, then "
            "run again (the same --run-name resumes from the last checkpoint)"
        )
    return mean


def steps_per_epoch(train_count: int, batch_size: int, num_workers: int, accumulate_steps: int = 1) -> int:
    """Optimizer steps each worker runs per epoch (equal shards, last batch and last partial step dropped)."""
    steps = (train_count // num_workers) // batch_size // accumulate_steps
    if steps == 0:
        raise ValueError(
            f"train split has {train_count} rows: too few for {num_workers} workers x batch_size {batch_size}"
            f" x accumulate_steps {accumulate_steps}"
        )
    return steps


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train one strategy for ``config.train.epochs`` epochs; the entry point given to ``TorchTrainer``.

    Args:
        loop_config: ``{"config": resolved ExperimentConfig dict, "dataset": {"num_classes",
            "in_chans", "class_names", "train_count"}, "tracking": {"uri", "run_id"}}``.
    """
    run_loop(loop_config, TrainWorkerSession())


def _to_device(batch: dict[str, torch.Tensor], channels_last: bool) -> dict[str, torch.Tensor]:
    if not channels_last:
        return batch
    return {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}


def validate(models: dict[str, nn.Module], shard: Any, cfg: ExperimentConfig, stepper: Stepper) -> dict:
    """Validation metrics of each of ``models`` on the validation split (every worker's shard together), by the
    strategy's task (:data:`pretrainlab.evaluation.tasks.EVALUATORS`)."""
    for model in models.values():
        model.eval()
    evaluator = EVALUATORS[task_of(cfg.strategy)]
    with torch.no_grad(), stepper.autocast:
        return evaluator.validate({name: unwrap(model) for name, model in models.items()}, shard, cfg, stepper.device)


def better_weights(results: dict[str, dict[str, float]], cfg: CheckpointConfig) -> str:
    """``"ema"`` or ``"raw"``: whichever scores better on ``cfg.score_metric`` (EMA on ties or non-val metrics)."""
    key = cfg.score_metric.removeprefix("val/")
    if key == cfg.score_metric or key not in results["raw"]:
        return "ema"
    raw, ema = results["raw"][key], results["ema"][key]
    return "raw" if (raw > ema if cfg.score_mode == "max" else raw < ema) else "ema"


def log_init_report(client: MlflowClient, run_id: str, report: LoadReport) -> None:
    """Where the backbone's starting weights came from, and which keys were loaded, dropped or adapted."""
    print(f"[rank 0] model.init_from: {report.summary()}")
    client.log_text(run_id, report.summary(limit=None), "init_from_report.txt")
    client.set_tag(run_id, "pretrainlab.init_from", f"{report.source}:{report.path}")


def run_loop(loop_config: dict[str, Any], session: LoopSession) -> None:
    """The loop of :func:`train_loop_per_worker`, in whichever ``session`` runs it."""
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    info = loop_config["dataset"]
    rank, world = session.rank, session.world_size
    torch.set_num_threads(cfg.train.cpus_per_worker)
    keep_freed_memory()
    torch.manual_seed(cfg.runtime.seed)
    device = session.device

    restored = session.get_checkpoint()
    model = build_model(cfg, info["num_classes"], info["in_chans"], load_init_from=restored is None)
    channels_last = device.type == "cuda" and uses_convolutions(model.backbone)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    start_epoch, step, run_id = 0, 0, loop_config["tracking"]["run_id"]
    client = client_for(loop_config["tracking"]["uri"]) if rank == 0 else None
    nodes = gather_from_workers(session.node_id)
    if client is not None:  # which Ray node each rank trains on, in rank order
        client.set_tag(run_id, "ray.worker_nodes", ",".join(nodes))
    if client is not None and model.init_report is not None:
        log_init_report(client, run_id, model.init_report)
    ckpt = None
    if restored is not None:
        resumption = load_resumable(restored)
        ckpt = resumption.checkpoint
        model.load_state_dict(ckpt.training_state.get("raw_weights", ckpt.weights))
        start_epoch, step = ckpt.meta["epoch"], ckpt.meta["step"]

    lr = scaled_lr(cfg, world)
    optimizer = build_optimizer(model, cfg.optim, lr)
    per_epoch = steps_per_epoch(info["train_count"], cfg.train.batch_size, world, cfg.train.accumulate_steps)
    scheduler = build_scheduler(optimizer, cfg.schedule, per_epoch, cfg.train.epochs)
    ema = build_ema(model.to(device), cfg.train.ema)
    total_steps = per_epoch * cfg.train.epochs
    stepper = Stepper(model, optimizer, scheduler, cfg.train, device, ema=ema, step=step, total_steps=total_steps)
    if ckpt is not None:
        stepper.load_state_dict(ckpt.training_state)
        apply_hyperparameters(optimizer, scheduler, cfg.optim, lr)
        torch.set_rng_state(ckpt.training_state["rng"]["torch"])
        print(f"[rank {rank}] resumed from {resumption.summary()}", flush=True)
        source_run = ckpt.meta["mlflow_run_id"]
        if client is not None:
            client.set_tag(run_id, "pretrainlab.resumed_from", resumption.summary()[:5000])
        if client is not None and source_run != run_id:  # PBT: this trial copied a better one's checkpoint
            client.set_tag(run_id, "pretrainlab.exploited_from", f"run {source_run} at epoch {start_epoch}")
            MetricLogger(client, run_id).log({"pbt/exploit": 1.0}, step)

    stepper.model = session.prepare_model(compile_forward(model, cfg.train.compile))
    logger = MetricLogger(client, run_id) if client is not None else None
    augment = Preprocessor(cfg.data, train=True) if cfg.data.augment_on == "worker" else None
    mixup = build_mixup(cfg.data, info["num_classes"], cfg.model.label_smoothing)
    micro_batches = per_epoch * cfg.train.accumulate_steps

    for epoch in range(start_epoch, cfg.train.epochs):
        stepper.model.train()
        epoch_start = window_start = time.perf_counter()
        window_loss, window_batches = 0.0, 0
        for index, rows in enumerate(training_batches(session.dataset("train"), cfg, epoch, device)):
            if index >= micro_batches:  # the last partial step of an epoch is not taken
                continue
            batch = to_model_inputs(augment(rows) if augment else rows, cfg.data, device)
            if mixup is not None:
                batch["image"], batch["label"] = mixup(batch["image"], batch["label"])
            loss, stepped = stepper.micro_batch(_to_device(batch, channels_last))
            window_loss += loss
            window_batches += 1
            if stepped and stepper.step % cfg.train.log_every_n_steps == 0:  # every rank checks its loss here
                mean_loss = finite_mean_loss(window_loss, window_batches, stepper.step, epoch + 1)
                if logger is not None:
                    elapsed = time.perf_counter() - window_start
                    logger.log(
                        {
                            "train/loss": mean_loss,
                            "train/lr": max(group["lr"] for group in optimizer.param_groups),
                            "train/throughput": window_batches * cfg.train.batch_size * world / elapsed,
                            **{key: float(value) for key, value in stepper.logs.items()},
                        },
                        stepper.step,
                    )
                window_start, window_loss, window_batches = time.perf_counter(), 0.0, 0
        if window_batches:  # the steps since the last log: no checkpoint of a diverged epoch
            finite_mean_loss(window_loss, window_batches, stepper.step, epoch + 1)
        epoch_time = time.perf_counter() - epoch_start

        candidates = {"raw": stepper.model} if ema is None else {"raw": stepper.model, "ema": ema.module}
        results = validate(candidates, session.dataset("val"), cfg, stepper)
        chosen = "raw" if ema is None else better_weights(results, cfg.train.checkpoint)
        metrics = {f"val/{k}": v for k, v in results[chosen].items()}
        if ema is not None:
            for name, values in results.items():
                metrics.update({f"val_{name}/{k}": v for k, v in values.items()})
            metrics["ema/chosen"] = float(chosen == "ema")
        metrics.update({"epoch": epoch + 1, "step": stepper.step, "train/epoch_time_s": epoch_time})
        if logger is not None:
            logger.log(metrics, stepper.step)

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                raw_weights = unwrap(stepper.model).state_dict()
                weights = raw_weights if chosen == "raw" else ema.module.state_dict()
                folder = save_checkpoint(
                    Path(tmp) / "checkpoint",
                    weights,
                    meta={
                        **checkpoint_meta(cfg, info, epoch + 1, stepper.step, metrics, run_id),
                        "weights": chosen,
                    },
                    training_state={
                        **stepper.state_dict(),
                        **({"raw_weights": raw_weights} if ema is not None else {}),
                        "rng": {"torch": torch.get_rng_state()},
                    },
                )
                checkpoint = session.checkpoint_from(folder)
            session.report(metrics, checkpoint)

    if logger is not None and logger.outbox:  # metrics still queued from an MLflow outage: one last try
        try:
            logger.flush()
        except Exception as err:  # still unreachable: the outbox file keeps them for a replay
            print(
                f"[rank 0] MLflow still unreachable ({err}): queued metrics stay in {logger.outbox.path}; "
                f"send them with `python -m pretrainlab.tracking.outbox replay {logger.outbox.path}`",
                flush=True,
            )
