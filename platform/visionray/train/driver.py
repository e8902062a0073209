"""The driver side of training: the ``TorchTrainer`` for a spec (scaling, storage, checkpoint
policy, fault tolerance) and a run with live progress (``fit_with_progress``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from visionray.data.manifest import read_manifest
from visionray.data.streaming import streaming_datasets
from visionray.runs import local_log_dir, storage_path
from visionray.specs import TrainSpec, with_absolute_paths
from visionray.train.progress import ReportToQueue
from visionray.train.worker import train_loop_per_worker


def build_trainer(spec: TrainSpec, callbacks: list | None = None):
    """The ``TorchTrainer`` for a spec: used by ``visionray train`` and, per trial, by Tune."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = with_absolute_paths(spec)  # the workers' directories are not this one
    config: dict[str, Any] = {"spec": spec, "started_at": time.time()}  # optim.time_budget_s counts from here
    datasets = None
    if spec.data.streaming:
        manifest = read_manifest(spec.data.path) if spec.data.source == "shards" else None  # read once, here
        preset = spec.eval_preset(spec.data.channels or (manifest.channels if manifest else 3))
        datasets, config["stream"] = streaming_datasets(spec.data, preset, spec.scaling.workers, spec.optim.batch_size,
                                                        spec.augment, manifest)
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
