"""``visionray validate``, ``train`` and ``evaluate``: a spec checked, a training job run with live
progress (registered after it when the spec asks), a checkpoint or registered model scored."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from visionray.cli.common import QUICKSTART, AddressOption, SetOption, console, err, fail, fmt, user_errors
from visionray.cli.registry import PublicKeyOption, RegistryOption, check_registration, load_for_cli, register_after_run


# --------------------------------------------------------------------------- validate


def validate(
    file: Path = typer.Argument(..., help="a training spec (jobs/*.yaml), a search spec (tune/*.yaml) or a serve config (serve/*.yaml)"),
    set_: list[str] = SetOption,
) -> None:
    """Validate a spec: print OK, or every error (field, value, what is allowed) and exit 2."""
    from visionray.serve.config import read_serve_config
    from visionray.spec_io import SpecError, read_yaml
    from visionray.specs import load_spec

    from visionray.tune.spec import is_search_spec, load_search_spec

    try:
        raw = read_yaml(file)
        if isinstance(raw, dict) and "applications" in raw:
            if set_:
                fail("--set applies to training and search specs; edit the serve config's args instead")
            apps = [a.get("name", "default") for a in read_serve_config(file)["applications"]]
            console.print(f"[green]OK[/] {file}: serve config, application(s) {', '.join(apps)}")
            return
        if is_search_spec(raw):
            search = load_search_spec(file, set_)
            console.print(f"[green]OK[/] {file}: search [bold]{search.output.name}[/] "
                          f"({search.search.algorithm} + {search.scheduler.name}, {search.expected_trials()} trial(s))")
            return
        spec = load_spec(file, set_)
    except SpecError as exc:
        fail(exc.errors, f"{file}: {len(exc.errors)} error(s)")
    console.print(f"[green]OK[/] {file}: training job [bold]{spec.output.name}[/] "
                  f"({spec.model.name} on {spec.data.source}, {spec.scaling.workers} worker(s))")


# --------------------------------------------------------------------------- train


def _epoch_table(spec, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{spec.output.name}: {spec.model.name} on {spec.data.source}, {spec.scaling.workers} worker(s)")
    for col in ("epoch", "train loss", "val loss", "val acc", "val top5", "img/s", "epoch s"):
        table.add_column(col, justify="right")
    for m in rows:
        table.add_row(
            f"{m['epoch']}/{m['planned_epochs']}", fmt(m["train_loss"]), fmt(m["val_loss"]), fmt(m["val_acc"]),
            fmt(m.get("val_top5")), f"{m['images_per_s']:.0f}", f"{m['epoch_s']:.1f}",
        )
    return table


def train(
    spec_file: Optional[Path] = typer.Argument(None, metavar="[SPEC]", help="training spec; default jobs/quickstart.yaml"),
    set_: list[str] = SetOption,
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="data-parallel workers (scaling.workers)"),
    gpu: bool = typer.Option(False, "--gpu", help="one GPU per worker (scaling.gpu)"),
    address: Optional[str] = AddressOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's worker and controller output"),
) -> None:
    """Train a CNN with Ray Train; the same job name again resumes from its latest checkpoint."""
    from visionray.cluster.local import init_ray
    from visionray.runs import best_checkpoint, completed_epochs, run_dir
    from visionray.specs import load_spec
    from visionray.train.driver import fit_with_progress

    overrides = list(set_)
    if workers is not None:
        overrides.append(f"scaling.workers={workers}")
    if gpu:
        overrides.append("scaling.gpu=true")
    with user_errors():
        spec = load_spec(spec_file or QUICKSTART, overrides)  # build_trainer makes its data paths absolute
        if spec.registration is not None:  # fail before training, not after, when no key can sign
            check_registration(spec.registration)
    if not (address or os.environ.get("RAY_ADDRESS")):  # a local cluster: its workers read this machine's files
        missing = [f"data.{name}: {value!r} does not exist ({os.path.abspath(os.path.expanduser(value))}); "
                   "give a directory of class folders or a .tar/.tar.gz"
                   for name in ("path", "val_path")
                   if (value := getattr(spec.data, name)) and not os.path.exists(os.path.expanduser(value))]
        if missing:
            fail(missing, f"{spec_file or QUICKSTART}: invalid spec")
    console.print(f"[bold]visionray train[/] {spec.output.name} -> {run_dir(spec)}")
    done = completed_epochs(spec)
    if done >= spec.optim.epochs:
        console.print(f"job {spec.output.name} already finished {done}/{spec.optim.epochs} epochs; "
                      "raise optim.epochs to continue it, or set output.name to start a new one")
        _summary(spec, best_checkpoint(run_dir(spec)), 0.0)
        return
    if done:
        console.print(f"resuming {spec.output.name} from its checkpoint at epoch {done}")
    init_ray(address, verbose)
    rows: list[dict[str, Any]] = []
    start = time.time()
    with user_errors(), Live(_epoch_table(spec, rows), console=console, refresh_per_second=4) as live:
        def on_report(item: dict[str, Any]) -> None:
            if "metrics" in item:
                rows.append(item["metrics"])
                if "bf16_speedup" in item["metrics"]:  # precision: fastest's choice, once
                    from visionray.train.epoch import bf16_pays

                    speedup = item["metrics"]["bf16_speedup"]
                    console.print(f"precision: {'bf16 autocast' if bf16_pays(speedup) else 'fp32'} (a probe "
                                  f"step ran {speedup:.2f}x as fast under bf16 as in fp32 on this CPU)", highlight=False)
                live.update(_epoch_table(spec, rows))
                if not console.is_terminal:  # job logs, pipes: one plain line per epoch (rich prints only the last table)
                    m = item["metrics"]
                    console.print(f"epoch {m['epoch']}/{m['planned_epochs']}: train_loss {fmt(m['train_loss'])} "
                                  f"val_loss {fmt(m['val_loss'])} val_acc {fmt(m['val_acc'])} "
                                  f"{m['images_per_s']:.0f} img/s {m['epoch_s']:.1f} s", highlight=False)
            elif "error" in item:
                for rank, msg in item["error"].items():
                    err.print(f"[yellow]worker {rank} failed[/]: {escape(msg)} (Ray Train restores from the latest checkpoint)")

        try:
            result = fit_with_progress(spec, on_report)
        except Exception as exc:
            live.stop()
            cause = data_error_in(exc)
            if cause is not None:  # bad data (a bad image, a shard that fails its checksum): the user's input
                fail(str(cause))
            fail([f"{type(exc).__name__}: {exc}"], "training failed", code=1)
    best = best_checkpoint(run_dir(spec)) if "://" not in spec.output.storage else result.checkpoint.path
    console.print()
    _summary(spec, best, time.time() - start, rows[-1]["planned_epochs"] if rows else None)
    if spec.registration is not None:
        register_after_run(spec.registration, best, lineage={"job": spec.output.name, "run_dir": run_dir(spec)})


def _summary(spec, best: Any, seconds: float, epochs: int | None = None) -> None:
    from visionray.checkpoint import read_metadata

    meta = read_metadata(Path(best)) if "://" not in str(best) else None
    table = Table(show_header=False, title="summary")
    table.add_row("job", spec.output.name)
    if meta:
        m = meta.metrics
        table.add_row("best epoch", f"{meta.epoch}/{epochs or spec.optim.epochs}")
        table.add_row("val accuracy", f"{m['val_acc']:.4f}" + (f" (top-5 {m['val_top5']:.4f})" if "val_top5" in m else ""))
    table.add_row("checkpoint", str(best))
    table.add_row("metrics", f"{spec.output.storage}/{spec.output.name}/metrics.csv, tensorboard/")
    table.add_row("wall time", f"{seconds:.0f} s")
    console.print(table)
    if meta:
        console.print(f"val accuracy {meta.metrics['val_acc']:.4f}  checkpoint {best}")


# --------------------------------------------------------------------------- evaluate


def evaluate(
    checkpoint: Path = typer.Argument(..., help="a checkpoint directory, a run directory (its best checkpoint), "
                                               "or a registered model NAME@ALIAS / NAME@3 (verified before loading)"),
    data: str = typer.Option("val", "--data", help="val (the checkpoint's held-out split), test (torchvision), or an image folder/archive"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for machines"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the confusion matrix as a PNG"),
    registry: Optional[str] = RegistryOption,
    public_key: list[Path] = PublicKeyOption,
) -> None:
    """Score a checkpoint or a registered model: top-1/top-5, a per-class table and a confusion matrix."""
    from visionray.evaluate import evaluate_checkpoint, plot_confusion

    with user_errors():
        model, meta, path = load_for_cli(checkpoint, registry, public_key)
        ev = evaluate_checkpoint(model, meta, data)
    if plot is not None:
        plot_confusion(ev, plot)
    if as_json:
        print(json.dumps({"checkpoint": str(path), **ev.to_json()}))
        return
    console.print(f"[bold]{path}[/] on {ev.data}: {ev.count} images")
    console.print(f"top-1 {ev.top1:.4f}" + (f"   top-5 {ev.top5:.4f}" if ev.top5 is not None else ""))
    per = Table(title="per class")
    for col in ("class", "support", "precision", "recall"):
        per.add_column(col, justify="right")
    for row in ev.per_class():
        per.add_row(row["class"], str(row["support"]), fmt(row["precision"], 3), fmt(row["recall"], 3))
    console.print(per)
    cm = Table(title="confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for name in ev.classes:
        cm.add_column(name[:8], justify="right")
    for name, row in zip(ev.classes, ev.confusion):
        cm.add_row(name[:12], *[str(v) for v in row])
    console.print(cm)
    if plot is not None:
        console.print(f"plot: {plot}")


def plot(
    runs: list[Path] = typer.Argument(..., help="run directories (each with the metrics.csv `visionray train` writes)"),
    out: Path = typer.Option(..., "--out", help="the PNG to write"),
    title: str = typer.Option("", "--title", help="plot title (hardware, versions)"),
) -> None:
    """Held-out accuracy against training wall time after every epoch, one line per run, as a PNG."""
    from visionray.evaluate import plot_curves, read_curve

    with user_errors():
        curves = {run.name: read_curve(run) for run in runs}
    plot_curves(curves, out, title)
    for name, points in curves.items():
        console.print(f"{name}: " + ", ".join(f"{t / 60:.1f} min {acc:.4f}" for t, acc in points), highlight=False)
    console.print(f"plot: {out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``visionray`` app."""
    for command in (validate, train, evaluate, plot):
        app.command()(command)


def data_error_in(exc: BaseException) -> Exception | None:
    """The ``DataError`` behind a failed run, if one is: raised on the driver, or in a worker (Ray
    Train's ``worker_failures``) or a Ray Data task (the exception's causes)."""
    from visionray.data.splits import DataError

    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "cause", None)) if isinstance(c, BaseException)]
        todo += [c for c in (getattr(e, "worker_failures", None) or {}).values() if isinstance(c, BaseException)]
    return None

