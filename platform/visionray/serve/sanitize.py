"""Untrusted bytes in, a model-ready uint8 array out, or a ``Rejection`` with an HTTP status.

Two layers, both usable without Ray:

- ``SanitizerMiddleware`` (pure ASGI, so it sees the body as it streams): request id, API keys
  (401), a per-client token bucket (429), refusal of compressed bodies (415), the body cap while it
  streams in (413 as soon as it is crossed, whatever Content-Length claimed), a time budget on
  receiving the body (408). The body it accepted is replayed to the app.
- ``check_type``: content-type allowlist and magic bytes (415). Then ``visionray.serve.structure``
  walks the container (pure Python, bounded) and ``visionray.serve.pool`` decodes in sandboxed
  worker processes (``visionray.serve.decode``): no decoder runs in the replica's own process.

Nothing here fetches URLs: an image only ever arrives as the request body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Awaitable, Callable, Iterator

from visionray.serve.config import AuthSpec, RateLimitSpec, SanitizerSpec
from visionray.serve.errors import Rejection, error_body

logger = logging.getLogger(__name__)

# Exempt from API keys and rate limits: probes and the API description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


# --------------------------------------------------------------------------- content type + magic


def sniff(data: bytes) -> str | None:
    """The media type the leading bytes announce (None when unknown)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[:2] == b"BM":
        return "image/bmp"
    if data[:4] == b"\x00\x00\x01\x00":
        return "image/x-icon"
    if data[:4] == b"8BPS":
        return "image/vnd.adobe.photoshop"
    if data[4:12] in (b"ftypavif", b"ftypavis", b"ftypheic", b"ftypmif1"):
        return "image/avif"
    return None


def media_type(content_type: str | None) -> str:
    """``image/PNG; charset=x`` -> ``image/png``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_type(content_type: str | None, data: bytes, spec: SanitizerSpec) -> str:
    """The declared media type when it is allowlisted and the bytes start like it; else 415/422."""
    declared = media_type(content_type)
    allowed = ", ".join(spec.allowed_types)
    if declared not in spec.allowed_types:
        shown = declared or "(none)"
        raise Rejection(415, "unsupported_media_type", f"Content-Type {shown} is not accepted; send one of {allowed}")
    if not data:
        raise Rejection(422, "empty_image", f"the {declared} image is empty (0 bytes)")
    found = sniff(data)
    if found != declared:
        what = f"bytes of {found}" if found else "bytes that are no known image format"
        raise Rejection(415, "content_mismatch", f"declared {declared} but the body starts with {what}")
    return declared


# --------------------------------------------------------------------------- keys and rate limits


def load_api_keys(spec: AuthSpec) -> list[bytes]:
    """The accepted keys (empty when auth is off). A configured but empty source is an error."""
    keys: list[str] = []
    if spec.api_keys_env:
        value = os.environ.get(spec.api_keys_env, "")
        keys += [k.strip() for k in value.split(",") if k.strip()]
        if not keys:
            raise ValueError(f"auth.api_keys_env={spec.api_keys_env!r}: the variable is unset or empty in the ingress replica")
    if spec.api_keys_file:
        try:
            lines = Path(spec.api_keys_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"auth.api_keys_file={spec.api_keys_file!r}: {exc.strerror or exc}") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"auth.api_keys_file={spec.api_keys_file!r} holds no keys")
        keys += found
    return [k.encode() for k in keys]


class RateLimiter:
    """Token buckets per client, least recently seen clients forgotten beyond ``max_clients``."""

    def __init__(self, spec: RateLimitSpec, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, last time)

    def peek(self, client: str) -> float:
        """The seconds until ``client`` could pass, without taking a token (0: now)."""
        rate = self.spec.requests_per_s
        if rate is None or client not in self.buckets:
            return 0.0
        tokens, last = self.buckets[client]
        tokens = min(float(self.spec.burst), tokens + (self.clock() - last) * rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate

    def acquire(self, client: str) -> float:
        """0 when the request may pass, else the seconds until it could."""
        rate = self.spec.requests_per_s
        if rate is None:
            return 0.0
        now = self.clock()
        tokens, last = self.buckets.pop(client, (float(self.spec.burst), now))
        tokens = min(float(self.spec.burst), tokens + (now - last) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self.buckets[client] = (tokens, now)
        while len(self.buckets) > self.spec.max_clients:
            self.buckets.popitem(last=False)
        return wait


class Gate:
    """A replica's door, shared by its HTTP and gRPC ingress: the admission limit (503
    ``overloaded``), API keys (401; failed keys throttled per address, 429) and the per-client
    rate limit (429). One per replica, so every protocol counts against the same limits."""

    def __init__(self, keys: list[bytes], rate: RateLimitSpec, admission_limit: int | None = None,
                 retry_after_s: int = 1):
        """``keys``: accepted API keys (``load_api_keys``); empty: no authentication.
        ``admission_limit``: requests (probes and docs aside) the replica holds at once."""
        self.keys = keys
        self.limiter = RateLimiter(rate)
        self.failed_auth = RateLimiter(RateLimitSpec(requests_per_s=rate.failed_auth_per_s, burst=rate.failed_auth_burst,
                                                     max_clients=rate.max_clients))
        self.admission_limit = admission_limit
        self.retry_after = {"Retry-After": str(max(1, retry_after_s))}
        self.in_flight = 0  # admitted requests the replica holds (its event loop only)

    def enter(self) -> None:
        """Take one of the replica's admission slots (``leave`` gives it back); 503 ``overloaded``
        when none is free."""
        if self.admission_limit is not None and self.in_flight >= self.admission_limit:
            raise Rejection(503, "overloaded", f"this replica holds {self.admission_limit} requests already "
                            f"(max_ongoing_requests + max_queued_requests); retry in {self.retry_after['Retry-After']} s",
                            self.retry_after)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """An admission slot held for the block."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @staticmethod
    def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        return headers.get(b"x-api-key")

    def check_client(self, headers: dict[bytes, bytes], address: str) -> None:
        """The API key (when auth is on) and the client's rate limit; raises ``Rejection``."""
        address = "addr:" + address
        client = address  # with auth off every made-up key would be a bucket of its own: the address decides
        if self.keys:
            wait = self.failed_auth.peek(address)
            if wait > 0:  # guessing keys: no key from this address is even checked until it waits
                raise Rejection(429, "auth_throttled", f"too many failed API keys from this address; retry in {wait:.2f} s",
                                {"Retry-After": str(max(1, int(wait + 0.999)))})
            key = self.presented_key(headers)
            if key is None or not any(hmac.compare_digest(key, k) for k in self.keys):
                self.failed_auth.acquire(address)
                raise Rejection(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                                {"WWW-Authenticate": "Bearer"})
            client = "key:" + hashlib.sha256(key).hexdigest()[:16]
        wait = self.limiter.acquire(client)
        if wait > 0:
            raise Rejection(429, "rate_limited", f"too many requests; retry in {wait:.2f} s",
                            {"Retry-After": str(max(1, int(wait + 0.999)))})


