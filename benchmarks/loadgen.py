"""The load generator's own ceiling: requests/s that ``visionray.serve.client.loadtest`` (aiohttp)
and an httpx ``AsyncClient`` with a shared pool (what loadtest used before) get from a trivial
Starlette server on loopback, side by side in one run, at concurrency 1 and 32.

A serving benchmark can only measure a server that is slower than its client; this says how fast
the client is on this machine.

    python benchmarks/loadgen.py [--duration 5] [--out benchmarks/results/loadgen.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import free_port  # noqa: E402  (benchmarks/soak.py)

from visionray.checkpoint import versions
from visionray.serve.client import loadtest  # noqa: E402

HERE = Path(__file__).resolve().parent
BODY = b"\x89PNG\r\n\x1a\n" + bytes(2400)  # about the size of a 32x32 PNG
SERVER = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def classify(request):
    await request.body()
    return JSONResponse({"results": []})

app = Starlette(routes=[Route("/v1/classify", classify, methods=["POST"])])
"""


async def httpx_pool(url: str, concurrency: int, duration_s: float) -> dict[str, float]:
    """The old loadtest loop: one AsyncClient, one pool of ``concurrency`` connections."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await client.post("/v1/classify", content=BODY, headers={"Content-Type": "image/png"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1e3}


async def aiohttp_loadtest(url: str, concurrency: int, duration_s: float) -> dict[str, float]:
    report = await loadtest(url, [("x.png", BODY, "image/png")], concurrency, duration_s)
    if set(report.statuses) != {200}:
        raise RuntimeError(f"trivial server answered {dict(report.statuses)}")
    return {"requests_per_s": len(report.latencies_s) / report.duration_s, "p50_ms": report.percentile(50) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--out", default=str(HERE / "results" / "loadgen.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER + f"\nimport uvicorn; uvicorn.run(app, host='127.0.0.1', port={port}, log_level='error')"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # up within 10 s
            try:
                httpx.post(url + "/v1/classify", content=BODY).raise_for_status()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        rows = []
        for concurrency in (1, 32):
            old = asyncio.run(httpx_pool(url, concurrency, args.duration))
            new = asyncio.run(aiohttp_loadtest(url, concurrency, args.duration))
            rows.append({"concurrency": concurrency, "httpx_pool": old, "loadtest_aiohttp": new,
                         "ratio": new["requests_per_s"] / old["requests_per_s"]})
    finally:
        server.terminate()
        server.wait()

    table = Table(title=f"load generator alone, trivial server on loopback, {args.duration:g} s each, CPU x{os.cpu_count()}")
    for col in ("concurrency", "httpx pool req/s", "p50 ms", "loadtest (aiohttp) req/s", "p50 ms", "aiohttp/httpx"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["concurrency"]), f"{r['httpx_pool']['requests_per_s']:,.0f}", f"{r['httpx_pool']['p50_ms']:.2f}",
                      f"{r['loadtest_aiohttp']['requests_per_s']:,.0f}", f"{r['loadtest_aiohttp']['p50_ms']:.2f}", f"{r['ratio']:.1f}")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": f"CPU x{os.cpu_count()}", "versions": versions() | {
        "httpx": httpx.__version__, "aiohttp": aiohttp.__version__}, "duration_s": args.duration, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
