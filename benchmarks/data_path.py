"""Is the input pipeline ever the bottleneck? Images/s of the input pipeline alone against the
model's training-step rate, for each shipped recipe, measured side by side in one process.

Pipelines: the recipe's own (per-sample torchvision ops in a DataLoader, or the batched
device-resident path), the batched path for comparison where the recipe's ops allow it, and, for
image-folder recipes, Ray Data streaming of the folder and of a pack of it (``visionray data
pack``, made once into the cache): their steady-state rate (over the second half of each row's
images) and time to the first batch, reported apart. ``decode_limit``: Pillow decode + the preset's
resize on one core (the physical limit each decode CPU has). Step rate: forward + backward +
optimiser step on ready-made batches. Goals: pipeline rate / step rate >= 1.5; streaming within 2x
of the decode limit per decode CPU (``data.decode_cpus``), and per host core busy while it streams
(decode tasks, Ray Data's actors and the consumer together, from /proc/stat). ``--scale`` adds
rows for manifests of 100, 1,000 and 10,000 tiny shards: driver memory and time to the first batch.

    python benchmarks/data_path.py [--recipes quickstart cifar10-small ...] [--limit 4096] [--gpu] [--scale]
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


STREAM_IMAGES = 30_000  # images a stream delivers in its row (four shuffle buffers for large images)


def cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole host so far (Linux /proc/stat; None elsewhere): every process
    a stream runs on counts (decode tasks, Ray Data's actors, the consumer)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def stream_rates(batches, max_images: int) -> dict:
    """Time to the first batch, then images/s over the second half of the row's images: the first
    half drains what the decode tasks made ahead while the shuffle buffer filled (timing from the
    first batches on would count that backlog as throughput)."""
    start, seen, first, steady_from, steady_seen, busy_from = time.perf_counter(), 0, None, None, 0, None
    for images, _ in batches:
        now = time.perf_counter()
        first = now - start if first is None else first
        if steady_from is None and seen >= max_images // 2:
            steady_from, steady_seen, busy_from = now, seen, cpu_seconds()
        seen += len(images)
        if seen >= max_images:
            break
    end, busy_to = time.perf_counter(), cpu_seconds()
    if steady_from is None or end <= steady_from:
        return {"images_per_s": None, "first_batch_s": first, "images": seen}
    busy = (busy_to - busy_from) / (end - steady_from) if busy_from is not None and busy_to is not None else None
    return {"images_per_s": (seen - steady_seen) / (end - steady_from), "first_batch_s": first, "images": seen,
            "busy_cores": busy}


def decode_limit(spec, preset, count: int) -> float:
    """Images/s of Pillow decode + resize of the recipe's own files, one core, one thread."""
    from visionray.data.folders import folder_files
    from visionray.data.images import decode

    blobs = [f.read_bytes() for f in folder_files(spec.data).train[:count]]
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for b in blobs:
            decode(b, preset.channels, preset.image_size)
        return len(blobs) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def cached_pack(spec) -> str:
    """The recipe's folder packed once into the cache (a rerun verifies and keeps it)."""
    import hashlib

    from visionray import defaults
    from visionray.data.pack import pack

    key = hashlib.sha256(f"{spec.data.path}|{spec.data.val_fraction}|{spec.data.split_seed}".encode()).hexdigest()[:12]
    dest = defaults.CACHE_DIR / "bench-packs" / key
    pack(spec.data.path, str(dest), val_fraction=spec.data.val_fraction, seed=spec.data.split_seed)
    return str(dest / "manifest.json")


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def scale_rows(counts=(10, 100, 1000, 10000)) -> list[dict]:
    """Driver memory and time to the first batch for manifests of many tiny generated shards (the
    first count only warms Ray Data's imports and workers; its row is dropped)."""
    import tempfile

    from PIL import Image

    from visionray.cluster.local import init_ray
    from visionray.data.pack import pack
    from visionray.data.streaming import iter_stream, streaming_datasets
    from visionray.specs import DataSpec, TrainSpec

    init_ray()
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            for i in range(n):  # one 8x8 PNG (~80 bytes) per shard: shard_mib below one image's size
                (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
                Image.new("L", (8, 8), i % 256).save(src / f"c{i % 2}" / f"{i}.png")
            pack(str(src), str(Path(tmp) / "pack"), shard_mib=1e-5, val_fraction=0.01)
            spec = DataSpec(source="shards", path=str(Path(tmp) / "pack" / "manifest.json"), image_size=8, channels=1)
            preset = TrainSpec(data=spec).eval_preset(1)
            rss = rss_bytes()
            start = time.perf_counter()
            datasets, info = streaming_datasets(spec, preset, 1, 16)
            planned = time.perf_counter() - start
            next(iter(iter_stream(datasets["train"], 16, preset)))
            first = time.perf_counter() - start
            grown = rss_bytes() - rss
        rows.append({"recipe": f"scale-{n}-shards", "pipeline": "shards_streaming", "shards": n,
                     "driver_plan_s": planned, "first_batch_s": first, "driver_rss_growth_mib": grown / 2**20})
    return rows[1:]


def step_rate(worker, batches: list, steps: int) -> float:
    from visionray.train.epoch import train_one_epoch

    train_one_epoch(worker.model, batches[:1], worker.optimizer, worker.scheduler, worker.scaler, worker.criterion, worker.rt, None)
    out = train_one_epoch(worker.model, batches[:steps], worker.optimizer, worker.scheduler, worker.scaler,
                          worker.criterion, worker.rt, None)
    return out["images_per_s_worker"]


def measure(recipe: str, limit: int, gpu: bool, steps: int) -> list[dict]:
    from visionray.data.streaming import STREAM_SHUFFLE_BUFFER, iter_stream, streaming_datasets
    from visionray.specs import load_spec
    from visionray.train.worker import Worker

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
        from visionray.cluster.local import init_ray

        init_ray()
        rows.append({"recipe": recipe, "pipeline": "decode_limit", "images_per_s": decode_limit(spec, worker.preset, 1000),
                     "cpus": 1})
        packed = spec.data.model_copy(update={"source": "shards", "path": cached_pack(spec), "streaming": True})
        warm, _ = streaming_datasets(packed, worker.preset, 1, spec.optim.batch_size)  # Ray's decode workers started
        next(iter(iter_stream(warm["train"].limit(spec.optim.batch_size), spec.optim.batch_size, worker.preset)))
        streamed = STREAM_IMAGES if not gpu and spec.data.image_size <= 64 else 4 * STREAM_SHUFFLE_BUFFER
        for name, data in (("folder_streaming", spec.data.model_copy(update={"streaming": True, "limit": None})),
                           ("shards_streaming", packed.model_copy(update={"limit": None}))):
            datasets, _ = streaming_datasets(data, worker.preset, 1, spec.optim.batch_size, spec.augment)
            stream = iter_stream(datasets["train"], spec.optim.batch_size, worker.preset, spec.augment, shuffle_seed=0)
            rows.append({"recipe": recipe, "pipeline": name, "cpus": data.decode_cpus, **stream_rates(stream, streamed)})
    for r in rows:
        r["step_images_per_s"] = model_rate
        r["ratio"] = r["images_per_s"] / model_rate if r["images_per_s"] else None
    limit_rate = next((r["images_per_s"] for r in rows if r["pipeline"] == "decode_limit"), None)
    for r in rows:
        if limit_rate and r["pipeline"].endswith("_streaming") and r["images_per_s"]:
            r["per_cpu_vs_decode_limit"] = r["images_per_s"] / r["cpus"] / limit_rate
            if r.get("busy_cores"):
                r["per_busy_core_vs_decode_limit"] = r["images_per_s"] / r["busy_cores"] / limit_rate
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--limit", type=int, default=4096, help="training images loaded per recipe")
    parser.add_argument("--steps", type=int, default=8, help="training steps timed per recipe")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--scale", action="store_true", help="add the 100/1,000/10,000-shard manifest rows")
    parser.add_argument("--out", default=str(HERE / "results" / "data_path.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from visionray.checkpoint import versions

    torch.set_num_threads(os.cpu_count() or 1)
    rows = [r for recipe in args.recipes for r in measure(recipe, args.limit, args.gpu, args.steps)]
    table = Table(title=f"input pipeline vs training step ({'GPU' if args.gpu else 'CPU'}), images/s")
    for col in ("recipe", "pipeline", "pipeline img/s", "first batch s", "step img/s", "ratio (goal >= 1.5)",
                "per decode CPU / decode limit", "busy cores", "per busy core / decode limit"):
        table.add_column(col, justify="right")
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        table.add_row(r["recipe"], r["pipeline"], num(r["images_per_s"], ".0f"), num(r.get("first_batch_s"), ".2f"),
                      num(r["step_images_per_s"], ".0f"), num(r["ratio"], ".2f"), num(r.get("per_cpu_vs_decode_limit"), ".2f"),
                      num(r.get("busy_cores"), ".2f"), num(r.get("per_busy_core_vs_decode_limit"), ".2f"))
    Console(width=200).print(table)
    if args.scale:
        scale = scale_rows()
        t = Table(title="time to first batch and driver memory by shard count")
        for col in ("shards", "plan s", "first batch s", "driver RSS growth MiB"):
            t.add_column(col, justify="right")
        for r in scale:
            t.add_row(str(r["shards"]), f"{r['driver_plan_s']:.2f}", f"{r['first_batch_s']:.2f}", f"{r['driver_rss_growth_mib']:.1f}")
        Console(width=200).print(t)
        rows += scale
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU x{os.cpu_count()}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "versions": versions(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
