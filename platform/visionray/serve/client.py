"""Client side: ``Client`` (httpx; retries 503 and 429 after Retry-After) and ``loadtest`` (aiohttp).

Images are sent as they are on disk: one as the request body with its sniffed content type,
several as multipart. Nothing is decoded on the client.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from visionray.serve.sanitize import sniff

RETRY_STATUSES = (429, 503)
MAX_RETRY_WAIT_S = 30.0  # longest Retry-After the client honours (s)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LOADTEST_MAX_DURATION_S = 3600.0  # s
LOADTEST_MAX_CONCURRENCY = 1024  # connections
LOADTEST_MAX_IMAGES = 10_000  # files read into memory from --images


class ServeError(RuntimeError):
    """The server refused: ``status``, its ``code`` and ``message``, and the ``request_id`` to grep logs for."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None):
        super().__init__(f"HTTP {status} {code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


def content_type(data: bytes, name: str = "image") -> str:
    found = sniff(data)
    if found is None:
        raise ValueError(f"{name}: not a PNG, JPEG or WebP file (first bytes {data[:8]!r})")
    return found


def _error_of(response: httpx.Response) -> ServeError:
    try:
        body = response.json()
        return ServeError(response.status_code, body.get("code", "error"), body.get("message", ""), body.get("request_id"))
    except ValueError:
        return ServeError(response.status_code, "error", response.text[:200], response.headers.get("x-request-id"))


def _retry_wait(response: httpx.Response, attempt: int) -> float:
    text = response.headers.get("retry-after", "")
    wait = float(text) if text.isdigit() else 0.5 * 2**attempt
    return min(wait, MAX_RETRY_WAIT_S)


class Client:
    """``Client(url).classify([path_or_bytes, ...], top_k=5)`` -> the JSON response as a dict."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 3):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.retries = retries

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            response = self.http.request(method, path, **kw)
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                time.sleep(_retry_wait(response, attempt))
                continue
            if response.status_code >= 400:
                raise _error_of(response)
            return response.json()
        raise AssertionError("unreachable: the last attempt returns or raises")

    def classify(self, images: list[str | Path | bytes], top_k: int | None = None) -> dict[str, Any]:
        blobs = [(Path(im).name, Path(im).read_bytes()) if not isinstance(im, bytes) else (f"image{i}", im)
                 for i, im in enumerate(images)]
        params = {"top_k": top_k} if top_k else {}
        if len(blobs) == 1:
            name, data = blobs[0]
            return self._send("POST", "/v1/classify", content=data, params=params,
                              headers={"Content-Type": content_type(data, name)})
        files = [("images", (name, data, content_type(data, name))) for name, data in blobs]
        return self._send("POST", "/v1/classify", files=files, params=params)

    def models(self) -> dict[str, Any]:
        return self._send("GET", "/v1/models")

    def rollout(self) -> dict[str, Any]:
        return self._send("GET", "/v1/rollout")


# --------------------------------------------------------------------------- load test


@dataclass
class LoadReport:
    duration_s: float
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)  # of 200 answers
    statuses: Counter = field(default_factory=Counter)  # status code (or error kind) -> count

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    def to_json(self) -> dict[str, Any]:
        ms = {f"p{q}_ms": (None if self.percentile(q) is None else round(self.percentile(q) * 1000, 2)) for q in (50, 95, 99)}
        return {
            "requests": self.requests, "duration_s": round(self.duration_s, 3), "concurrency": self.concurrency,
            "requests_per_s": round(self.requests / self.duration_s, 2) if self.duration_s else 0.0,
            "ok_per_s": round(len(self.latencies_s) / self.duration_s, 2) if self.duration_s else 0.0,
            **ms, "by_status": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
        }


def read_images(directory: str | Path) -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) of the PNG/JPEG/WebP files under ``directory`` (at most
    LOADTEST_MAX_IMAGES, sorted)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--images {directory}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:LOADTEST_MAX_IMAGES]
    out = []
    for p in files:
        data = p.read_bytes()
        if sniff(data) in ("image/png", "image/jpeg", "image/webp"):
            out.append((p.name, data, sniff(data)))
    if not out:
        raise ValueError(f"--images {directory}: no PNG, JPEG or WebP files")
    return out


async def loadtest(url: str, images: list[tuple[str, bytes, str]], concurrency: int, duration_s: float,
                   max_requests: int | None = None, api_key: str | None = None, timeout_s: float = 30.0,
                   seed: int = 0) -> LoadReport:
    """``concurrency`` clients post random images back to back until ``duration_s`` has passed or
    ``max_requests`` were sent. 503s are counted, not retried (the point is to see them)."""
    if not 1 <= concurrency <= LOADTEST_MAX_CONCURRENCY:
        raise ValueError(f"concurrency {concurrency}: allowed 1..{LOADTEST_MAX_CONCURRENCY}")
    if not 0 < duration_s <= LOADTEST_MAX_DURATION_S:
        raise ValueError(f"duration {duration_s}: allowed (0, {LOADTEST_MAX_DURATION_S}] s")
    report = LoadReport(duration_s=0.0, concurrency=concurrency)
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = url.rstrip("/") + "/v1/classify"
    start = time.perf_counter()
    deadline = start + duration_s
    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.perf_counter() < deadline and (max_requests is None or sent < max_requests):
            sent += 1
            _, data, ctype = images[rng.randrange(len(images))]
            t0 = time.perf_counter()
            try:
                async with session.post(target, data=data, headers={"Content-Type": ctype}) as r:
                    await r.read()
                report.statuses[r.status] += 1
                if r.status == 200:
                    report.latencies_s.append(time.perf_counter() - t0)
            except asyncio.TimeoutError:  # aiohttp's ServerTimeoutError is one too
                report.statuses["timeout"] += 1
            except aiohttp.ClientError as exc:
                report.statuses[type(exc).__name__] += 1

    # aiohttp, not httpx: one httpx AsyncClient tops out near 270 requests/s at concurrency 32
    # on 2 cores, this loop about 10,000 against the same trivial server (benchmarks/loadgen.py);
    # the load generator was the bottleneck of every serving benchmark.
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    report.duration_s = time.perf_counter() - start
    return report
