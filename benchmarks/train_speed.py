"""CPU training speed: images/s of one training step of a recipe's net under each CPU option,
side by side in one run, so the recipe's choice is measured, not guessed.

The step is the platform's own (``visionray.train.epoch``'s body: forward under the recipe's
autocast, loss, backward, optimiser step) on a fixed synthetic batch of the recipe's input size,
with the recipe's model, optimiser and label smoothing. Options: eager fp32; channels_last; bf16
autocast; both; and each of those under ``torch.compile`` (compile time reported apart, kept out
of the rate). Threads: ``--threads`` (default every core), as a one-worker run gets them.

    python benchmarks/train_speed.py [--job jobs/cifar10-cpu.yaml] [--batch 512] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OPTIONS = [  # (name, channels_last, bf16, compile)
    ("eager fp32", False, False, False),
    ("channels_last", True, False, False),
    ("bf16 autocast", False, True, False),
    ("channels_last + bf16", True, True, False),
    ("compile", False, False, True),
    ("compile + channels_last", True, False, True),
    ("compile + bf16", False, True, True),
]


def measure(spec, batch: int, steps: int, channels_last: bool, bf16: bool, compile_: bool) -> dict[str, float]:
    from visionray.models import create_model
    from visionray.train.optim import build_optimizer, effective_lr

    torch.manual_seed(0)
    size, channels = spec.data.image_size, 3
    model = create_model(spec.model.name, 10, channels, size, **spec.model.kwargs())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = build_optimizer(spec.optim, model, effective_lr(spec.optim, batch))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=spec.optim.label_smoothing)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    forward = torch.compile(model) if compile_ else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t0 = time.perf_counter()
    step()  # compile (if any) and first-step allocations
    first_s = time.perf_counter() - t0
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    return {"images_per_s": steps * batch / seconds, "step_ms": seconds / steps * 1e3, "first_step_s": first_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/cifar10-cpu.yaml", help="the recipe whose net and optimiser are timed")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: the recipe's batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per option")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--options", default=",".join(name for name, *_ in OPTIONS), help="comma-separated option names")
    parser.add_argument("--out", default=str(HERE / "results" / "train_speed.json"))
    args = parser.parse_args()
    wanted = [o.strip() for o in args.options.split(",")]
    known = {name for name, *_ in OPTIONS}
    if unknown := [o for o in wanted if o not in known]:
        parser.error(f"--options: unknown {unknown}; choose from {sorted(known)}")

    from rich.console import Console
    from rich.table import Table

    from visionray.checkpoint import versions
    from visionray.specs import load_spec

    torch.set_num_threads(args.threads)
    spec = load_spec(args.job, [])
    batch = args.batch or spec.optim.batch_size
    rows = []
    for name, channels_last, bf16, compile_ in OPTIONS:
        if name in wanted:
            rows.append({"option": name, **measure(spec, batch, args.steps, channels_last, bf16, compile_)})
    base = rows[0]["images_per_s"]
    table = Table(title=f"training step, {spec.model.name} {spec.model.kwargs()}, batch {batch}, {args.threads} threads, "
                        f"{os.cpu_count()} CPUs")
    for col in ("option", "images/s", "step ms", f"vs {rows[0]['option']}", "first step s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["option"], f"{r['images_per_s']:.0f}", f"{r['step_ms']:.0f}", f"{r['images_per_s'] / base:.2f}",
                      f"{r['first_step_s']:.1f}")
    Console(width=140).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"job": args.job, "model": spec.model.name, "model_kwargs": spec.model.kwargs(),
                                          "batch": batch, "threads": args.threads, "cpus": os.cpu_count(),
                                          "versions": versions(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
