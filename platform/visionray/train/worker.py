"""One Ray Train worker: ``Worker`` builds data, model, optimiser and schedule from a spec and
restores Ray's latest checkpoint; ``train_loop_per_worker`` then runs ``train_one_epoch``,
``evaluate`` and ``ray.train.report`` per epoch (``run_epochs``)."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from visionray import checkpoint as ckpt
from visionray.data.pipelines import open_pipeline
from visionray.data.streaming import StreamInfo
from visionray.models import TTA_VIEWS, create_model
from visionray.specs import TrainSpec
from visionray.train.epoch import Runtime, bf16_pays, bf16_speedup, epochs_within, evaluate, train_one_epoch
from visionray.train.optim import Lookahead, build_optimizer, effective_lr, lr_factors


def _warm_batches(batches: Iterable, last_size: int | None) -> list:
    """The first batch of an epoch and that batch resized to the epoch's last batch size: the batch
    shapes a compiled model meets, without reading the whole epoch. Always two entries when there
    is a batch, so DDP ranks stay in step."""
    first = next(iter(batches), None)
    if first is None:
        return []
    images, labels = first
    size = last_size or len(labels)
    reps = -(-size // len(labels))  # the last batch may be larger than the first (it takes the remainder)
    return [first, (images.repeat(reps, *[1] * (images.dim() - 1))[:size], labels.repeat(reps)[:size])]


def _warm_up(worker: "Worker") -> float:
    """Compile every graph an epoch needs (the training step and the evaluation, with TTA, at the
    first and the last batch sizes), then put the weights and buffers back, so that epoch timings
    measure steady-state steps only. Returns the seconds spent."""
    model, rt = worker.model, worker.rt
    start = time.perf_counter()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = worker.data.epoch(0)
    last_train, last_val = worker.data.last_batch_sizes()
    model.train()
    for images, labels in _warm_batches(train, last_train):
        images, labels = rt.to_device(images, labels)
        with rt.autocast():
            worker.criterion(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    evaluate(model, _warm_batches(val, last_val), rt, len(worker.classes), worker.spec.evaluation.tta)
    model.load_state_dict(state)
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter() - start


class Worker:
    """Everything one training worker builds from a spec: data, model, optimiser, schedule,
    restored state. Ray Train's loop and the plain-PyTorch benchmarks drive it the same way."""

    def __init__(
        self, spec: TrainSpec, rank: int, world: int, device: torch.device, *,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m, restore_dir: Path | None = None,
        stream: StreamInfo | None = None, started_at: float | None = None,
    ):
        started_at = time.time() if started_at is None else started_at  # optim.time_budget_s counts from here
        self.spec, self.rank, self.world = spec, rank, world
        torch.manual_seed(spec.seed)
        gpu = device.type == "cuda"
        channels_last = spec.scaling.channels_last if spec.scaling.channels_last is not None else gpu
        self.data = data = open_pipeline(spec, rank, world, device, stream)
        self.classes, self.preset, steps = data.classes, data.preset, data.steps_per_epoch

        model = create_model(spec.model.name, len(self.classes), self.preset.channels, self.preset.image_size,
                             **spec.model.kwargs())
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        precision, self.bf16_speedup = spec.scaling.precision, None
        if precision == "fastest" and not gpu:  # each worker measures its own CPU (nodes may differ)
            shape = (self.preset.channels, self.preset.image_size, self.preset.image_size)
            self.bf16_speedup = bf16_speedup(model, shape, device, channels_last)
            precision = "bf16" if bf16_pays(self.bf16_speedup) else "fp32"
        elif precision in ("auto", "fastest"):
            precision = "bf16" if gpu else "fp32"
        self.rt = rt = Runtime(
            device=device, autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
            channels_last=channels_last, world_size=world,
        )
        state = ckpt.load_train_state(restore_dir, device) if restore_dir is not None else None
        epochs = self._planned_epochs(state, model, started_at)
        if epochs != spec.optim.epochs:  # the run's own spec from here on: schedule, checkpoints, the loop
            self.spec = spec = spec.model_copy(update={"optim": spec.optim.model_copy(update={"epochs": epochs})})
        self.optimizer = build_optimizer(spec.optim, model, effective_lr(spec.optim, spec.optim.batch_size * world))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factors(spec.optim, self.optimizer, steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.start_epoch = 0
        if state is not None:
            model.load_state_dict(ckpt.load_model(restore_dir, device)[0].state_dict())
            self._restore_optimisation(state)
            self.start_epoch = state["epoch"]
        elif hasattr(model, "init_whitening") and (sample := data.sample_images()) is not None:
            model.init_whitening(sample.to(device))  # data-dependent init (airbench's whitening)
        self.lookahead = None
        if spec.optim.lookahead is not None:  # built on the restored weights; a checkpoint's average replaces them
            self.lookahead = Lookahead(model, spec.optim.lookahead, spec.optim.epochs * steps)
            if state is not None and "lookahead" in state:
                self.lookahead.load_state_dict(state["lookahead"])
        self.model = wrap(model)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=spec.optim.label_smoothing)
        self.compile_s = None
        if spec.scaling.compile:
            self.model = torch.compile(self.model)
            self.compile_s = _warm_up(self)

    def _planned_epochs(self, state: dict[str, Any] | None, model: nn.Module, started_at: float) -> int:
        """``optim.epochs``; under ``optim.time_budget_s`` the most epochs that fit (rank 0's estimate,
        the same on every rank), and a resumed run keeps the count its checkpoint was planned with
        (without a budget a resumed run follows its spec: ``--set optim.epochs=N`` trains on to N)."""
        optim, data = self.spec.optim, self.spec.data
        if optim.time_budget_s is None:
            return optim.epochs
        if state is not None and "epochs" in state:
            return min(int(state["epochs"]), optim.epochs)
        steps = self.data.steps_per_epoch
        val_steps = math.ceil(steps * data.val_fraction / (1 - data.val_fraction))  # an estimate: splits hold it out
        shape = (self.preset.channels, self.preset.image_size, self.preset.image_size)
        epochs = epochs_within(optim.time_budget_s, time.time() - started_at, model, self.rt, optim.batch_size, shape,
                               steps, val_steps, TTA_VIEWS[self.spec.evaluation.tta], optim.epochs)
        return self.rt.from_rank0(max(epochs, int(optim.warmup_epochs) + 1))

    def _restore_optimisation(self, state: dict[str, Any]) -> None:
        """Load optimiser, schedule and scaler state, keeping this spec's hyperparameters (lr, weight
        decay, momentum): the same values on a plain resume; the new ones when population-based
        training continues another trial's checkpoint with perturbed values."""
        spec_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for group, spec_group, factor in zip(self.optimizer.param_groups, spec_groups, self.scheduler.lr_lambdas):
            group.update(spec_group)
            group["lr"] = group["initial_lr"] * factor(self.scheduler.last_epoch)
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        train_batches, val_batches = self.data.epoch(epoch)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "planned_epochs": self.spec.optim.epochs,
                                   "lr": self.scheduler.get_last_lr()[0]}
        if self.data.skipped:
            metrics["skipped_images"] = len(self.data.skipped)  # data.on_bad_file: skip
        if self.compile_s is not None and epoch == self.start_epoch:
            metrics["compile_s"] = self.compile_s  # kept out of epoch_s
        if self.bf16_speedup is not None and epoch == self.start_epoch:
            metrics["bf16_speedup"] = self.bf16_speedup  # precision: fastest's probe (bf16_pays: trained in bf16)
        metrics |= train_one_epoch(
            self.model, train_batches, self.optimizer, self.scheduler, self.scaler, self.criterion, self.rt,
            self.spec.optim.grad_clip, self.lookahead,
        )
        return metrics | evaluate(self.model, val_batches, self.rt, len(self.classes), self.spec.evaluation.tta)

    def checkpoint_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.spec.checkpoint.every_epochs == 0 or epoch + 1 == self.spec.optim.epochs

    def save(self, directory: Path, metrics: dict[str, Any], epoch: int) -> None:
        ckpt.save_checkpoint(
            directory, self.model, spec=self.spec,
            classes=self.classes, preset=self.preset, metrics=metrics, epoch=epoch, skipped=self.data.skipped,
            train_state={
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "epochs": self.spec.optim.epochs,
            } | ({"lookahead": self.lookahead.state_dict()} if self.lookahead is not None else {}),
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: resume, then train, evaluate and report every epoch."""
    import ray.train
    import ray.train.torch

    spec: TrainSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    restored = ray.train.get_checkpoint()
    with restored.as_directory() if restored else contextlib.nullcontext() as restore_dir:
        worker = Worker(
            spec, rank, world, ray.train.torch.get_device(),
            wrap=lambda m: ray.train.torch.prepare_model(m, parallel_strategy="ddp" if world > 1 else None),
            restore_dir=Path(restore_dir) if restore_dir else None, stream=config.get("stream"),
            started_at=config.get("started_at"),
        )
    run_epochs(worker, lambda metrics, directory, epoch: ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None,
        checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
    ))


def run_epochs(worker: Worker, report: Callable[[dict[str, Any], Path | None, int], None]) -> None:
    """The epoch loop of Ray Train workers and of in-process Tune trials: train and evaluate each
    epoch from the worker's start, then ``report(metrics, checkpoint directory or None, epochs done)``
    (the directory holds a checkpoint on rank 0 when one is due, and is gone after the call)."""
    for epoch in range(worker.start_epoch, worker.spec.optim.epochs):
        metrics = worker.run_epoch(epoch)
        with tempfile.TemporaryDirectory() as tmp:
            directory = None
            if worker.rank == 0 and worker.checkpoint_due(epoch):
                worker.save(Path(tmp), metrics, epoch + 1)
                directory = Path(tmp)
            report(metrics, directory, epoch + 1)
