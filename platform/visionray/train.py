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
from ray.train import UserCallback
from torch import nn

from visionray import checkpoint as ckpt
from visionray import data as vdata
from visionray.models import create_model
from visionray.specs import TrainSpec, with_absolute_paths
from visionray.transforms import batch_augment, eval_transform, normalize_batch, preprocess_all, train_transform


from visionray.optim import Lookahead, build_optimizer, effective_lr, lr_factors
from visionray.optim import lr_factor  # noqa: F401 - re-exported: callers import them from visionray.train
from visionray.epoch import Runtime, evaluate, train_one_epoch
from visionray.runs import local_log_dir, storage_path
from visionray.runs import best_checkpoint, completed_epochs, init_ray, local_cluster_env, run_dir  # noqa: F401 - re-exported: callers import them from visionray.train
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
