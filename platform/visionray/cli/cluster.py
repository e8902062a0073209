"""`visionray submit` and `visionray jobs list|status|logs|stop`: specs as Ray jobs on a cluster."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from visionray.cli.common import PROJECT_DIR, SetOption, console, err, fail, user_errors
from visionray.cluster.client import TERMINAL, JobsError, connect, follow, job_info, logs, stop

JobAddressOption = typer.Option(
    None, "--address",
    help="the head's Jobs API, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, "
         "else a Ray started on this machine)",
)
InsecureTokenOption = typer.Option(
    False, "--insecure-token", help="send Ray's token to a non-loopback head over plain http (trusted networks only)")
# How often `submit --wait` and `jobs logs --follow` poll for the end of a job (s).
POLL_S = 1.0
FAILED_EXIT = 1  # the job ended FAILED or STOPPED

jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect, follow and stop VisionRay's Ray jobs.")


class _Errors:
    """JobsError -> the user's message and exit 2 (1 where the cluster, not the input, is at fault).
    Ray's INFO lines about packaging and log streaming stay out of the way (warnings still show)."""

    def __enter__(self):
        import logging

        for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env"):
            logging.getLogger(name).setLevel(logging.WARNING)
        return self

    def __exit__(self, kind, exc, tb):
        from ray.exceptions import AuthenticationError

        if isinstance(exc, JobsError):
            code = 1 if exc.title in ("cannot reach the Ray cluster", "the cluster refused the job") else 2
            fail(exc.lines, exc.title, code=code)
        if isinstance(exc, AuthenticationError):  # the head refused this machine's token (403)
            fail([str(exc).strip().splitlines()[0],
                  "the token here is not the cluster's: copy it from the head (`ray get-auth-token` there) into "
                  "~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH"], "authentication failed")
        return False


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status(status) -> str:
    value = getattr(status, "value", str(status))
    color = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}.get(value)
    return f"[{color}]{value}[/]" if color else value


def _follow(client, job_id: str) -> int:
    """Stream the job's log until it ends; the exit code says how it ended."""
    for chunk in follow(client, job_id):
        console.out(chunk, end="", highlight=False)
    info = job_info(client, job_id)
    while info.status.value not in TERMINAL:  # the log closes a moment before the status lands
        time.sleep(POLL_S)
        info = job_info(client, job_id)
    line = f"job {job_id}: {_status(info.status)}"
    if info.status.value != "SUCCEEDED" and info.message:
        line += f" ({info.message.strip().splitlines()[-1]})"
    (console if info.status.value == "SUCCEEDED" else err).print(line)
    return 0 if info.status.value == "SUCCEEDED" else FAILED_EXIT


def submit_command(
    spec_file: Path = typer.Argument(..., metavar="SPEC",
                                     help="a training spec (jobs/), a search spec (tune/) or a Serve config (serve/)"),
    extra: Optional[list[str]] = typer.Argument(None, metavar="[-- ARGS]",
                                                help="more arguments for the command on the cluster, after --"),
    address: Optional[str] = JobAddressOption,
    insecure_token: bool = InsecureTokenOption,
    wait: bool = typer.Option(False, "--wait", help="stream the job's log until it ends; exit 1 unless it SUCCEEDED"),
    set_: list[str] = SetOption,
    storage: Optional[str] = typer.Option(
        None, "--storage", help="output.storage on the cluster: s3://..., gs://... or an absolute shared path"),
    registry: Optional[str] = typer.Option(
        None, "--registry", help="model registry on the cluster ($VISIONRAY_REGISTRY there): a URI or absolute shared path"),
    project_dir: Path = typer.Option(PROJECT_DIR, "--project-dir", help="the project whose code is shipped"),
    job_id: Optional[str] = typer.Option(None, "--id", help="submission id (default visionray-KIND-NAME-RANDOM)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print what would be submitted, as JSON"),
) -> None:
    """Run a spec on a Ray cluster as a Ray job: `visionray train|tune|serve SPEC` there, this code shipped."""
    from visionray.cluster.jobs import prepare, submit

    with user_errors(), _Errors():
        plan = prepare(spec_file, project=project_dir, overrides=set_, storage=storage, registry=registry,
                            extra_args=extra)
        if dry_run:
            print(json.dumps({"kind": plan.kind, "entrypoint": plan.entrypoint, "runtime_env": plan.runtime_env,
                              "warnings": plan.warnings,
                              "metadata": plan.metadata, "upload_bytes": plan.upload.total,
                              "upload_limit_bytes": plan.upload.limit}))
            return
        for warning in plan.warnings:
            err.print(f"[yellow]warning[/]: {escape(warning)}")
        client = connect(address, insecure_token)
        console.print(f"[bold]visionray submit[/] {plan.kind} {plan.spec}: shipping "
                      f"{plan.upload.total / 2**20:.1f} MiB from {Path(project_dir).resolve()}")
        sid = submit(client, plan, job_id)
        console.print(f"submitted [bold]{sid}[/]: {plan.entrypoint}")
        if not wait:
            console.print(f"follow it:  visionray jobs logs {sid} --follow")
            return
        code = _follow(client, sid)
    raise typer.Exit(code)

