"""Soak: the real serving app (``visionray.serve.app:build_app``) under sustained concurrent load on
loopback, with valid images mixed with hostile ones (truncated, bombs declared in the header, wrong
type, gzip bomb, random bytes, polyglots). Checks that every hostile request gets its 4xx, that
no request gets a 5xx or loses its connection, and that the replica processes (Classifier and
Ingress; one Classifier with ``--topology combined``) do not grow (RSS before and after, from
``ray.util.state.list_actors`` pids).

Exits 1 when any request got a 5xx, an unexpected status, a transport error or a timeout, or when
a replica's RSS grew by more than ``--max-growth-pct`` percent AND ``--max-growth-mb`` MiB.

    python benchmarks/soak.py [--duration 60] [--concurrency 32] [--out benchmarks/results/soak.json]

Inside a Ray session that already runs Serve (tests), pass that Serve's ``--port``: the soak
deploys its own application under ``/soak`` and deletes it after, leaving Ray and Serve running.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import logging
import os
import random
import socket
import struct
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
APP_NAME = "soak"
ROUTE = "/soak"
HOSTILE_SHARE = 0.3  # fraction of requests that are hostile
WARMUP_S = 3.0  # valid traffic before the "before" RSS is read (s)
REQUEST_TIMEOUT_S = 30.0  # per request (s); a timeout counts as a failure
SETTLE_S = 2.0  # pause after the load before the "after" RSS is read (s)

log = logging.getLogger("soak")


# --------------------------------------------------------------------------- models and images


def register_untrained(root: Path, name: str, arch: str, kwargs: dict[str, Any], channels: int, size: int,
                       num_classes: int = 10, seed: int = 0, versions: int = 1) -> tuple[Path, Path]:
    """Register an untrained ``arch`` as ``name@best`` in a fresh registry at ``root``, signed with a
    fresh key pair; ``versions`` > 1 adds versions 2.. (seeds seed+1..). Returns (registry root, public key)."""
    import torch

    from visionray.registry.keys import generate_keys
    from visionray.registry.registry import Registry
    from visionray.checkpoint import save_checkpoint
    from visionray.models import create_model
    from visionray.specs import EvalPreset, TrainSpec

    private, public = generate_keys(root / "keys" / "signer")
    preset = EvalPreset(image_size=size, channels=channels, mean=[0.5] * channels, std=[0.25] * channels)
    spec = TrainSpec.model_validate({"model": {"name": arch, **kwargs}})
    registry = root / "registry"
    for version in range(1, versions + 1):
        torch.manual_seed(seed + version - 1)
        ckpt = root / "ckpt" / (name if version == 1 else f"{name}-v{version}")  # serve.py reads ckpt/<name>
        save_checkpoint(ckpt, create_model(arch, num_classes, channels, size, **kwargs), spec=spec,
                        classes=[f"c{i}" for i in range(num_classes)], preset=preset, metrics={}, epoch=0)
        Registry(str(registry)).register(ckpt, name, alias="best" if version == 1 else None, private_key=private)
    return registry, public


def photo(side: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A photographic-like image: smooth gradients plus noise (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1) + rng.integers(0, 40, (side, side, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert(mode)


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A structurally valid PNG whose header claims width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(photo(16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _zip() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.html", "<script>alert(1)</script>")
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    headers: dict[str, str]
    expect: int  # the status this case must get


def cases(side: int) -> tuple[list[Case], list[Case]]:
    """(valid, hostile) requests for a model that takes ``side`` x ``side`` images."""
    im = photo(side)
    png, jpeg, webp = encode(im, "PNG"), encode(im, "JPEG", quality=90), encode(im, "WEBP", quality=90)
    rnd = random.Random(0).randbytes(4096)
    valid = [
        Case("png", png, {"content-type": "image/png"}, 200),
        Case("jpeg", jpeg, {"content-type": "image/jpeg"}, 200),
        Case("webp", webp, {"content-type": "image/webp"}, 200),
    ]
    hostile = [
        Case("truncated png", png[: len(png) // 2], {"content-type": "image/png"}, 422),
        Case("truncated jpeg", jpeg[: len(jpeg) // 2], {"content-type": "image/jpeg"}, 422),
        Case("png bomb 20000x20000 (header)", png_declaring(20000, 20000), {"content-type": "image/png"}, 413),
        Case("jpeg bomb 65500x65500 (header)", jpeg_declaring(65500, 65500), {"content-type": "image/jpeg"}, 413),
        Case("wrong type text/plain", png, {"content-type": "text/plain"}, 415),
        Case("gif declared png", encode(photo(16), "GIF"), {"content-type": "image/png"}, 415),
        Case("gzip bomb", gzip.compress(b"\x00" * (16 * 2**20)), {"content-type": "image/png", "content-encoding": "gzip"}, 415),
        Case("random bytes as png", rnd, {"content-type": "image/png"}, 415),
        Case("random bytes after png magic", b"\x89PNG\r\n\x1a\n" + rnd, {"content-type": "image/png"}, 422),
        Case("polyglot png+zip", png + _zip(), {"content-type": "image/png"}, 422),
        Case("empty body", b"", {"content-type": "image/png"}, 422),
    ]
    return valid, hostile


# --------------------------------------------------------------------------- replica memory


def replica_rss() -> dict[str, int]:
    """RSS (bytes) of every live Serve replica process of the soak app, keyed 'Deployment pid'."""
    import ray  # puts Ray's vendored psutil on sys.path
    import psutil
    from ray.util.state import list_actors

    out = {}
    address = ray.get_runtime_context().gcs_address  # this session's cluster, not any other on the host
    for actor in list_actors(address=address, detail=True, filters=[("state", "=", "ALIVE")], limit=10_000):
        name = actor.class_name or ""
        if not name.startswith(f"ServeReplica:{APP_NAME}:"):
            continue
        try:
            out[f"{name.rsplit(':', 1)[1]} {actor.pid}"] = psutil.Process(actor.pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


# --------------------------------------------------------------------------- load


@dataclass
class Tally:
    by_case: dict[str, Counter] = field(default_factory=dict)  # case -> status (or error kind) -> count
    latencies_s: list[float] = field(default_factory=list)  # every answered request
    ok_latencies_s: list[float] = field(default_factory=list)  # valid images answered 200
    unexpected: Counter = field(default_factory=Counter)  # (case, got) -> count
    first_unexpected: dict[str, str] = field(default_factory=dict)  # case -> response text


def percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    def at(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] * 1e3, 2) if ordered else None
    return {f"p{q}_ms": at(q) for q in (50, 90, 99)} | {"max_ms": round(ordered[-1] * 1e3, 2) if ordered else None}


async def drive(url: str, valid: list[Case], hostile: list[Case], concurrency: int, duration_s: float,
                tally: Tally | None, seed: int = 0) -> None:
    """``concurrency`` connections send requests back to back for ``duration_s``; ``tally=None``
    sends valid images only and records nothing (warm-up)."""
    rng = random.Random(seed)
    deadline = time.perf_counter() + duration_s
    target = url.rstrip("/") + "/v1/classify"

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            pool = hostile if tally is not None and rng.random() < HOSTILE_SHARE else valid
            case = pool[rng.randrange(len(pool))]
            t0 = time.perf_counter()
            text = ""
            try:
                async with session.post(target, data=case.body, headers=case.headers) as r:
                    text = (await r.read())[:300].decode("utf-8", "replace")
                got: int | str = r.status
            except asyncio.TimeoutError:
                got = "timeout"
            except aiohttp.ClientError as exc:
                got = f"transport:{type(exc).__name__}"
            if tally is None:
                continue
            elapsed = time.perf_counter() - t0
            tally.by_case.setdefault(case.name, Counter())[got] += 1
            if isinstance(got, int):
                tally.latencies_s.append(elapsed)
                if got == 200:
                    tally.ok_latencies_s.append(elapsed)
            if got != case.expect:
                tally.unexpected[(case.name, got)] += 1
                if isinstance(got, int):
                    tally.first_unexpected.setdefault(case.name, text)

    # aiohttp as in visionray.serve.client.loadtest: httpx's pool would be the bottleneck
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


# --------------------------------------------------------------------------- the soak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak(port: int, duration_s: float, concurrency: int, max_growth_pct: float, max_growth_mb: float,
         workdir: Path, topology: str = "split") -> dict[str, Any]:
    """Deploy the app at ``/soak`` on the running Serve (port ``port``), soak it, delete it. The report."""
    from ray import serve

    from visionray.serve.app import build_app

    size = 32
    registry, public = register_untrained(workdir, "soak", "convnet", {"depth": 4, "width": 32}, 3, size)
    args = {
        "model": "soak@best", "registry": str(registry), "public_keys": [str(public)],
        "classifier": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}, "topology": topology,
    }
    if topology == "split":
        args["ingress"] = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    serve.run(build_app(args), name=APP_NAME, route_prefix=ROUTE)
    url = f"http://127.0.0.1:{port}{ROUTE}"
    valid, hostile = cases(size)
    try:
        asyncio.run(drive(url, valid, hostile, concurrency, min(WARMUP_S, duration_s), None))
        before = replica_rss()
        tally = Tally()
        start = time.perf_counter()
        asyncio.run(drive(url, valid, hostile, concurrency, duration_s, tally, seed=1))
        elapsed = time.perf_counter() - start
        time.sleep(SETTLE_S)
        after = replica_rss()
        app_status = str(serve.status().applications[APP_NAME].status)
    finally:
        serve.delete(APP_NAME)

    statuses: Counter = Counter()
    for per_case in tally.by_case.values():
        statuses.update(per_case)
    five_xx = sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)
    transport = sum(n for s, n in statuses.items() if isinstance(s, str) and s.startswith("transport:"))
    timeouts = statuses.get("timeout", 0)
    memory = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        grew = None if b is None or a is None else a - b
        too_much = grew is not None and grew > max_growth_mb * 2**20 and grew > b * max_growth_pct / 100
        memory.append({"replica": key, "rss_before_mb": None if b is None else round(b / 2**20, 1),
                       "rss_after_mb": None if a is None else round(a / 2**20, 1),
                       "growth_mb": None if grew is None else round(grew / 2**20, 1), "too_much": too_much})
    replaced = [m["replica"] for m in memory if m["rss_before_mb"] is None or m["rss_after_mb"] is None]
    failures = []
    if five_xx:
        failures.append(f"{five_xx} responses were 5xx")
    if transport:
        failures.append(f"{transport} requests lost their connection")
    if timeouts:
        failures.append(f"{timeouts} requests timed out after {REQUEST_TIMEOUT_S} s")
    if tally.unexpected:
        failures.append("unexpected statuses: " + ", ".join(f"{c} -> {g} x{n}" for (c, g), n in tally.unexpected.items()))
    if not before or replaced:
        failures.append(f"replica processes changed during the soak (before {sorted(before)}, after {sorted(after)})")
    failures += [f"{m['replica']} RSS grew {m['growth_mb']} MiB ({m['rss_before_mb']} -> {m['rss_after_mb']})"
                 for m in memory if m["too_much"]]
    ok = statuses.get(200, 0)
    return {
        "duration_s": round(elapsed, 2), "concurrency": concurrency, "requests": sum(statuses.values()),
        "requests_per_s": round(sum(statuses.values()) / elapsed, 1), "ok_per_s": round(ok / elapsed, 1),
        "by_status": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "by_case": {c: {str(k): v for k, v in n.items()} for c, n in sorted(tally.by_case.items())},
        "five_xx": five_xx, "transport_errors": transport, "timeouts": timeouts,
        "unexpected": [{"case": c, "got": str(g), "count": n, "body": tally.first_unexpected.get(c)}
                       for (c, g), n in tally.unexpected.items()],
        "latency_ok": percentiles(tally.ok_latencies_s), "latency_all": percentiles(tally.latencies_s),
        "memory": memory, "max_growth": {"pct": max_growth_pct, "mb": max_growth_mb},
        "app_status_after": app_status, "failures": failures, "passed": not failures,
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"soak: {report['duration_s']} s at concurrency {report['concurrency']}, "
                    f"{report['requests']} requests ({report['requests_per_s']}/s, {report['ok_per_s']} ok/s)")
    t.add_column("case")
    t.add_column("statuses", justify="right")
    for case, counts in report["by_case"].items():
        t.add_row(case, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    console.print(t)
    m = Table(title="replica RSS (MiB)")
    for col in ("replica", "before", "after", "growth"):
        m.add_column(col, justify="right")
    for r in report["memory"]:
        m.add_row(r["replica"], str(r["rss_before_mb"]), str(r["rss_after_mb"]),
                  f"[red]{r['growth_mb']}[/]" if r["too_much"] else str(r["growth_mb"]))
    console.print(m)
    console.print(f"latency of 200s: {report['latency_ok']}; all answers: {report['latency_all']}")
    console.print(f"5xx: {report['five_xx']}, dropped connections: {report['transport_errors']}, timeouts: {report['timeouts']}")
    if report["failures"]:
        console.print("[red]FAILED[/]: " + "; ".join(report["failures"]))
    else:
        console.print("[green]passed[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load after a warm-up (s)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections sending back to back")
    parser.add_argument("--port", type=int, default=None, help="Serve's HTTP port (default: a free one; "
                        "when Ray already runs Serve, its port)")
    parser.add_argument("--max-growth-pct", type=float, default=25.0, help="RSS growth per replica allowed (%%) ...")
    parser.add_argument("--max-growth-mb", type=float, default=200.0, help="... or this many MiB, whichever is larger")
    parser.add_argument("--topology", choices=("split", "combined"), default="split", help="the app's ServeSpec.topology")
    parser.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 3600 or not 1 <= args.concurrency <= 1024:
        parser.error(f"--duration {args.duration} must be in (0, 3600] s and --concurrency {args.concurrency} in 1..1024")

    import ray
    from ray import serve

    from visionray.checkpoint import versions

    own_ray = not ray.is_initialized()
    if own_ray:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(num_cpus=max(4, os.cpu_count() or 4), include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    port = args.port or free_port()
    load_before = os.getloadavg()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as tmp:
            report = soak(port, args.duration, args.concurrency, args.max_growth_pct, args.max_growth_mb, Path(tmp),
                          args.topology)
    finally:
        if own_ray:
            serve.shutdown()
            ray.shutdown()
    report.update(device=f"CPU x{os.cpu_count()}", load_average={"before": load_before, "after": os.getloadavg()},
                  versions=versions())
    print_report(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
