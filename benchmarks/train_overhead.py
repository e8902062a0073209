"""Ray Train overhead: in-worker epoch time under Ray Train against plain PyTorch.

Same model, data, batch size and per-process thread count; the same ``visionray.train.Worker``
drives both, so the only difference is the harness: Ray Train V2 (1 and 2 workers) against one
plain process and ``torchrun`` DDP over gloo/nccl (2 processes). Steady state is the median epoch
after the first. Goal: Ray Train / plain <= 1.03.

    python benchmarks/train_overhead.py [--epochs 4] [--samples 4096] [--gpu] [--out benchmarks/results/train_overhead.json]

With ``--gpu`` on a machine with one GPU the 2-worker rows are skipped (NCCL runs one rank per GPU);
use ``--samples 50000`` there so an epoch is long enough to time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_spec(workers: int, epochs: int, gpu: bool, storage: str, samples: int):
    from visionray.specs import load_spec

    return load_spec(None, [
        "data.source=synthetic", f"data.num_samples={samples}", "data.image_size=32", "data.channels=3",
        "data.val_fraction=0.05", "data.pipeline=batched", "augment=[flip_crop]",
        "model.name=convnet", "model.depth=4", "model.width=32",
        f"optim.epochs={epochs}", "optim.batch_size=128", f"scaling.workers={workers}", f"scaling.gpu={str(gpu).lower()}",
        f"checkpoint.every_epochs={epochs}", "output.name=overhead", f"output.storage={storage}",
    ])


def steady(epoch_s: list[float]) -> float:
    return statistics.median(epoch_s[1:]) if len(epoch_s) > 1 else epoch_s[0]


def plain_epochs(spec, rank: int = 0, world: int = 1, wrap=lambda m: m) -> list[float]:
    from visionray.train.worker import Worker

    device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if spec.scaling.gpu else torch.device("cpu")
    worker = Worker(spec, rank, world, device, wrap=wrap)
    return [worker.run_epoch(e)["epoch_s"] for e in range(spec.optim.epochs)]


def ddp_child(out: str, epochs: int, gpu: bool, samples: int) -> None:
    """One torchrun process: DDP around the same Worker."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if gpu:
        torch.cuda.set_device(rank)
    wrap = (lambda m: DistributedDataParallel(m, device_ids=[rank])) if gpu else DistributedDataParallel
    times = plain_epochs(make_spec(world, epochs, gpu, tempfile.mkdtemp(), samples), rank, world, wrap)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def torchrun_epochs(epochs: int, gpu: bool, threads: int, samples: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run([
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(Path(__file__).resolve()), "--ddp-child", str(out), "--epochs", str(epochs), "--samples", str(samples), *(["--gpu"] if gpu else []),
        ], check=True, env=env, capture_output=True)
        return json.loads(out.read_text())


def ray_epochs(workers: int, epochs: int, gpu: bool, samples: int) -> list[float]:
    from visionray.train.driver import fit_with_progress

    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        fit_with_progress(make_spec(workers, epochs, gpu, tmp, samples), lambda item: times.append(item["metrics"]["epoch_s"]) if "metrics" in item else None)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4096, help="synthetic 32x32 images (5%% held out)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "train_overhead.json"))
    parser.add_argument("--ddp-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_child:
        return ddp_child(args.ddp_child, args.epochs, args.gpu, args.samples)

    import ray
    from rich.console import Console
    from rich.table import Table

    from visionray.checkpoint import versions

    threads = 1  # Ray gives each 1-CPU worker OMP_NUM_THREADS=1; the plain runs match it
    torch.set_num_threads(threads)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no CUDA device here")
    two = not args.gpu or torch.cuda.device_count() >= 2  # NCCL runs one rank per GPU
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain1 = plain_epochs(make_spec(1, args.epochs, args.gpu, tmp, args.samples))
    ddp2 = torchrun_epochs(args.epochs, args.gpu, threads, args.samples) if two else None
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    try:
        ray1 = ray_epochs(1, args.epochs, args.gpu, args.samples)
        ray2 = ray_epochs(2, args.epochs, args.gpu, args.samples) if two else None
    finally:
        ray.shutdown()
    for name, plain, under_ray in (("1 worker", plain1, ray1), ("2 workers (DDP)", ddp2, ray2)):
        if plain is None:
            continue
        rows.append({
            "config": name, "plain_epoch_s": steady(plain), "ray_epoch_s": steady(under_ray),
            "ratio": steady(under_ray) / steady(plain), "plain_all": plain, "ray_all": under_ray,
        })
    table = Table(title=f"Ray Train overhead ({'GPU' if args.gpu else 'CPU'}, median of epochs 2..{args.epochs})")
    for col in ("config", "plain s/epoch", "Ray Train s/epoch", "Ray/plain (goal <= 1.03)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["config"], f"{r['plain_epoch_s']:.3f}", f"{r['ray_epoch_s']:.3f}", f"{r['ratio']:.3f}")
    Console().print(table)
    if not two:
        Console().print(f"2-worker rows skipped: {torch.cuda.device_count()} GPU here, NCCL needs one per rank")
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU x{os.cpu_count()}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "versions": versions(), "epochs": args.epochs,
                                           "samples": args.samples, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
