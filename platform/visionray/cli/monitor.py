"""`visionray status` (the served model, its rollout and what it counted) and `visionray monitor`
(a payload log against the model's own held-out split)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from visionray.cli.common import console, fail, fmt, user_errors
from visionray.cli.registry import PublicKeyOption, RegistryOption, load_for_cli
from visionray.cli.serve import DEFAULT_URL, ApiKeyOption


def status(
    url: str = typer.Option(os.environ.get("VISIONRAY_URL", DEFAULT_URL), "--url", help="server URL (default $VISIONRAY_URL or http://127.0.0.1:8000)"),
    api_key: Optional[str] = ApiKeyOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON for machines"),
) -> None:
    """The running app: its model, its rollout (canary or shadow), answers per version, shadow agreement per class."""
    import httpx

    from visionray.serve.client import Client, ServeError

    try:
        with Client(url, api_key=api_key) as client:
            models, rollout = client.models(), client.rollout()
    except ServeError as exc:
        fail(str(exc), "the server refused", code=1)
    except httpx.HTTPError as exc:
        fail(f"{url}: {type(exc).__name__}: {exc}", "cannot reach the server", code=1)
    if as_json:
        print(json.dumps({"models": models["models"], **rollout}))
        return
    m = models["models"][0]
    console.print(f"serving [bold]{m['name']}@{m['version']}[/] at {url}", highlight=False)
    r = rollout.get("rollout")
    if r is None:
        console.print("no rollout")
    else:
        state = f"[red]refused[/]: {r['reason']}" if r["state"] == "refused" else "active"
        console.print(f"rollout: {r['mode']} {r['candidate']} at {r['percent']:g}% ({state})", highlight=False)
    answers = Table(title="requests answered")
    answers.add_column("version")
    answers.add_column("requests", justify="right")
    for ref, n in sorted(rollout.get("answers", {}).items()):
        answers.add_row(ref, str(n))
    console.print(answers)
    if rollout.get("candidate_errors"):
        console.print(f"canary failures answered by the served model: {rollout['candidate_errors']}")
    if r is not None and r["mode"] == "shadow":
        console.print(f"shadow agreement (top-1): {fmt(rollout.get('agreement'))} over "
                      f"{sum(rollout.get('compared', {}).values())} images ({rollout.get('shadow_errors', 0)} shadow errors)")
        per = Table(title="agreement per class (the served model's top-1)")
        for col in ("class", "compared", "agreed", "agreement"):
            per.add_column(col, justify="right")
        for cls, n in sorted(rollout.get("compared", {}).items()):
            per.add_row(cls, str(n), str(rollout["agreed"].get(cls, 0)), fmt(rollout["agreement_per_class"][cls], 3))
        console.print(per)


def monitor(
    log: str = typer.Argument(..., help="the payload log: monitor.path of the serve config (a directory or s3://, gs:// prefix)"),
    against: str = typer.Option(..., "--against", help="the model to compare with: NAME@ALIAS, NAME@3, or a checkpoint/run directory"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the class distribution and confidence as a PNG"),
    registry: Optional[str] = RegistryOption,
    public_key: list[Path] = PublicKeyOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON for machines"),
) -> None:
    """Logged requests' class distribution and confidence beside the model's own on its held-out split (drift)."""
    from visionray.serve.monitor import compare, plot_drift, read_log

    with user_errors():
        table = read_log(log)
        model, meta, label = load_for_cli(against, registry, public_key)
        drift = compare(table, model, meta)
    if plot is not None:
        plot_drift(drift, plot)
    out = drift.to_json()
    if as_json:
        print(json.dumps({"log": log, "against": label, **out}))
        return
    console.print(f"{drift.live_count} logged images against {label} on {drift.reference_count} images of "
                  f"{drift.reference}; total variation {drift.total_variation:.3f}", highlight=False)
    t = Table(title="top-1 class distribution")
    for col in ("class", "logged", "held-out"):
        t.add_column(col, justify="right")
    for row in out["per_class"]:
        t.add_row(row["class"], fmt(row["live"], 3), fmt(row["reference"], 3))
    console.print(t)
    c = Table(title="top-1 confidence quantiles")
    for col in ("", "p10", "p50", "p90"):
        c.add_column(col, justify="right")
    for who in ("live", "reference"):
        q = out["confidence"][who]
        c.add_row("logged" if who == "live" else "held-out", *(fmt(q[k], 3) for k in ("0.1", "0.5", "0.9")))
    console.print(c)
    if plot is not None:
        console.print(f"plot: {plot}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``visionray`` app."""
    app.command()(status)
    app.command()(monitor)
