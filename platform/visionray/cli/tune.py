"""`visionray tune`: a Ray Tune search over a training job."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any, Optional

import typer
from rich.live import Live
from rich.table import Table

from visionray.cli.registry import register_after_run
from visionray.cli.common import AddressOption, SetOption, console, err, fail, fmt, user_errors

INTERRUPTED_EXIT = 130  # the search stopped early (Ctrl+C); resume it with --resume


def _config(params: dict[str, Any]) -> str:
    """``depth=3 width=16 lr=0.0093 augment=randaugment randaugment.m=12``: short keys, sorted."""
    def short(key: str) -> str:
        return key.split(".", 1)[1] if key.startswith(("model.", "optim.", "data.", "augment.")) else key

    return " ".join(f"{short(k)}={fmt(v, 4)}" for k, v in sorted(params.items()))


def _status(row, max_epochs: int) -> str:
    if row.status == "TERMINATED":
        return "[green]done[/]" if row.epoch >= max_epochs else "[yellow]stopped early[/]"
    if row.status == "ERROR":
        return "[red]error[/]"
    if row.status == "RUNNING" and row.retries:
        return f"running (retry {row.retries})"
    return row.status.lower()


def live_table(spec, rows: list) -> Table:
    table = Table(title=f"search {spec.output.name}: {spec.search.algorithm} + {spec.scheduler.name}, "
                        f"{spec.metric} ({spec.mode})")
    for col in ("trial", "config", "epoch", spec.metric, "best", "status", "error"):
        table.add_column(col, justify="left" if col in ("trial", "config", "status", "error") else "right",
                         overflow="fold")
    for r in rows:
        table.add_row(r.trial_id, _config(r.params), f"{r.epoch}/{spec.max_epochs}", fmt(r.value), fmt(r.best),
                      _status(r, spec.max_epochs), r.error or "")
    return table


def closing_table(outcome) -> Table:
    spec = outcome.spec
    table = Table(title=f"search {spec.output.name}: trials by best {spec.metric} "
                        "(ties: fewer parameters, then earlier finish)")
    for col in ("rank", "trial", "config", "epochs", "best epoch", f"best {spec.metric}", "params", "status", "error"):
        table.add_column(col, justify="left" if col in ("trial", "config", "status", "error") else "right",
                         overflow="fold")
    for i, t in enumerate(outcome.trials, 1):
        status = {"completed": "[green]completed[/]", "early-stopped": "[yellow]early-stopped[/]",
                  "error": "[red]error[/]"}.get(t.status, t.status)
        table.add_row(str(i), t.trial_id, _config(t.params), f"{t.epochs}/{spec.max_epochs}", fmt(t.best_epoch),
                      fmt(t.best_value), f"{t.num_params:,}" if t.num_params else "-", status, t.error or "")
    return table


def tune_command(
    spec_file: Path = typer.Argument(..., metavar="SPEC", help="a search spec (tune/*.yaml)"),
    set_: list[str] = SetOption,
    address: Optional[str] = AddressOption,
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted search; finished trials are kept"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's worker and controller output"),
) -> None:
    """Search depth, width, augmentation (and more) with Ray Tune; ASHA stops poor trials early."""
    from visionray.cluster.local import init_ray
    from visionray.tune.results import lineage
    from visionray.tune.run import SearchError, run_search
    from visionray.tune.spec import experiment_dir, load_search_spec

    with user_errors():
        spec = load_search_spec(spec_file, set_)
    exp = experiment_dir(spec)
    console.print(f"[bold]visionray tune[/] {spec.output.name} -> {exp}"
                  + (" [cyan](resuming)[/]" if resume else ""))
    init_ray(address, verbose)
    if not verbose:  # failed trials show in the table and in their error.txt, not as tracebacks here
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    with Live(live_table(spec, []), console=console, refresh_per_second=2) as live:
        try:
            outcome = run_search(spec, resume=resume, on_update=lambda rows: live.update(live_table(spec, rows)))
        except SearchError as exc:
            live.stop()
            fail(str(exc))
        except Exception as exc:
            live.stop()
            fail([f"{type(exc).__name__}: {exc}"], "search failed", code=1)
    console.print(closing_table(outcome))
    for kind, path in outcome.files.items():
        console.print(f"{kind:>5}: {path}")
    if outcome.interrupted:
        again = " ".join(["visionray tune", shlex.quote(str(spec_file)), *(f"--set {shlex.quote(s)}" for s in set_), "--resume"])
        err.print(f"[yellow]search interrupted[/]: continue with  {again}", highlight=False)
        raise typer.Exit(INTERRUPTED_EXIT)
    if outcome.best is None:
        fail("no trial reported a checkpoint; see the errors above", "search finished without a model", code=1)
    b = outcome.best
    console.print(f"[bold]best trial[/] {b.trial_id}: {spec.metric} {b.best_value:.4f} at epoch {b.best_epoch} "
                  f"({b.num_params:,} parameters), {_config(b.params)}")
    console.print(f"best checkpoint {outcome.best_dir}  ({outcome.wall_s:.0f} s)")
    if outcome.best_dir and spec.registration is not None:
        register_after_run(spec.registration, outcome.best_dir, lineage=lineage(spec, b))


def register(app: typer.Typer) -> None:
    """Add ``tune`` to the ``visionray`` app."""
    app.command("tune")(tune_command)
