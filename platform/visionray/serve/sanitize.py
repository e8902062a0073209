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
import hmac
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Awaitable, Callable

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


# --------------------------------------------------------------------------- ASGI middleware


_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._-]{1,128}$")


def _request_id(scope: dict) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id" and _REQUEST_ID.match(value):
            return value.decode()
    return uuid.uuid4().hex


class SanitizerMiddleware:
    """Everything that can be decided before the route runs, on the raw ASGI messages.

    ``on_reject(code)`` is called for every refusal (the Serve app counts them in Prometheus).
    The request id is the request's ``X-Request-ID`` when it is a sane token (Serve's proxy sets one
    on every request), else a new one; it is in ``scope["state"]["request_id"]`` and, with
    ``echo_request_id`` (off behind Serve's proxy, which echoes it itself), in the response headers.
    """

    def __init__(self, app: Callable, spec: SanitizerSpec, keys: list[bytes], rate: RateLimitSpec,
                 on_reject: Callable[[str], None] = lambda code: None, echo_request_id: bool = True):
        """``keys``: accepted API keys (``load_api_keys``); empty: no authentication."""
        self.app = app
        self.echo_request_id = echo_request_id
        self.spec = spec
        self.keys = keys
        self.limiter = RateLimiter(rate)
        self.on_reject = on_reject

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

        try:
            await self._admit(scope)
            body = await self._read_body(scope, receive)
        except Rejection as rej:
            self.on_reject(rej.code)
            await self._reject(send_with_id, rej, request_id)
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

        await self.app(scope, replay, send_with_id)

    async def _reject(self, send: Callable, rej: Rejection, request_id: str) -> None:
        body = error_body(rej.code, rej.message, request_id)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in rej.headers.items()]
        if rej.status in (408, 413):  # we stop reading: tell the client the connection ends here
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": rej.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _client(self, scope: dict, headers: dict[bytes, bytes]) -> str:
        key = self._presented_key(headers)
        if key:
            return "key:" + key.decode(errors="replace")
        client = scope.get("client")
        return f"addr:{client[0]}" if client else "addr:unknown"

    @staticmethod
    def _presented_key(headers: dict[bytes, bytes]) -> bytes | None:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        return headers.get(b"x-api-key")

    async def _admit(self, scope: dict) -> None:
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            k = k.lower()
            if k in headers and k in (b"content-length", b"content-type", b"authorization", b"x-api-key"):
                raise Rejection(400, "duplicate_header", f"header {k.decode()} is sent twice")
            headers[k] = v
        open_path = scope.get("path", "") in OPEN_PATHS
        if self.keys and not open_path:
            key = self._presented_key(headers)
            if key is None or not any(hmac.compare_digest(key, k) for k in self.keys):
                raise Rejection(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                                {"WWW-Authenticate": "Bearer"})
        if not open_path:
            wait = self.limiter.acquire(self._client(scope, headers))
            if wait > 0:
                raise Rejection(429, "rate_limited", f"too many requests; retry in {wait:.2f} s",
                                {"Retry-After": str(max(1, int(wait + 0.999)))})
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            raise Rejection(415, "encoded_body", f"Content-Encoding {encoding} is refused; send the image bytes as they are")
        length = headers.get(b"content-length")
        if length is not None:
            text = length.decode("latin-1").strip()
            if not text.isdigit():
                raise Rejection(400, "bad_content_length", f"Content-Length {text!r} is not a byte count")
            if int(text) > self.spec.max_body_bytes:
                raise Rejection(413, "body_too_large", f"body of {int(text)} bytes is above the {self.spec.max_body_bytes}-byte limit")

    async def _read_body(self, scope: dict, receive: Callable[[], Awaitable[dict]]) -> bytes | None:
        """The whole body, counted while it streams: 413 the moment the cap is crossed (the rest
        is never read), 408 when it takes longer than the budget."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.body_timeout_s
        chunks, total = [], 0
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise Rejection(408, "body_timeout", f"the body did not arrive within {self.spec.body_timeout_s} s") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.spec.max_body_bytes:
                raise Rejection(413, "body_too_large", f"body is above the {self.spec.max_body_bytes}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
