"""`visionray serve`, `predict` and `loadtest`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.table import Table

from visionray.cli.common import AddressOption, PROJECT_DIR, console, fail, fmt, user_errors
from visionray.cli.registry import PublicKeyOption, RegistryOption

DEFAULT_CONFIG = PROJECT_DIR / "serve" / "classifier.yaml"
DEFAULT_URL = "http://127.0.0.1:8000"
ApiKeyOption = typer.Option(None, "--api-key", envvar="VISIONRAY_API_KEY", help="API key (default: $VISIONRAY_API_KEY)")


def _visionray_app(raw: dict[str, Any]) -> dict[str, Any]:
    from visionray.serve.config import IMPORT_PATH

    return next(a for a in raw["applications"] if a.get("import_path") == IMPORT_PATH)


def _deploy_failure(app_name: str) -> list[str]:
    """What Serve says went wrong with each deployment of ``app_name`` (the replica's exception)."""
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None:
        return [f"application {app_name!r} is not on the cluster"]
    lines = [f"application {app_name}: {status.status}"]
    for name, dep in status.deployments.items():
        if dep.message:
            # the replica's traceback ends with the exception's message: keep that, not the stack
            last = [ln for ln in dep.message.strip().splitlines() if ln.strip()]
            lines.append(f"{name}: {last[-1] if last else dep.status}")
    return lines


def serve_command(
    config: Path = typer.Argument(DEFAULT_CONFIG, metavar="[CONFIG]", help="Serve config (serve/*.yaml); default serve/classifier.yaml"),
    model: Optional[str] = typer.Option(None, "--model", help="registry model NAME@ALIAS or NAME@VERSION (overrides args.model)"),
    address: Optional[str] = AddressOption,
    host: Optional[str] = typer.Option(None, "--host", help="HTTP bind address (overrides http_options.host)"),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="HTTP port (overrides http_options.port)"),
    detach: bool = typer.Option(False, "--detach", help="deploy and return; the app keeps running on the cluster"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's and Serve's output"),
) -> None:
    """Serve a registered model over HTTP with Ray Serve (autoscaling, sanitized input), until Ctrl-C."""
    from visionray.serve.config import load_serve_spec, read_serve_config

    with user_errors():
        raw = read_serve_config(config)
        app_cfg = dict(_visionray_app(raw))
        args = dict(app_cfg.get("args") or {})
        if model is not None:
            args.pop("checkpoint", None)
            args["model"] = model
        spec = load_serve_spec(args, f"{config}: args (with --model)" if model else f"{config}: args")
    http = dict(raw.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    local = not (address or os.environ.get("RAY_ADDRESS"))
    direct_port = http.get("port", 8000)
    if spec.ingress_mode != "proxy":
        from visionray.serve.modes import FALLBACK_PORT_OFFSET, mode_env

        http["port"] = direct_port + FALLBACK_PORT_OFFSET  # Serve's proxy steps aside: the replicas take the port
        if local:  # a cluster we connect to runs the mode it was started in; the replicas check it
            os.environ.update(mode_env(spec.ingress_mode, direct_port, spec.http_facing.max_replicas))
    name = app_cfg.get("name", "default")
    prefix = app_cfg.get("route_prefix", "/")

    from ray import serve

    from visionray.serve.app import build_app
    from visionray.cluster.local import init_ray

    with user_errors():
        application = build_app(args)  # resolves the alias: a missing model fails here, before Ray starts
    init_ray(address, verbose)
    _stop_on_sigterm()  # after Ray's start: its core worker installs a SIGTERM handler of its own
    _warn_if_it_cannot_scale(spec)
    with _serve_start_quiet():
        serve.start(http_options=http, grpc_options=raw.get("grpc_options"), proxy_location=raw.get("proxy_location", "HeadOnly"))
    console.print(f"[bold]visionray serve[/] {args.get('model') or args.get('checkpoint')} as application {name!r} ...")
    start = time.time()
    try:
        with _serve_start_quiet():
            serve.run(application, name=name, route_prefix=prefix)
    except RuntimeError as exc:
        lines = _deploy_failure(name)
        serve.delete(name)
        fail(lines if len(lines) > 1 else [str(exc), *lines], "deploy failed (the app was removed)", code=1)
    proxy = _serving_address()
    if spec.ingress_mode == "proxy":
        url = f"{proxy}{prefix.rstrip('/')}"
    else:
        url = f"http://{http.get('host', '127.0.0.1')}:{direct_port}{prefix.rstrip('/')}"
        more = spec.http_facing.max_replicas - 1
        console.print(f"ingress_mode {spec.ingress_mode}: the HTTP-facing replicas listen on port {direct_port}"
                      + (f" and up to {more} next port(s), one per replica (balance across them)" if more else "")
                      + f"; Serve's fallback proxy on {proxy}")
    console.print(f"[green]ready[/] in {time.time() - start:.0f} s: {url}/v1/classify  (API docs {url}/docs, "
                  f"health {url}/healthz, {url}/readyz)")
    if spec.rollout is not None:
        _print_rollout(url)
    if (raw.get("grpc_options") or {}).get("grpc_servicer_functions"):
        console.print(f"gRPC: visionray.v1.Classifier/Classify on port {raw['grpc_options'].get('port', 9000)} "
                      f"(every interface: Serve's gRPC proxy takes no host), metadata application={name}; "
                      f"`visionray predict --grpc HOST:PORT --app {name} IMAGE`")
    if local:
        import ray

        console.print(f"Prometheus metrics: http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics; Ray's own "
                      "CLI reaches this local cluster with its token: [bold]RAY_AUTH_MODE=token serve status[/] "
                      "(the token is in ~/.ray/auth_token)")
    if detach:
        console.print(f"detached; stop it with `serve delete {name}` or `serve shutdown`")
        return
    console.print("Ctrl-C (or SIGTERM) stops it, draining requests first")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping (draining requests) ...")
        serve.delete(name)
        console.print("stopped")


def _print_rollout(url: str) -> None:
    """The rollout as the app built it: active, or refused and why (a candidate that failed verification)."""
    import httpx

    try:
        r = httpx.get(f"{url}/v1/rollout", timeout=10).raise_for_status().json()["rollout"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # e.g. 401: the app wants an API key
        console.print(f"rollout configured; its state: `visionray status --url {url}` ({type(exc).__name__})")
        return
    if r["state"] == "refused":
        console.print(f"[red]rollout refused[/]: {r['mode']} {r['candidate']} gets no traffic: {r['reason']}", highlight=False)
    else:
        console.print(f"rollout: {r['mode']} {r['candidate']} at {r['percent']:g}% of requests "
                      f"(`visionray status --url {url}`)", highlight=False)


def _warn_if_it_cannot_scale(spec: Any) -> None:
    """Say so when the cluster could never run every replica the config allows (they would sit
    "STARTING, cannot be scheduled" under load)."""
    import ray

    from visionray.serve.config import cpus_at_full_scale

    need, have = cpus_at_full_scale(spec), ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        parts = [f"{n}: {d.max_replicas} x {d.num_cpus:g} CPU" for n, d in
                 (("classifier", spec.classifier), ("ingress", spec.ingress)) if n == "classifier" or spec.topology == "split"]
        console.print(f"[yellow]warning:[/] at max_replicas the app reserves {need:g} CPUs ({', '.join(parts)}) and this "
                      f"cluster has {have:g}: replicas beyond that wait unscheduled; lower max_replicas or num_cpus, or add nodes")


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, systemd, a container runtime) stops the app like Ctrl-C does, draining
    requests first; SIGINT works too when the shell started us in the background (``&`` sets it
    to ignored)."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _serving_address() -> str:
    """Where Serve's HTTP proxy really listens: the cluster's settings, which win over the config's
    when Serve already ran there (Serve warns that the new ones are ignored)."""
    from ray.serve.context import _get_global_client  # Serve's public API does not expose the running http_options

    http = _get_global_client().http_config
    return f"http://{http.host}:{http.port}"


@contextlib.contextmanager
def _serve_start_quiet() -> Iterator[None]:
    """``serve.run`` after our ``serve.start`` logs "New http_options/controller_options will not be
    applied" though they were, by that ``serve.start``. Drop that one line (Serve's warning that an
    already running Serve keeps its own settings still shows)."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "will not be applied" not in record.getMessage()

    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addFilter(keep)
    try:
        yield
    finally:
        serve_logger.removeFilter(keep)


def predict_command(
    images: Optional[list[Path]] = typer.Argument(None, help="PNG, JPEG or WebP files (several go in one multipart request)"),
    url: str = typer.Option(os.environ.get("VISIONRAY_URL", DEFAULT_URL), "--url", help="server URL (default $VISIONRAY_URL or http://127.0.0.1:8000)"),
    top_k: int = typer.Option(5, "--top-k", min=1, max=1000, help="labels per image"),
    api_key: Optional[str] = ApiKeyOption,
    grpc_address: Optional[str] = typer.Option(None, "--grpc", metavar="HOST:PORT",
                                               help="call the gRPC ingress there instead of HTTP (one RPC per image)"),
    app_name: str = typer.Option("visionray", "--app", help="with --grpc: the Serve application's name"),
    batch: Optional[str] = typer.Option(None, "--batch", metavar="SRC", help="bulk scoring on Ray, no server: every image "
                                        "of a folder, .tar/.tar.gz, pack manifest.json or s3://, gs:// prefix"),
    output: Optional[str] = typer.Option(None, "--output", help="with --batch: the Parquet file of rows (resumed when it exists)"),
    model: Optional[str] = typer.Option(None, "--model", help="with --batch: the registered model NAME@ALIAS or NAME@VERSION"),
    registry: Optional[str] = RegistryOption,
    public_key: list[Path] = PublicKeyOption,
    batch_size: int = typer.Option(256, "--batch-size", min=1, max=65536, help="with --batch: images per forward pass"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, max=4096, show_default="as many as the free "
                                              "CPUs (GPUs) hold", help="with --batch: actors holding the model"),
    cpus: float = typer.Option(1.0, "--cpus", min=0.0, max=256, help="with --batch: CPUs per actor"),
    gpus: float = typer.Option(0.0, "--gpus", min=0.0, max=8, help="with --batch: GPUs per actor"),
    decode_workers: int = typer.Option(2, "--decode-workers", min=1, max=64, help="with --batch: sandboxed decoders per actor"),
    address: Optional[str] = AddressOption,
    as_json: bool = typer.Option(False, "--json", help="print the server's JSON (with --batch: the run's summary)"),
) -> None:
    """Classify images with a running `visionray serve`, or with --batch a folder, archive, pack or bucket into Parquet.

    Against a server it retries while the server answers 503 or 429. With --batch it runs on Ray (no server): the
    model verified, images decoded by the sandboxed sanitizer, one row per input; an existing OUT is resumed."""
    import httpx

    from visionray.serve.client import Client, ServeError
    from visionray.serve.grpc_api import GrpcClient, GrpcError

    if batch is not None:
        if images:
            fail("give image files or --batch SRC, not both")
        from visionray.cli.bulk import predict_batch

        options = {"top_k": top_k, "batch_size": batch_size, "concurrency": concurrency, "num_cpus": cpus,
                   "num_gpus": gpus, "sanitizer": {"decode_workers": decode_workers}}
        predict_batch(batch, output, model, registry, public_key, options, address, as_json)
        return
    if not images:
        fail("give one or more image files, or --batch SRC --output OUT.parquet --model NAME@ALIAS")
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        fail([f"{p}: no such file" for p in missing])
    where = grpc_address or url
    try:
        with (GrpcClient(grpc_address, app=app_name, api_key=api_key) if grpc_address else Client(url, api_key=api_key)) as client:
            result = client.classify(list(images), top_k=top_k)
    except ValueError as exc:
        fail(str(exc))
    except GrpcError as exc:
        if exc.request_id is None:  # not one of our refusals: gRPC's own (no server, no such application)
            fail(f"{where}: {exc}", "cannot reach the service", code=1)
        fail(str(exc), "the server refused", code=1)
    except ServeError as exc:
        fail(str(exc), "the server refused", code=1)
    except httpx.HTTPError as exc:
        fail(f"{where}: {type(exc).__name__}: {exc}", "cannot reach the server", code=1)
    if as_json:
        print(json.dumps(result))
        return
    m = result["model"]
    table = Table(title=f"{m['name']} v{m['version']}  (request {result['request_id']})")
    for col in ("image", "rank", "label", "probability"):
        table.add_column(col, justify="right" if col != "image" else "left")
    for res, path in zip(result["results"], images):
        for rank, lab in enumerate(res["top_k"], 1):
            table.add_row(str(path) if rank == 1 else "", str(rank), lab["label"], fmt(lab["probability"]))
    console.print(table)


def loadtest_command(
    url: str = typer.Argument(..., help="server URL, e.g. http://127.0.0.1:8000"),
    images: Path = typer.Option(..., "--images", help="directory of PNG/JPEG/WebP files to send"),
    concurrency: int = typer.Option(8, "--concurrency", min=1, max=1024, help="requests in flight"),
    duration: float = typer.Option(10.0, "--duration", min=0.1, max=3600.0, help="seconds to run"),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", min=1, help="stop after this many requests"),
    api_key: Optional[str] = ApiKeyOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON for machines"),
) -> None:
    """Send images as fast as CONCURRENCY clients can; print requests/s, p50/p95/p99 and errors by status."""
    from visionray.serve.client import loadtest, read_images

    try:
        blobs = read_images(images)
    except ValueError as exc:
        fail(str(exc))
    report = asyncio.run(loadtest(url, blobs, concurrency, duration, max_requests, api_key))
    out = report.to_json()
    if as_json:
        print(json.dumps(out))
        return
    table = Table(title=f"loadtest {url}: {len(blobs)} image(s), concurrency {concurrency}", show_header=False)
    for key in ("requests", "duration_s", "requests_per_s", "ok_per_s", "p50_ms", "p95_ms", "p99_ms"):
        table.add_row(key, fmt(out[key], 2))
    for status, count in out["by_status"].items():
        table.add_row(f"status {status}", str(count))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``visionray`` app."""
    app.command("serve")(serve_command)
    app.command("predict")(predict_command)
    app.command("loadtest")(loadtest_command)
