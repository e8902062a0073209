"""The sanitizer and the HTTP API in process (no Ray): real FastAPI app, real model, real HTTP
semantics through httpx's ASGI transport. ``tests/serve/test_app.py`` sends the same table to real Serve."""

from __future__ import annotations

import asyncio
import json
import gzip
import io
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionray.checkpoint import load_model
from visionray.serve.api import LocalBackend, make_api
from visionray.serve.config import (RateLimitSpec, SanitizerSpec, ServeSpec, cpus_at_full_scale, load_serve_spec,
                                    read_serve_config)
from visionray.serve.predictor import Predictor
from visionray.serve.decode import configure_pillow, decode_image, to_model_mode
from visionray.serve.errors import Rejection
from visionray.serve.sanitize import RateLimiter, check_type, sniff
from visionray.serve.structure import Header
from visionray.specs import EvalPreset
from visionray.spec_io import SpecError
from tests.helpers import REPO, make_checkpoint
from typer.testing import CliRunner
from visionray.cli.app import app as cli_app

LIMITS = SanitizerSpec()


# --------------------------------------------------------------------------- image builders


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int = 20, h: int = 12, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A structurally valid PNG whose header claims width x height; its IDAT holds one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(noise(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def zip_bytes() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.html", "<script>alert(1)</script>")
    return buf.getvalue()


def animated_png() -> bytes:
    frames = [Image.new("RGB", (10, 10), c) for c in ("red", "green", "blue")]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)


def progressive_jpeg(width: int = 20, height: int = 12, scan_copies: int = 1) -> bytes:
    """A progressive JPEG (Pillow writes 10 scans), its scans repeated ``scan_copies`` times and
    its frame header patched to declare ``width`` x ``height`` when they differ from 20x12."""
    data = bytearray(encode(noise(), "JPEG", progressive=True))
    first_scan = data.index(b"\xff\xda")
    data = data[:first_scan] + data[first_scan:-2] * scan_copies + data[-2:]
    sof = data.index(b"\xff\xc2")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_with_chunks(count: int) -> bytes:
    """A valid PNG with ``count`` empty ancillary chunks before its IEND."""
    data = encode(noise(), "PNG")
    return data[:-12] + png_chunk(b"tEXt", b"") * count + data[-12:]


PNG = encode(noise(), "PNG")
JPEG = encode(noise(), "JPEG", quality=90)
WEBP = encode(noise(), "WEBP", quality=90)
ICO = encode(noise(16, 16), "ICO")

# (id, body, headers, expected status, expected code). Every one must leave the server serving.
HOSTILE = [
    ("empty body", b"", {"content-type": "image/png"}, 422, "empty_image"),
    ("one byte", b"\x89", {"content-type": "image/png"}, 415, "content_mismatch"),
    ("no content type", PNG, {"content-type": ""}, 415, "unsupported_media_type"),
    ("wrong content type", PNG, {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ("json content type", b'{"url": "http://169.254.169.254/"}', {"content-type": "application/json"}, 415, "unsupported_media_type"),
    ("text as image/png", b"hello, I am not a picture", {"content-type": "image/png"}, 415, "content_mismatch"),
    ("png declared jpeg", PNG, {"content-type": "image/jpeg"}, 415, "content_mismatch"),
    ("truncated png", PNG[: len(PNG) // 2], {"content-type": "image/png"}, 422, "truncated_image"),
    ("png without IEND", PNG[:-12], {"content-type": "image/png"}, 422, "truncated_image"),
    ("truncated jpeg", JPEG[: len(JPEG) // 2], {"content-type": "image/jpeg"}, 422, "truncated_image"),
    ("jpeg header only", JPEG[:200], {"content-type": "image/jpeg"}, 422, None),
    ("truncated webp", WEBP[: len(WEBP) // 2], {"content-type": "image/webp"}, 422, "truncated_image"),
    ("jpeg cut short but ended with EOI", JPEG[: len(JPEG) * 2 // 3] + b"\xff\xd9", {"content-type": "image/jpeg"}, 422, "truncated_image"),
    ("polyglot jpeg+zip", JPEG + zip_bytes(), {"content-type": "image/jpeg"}, 422, "trailing_data"),
    ("jpeg+html after EOI", JPEG + b"<script>alert(1)</script>", {"content-type": "image/jpeg"}, 422, "trailing_data"),
    ("progressive jpeg with 100 scans", progressive_jpeg(scan_copies=10), {"content-type": "image/jpeg"}, 413, "too_many_scans"),
    ("progressive jpeg 4000x4000", progressive_jpeg(4000, 4000), {"content-type": "image/jpeg"}, 413, "image_too_large"),
    ("jpeg 4096x4096 from a few hundred bytes", jpeg_declaring(4096, 4096), {"content-type": "image/jpeg"}, 422, None),
    ("png of 10000 empty chunks", png_with_chunks(10_000), {"content-type": "image/png"}, 413, "too_many_chunks"),
    ("jpeg arithmetic coding", JPEG.replace(b"\xff\xc0", b"\xff\xc9", 1), {"content-type": "image/jpeg"}, 415, "unsupported_jpeg"),
    ("jpeg without EOI", JPEG[:-2], {"content-type": "image/jpeg"}, 422, "truncated_image"),
    ("png 20000x20000 bomb", png_declaring(20000, 20000), {"content-type": "image/png"}, 413, "image_too_large"),
    ("png 1x5000000 strip", png_declaring(1, 5_000_000), {"content-type": "image/png"}, 413, "image_too_large"),
    ("jpeg 65500x65500", jpeg_declaring(65500, 65500), {"content-type": "image/jpeg"}, 413, "image_too_large"),
    ("png 0x0", png_declaring(0, 0), {"content-type": "image/png"}, 422, None),
    ("gif", encode(noise(), "GIF"), {"content-type": "image/gif"}, 415, "unsupported_media_type"),
    ("gif as png", encode(noise(), "GIF"), {"content-type": "image/png"}, 415, "content_mismatch"),
    ("tiff", encode(noise(), "TIFF"), {"content-type": "image/tiff"}, 415, "unsupported_media_type"),
    ("tiff as png", encode(noise(), "TIFF"), {"content-type": "image/png"}, 415, "content_mismatch"),
    ("bmp as png", encode(noise(), "BMP"), {"content-type": "image/png"}, 415, "content_mismatch"),
    ("ico as png", ICO, {"content-type": "image/png"}, 415, "content_mismatch"),
    ("psd as png", b"8BPS\x00\x01" + b"\x00" * 64, {"content-type": "image/png"}, 415, "content_mismatch"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', {"content-type": "image/svg+xml"}, 415, "unsupported_media_type"),
    ("polyglot png+zip", PNG + zip_bytes(), {"content-type": "image/png"}, 422, "trailing_data"),
    ("polyglot gif/js as png", b"GIF89a/*\x00\x00*/=alert(1);", {"content-type": "image/png"}, 415, "content_mismatch"),
    ("polyglot webp+zip", WEBP + zip_bytes(), {"content-type": "image/webp"}, 422, "trailing_data"),
    ("gzip bomb", gzip.compress(b"\x00" * (16 * 2**20)), {"content-type": "image/png", "content-encoding": "gzip"}, 415, "encoded_body"),
    ("body above cap", b"\x89PNG\r\n\x1a\n" + b"\x00" * (LIMITS.max_body_bytes + 1), {"content-type": "image/png"}, 413, "body_too_large"),
    ("broken multipart boundary", b"--nope\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n" + PNG,
     {"content-type": "multipart/form-data; boundary=other"}, 400, "bad_multipart"),
    ("multipart without boundary", PNG, {"content-type": "multipart/form-data"}, 400, "bad_multipart"),
    ("bad content-length", PNG, {"content-type": "image/png", "content-length": "abc"}, 400, "bad_content_length"),
]


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "vrboundary") -> tuple[bytes, dict[str, str]]:
    out = b""
    for filename, ctype, data in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"".encode()
        out += f"; filename=\"{filename}\"\r\n".encode() if filename else b"\r\n"
        out += f"Content-Type: {ctype}\r\n".encode() if ctype else b""
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


MULTI_OK = multipart([("a.png", "image/png", PNG), ("b.jpg", "image/jpeg", JPEG), ("c.webp", "image/webp", WEBP)])
MULTIPART = [
    ("too many images", multipart([(f"{i}.png", "image/png", PNG) for i in range(LIMITS.max_images + 1)]), 413, "too_many_images"),
    ("text field", multipart([(None, None, b"hello")]), 422, "unexpected_field"),
    ("part without type", multipart([("a.png", None, PNG)]), 415, "unsupported_media_type"),
    ("one bad part", multipart([("a.png", "image/png", PNG), ("b.png", "image/png", PNG[:40])]), 422, "truncated_image"),
    ("pixel budget across parts", multipart([(f"{i}.png", "image/png", png_declaring(4096, 4096)) for i in range(3)]), 413, "too_many_pixels"),
    ("oversized multipart", multipart([(f"{i}.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 2**20) for i in range(9)]), 413, "body_too_large"),
]


# --------------------------------------------------------------------------- a real (untrained) model


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "rgb"
    preset = EvalPreset(image_size=16, channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    return make_checkpoint(d, preset=preset, classes=[f"c{i}" for i in range(10)], metrics={"val_acc": 0.1})[0]


def make_app(checkpoint: Path, **spec_fields):
    model, meta = load_model(checkpoint)
    spec = load_serve_spec({"checkpoint": str(checkpoint), "allow_unsigned": True, **spec_fields})
    counts: Counter[str] = Counter()
    app = make_api(spec, LocalBackend(Predictor(model, meta, "rgb", None, torch.device("cpu"))),
                   on_reject=lambda code: counts.update([code]))
    return app, counts


async def _post(app, body: bytes, headers: dict[str, str], path: str = "/v1/classify", client: str = "10.0.0.1",
                root_path: str = "", method: str = "POST") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client, 1234), root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://vr") as c:
        return await c.request(method, path, content=body, headers=headers)


def post(app, body: bytes, headers: dict[str, str], path: str = "/v1/classify", **kw) -> httpx.Response:
    return asyncio.run(_post(app, body, headers, path, **kw))


def assert_error(r: httpx.Response, status: int, code: str | None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "request_id"}, body
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in body["message"]
    assert " object at 0x" not in body["message"], body  # no repr of our own objects
    if code is not None:
        assert body["code"] == code, body


@pytest.fixture(scope="module")
def app_and_counts(rgb_checkpoint):
    return make_app(rgb_checkpoint)


@pytest.mark.parametrize("name,body,headers,status,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_inputs_get_their_status(app_and_counts, name, body, headers, status, code):
    app, counts = app_and_counts
    before = dict(counts)
    r = post(app, body, headers)
    assert_error(r, status, code)
    assert counts.get(r.json()["code"], 0) == before.get(r.json()["code"], 0) + 1  # counted by reason
    assert post(app, PNG, {"content-type": "image/png"}).status_code == 200  # still serving


@pytest.mark.parametrize("name,payload,status,code", MULTIPART, ids=[m[0] for m in MULTIPART])
def test_hostile_multipart(app_and_counts, name, payload, status, code):
    body, headers = payload
    assert_error(post(app_and_counts[0], body, headers), status, code)


@pytest.mark.parametrize("body,ctype", [(PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp"),
                                        (PNG, "IMAGE/PNG; charset=binary"), (animated_png(), "image/png")])
def test_allowed_images_classify(app_and_counts, body, ctype):
    r = post(app_and_counts[0], body, {"content-type": ctype}, "/v1/classify?top_k=3")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == {"name": "rgb", "version": None}
    [res] = out["results"]
    probs = [x["probability"] for x in res["top_k"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert out["request_id"] == r.headers["x-request-id"]


def test_multipart_classifies_each_image_like_single_requests(app_and_counts):
    app = app_and_counts[0]
    body, headers = MULTI_OK
    r = post(app, body, headers)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "b.jpg", "c.webp"]
    for res, (data, ctype) in zip(results, [(PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp")]):
        single = post(app, data, {"content-type": ctype}).json()["results"][0]
        assert res["top_k"] == single["top_k"]


async def _raw_asgi(app, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request straight into the ASGI app, header bytes as given (httpx refuses CR and LF)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/classify", "raw_path": b"/v1/classify", "root_path": "", "query_string": b"",
             "headers": headers, "client": ("10.0.0.9", 1234), "server": ("vr", 80)}
    sent = [{"type": "http.request", "body": b"", "more_body": False}]
    out: list[dict] = []

    async def receive() -> dict:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        out.append(message)

    await app(scope, receive, send)
    start = next(m for m in out if m["type"] == "http.response.start")
    return start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")


@pytest.mark.parametrize("sent,kept", [
    (b"abc-123.x_Y", True), (b"a" * 128, True), (b"a" * 129, False), (b"bad id", False),
    (b"abc\r\nX-Evil: 1", False), (b"abc\n", False), (b"abc\r", False), (b"abc\nX-Evil: 1", False), (b"\xff", False),
])
def test_request_id_adopted_only_when_sane(app_and_counts, sent, kept):
    status, headers, body = asyncio.run(_raw_asgi(app_and_counts[0], [(b"content-type", b"image/png"),
                                                                       (b"x-request-id", sent)]))
    echoed = [v for k, v in headers if k.lower() == b"x-request-id"]
    assert status == 422 and len(echoed) == 1 and json.loads(body)["request_id"] == echoed[0].decode()
    assert (echoed[0] == sent) is kept
    assert all(b"\r" not in v and b"\n" not in v for _, v in headers) and b"x-evil" not in b" ".join(k.lower() for k, _ in headers)


@pytest.mark.parametrize("query,status", [("top_k=0", 422), ("top_k=21", 422), ("top_k=x", 422), ("top_k=20", 200)])
def test_top_k_bounds(app_and_counts, query, status):
    r = post(app_and_counts[0], PNG, {"content-type": "image/png"}, f"/v1/classify?{query}")
    assert r.status_code == status
    if status == 200:
        assert len(r.json()["results"][0]["top_k"]) == 10  # clamped to the model's classes
    else:
        assert_error(r, 422, "invalid_request")


def test_routes_models_health_docs(app_and_counts):
    app = app_and_counts[0]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vr") as c:
            return [await c.get(p) for p in ("/v1/models", "/healthz", "/readyz", "/openapi.json", "/docs", "/nope")] + \
                   [await c.get("/v1/classify")]

    models, health, ready, openapi, docs, missing, wrong_method = asyncio.run(go())
    m = models.json()["models"][0]
    assert m["classes"] == [f"c{i}" for i in range(10)] and m["input"] == {"channels": 3, "image_size": 16}
    assert health.json() == {"status": "ok"} and ready.json()["status"] == "ready"
    content = openapi.json()["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert set(content) == {"image/png", "image/jpeg", "image/webp", "multipart/form-data"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert_error(missing, 404, "not_found")
    assert_error(wrong_method, 405, "method_not_allowed")


# --------------------------------------------------------------------------- auth, rate limit, time budgets


def test_api_keys(rgb_checkpoint, monkeypatch):
    monkeypatch.setenv("VR_TEST_KEYS", "k1, k2")
    app, counts = make_app(rgb_checkpoint, auth={"api_keys_env": "VR_TEST_KEYS"})
    png = {"content-type": "image/png"}
    r = post(app, PNG, png)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(post(app, PNG, {**png, "authorization": "Bearer k3"}), 401, "unauthorized")
    assert post(app, PNG, {**png, "authorization": "Bearer k2"}).status_code == 200
    assert post(app, PNG, {**png, "x-api-key": "k1"}).status_code == 200
    assert post(app, b"", {}, "/healthz").status_code == 405  # open path: no key needed to reach it
    assert counts["unauthorized"] == 2


def test_api_keys_misconfigured_is_an_error(rgb_checkpoint, monkeypatch):
    monkeypatch.delenv("VR_TEST_KEYS", raising=False)
    with pytest.raises(ValueError, match="VR_TEST_KEYS"):  # when the app is built, not at the first request
        make_app(rgb_checkpoint, auth={"api_keys_env": "VR_TEST_KEYS"})


def test_api_keys_file(rgb_checkpoint, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha\n\n")
    app, _ = make_app(rgb_checkpoint, auth={"api_keys_file": str(keys)})
    assert post(app, PNG, {"content-type": "image/png", "x-api-key": "alpha"}).status_code == 200
    assert_error(post(app, PNG, {"content-type": "image/png", "x-api-key": "# team keys"}), 401, "unauthorized")


def test_rate_limit_per_client(rgb_checkpoint):
    app, _ = make_app(rgb_checkpoint, rate_limit={"requests_per_s": 0.01, "burst": 2})
    png = {"content-type": "image/png"}
    assert [post(app, PNG, png).status_code for _ in range(2)] == [200, 200]
    r = post(app, PNG, png)
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1
    # auth is off: a made-up key is no bucket of its own (the bypass); another address is
    assert_error(post(app, PNG, {**png, "x-api-key": "made-up"}), 429, "rate_limited")
    assert_error(post(app, PNG, {**png, "authorization": "Bearer other"}), 429, "rate_limited")
    assert post(app, PNG, png, client="10.0.0.2").status_code == 200


def test_failed_keys_are_throttled_by_address_even_when_the_next_guess_is_right(rgb_checkpoint, monkeypatch):
    monkeypatch.setenv("VR_TEST_KEYS", "right")
    app, _ = make_app(rgb_checkpoint, auth={"api_keys_env": "VR_TEST_KEYS"},
                      rate_limit={"failed_auth_per_s": 0.01, "failed_auth_burst": 3})
    png = {"content-type": "image/png"}
    assert [post(app, PNG, {**png, "x-api-key": f"guess{i}"}).status_code for i in range(3)] == [401] * 3
    r = post(app, PNG, {**png, "x-api-key": "right"})
    assert_error(r, 429, "auth_throttled")
    assert int(r.headers["retry-after"]) >= 1
    assert post(app, PNG, {**png, "x-api-key": "right"}, client="10.0.0.9").status_code == 200  # other addresses pass


@pytest.mark.parametrize("root_path", ["", "/vr", "/a/b"])
def test_probes_and_docs_need_no_key_under_any_route_prefix(rgb_checkpoint, monkeypatch, root_path):
    monkeypatch.setenv("VR_TEST_KEYS", "right")
    app, _ = make_app(rgb_checkpoint, auth={"api_keys_env": "VR_TEST_KEYS"})
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        r = post(app, b"", {}, f"{root_path}{path}", root_path=root_path, method="GET")
        assert r.status_code == 200, (path, r.text)
    assert_error(post(app, PNG, {"content-type": "image/png"}, f"{root_path}/v1/classify", root_path=root_path), 401, "unauthorized")
    assert_error(post(app, b"", {}, f"{root_path}/healthzx", root_path=root_path, method="GET"), 401, "unauthorized")


def test_rate_limiter_refills_and_forgets():
    now = [0.0]
    lim = RateLimiter(RateLimitSpec(requests_per_s=2.0, burst=1, max_clients=2), clock=lambda: now[0])
    assert lim.acquire("a") == 0 and lim.acquire("a") == pytest.approx(0.5)
    now[0] = 0.5
    assert lim.acquire("a") == 0
    lim.acquire("b"), lim.acquire("c")
    assert list(lim.buckets) == ["b", "c"]


def test_decode_time_budget(rgb_checkpoint):
    big = encode(noise(2000, 2000), "PNG", compress_level=0)
    app, _ = make_app(rgb_checkpoint, sanitizer={"decode_timeout_s": 0.001, "max_body_bytes": 64 * 2**20})
    assert_error(post(app, big, {"content-type": "image/png"}), 422, "decode_timeout")


def test_body_cap_is_enforced_while_streaming(rgb_checkpoint):
    """No Content-Length (chunked): the cap is crossed mid-stream; the rest is never read."""
    app, _ = make_app(rgb_checkpoint, sanitizer={"max_body_bytes": 4096})
    pulled = []

    async def chunks():
        for i in range(1000):
            pulled.append(i)
            yield b"\x00" * 1024

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vr") as c:
            return await c.post("/v1/classify", content=chunks(), headers={"content-type": "image/png"})

    assert_error(asyncio.run(go()), 413, "body_too_large")
    assert len(pulled) < 1000


async def _trickle(c: httpx.AsyncClient, gap_s: float, chunks: int = 100, path: str = "/v1/classify") -> httpx.Response:
    async def body():
        for _ in range(chunks):
            yield b"\x00"
            await asyncio.sleep(gap_s)

    return await c.post(path, content=body(), headers={"content-type": "image/png"})


def test_a_body_slower_than_the_minimum_rate_is_cut_after_the_grace_period(rgb_checkpoint):
    app, _ = make_app(rgb_checkpoint, sanitizer={"body_grace_s": 0.3, "min_body_bytes_per_s": 1024})

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vr", timeout=30) as c:
            t0 = time.perf_counter()
            r = await _trickle(c, 0.05)
            return r, time.perf_counter() - t0

    r, elapsed = asyncio.run(go())
    assert_error(r, 408, "body_too_slow")
    assert elapsed < 2.0  # not the 10 s body timeout


def test_slow_uploads_beyond_the_caps_get_a_short_leash_and_valid_requests_pass(rgb_checkpoint):
    app, _ = make_app(rgb_checkpoint, sanitizer={"max_unfinished_bodies": 3, "max_unfinished_bodies_per_client": 2,
                                                 "crowded_body_s": 0.2, "body_grace_s": 5, "min_body_bytes_per_s": 1})

    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://vr", timeout=30) as c:
            assert (await c.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})).status_code == 200
            holders = [asyncio.create_task(_trickle(c, 0.1, chunks=15)) for _ in range(2)]  # within the per-client cap
            await asyncio.sleep(0.3)
            crowded = await _trickle(c, 0.1, chunks=15)  # a third from the same address
            t0 = time.perf_counter()
            valid = await c.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
            valid_s = time.perf_counter() - t0
            done = await asyncio.gather(*holders)
            return crowded, valid, valid_s, done

    crowded, valid, valid_s, done = asyncio.run(go())
    assert_error(crowded, 503, "uploads_busy")
    assert crowded.headers["retry-after"] == "1"
    assert valid.status_code == 200 and valid_s < 2.0  # the decoders were started by the first request
    assert [r.json()["code"] for r in done] == ["content_mismatch"] * 2  # the two within the caps were read whole


@pytest.mark.parametrize("topology", ["split", "combined"])
def test_admission_gate_answers_overload_as_json_and_lets_probes_through(rgb_checkpoint, topology):
    limits = {"max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 3}
    deployments = {"classifier": {**limits, "max_ongoing_requests": 16}} if topology == "combined" else {"ingress": limits}
    app, counts = make_app(rgb_checkpoint, topology=topology, **deployments, sanitizer={
        "body_grace_s": 5, "min_body_bytes_per_s": 1, "max_unfinished_bodies": 64, "max_unfinished_bodies_per_client": 64})
    limit = 17 if topology == "combined" else 2  # max_ongoing_requests + max_queued_requests of the HTTP-facing one

    async def go():
        transport = httpx.ASGITransport(app=app, client=("10.0.0.8", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://vr", timeout=30) as c:
            holders = [asyncio.create_task(_trickle(c, 0.1, chunks=10)) for _ in range(limit)]  # fill the gate
            await asyncio.sleep(0.3)
            over = await c.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
            probe = await c.get("/healthz")
            await asyncio.gather(*holders)
            after = await c.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
            return over, probe, after

    over, probe, after = asyncio.run(go())
    assert_error(over, 503, "overloaded")
    assert over.headers["retry-after"] == "3" and counts["overloaded"] == 1
    assert probe.status_code == 200 and after.status_code == 200  # probes pass the gate; it reopens


def test_lying_content_length_above_cap_is_refused_before_reading(rgb_checkpoint):
    app, _ = make_app(rgb_checkpoint, sanitizer={"max_body_bytes": 4096})
    assert_error(post(app, PNG, {"content-type": "image/png", "content-length": str(10**12)}), 413, "body_too_large")


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_png_mode_converts_deterministically(mode, channels):
    if mode == "I;16":
        im = Image.fromarray(np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 270)
        assert im.mode == "I;16"
    else:
        im = noise(mode="RGB").convert(mode)
    data = encode(im, "PNG")
    a = decode_image(data, "image/png", channels, LIMITS)
    assert a.dtype == np.uint8 and a.shape == (channels, 12, 20)
    assert np.array_equal(a, decode_image(data, "image/png", channels, LIMITS))
    if mode.startswith("I"):  # 16-bit samples keep their top byte instead of clipping at 255
        ref = (np.asarray(Image.open(io.BytesIO(data))).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        assert a[0].max() > 200 and np.array_equal(a[0], ref)
    elif mode not in ("LA", "RGBA"):
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB"))
        assert np.array_equal(a, (ref[:, :, None] if ref.ndim == 2 else ref).transpose(2, 0, 1))


@pytest.mark.parametrize("channels", [1, 3])
def test_32_bit_and_float_modes_scale_not_clip(channels):
    i32 = Image.fromarray(np.array([[0, 255, 256, 65535, 70000, -5]], dtype=np.int32))
    assert i32.mode == "I"
    out = np.asarray(to_model_mode(i32, channels))
    assert (out if channels == 1 else out[..., 0]).tolist() == [[0, 0, 1, 255, 255, 0]]
    f = Image.fromarray(np.array([[-1.0, 0.4, 254.6, 300.0, np.nan]], dtype=np.float32))
    assert f.mode == "F"
    out = np.asarray(to_model_mode(f, channels))
    assert (out if channels == 1 else out[..., 0]).tolist() == [[0, 0, 254, 255, 0]]


def test_cmyk_jpeg_and_alpha_drop():
    cmyk = encode(noise().convert("CMYK"), "JPEG")
    assert decode_image(cmyk, "image/jpeg", 3, LIMITS).shape == (3, 12, 20)
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert decode_image(encode(rgba, "PNG"), "image/png", 3, LIMITS)[:, 0, 0].tolist() == [200, 100, 50]


def _exif_rotated() -> dict:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    exif[0x010E] = "a description that must not survive"
    return {"exif": exif.tobytes()}


# Pillow reads the orientation from EXIF, else from XMP: both live in APP1 segments
XMP_ROTATED = {"xmp": b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'}


@pytest.mark.parametrize("metadata", [_exif_rotated(), XMP_ROTATED], ids=["exif", "xmp"])
def test_exif_orientation_is_applied(metadata):
    data = encode(noise(30, 10), "JPEG", quality=95, **metadata)
    a = decode_image(data, "image/jpeg", 3, LIMITS)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as stored: landscape 30x10
    assert a.shape == (3, 30, 10)  # upright: portrait
    assert np.array_equal(a.transpose(1, 2, 0), np.rot90(stored, k=-1))


def test_animated_png_uses_first_frame():
    a = decode_image(animated_png(), "image/png", 3, LIMITS)
    assert a[:, 0, 0].tolist() == [255, 0, 0]


def test_bomb_refusal_quotes_the_configured_limits_not_pillows():
    spec = SanitizerSpec(max_pixels=1000, max_width=64, max_height=64, max_request_pixels=1000)
    configure_pillow(spec)
    try:
        with pytest.raises(Rejection) as info:  # header given: the walk is skipped, Pillow decides
            decode_image(encode(noise(100, 100), "PNG"), "image/png", 3, spec, header=Header(100, 100))
    finally:
        configure_pillow(LIMITS)
    assert (info.value.status, info.value.code) == (413, "image_too_large")
    assert "64x64 and 1000 pixels" in info.value.message and "2000" not in info.value.message, info.value.message


def test_unidentified_image_message_has_no_object_repr():
    ihdr = struct.pack(">IIBBBBB", 8, 8, 3, 9, 0, 0, 0)  # colour type 9 does not exist
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    with pytest.raises(Rejection) as info:
        decode_image(data, "image/png", 3, LIMITS)
    assert info.value.code == "corrupt_image" and "cannot identify image file" in info.value.message
    assert "BytesIO" not in info.value.message and "0x" not in info.value.message, info.value.message


def test_pillow_bomb_threshold_is_set_explicitly():
    configure_pillow(SanitizerSpec(max_pixels=12345))
    assert Image.MAX_IMAGE_PIXELS == 12345
    configure_pillow(LIMITS)
    assert Image.MAX_IMAGE_PIXELS == LIMITS.max_pixels


@pytest.mark.parametrize("data,found", [(PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp"),
                                        (b"GIF89a", "image/gif"), (b"BM\x00", "image/bmp"), (b"", None), (b"RIFF", None)])
def test_sniff(data, found):
    assert sniff(data) == found


def test_check_type_respects_the_allowlist():
    only_png = SanitizerSpec(allowed_types=["image/png"])
    assert check_type("image/png", PNG, only_png) == "image/png"
    with pytest.raises(Rejection) as e:
        check_type("image/jpeg", JPEG, only_png)
    assert e.value.status == 415


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x10\x00\x00\x00WEBP"]),
       ctype=st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/gif", "", "multipart/form-data; boundary=x"]))
def test_fuzzed_bytes_never_get_a_5xx(app_and_counts, data, prefix, ctype):
    r = post(app_and_counts[0], prefix + data, {"content-type": ctype})
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert set(r.json()) == {"code", "message", "request_id"}


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(PNG) - 1), st.integers(0, 255), st.sampled_from([PNG, JPEG, WEBP]))
def test_bit_flipped_images_decode_or_are_rejected_cleanly(pos, byte, original):
    data = bytearray(original)
    data[pos % len(data)] = byte
    declared = sniff(bytes(data))
    if declared is None:
        return
    try:
        a = decode_image(bytes(data), declared, 3, LIMITS)
        assert a.dtype == np.uint8 and a.shape[0] == 3
    except Rejection as rej:
        assert rej.status in (413, 415, 422)


PIL_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "F"]
PIL_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP", "ICO", "TGA", "PPM", "JPEG2000", "AVIF", "SGI", "PCX"]


def test_every_format_and_mode_pillow_writes_is_served_or_refused_cleanly(app_and_counts):
    """A corpus in the spirit of Pillow's own test images: every format x mode Pillow can write,
    sent under each allowlisted content type. Never a 5xx; the allowlisted ones classify."""
    app = app_and_counts[0]
    base = noise(13, 9)
    outcomes = {}
    for mode in PIL_MODES:
        im = base.convert(mode)
        for fmt in PIL_FORMATS:
            try:
                data = encode(im, fmt)
            except (OSError, ValueError, KeyError):
                continue  # Pillow cannot write this pair
            for ctype in ("image/png", "image/jpeg", "image/webp"):
                r = post(app, data, {"content-type": ctype})
                outcomes[(fmt, mode, ctype)] = r.status_code
                assert r.status_code < 500, (fmt, mode, ctype, r.text)
                if f"image/{fmt.lower()}" == ctype:
                    assert r.status_code == 200, (fmt, mode, r.text)
    assert len(outcomes) > 100 and set(outcomes.values()) == {200, 415}


# --------------------------------------------------------------------------- the serve config


def test_validate_checks_serve_configs(tmp_path):
    res = CliRunner().invoke(cli_app, ["validate", str(REPO / "serve" / "classifier.yaml")])
    assert res.exit_code == 0 and "serve config" in res.output, res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n- name: x\n  import_path: visionray.serve.app:build_app\n"
                   "  args: {model: d@best, rollout: {canary: d@2, percent: 200}}\n")
    res = CliRunner().invoke(cli_app, ["validate", str(bad)])
    assert res.exit_code == 2 and "rollout.percent" in res.output, res.output


def test_shipped_serve_configs_are_valid():
    for path in sorted((REPO / "serve").glob("*.yaml")):
        raw = read_serve_config(path)
        assert raw["applications"][0]["import_path"] == "visionray.serve.app:build_app", path
        spec = load_serve_spec(raw["applications"][0]["args"])
        assert cpus_at_full_scale(spec) <= 2, f"{path} needs more than the 2 cores CI and a laptop have at full scale"


BAD_SPECS = [
    ({}, "exactly one of model"),
    ({"model": "digits@best", "checkpoint": "/x"}, "exactly one of model"),
    ({"model": "Digits@best"}, "not NAME@ALIAS"),
    ({"model": "digits"}, "not NAME@ALIAS"),
    ({"checkpoint": "/x"}, "allow_unsigned"),
    ({"model": "d@best", "classifier": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas=3 is above max_replicas=2"),
    ({"model": "d@best", "classifier": {"initial_replicas": 9}}, "initial_replicas=9"),
    ({"model": "d@best", "batch": {"max_batch_size": 64}}, "max_ongoing_requests=32 is below batch.max_batch_size=64"),
    ({"model": "d@best", "top_k": 50}, "top_k=50 is above max_top_k=20"),
    ({"model": "d@best", "sanitizer": {"allowed_types": ["image/gif"]}}, "sanitizer.allowed_types.0"),
    ({"model": "d@best", "sanitizer": {"max_body_bytes": 10}}, "sanitizer.max_body_bytes"),
    ({"model": "d@best", "classifier": {"min_replicas": -1}}, "classifier.min_replicas"),
    ({"model": "d@best", "autoscale": {}}, "autoscale: unknown field"),
    ({"model": "d@best", "topology": "merged"}, "topology: Input should be 'split' or 'combined'"),
    ({"model": "d@best", "topology": "combined", "ingress": {"max_replicas": 3}}, "ingress is set but topology is 'combined'"),
    ({"model": "d@best", "rollout": {"canary": "d@2", "shadow": "d@3", "percent": 5}}, "exactly one of canary or shadow"),
    ({"model": "d@best", "rollout": {"percent": 5}}, "exactly one of canary or shadow"),
    ({"model": "d@best", "rollout": {"canary": "d", "percent": 5}}, "canary 'd' is not NAME@VERSION"),
    ({"model": "d@best", "rollout": {"canary": "d@2", "percent": 0}}, "rollout.percent"),
    ({"model": "d@best", "rollout": {"canary": "d@2", "percent": 101}}, "rollout.percent"),
    ({"checkpoint": "/x", "allow_unsigned": True, "rollout": {"shadow": "d@2", "percent": 5}}, "rollout (shadow d@2) needs model"),
    ({"model": "d@best", "monitor": {"path": "p", "sample_percent": 0}}, "monitor.sample_percent"),
    ({"model": "d@best", "monitor": {"sample_percent": 5}}, "monitor.path"),
]


@pytest.mark.parametrize("args,message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_serve_specs_name_the_field(args, message):
    with pytest.raises(SpecError) as e:
        load_serve_spec(args)
    assert message in " ".join(e.value.errors)


def test_min_replicas_zero_allowed_and_options_reach_serve():
    spec = load_serve_spec({"model": "d@best", "classifier": {"min_replicas": 0, "initial_replicas": 1, "max_queued_requests": 5}})
    opts = spec.classifier.options()
    assert opts["autoscaling_config"]["min_replicas"] == 0 and opts["max_queued_requests"] == 5
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    assert isinstance(spec, ServeSpec)