# --------------------------------------------------------------------------- ASGI middleware


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")  # always fullmatch: "$" would let a trailing newline in


def _request_id(scope: dict) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value.decode()
    return uuid.uuid4().hex


class SanitizerMiddleware:
    """Everything that can be decided before the route runs, on the raw ASGI messages.

    ``on_reject(code)`` is called for every refusal (the Serve app counts them in Prometheus).
    The request id is the request's ``X-Request-ID`` when it is a sane token (Serve's proxy sets one
    on every request), else a new one; it is in ``scope["state"]["request_id"]`` and, with
    ``echo_request_id`` (off behind Serve's proxy, which echoes it itself), in the response headers.
    """

    def __init__(self, app: Callable, spec: SanitizerSpec, gate: Gate,
                 on_reject: Callable[[str], None] = lambda code: None, echo_request_id: bool = True):
        """``gate``: the replica's admission limit, API keys and rate limits."""
        self.app = app
        self.echo_request_id = echo_request_id
        self.spec = spec
        self.gate = gate
        self.on_reject = on_reject
        self.unfinished: dict[str, int] = {}  # client address -> bodies still arriving (this replica's event loop)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start" and self.echo_request_id:
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        gated = app_path(scope) not in OPEN_PATHS  # probes and docs are never held back by load
        if gated:
            try:
                self.gate.enter()
            except Rejection as rej:
                self.on_reject(rej.code)
                await self._reject(send_with_id, rej, request_id)
                return
        try:
            await self._admitted(scope, receive, send_with_id, request_id)
        finally:
            if gated:
                self.gate.leave()

    async def _admitted(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable, request_id: str) -> None:
        try:
            await self._admit(scope)
            body = await self._read_body(receive, _address(scope))
        except Rejection as rej:
            self.on_reject(rej.code)
            await self._reject(send, rej, request_id)
            return
        if body is None:  # the client went away
            return
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Callable, rej: Rejection, request_id: str) -> None:
        body = error_body(rej.code, rej.message, request_id)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in rej.headers.items()]
        if rej.status in (408, 413):  # we stop reading: tell the client the connection ends here
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": rej.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _admit(self, scope: dict) -> None:
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            k = k.lower()
            if k in headers and k in (b"content-length", b"content-type", b"authorization", b"x-api-key"):
                raise Rejection(400, "duplicate_header", f"header {k.decode()} is sent twice")
            headers[k] = v
        if app_path(scope) not in OPEN_PATHS:
            self.gate.check_client(headers, _address(scope))
        self._check_encoding_and_length(headers)

    def _check_encoding_and_length(self, headers: dict[bytes, bytes]) -> None:
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            raise Rejection(415, "encoded_body", f"Content-Encoding {encoding} is refused; send the image bytes as they are")
        length = headers.get(b"content-length")
        if length is not None:
            text = length.decode("latin-1").strip()
            if not text.isdigit():
                raise Rejection(400, "bad_content_length", f"Content-Length {text[:64]!r} is not a byte count")
            if int(text) > self.spec.max_body_bytes:
                raise Rejection(413, "body_too_large", f"body of {int(text)} bytes is above the {self.spec.max_body_bytes}-byte limit")

    async def _read_body(self, receive: Callable[[], Awaitable[dict]], address: str) -> bytes | None:
        """The whole body, counted while it streams: 413 the moment the cap is crossed (the rest
        is never read); 408 when it takes longer than ``body_timeout_s`` or, after
        ``body_grace_s``, averages less than ``min_body_bytes_per_s``. A request that starts while
        ``max_unfinished_bodies`` bodies are still arriving (or ``max_unfinished_bodies_per_client``
        from its address) gets 503 unless the rest of its body follows its first part within
        ``crowded_body_s``: a valid body is with the server at once (however long the replica takes
        to read it), so slow clients hold at most those caps of the replica's slots, and only for
        as long as they keep the minimum rate."""
        spec, loop = self.spec, asyncio.get_running_loop()
        start = loop.time()
        timeout_at, crowded_at = start + spec.body_timeout_s, float("inf")
        mine = self.unfinished.get(address, 0)
        crowded = sum(self.unfinished.values()) >= spec.max_unfinished_bodies or mine >= spec.max_unfinished_bodies_per_client
        self.unfinished[address] = mine + 1
        chunks, total = [], 0
        try:
            while True:
                slow_at = start + max(spec.body_grace_s, total / spec.min_body_bytes_per_s)
                deadline = min(timeout_at, slow_at, crowded_at)
                try:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    message = await asyncio.wait_for(receive(), remaining)
                except asyncio.TimeoutError:
                    raise self._too_slow(deadline, timeout_at, crowded_at) from None
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > spec.max_body_bytes:
                    raise Rejection(413, "body_too_large", f"body is above the {spec.max_body_bytes}-byte limit")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
                if crowded and crowded_at == float("inf"):  # others' uploads fill the caps: the rest must be quick
                    crowded_at = loop.time() + spec.crowded_body_s
        finally:
            left = self.unfinished[address] - 1
            if left:
                self.unfinished[address] = left
            else:
                del self.unfinished[address]

    def _too_slow(self, deadline: float, timeout_at: float, crowded_at: float) -> Rejection:
        spec = self.spec
        if deadline == crowded_at:
            return Rejection(503, "uploads_busy", f"{spec.max_unfinished_bodies} uploads are arriving already (or "
                             f"{spec.max_unfinished_bodies_per_client} from this address) and this body did not arrive "
                             f"within {spec.crowded_body_s} s; retry", {"Retry-After": "1"})
        if deadline == timeout_at:
            return Rejection(408, "body_timeout", f"the body did not arrive within {spec.body_timeout_s} s")
        return Rejection(408, "body_too_slow", f"the body arrived slower than {spec.min_body_bytes_per_s} bytes/s "
                         f"(after the first {spec.body_grace_s} s)")


def _address(scope: dict) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def app_path(scope: dict) -> str:
    """The request's path inside the app: without the ``root_path`` Serve's ``route_prefix`` sets."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):] or "/"
    return path
