"""Is the input pipeline ever the bottleneck? Images/s of the input pipeline alone against the
model's training-step rate, for each shipped recipe, measured side by side in one process.

Pipelines: the recipe's own (per-sample torchvision ops in a DataLoader, or the batched
device-resident path), the batched path for comparison where the recipe's ops allow it, and Ray
Data streaming for image-folder recipes. Step rate: forward + backward + optimiser step on
ready-made batches. Goal: pipeline rate / step rate >= 1.5.

    python benchmarks/data_path.py [--recipes quickstart cifar10-small ...] [--limit 4096] [--gpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPES = ["quickstart", "cifar10-small", "cifar10-fast", "seed-article", "cifar10-resnet"]


def images_per_s(batches, max_images: int) -> float:
    seen, start = 0, time.perf_counter()
    for images, _ in batches:
        seen += len(images)
        if seen >= max_images:
            break
    return seen / (time.perf_counter() - start)


def step_rate(worker, batches: list, steps: int) -> float:
    from visionray.train.epoch import train_one_epoch

    train_one_epoch(worker.model, batches[:1], worker.optimizer, worker.scheduler, worker.scaler, worker.criterion, worker.rt, None)
    out = train_one_epoch(worker.model, batches[:steps], worker.optimizer, worker.scheduler, worker.scaler,
                          worker.criterion, worker.rt, None)
    return out["images_per_s_worker"]


def measure(recipe: str, limit: int, gpu: bool, steps: int) -> list[dict]:
    from visionray.data.streaming import iter_stream, streaming_datasets
    from visionray.specs import load_spec
    from visionray.train.worker import Worker
    from visionray.transforms import train_transform

    overrides = [f"data.limit={limit}", f"scaling.gpu={str(gpu).lower()}", "scaling.workers=1", "scaling.compile=false"]
    if not gpu:
        overrides.append("scaling.precision=fp32")
    spec = load_spec(REPO / "jobs" / f"{recipe}.yaml", overrides)
    device = torch.device("cuda" if gpu else "cpu")
    rows = []
    worker = Worker(spec, 0, 1, device)
    ready = list(itertools.islice(worker.data.epoch(0)[0], steps + 1))
    model_rate = step_rate(worker, ready, steps)
    budget = max(spec.optim.batch_size * (steps + 1), 1024)
    rows.append({"recipe": recipe, "pipeline": spec.data.pipeline, "images_per_s": images_per_s(worker.data.epoch(1)[0], budget)})
    if spec.data.pipeline == "per_sample" and all(op.op in ("none", "flip_crop") for op in spec.augment):
        batched = Worker(load_spec(REPO / "jobs" / f"{recipe}.yaml", [*overrides, "data.pipeline=batched"]), 0, 1, device)
        rows.append({"recipe": recipe, "pipeline": "batched", "images_per_s": images_per_s(batched.data.epoch(1)[0], budget)})
    if spec.data.source == "imagefolder":
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        datasets, _ = streaming_datasets(spec.data.model_copy(update={"streaming": True}), worker.preset)
        tf = train_transform(worker.preset, spec.augment)  # streaming always runs the per-sample ops
        stream = iter_stream(datasets["train"].limit(budget), spec.optim.batch_size, tf)
        rows.append({"recipe": recipe, "pipeline": "ray_data_streaming", "images_per_s": images_per_s(stream, budget)})
    for r in rows:
        r["step_images_per_s"] = model_rate
        r["ratio"] = r["images_per_s"] / model_rate
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--limit", type=int, default=4096, help="training images loaded per recipe")
    parser.add_argument("--steps", type=int, default=8, help="training steps timed per recipe")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "data_path.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from visionray.checkpoint import versions

    torch.set_num_threads(os.cpu_count() or 1)
    rows = [r for recipe in args.recipes for r in measure(recipe, args.limit, args.gpu, args.steps)]
    table = Table(title=f"input pipeline vs training step ({'GPU' if args.gpu else 'CPU'}), images/s")
    for col in ("recipe", "pipeline", "pipeline img/s", "step img/s", "ratio (goal >= 1.5)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["recipe"], r["pipeline"], f"{r['images_per_s']:.0f}", f"{r['step_images_per_s']:.0f}", f"{r['ratio']:.2f}")
    Console().print(table)
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU x{os.cpu_count()}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "versions": versions(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
