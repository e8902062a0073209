"""ASHA against random search with the full budget: same space, same seed, same trials.

Runs a search spec twice on one Ray cluster: once with FIFO scheduling (plain random search: every
trial trains all ``max_epochs``) and once with ASHA (early stopping). The random search's best
accuracy sets the target (within ``--tolerance``, default 0.5 points); for each search we record
the wall-clock seconds and the trial-epochs (epochs trained, summed over trials) until some trial
first reported an accuracy at or above the target, and the totals. The table gives ASHA/random
ratios (below 1: ASHA is cheaper); the same numbers go to a JSON file.

    .venv/bin/python benchmarks/tune_asha_vs_random.py                      # tune/quickstart.yaml
    .venv/bin/python benchmarks/tune_asha_vs_random.py --samples 12 --max-epochs 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visionray.tune.run import TrialRow, run_search
from visionray.tune.spec import load_search_spec
from visionray.cluster.local import init_ray

REPO = Path(__file__).resolve().parents[1]
console = Console()


def run(spec_path: Path, scheduler: str, args: argparse.Namespace, storage: str) -> dict[str, Any]:
    overrides = [
        f"search.num_samples={args.samples}", f"search.seed={args.seed}", f"base.seed={args.seed}",
        f"search.max_concurrent_trials={args.concurrency}", f"output.storage={storage}",
        f"output.name=bench-{scheduler}", "register=null", *args.set,
    ]
    if scheduler == "asha":
        overrides.append(f"scheduler={{name: asha, max_epochs: {args.max_epochs}, grace_period: {args.grace}, "
                         f"reduction_factor: {args.reduction}}}")
    else:  # every trial trains all its epochs
        overrides += ["scheduler={name: fifo}", f"base.optim.epochs={args.max_epochs}"]
    spec = load_search_spec(spec_path, overrides)
    events: list[dict[str, Any]] = []  # one per reported epoch: seconds since start, trial, epoch, value
    seen: dict[str, int] = {}
    start = time.monotonic()

    def on_update(rows: list[TrialRow]) -> None:
        now = time.monotonic() - start
        for r in rows:
            if r.epoch > seen.get(r.trial_id, 0) and r.value is not None:
                seen[r.trial_id] = r.epoch
                events.append({"t": now, "trial": r.trial_id, "epoch": r.epoch, "value": r.value})

    outcome = run_search(spec, on_update=on_update)
    wall = time.monotonic() - start
    configs = {t.trial_id: t.params for t in outcome.trials}
    return {
        "scheduler": scheduler, "wall_s": wall, "events": events, "trial_epochs": len(events),
        "best": max((e["value"] for e in events), default=None),
        "trials": [{"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs, "best": t.best_value,
                    "params": configs[t.trial_id]} for t in outcome.trials],
    }


def to_target(run_: dict[str, Any], target: float) -> dict[str, Any] | None:
    """Seconds and trial-epochs until the first report at or above ``target``."""
    for i, e in enumerate(run_["events"], 1):
        if e["value"] >= target:
            return {"seconds": e["t"], "trial_epochs": i, "trial": e["trial"], "epoch": e["epoch"]}
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=REPO / "tune" / "quickstart.yaml")
    p.add_argument("--samples", type=int, default=8, help="trials per search")
    p.add_argument("--max-epochs", type=int, default=6, help="epochs of a trial that is never stopped")
    p.add_argument("--grace", type=int, default=1, help="ASHA grace period (epochs)")
    p.add_argument("--reduction", type=float, default=2.0, help="ASHA reduction factor")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (both searches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.005, help="target = random's best minus this (0.005 = 0.5 points)")
    p.add_argument("--set", action="append", default=[], help="extra overrides for both searches")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "tune_asha_vs_random.json")
    args = p.parse_args()

    init_ray(args.address)
    import ray
    import torch

    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vr-bench-") as storage:
        random_run = run(args.spec, "fifo", args, storage)
        args.json.with_suffix(".random.json").write_text(json.dumps(random_run, indent=2))  # kept if ASHA is cut short
        asha_run = run(args.spec, "asha", args, storage)

    target = random_run["best"] - args.tolerance
    rows = []
    for r in (random_run, asha_run):
        hit = to_target(r, target)
        r["to_target"] = hit
        rows.append(r)
    r_hit, a_hit = random_run["to_target"], asha_run["to_target"]
    ratios = {
        "wall_to_target": a_hit["seconds"] / r_hit["seconds"] if a_hit else None,
        "trial_epochs_to_target": a_hit["trial_epochs"] / r_hit["trial_epochs"] if a_hit else None,
        "wall_total": asha_run["wall_s"] / random_run["wall_s"],
        "trial_epochs_total": asha_run["trial_epochs"] / random_run["trial_epochs"],
    }

    table = Table(title=f"ASHA vs random search: {args.samples} trials, up to {args.max_epochs} epochs, seed {args.seed}, "
                        f"target {target:.4f} (random's best {random_run['best']:.4f} - {args.tolerance})")
    for col in ("search", "best val_acc", "s to target", "trial-epochs to target", "total s", "total trial-epochs"):
        table.add_column(col, justify="right")
    for name, r in (("random (FIFO)", random_run), ("ASHA", asha_run)):
        hit = r["to_target"]
        table.add_row(name, f"{r['best']:.4f}", f"{hit['seconds']:.0f}" if hit else "not reached",
                      str(hit["trial_epochs"]) if hit else "not reached", f"{r['wall_s']:.0f}", str(r["trial_epochs"]))

    def ratio(v):
        return f"{v:.2f}" if v is not None else "n/a"

    table.add_row("ASHA / random", "", ratio(ratios["wall_to_target"]), ratio(ratios["trial_epochs_to_target"]),
                  ratio(ratios["wall_total"]), ratio(ratios["trial_epochs_total"]), style="bold")
    console.print(table)

    report = {
        "spec": str(args.spec), "samples": args.samples, "max_epochs": args.max_epochs, "seed": args.seed,
        "asha": {"grace_period": args.grace, "reduction_factor": args.reduction}, "concurrency": args.concurrency,
        "tolerance": args.tolerance, "target": target, "ratios": ratios, "random": random_run, "asha_run": asha_run,
        "hardware": {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    console.print(f"saved {args.json}")
    ray.shutdown()


if __name__ == "__main__":
    main()