@jobs_app.command("list")
def list_command(
    address: Optional[str] = JobAddressOption,
    insecure_token: bool = InsecureTokenOption,
    all_: bool = typer.Option(False, "--all", help="every Ray job, not only VisionRay's"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for machines"),
) -> None:
    """The cluster's VisionRay jobs, newest last."""

    with _Errors():
        client = connect(address, insecure_token)
        found = [j for j in client.list_jobs() if j.submission_id and (all_ or (j.metadata or {}).get("visionray_kind"))]
    found.sort(key=lambda j: j.start_time or 0)
    if as_json:
        print(json.dumps([{"id": j.submission_id, "status": j.status.value, "kind": (j.metadata or {}).get("visionray_kind"),
                           "entrypoint": j.entrypoint, "start_time": j.start_time, "end_time": j.end_time}
                          for j in found]))
        return
    table = Table(title=f"jobs on {client.get_address()}")
    for col in ("id", "status", "kind", "spec", "started", "ended"):
        table.add_column(col, overflow="fold")
    for j in found:
        meta = j.metadata or {}
        table.add_row(j.submission_id, _status(j.status), meta.get("visionray_kind", "-"),
                      meta.get("visionray_spec", j.entrypoint), _time(j.start_time), _time(j.end_time))
    console.print(table)

@jobs_app.command("status")
def status_command(
    job_id: str = typer.Argument(..., help="submission id (see `visionray jobs list`)"),
    address: Optional[str] = JobAddressOption,
    insecure_token: bool = InsecureTokenOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON for machines"),
) -> None:
    """One job's status, entrypoint, times and message."""

    with _Errors():
        info = job_info(connect(address, insecure_token), job_id)
    if as_json:
        print(json.dumps({"id": job_id, "status": info.status.value, "entrypoint": info.entrypoint,
                          "message": info.message, "start_time": info.start_time, "end_time": info.end_time,
                          "metadata": info.metadata, "runtime_env": info.runtime_env,
                          "driver_exit_code": info.driver_exit_code}))
        return
    table = Table(show_header=False, title=f"job {job_id}")
    table.add_row("status", _status(info.status))
    table.add_row("entrypoint", info.entrypoint)
    table.add_row("started", _time(info.start_time))
    table.add_row("ended", _time(info.end_time))
    if info.message:
        table.add_row("message", info.message.strip())
    console.print(table)

@jobs_app.command("logs")
def logs_command(
    job_id: str = typer.Argument(..., help="submission id (see `visionray jobs list`)"),
    address: Optional[str] = JobAddressOption,
    insecure_token: bool = InsecureTokenOption,
    follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until the job ends; exit 1 unless it SUCCEEDED"),
) -> None:
    """The job's output (per-epoch lines for training jobs)."""

    with _Errors():
        client = connect(address, insecure_token)
        if follow:
            code = _follow(client, job_id)
        else:
            console.out(logs(client, job_id), end="", highlight=False)
            code = 0
    raise typer.Exit(code)

@jobs_app.command("stop")
def stop_command(
    job_id: str = typer.Argument(..., help="submission id (see `visionray jobs list`)"),
    address: Optional[str] = JobAddressOption,
    insecure_token: bool = InsecureTokenOption,
) -> None:
    """Stop a running job (a training job resumes from its checkpoint when submitted again)."""

    with _Errors():
        client = connect(address, insecure_token)
        stopped = stop(client, job_id)
        status = job_info(client, job_id).status
    console.print(f"job {job_id}: " + ("stop requested" if stopped else f"already ended ({_status(status)})"))


def register(app: typer.Typer) -> None:
    """Add ``submit`` and the ``jobs`` group to the ``visionray`` app."""
    app.command("submit")(submit_command)
    app.add_typer(jobs_app, name="jobs")

