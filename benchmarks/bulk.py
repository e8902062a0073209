"""Bulk scoring throughput: ``visionray predict --batch`` (``visionray.serve.bulk.score``) against the
raw batched forward pass of the same model on the same images, side by side in one run.

- (a) bulk: ``score()`` over N JPEG files on a local Ray cluster started here (every byte read by a
  Ray Data task, checked and decoded by the sandboxed decoders, classified by the actor pool, rows
  written as Parquet). Reported twice: the whole call over N images (actor start, imports and
  model verification included: a fixed cost), and the marginal rate: N more images divided by
  the extra time a call over 2N images takes (the rate once the actors are up).
- (b) raw: the model's forward pass (with the checkpoint's eval preset and TTA, ``Predictor.predict``)
  on the same images already decoded in memory, batches of ``--batch-size``, every core's threads.

Images: the first N of ``../shared/data/cifar10/train.tar.gz`` (32x32 JPEGs) when present, else
synthetic 32x32 JPEGs. The model: the recipe's (``--job``) net, untrained (speed does not depend on
the weights), saved and registered signed in a temporary registry.

    python benchmarks/bulk.py [--job jobs/cifar10-cpu.yaml] [--images 8000] [--cpus 1] [--concurrency N] [--decode-workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parent.parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def make_images(dest: Path, n: int) -> str:
    """N JPEG files under dest/<class>/; returns what they are."""
    from PIL import Image

    if CIFAR.exists():
        from visionray.data.folders import extract_archive

        root = extract_archive(CIFAR) / "train"
        files = sorted(root.glob("*/*.jpg"))[:: max(1, 50000 // n)][:n]
        for f in files:
            (dest / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.parent.name / f.name)
        return f"{len(files)} CIFAR-10 JPEGs (32x32) from {CIFAR.name}"
    rng = np.random.default_rng(0)
    for i in range(n):
        (dest / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(dest / f"c{i % 10}" / f"{i}.jpg", quality=90)
    return f"{n} synthetic 32x32 JPEGs"


def raw_rate(ckpt: Path, folder: Path, batch_size: int) -> float:
    import torch

    from visionray.checkpoint import load_model
    from visionray.data.images import decode
    from visionray.serve.predictor import Predictor

    model, meta = load_model(ckpt)
    predictor = Predictor(model, meta, "bench", 1, torch.device("cpu"))
    images = [decode(f, 3, meta.eval_preset.image_size).numpy() for f in sorted(folder.glob("*/*.jpg"))]
    predictor.predict(images[:batch_size], 5)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        predictor.predict(images[i: i + batch_size], 5)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", default=str(HERE.parent / "jobs" / "cifar10-cpu.yaml"))
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs per scoring actor")
    parser.add_argument("--concurrency", type=int, default=None, help="actors (default: as many as the CPUs hold, as the CLI)")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "bulk.json"))
    args = parser.parse_args()

    import ray
    import torch

    from visionray.checkpoint import save_checkpoint
    from visionray.models import create_model
    from visionray.registry.keys import generate_keys
    from visionray.registry.registry import Registry
    from visionray.serve.bulk import BulkJob, list_inputs, score
    from visionray.serve.predictor import resolve_registry_model
    from visionray.specs import load_spec

    spec = load_spec(args.job)
    tmp = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    try:
        first = tmp / "first"
        what = make_images(first, args.images)
        preset = spec.eval_preset(3)
        torch.manual_seed(0)
        model = create_model(spec.model.name, 10, 3, preset.image_size, **spec.model.kwargs())
        classes = sorted(p.name for p in first.iterdir())
        ckpt = tmp / "ckpt"
        save_checkpoint(ckpt, model, spec=spec, classes=classes, preset=preset, metrics={"val_acc": 0.1}, epoch=1)
        private, public = generate_keys(tmp / "signer")
        Registry(str(tmp / "registry")).register(ckpt, "bench", alias="best", private_key=private)
        source = resolve_registry_model("bench@best", str(tmp / "registry"), (str(public),))
        torch.set_num_threads(os.cpu_count() or 1)
        raw = raw_rate(ckpt, first, args.batch_size)
        job = BulkJob(batch_size=args.batch_size, concurrency=args.concurrency, num_cpus=args.cpus,
                      sanitizer={"decode_workers": args.decode_workers})
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(args.cpus * (args.concurrency or 1))),
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        double = tmp / "double"  # the same images twice (other names): a run that differs only by N images
        for copy in ("a", "b"):
            shutil.copytree(first, double / copy)
        single = score(list_inputs(str(first)), source, job, str(tmp / "single.parquet"))
        twice = score(list_inputs(str(double)), source, job, str(tmp / "double.parquet"))
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marginal = (twice.scored - single.scored) / (twice.seconds - single.seconds)
    rows = {
        "raw_forward_images_per_s": raw,
        "bulk_images_per_s": single.scored / single.seconds, "bulk_s": single.seconds,
        "bulk_2n_s": twice.seconds, "bulk_marginal_images_per_s": marginal,
        "ratio": single.scored / single.seconds / raw, "ratio_marginal": marginal / raw,
    }
    result = {"job": args.job, "model": spec.model.name, "model_kwargs": spec.model.kwargs(), "tta": spec.evaluation.tta,
              "images": what, "batch_size": args.batch_size, "actor_cpus": args.cpus, "concurrency": twice.actors,
              "decode_workers": args.decode_workers, "cores": os.cpu_count(), "torch": torch.__version__,
              "ray": ray.__version__, **rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
