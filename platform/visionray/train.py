"""Data-parallel training on Ray Train (V2 ``TorchTrainer``).

``train_loop_per_worker`` is the whole per-worker program: build data, model and optimiser, resume
from Ray's latest checkpoint, then ``train_one_epoch``, ``evaluate`` and ``ray.train.report`` per
epoch. ``run_training`` is the driver side: scaling, storage, checkpoint policy and fault tolerance.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from ray.train import UserCallback
from torch import nn

from visionray import checkpoint as ckpt
from visionray import data as vdata
from visionray.defaults import LR_REFERENCE_BATCH
from visionray.models import create_model, tta_logits
from visionray.specs import LookaheadSpec, OneCycleSpec, OptimSpec, TrainSpec, with_absolute_paths
from visionray.transforms import batch_augment, eval_transform, normalize_batch, preprocess_all, train_transform


# --------------------------------------------------------------------------- optimisation


def effective_lr(optim: OptimSpec, global_batch: int) -> float:
    return optim.lr * global_batch / LR_REFERENCE_BATCH if optim.scale_lr else optim.lr


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build_optimizer(optim: OptimSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Parameter groups: weights (decayed), biases and norm scales (not), norm biases at
    ``norm_bias_lr_scale`` x lr if that is not 1, and one group per parameter the model trains for
    a limited number of epochs (``param_epochs``; ``lr_factors`` zeroes its lr after them)."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, NORM_LAYERS) and m.bias is not None}
    limited = model.param_epochs() if hasattr(model, "param_epochs") else {}
    scale_norm_biases = optim.norm_bias_lr_scale != 1.0
    decay, no_decay, scaled, stopping = [], [], [], []
    for p in model.parameters():  # no weight decay on biases and norm scales; frozen parameters left out
        if not p.requires_grad:
            continue
        if id(p) in limited:
            stopping.append({"params": [p], "weight_decay": optim.weight_decay if p.ndim > 1 else 0.0,
                             "train_epochs": limited[id(p)]})
        else:
            (scaled if scale_norm_biases and id(p) in norm_biases else decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scale_norm_biases:
        groups.append({"params": scaled, "weight_decay": 0.0, "lr": lr * optim.norm_bias_lr_scale})
    groups += stopping
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.momentum > 0)
    cls = torch.optim.Adam if optim.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=optim.betas)


def lr_factor(optim: OptimSpec, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a given optimiser step: linear warmup, then the schedule."""
    total = optim.epochs * steps_per_epoch
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    shape = optim.onecycle or OneCycleSpec()
    peak = 0.0 if warmup else shape.peak_at

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)  # progress through the schedule, 0..1
        match optim.schedule:
            case "constant":
                return 1.0
            case "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
            case "onecycle":  # linear start -> 1 (unless warmup did that), then linear 1 -> end
                if t < peak:
                    return shape.start + (1 - shape.start) * t / peak
                return 1 + (shape.end - 1) * min(1.0, (t - peak) / (1 - peak))
            case "step":
                return optim.step_gamma ** ((step // steps_per_epoch) // optim.step_epochs)
        raise AssertionError(optim.schedule)

    return factor


def lr_factors(optim: OptimSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> list[Callable[[int], float]]:
    """One lr multiplier per parameter group: the schedule, and 0 once a group's ``train_epochs`` are over."""
    factor = lr_factor(optim, steps_per_epoch)

    def until(epochs: float) -> Callable[[int], float]:
        last = round(epochs * steps_per_epoch)
        return lambda step: factor(step) if step < last else 0.0

    return [until(g["train_epochs"]) if "train_epochs" in g else factor for g in optimizer.param_groups]


class Lookahead:
    """airbench94's lookahead over a model's weights and float buffers: every ``every_steps``
    optimiser steps the running average moves towards the weights (keeping ``decay * (step /
    total) ** power`` of itself) and the weights are replaced by it; after the last step the
    weights are the average."""

    def __init__(self, model: nn.Module, spec: LookaheadSpec, total_steps: int):
        self.spec, self.total, self.steps = spec, total_steps, 0
        # the model's own tensors (loading a state dict copies into them, so they stay the model's)
        weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.weights = list(weights.values())
        self.average = {k: v.clone() for k, v in weights.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        last = self.steps >= self.total
        if self.steps % self.spec.every_steps and not last:
            return
        keep = 1.0 if last else self.spec.decay * (self.steps / self.total) ** self.spec.power
        average = list(self.average.values())
        torch._foreach_lerp_(average, self.weights, 1.0 - keep)  # one kernel per list, not per tensor
        torch._foreach_copy_(self.weights, average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for name, average in self.average.items():
            average.copy_(state["average"][name])


# --------------------------------------------------------------------------- epoch loops


@dataclass
class Runtime:
    """What one worker's loops need besides the model: device, precision and its place in the world."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    world_size: int

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True, memory_format=fmt), labels.to(self.device, non_blocking=True)

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()


def train_one_epoch(
    model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, scheduler, scaler,
    criterion: nn.Module, rt: Runtime, grad_clip: float | None, lookahead: Lookahead | None = None,
) -> dict[str, float]:
    model.train()
    loss_sum, seen, start = torch.zeros((), device=rt.device), 0, time.perf_counter()
    for images, labels in batches:
        images, labels = rt.to_device(images, labels)
        with rt.autocast():
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if lookahead is not None:
            lookahead.step()
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    total_loss, total_seen, max_seconds = *rt.all_sum([loss_sum.item(), seen]), seconds
    if rt.world_size > 1:  # the slowest worker sets the pace
        t = torch.tensor([seconds], device=rt.device if rt.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        max_seconds = t.item()
    return {
        "train_loss": total_loss / max(total_seen, 1),
        "images_per_s": total_seen / max_seconds,
        "images_per_s_worker": seen / seconds,
        "epoch_s": max_seconds,
    }


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, rt: Runtime, num_classes: int, tta: str = "none") -> dict[str, float]:
    """Loss, top-1 and (with more than 5 classes) top-5 over every worker's part of the data.
    ``tta`` averages logits over test-time views (``models.tta_logits``)."""
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, top1, top5, count
    for images, labels in batches:
        images, labels = rt.to_device(images, labels)
        with rt.autocast():
            logits = tta_logits(model, images, tta)
        top = logits.topk(k, dim=1).indices
        sums += torch.stack([
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            (top[:, 0] == labels).sum().double(),
            (top == labels[:, None]).any(dim=1).sum().double(),
            torch.tensor(float(len(labels)), dtype=torch.float64, device=rt.device),
        ])
    loss, top1, top5, count = rt.all_sum(sums.tolist())
    out = {"val_loss": loss / max(count, 1), "val_acc": top1 / max(count, 1)}
    if num_classes > 5:
        out["val_top5"] = top5 / max(count, 1)
    return out


# --------------------------------------------------------------------------- the worker


def _epoch_batches(spec: TrainSpec, data, transforms, rank: int, world: int, epoch: int):
    """(train batches, val batches) for this worker and epoch, from memory or a Ray Data shard."""
    train_tf, eval_tf = transforms
    if data is None:  # streaming
        import ray.train

        bs = spec.optim.batch_size
        return (
            vdata.iter_stream(ray.train.get_dataset_shard("train"), bs, train_tf, shuffle_seed=spec.seed * 1000 + epoch * 10 + rank),
            vdata.iter_stream(ray.train.get_dataset_shard("val"), bs, eval_tf),
        )
    train_chunks, val_chunks = _epoch_chunks(spec, data, rank, world, epoch)
    if spec.data.pipeline == "batched":  # data already on the device and preprocessed (see Worker)
        preset, augment = train_tf
        dev = data.train.images.device
        return (
            ((augment(normalize_batch(preset, data.train.images[c]), c, epoch), data.train.labels[c])
             for c in (torch.as_tensor(c, device=dev) for c in train_chunks)),
            ((normalize_batch(preset, data.val.images[c]), data.val.labels[c])
             for c in (torch.as_tensor(c, device=dev) for c in val_chunks)),
        )
    return (
        vdata.loader(data.train, train_tf, train_chunks, spec.data.loader_workers, spec.seed + epoch),
        vdata.loader(data.val, eval_tf, val_chunks or [np.arange(0)], spec.data.loader_workers, 0),
    )


def _epoch_chunks(spec: TrainSpec, data, rank: int, world: int, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """This worker's index chunks of the in-memory train and val splits, one per batch."""
    bs, n = spec.optim.batch_size, len(data.train)
    train_idx = vdata.shard_indices(n, rank, world, spec.seed, epoch)
    val_idx = np.array_split(np.arange(len(data.val)), world)[rank]
    return (
        vdata.batch_chunks(train_idx, vdata.steps_per_epoch(n, world, bs), bs),
        [val_idx[i:i + bs] for i in range(0, len(val_idx), bs)],
    )


def _first_images(spec: TrainSpec, data, preset) -> torch.Tensor:
    """Up to 5,000 normalised training images (no augmentation), for data-dependent init."""
    images = data.train.images[:5000]
    if spec.data.pipeline == "batched":
        return normalize_batch(preset, images)
    tf = eval_transform(preset)
    return torch.stack([tf(im) for im in images])


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
    train, val = worker.batches(0)
    last_train = last_val = None  # a streaming shard's batch sizes are not known ahead
    if worker.data is not None:
        train_chunks, val_chunks = _epoch_chunks(worker.spec, worker.data, worker.rank, worker.world, 0)
        last_train, last_val = len(train_chunks[-1]), len(val_chunks[-1]) if val_chunks else None
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


@dataclass(frozen=True)
class StreamInfo:
    """What a worker needs to know about Ray Data streaming inputs (counted on the driver)."""

    classes: list[str]
    channels: int
    steps_per_epoch: int


class Worker:
    """Everything one training worker builds from a spec: data, model, optimiser, schedule,
    restored state. Ray Train's loop and the plain-PyTorch benchmarks drive it the same way."""

    def __init__(
        self, spec: TrainSpec, rank: int, world: int, device: torch.device, *,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m, restore_dir: Path | None = None,
        stream: StreamInfo | None = None,
    ):
        self.spec, self.rank, self.world = spec, rank, world
        torch.manual_seed(spec.seed)
        gpu = device.type == "cuda"
        precision = spec.scaling.precision if spec.scaling.precision != "auto" else ("bf16" if gpu else "fp32")
        self.rt = rt = Runtime(
            device=device,
            autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
            channels_last=spec.scaling.channels_last if spec.scaling.channels_last is not None else gpu,
            world_size=world,
        )
        if stream is not None:
            data, self.classes, channels, steps = None, stream.classes, stream.channels, stream.steps_per_epoch
        else:
            data = vdata.load_splits(spec.data)
            self.classes, channels = data.classes, data.channels
            steps = vdata.steps_per_epoch(len(data.train), world, spec.optim.batch_size)
        self.preset = preset = spec.eval_preset(channels)
        if spec.data.pipeline == "batched":  # the whole split lives on the device; ops run on batches
            data = vdata.DataSplits(*(
                vdata.ImageArrays(preprocess_all(preset, a.images).to(device), a.labels.to(device))
                for a in (data.train, data.val)
            ), data.classes)
            augment = batch_augment(spec.augment, torch.Generator().manual_seed(spec.seed * 1000 + rank), len(data.train), spec.seed)
            self.transforms = ((preset, augment), None)
        else:
            self.transforms = (train_transform(preset, spec.augment), eval_transform(preset))
        self.data = data

        self.model_kwargs = spec.model.kwargs()
        model = create_model(spec.model.name, len(self.classes), preset.channels, preset.image_size, **self.model_kwargs)
        model = model.to(device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
        self.optimizer = build_optimizer(spec.optim, model, effective_lr(spec.optim, spec.optim.batch_size * world))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factors(spec.optim, self.optimizer, steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.start_epoch = 0
        if restore_dir is not None:
            state = ckpt.load_train_state(restore_dir, device)
            model.load_state_dict(ckpt.load_model(restore_dir, device)[0].state_dict())
            self._restore_optimisation(state)
            self.start_epoch = state["epoch"]
        elif hasattr(model, "init_whitening") and data is not None:  # data-dependent init (airbench's whitening)
            model.init_whitening(_first_images(spec, data, preset).to(device))
        self.lookahead = None
        if spec.optim.lookahead is not None:  # built on the restored weights; a checkpoint's average replaces them
            self.lookahead = Lookahead(model, spec.optim.lookahead, spec.optim.epochs * steps)
            if restore_dir is not None and "lookahead" in state:
                self.lookahead.load_state_dict(state["lookahead"])
        self.model = wrap(model)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=spec.optim.label_smoothing)
        self.compile_s = None
        if spec.scaling.compile:
            self.model = torch.compile(self.model)
            self.compile_s = _warm_up(self)

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

    def batches(self, epoch: int):
        return _epoch_batches(self.spec, self.data, self.transforms, self.rank, self.world, epoch)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        train_batches, val_batches = self.batches(epoch)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0]}
        if self.compile_s is not None and epoch == self.start_epoch:
            metrics["compile_s"] = self.compile_s  # kept out of epoch_s
        metrics |= train_one_epoch(
            self.model, train_batches, self.optimizer, self.scheduler, self.scaler, self.criterion, self.rt,
            self.spec.optim.grad_clip, self.lookahead,
        )
        return metrics | evaluate(self.model, val_batches, self.rt, len(self.classes), self.spec.evaluation.tta)

    def checkpoint_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.spec.checkpoint.every_epochs == 0 or epoch + 1 == self.spec.optim.epochs

    def save(self, directory: Path, metrics: dict[str, Any], epoch: int) -> None:
        ckpt.save_checkpoint(
            directory, self.model, spec=self.spec, model_name=self.spec.model.name, model_kwargs=self.model_kwargs,
            classes=self.classes, preset=self.preset, metrics=metrics, epoch=epoch,
            train_state={
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch,
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


# --------------------------------------------------------------------------- the driver


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local cluster bound to loopback.

    Unless ``verbose``, worker and controller output stays in Ray's log files (under
    /tmp/ray/session_latest/logs): Ray's repeated internal lines are kept out of the user's way,
    while real errors still surface as exceptions and through ``ReportToQueue.after_exception``."""
    import logging
    import os

    import ray

    from visionray.defaults import LOCAL_HOST

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
    }
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves Ray's state API (Train's placement-group cleaner polls it) and the
        # Jobs API; both listen on loopback only.
        with local_cluster_env():
            ray.init(address="local", include_dashboard=True, dashboard_host=LOCAL_HOST,
                     _node_ip_address=LOCAL_HOST, **kwargs)


@contextlib.contextmanager
def local_cluster_env():
    """Start a local cluster on a known GCS port and give its processes RAY_ADDRESS: Ray's own
    state-API lookups inside the cluster (Train's placement-group cleaner) then find this cluster
    even when other Ray clusters run on the same machine. The driver's environment is restored."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def storage_path(spec: TrainSpec) -> str:
    """Ray's storage path: a URI as given, a local path made absolute (Ray requires that)."""
    storage = spec.output.storage
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def run_dir(spec: TrainSpec) -> str:
    """Where Ray keeps this job's checkpoints: ``<storage>/<name>``."""
    return f"{storage_path(spec).rstrip('/')}/{spec.output.name}"


def local_log_dir(spec: TrainSpec) -> Path:
    """Where the driver writes metrics.csv and TensorBoard events: the run directory when it is
    local, else ``runs/<name>`` under the current directory."""
    if "://" in spec.output.storage:
        return Path("runs") / spec.output.name
    return Path(run_dir(spec))


def build_trainer(spec: TrainSpec, callbacks: list | None = None):
    """The ``TorchTrainer`` for a spec: used by ``visionray train`` and, per trial, by Tune."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = with_absolute_paths(spec)  # the workers' directories are not this one
    config: dict[str, Any] = {"spec": spec}
    datasets = None
    if spec.data.streaming:
        preset = spec.eval_preset(spec.data.channels or 3)
        datasets, classes = vdata.streaming_datasets(spec.data, preset)
        n = datasets["train"].count()
        config["stream"] = StreamInfo(classes, preset.channels, max(1, math.ceil(n / spec.scaling.workers / spec.optim.batch_size)))
    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.gpu:
        resources.setdefault("GPU", 1)  # a fraction from resources_per_worker packs workers on one GPU (tune)
    run_config = RunConfig(
        name=spec.output.name,
        storage_path=storage_path(spec),
        checkpoint_config=CheckpointConfig(
            num_to_keep=spec.checkpoint.keep, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
        ),
        failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
        callbacks=callbacks or None,
        logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's per-report INFO lines stay in its log files
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets=datasets,
    )


def list_checkpoints(directory: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """A run directory's checkpoints with their metadata, oldest epoch first."""
    found = []
    for d in sorted(Path(directory).glob("checkpoint_*")):
        try:
            found.append((d, ckpt.read_metadata(d)))
        except ckpt.CheckpointError:
            continue  # a checkpoint Ray is still writing, or one of another format
    return sorted(found, key=lambda item: item[1]["epoch"])


def completed_epochs(spec: TrainSpec) -> int:
    """Epochs the job's latest checkpoint holds (0 for a new job or a remote store)."""
    if "://" in spec.output.storage:
        return 0
    found = list_checkpoints(run_dir(spec))
    return found[-1][1]["epoch"] if found else 0


def best_checkpoint(directory: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's best by val_acc (ties: later epoch)."""
    directory = Path(directory)
    if (directory / ckpt.METADATA_FILE).exists():
        return directory
    found = list_checkpoints(directory)
    if not found:
        raise ckpt.CheckpointError(f"{directory}: neither a checkpoint nor a run directory with checkpoints")
    return max(found, key=lambda item: (item[1]["metrics"].get("val_acc", 0.0), item[1]["epoch"]))[0]


# --------------------------------------------------------------------------- progress


class ReportToQueue(UserCallback):
    """Runs in the Ray Train controller and forwards every report to a ``ray.util.queue.Queue``
    that the driver reads: rank 0's metrics, every worker's, and the persisted checkpoint."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": metrics[0], "workers": metrics, "checkpoint": checkpoint.path if checkpoint else None})

    def after_exception(self, run_context, worker_exceptions):
        self.queue.put({"error": {rank: f"{type(e).__name__}: {e}" for rank, e in worker_exceptions.items()}})


class MetricsLog:
    """Per-epoch metrics into ``metrics.csv`` (appended across resumes) and TensorBoard events."""

    FIELDS = ("epoch", "train_loss", "val_loss", "val_acc", "val_top5", "lr", "images_per_s", "images_per_s_worker", "epoch_s")

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.csv_path = directory / "metrics.csv"
        new = not self.csv_path.exists()
        self.csv = self.csv_path.open("a")
        if new:
            self.csv.write(",".join(self.FIELDS) + "\n")
        self.tb = SummaryWriter(str(directory / "tensorboard"))

    def write(self, metrics: dict[str, Any]) -> None:
        self.csv.write(",".join(str(metrics.get(f, "")) for f in self.FIELDS) + "\n")
        self.csv.flush()
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, metrics["epoch"])
        self.tb.flush()

    def close(self) -> None:
        self.csv.close()
        self.tb.close()


def fit_with_progress(spec: TrainSpec, on_report: Callable[[dict[str, Any]], None]):
    """Run the job; call ``on_report`` on the driver for each epoch as it lands. Returns Ray's Result."""
    import threading

    from ray.util.queue import Empty, Queue

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node and holding no CPU: losing another node must not take the progress queue with it.
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})
    trainer = build_trainer(spec, callbacks=[ReportToQueue(queue)])
    log = MetricsLog(local_log_dir(spec))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the driver's main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                continue
            if "metrics" in item:
                log.write(item["metrics"])
            on_report(item)
        thread.join()
    finally:
        log.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
