"""The HTTP API (FastAPI, OpenAPI at ``/docs``), independent of Ray: ``make_api(spec, backend)``.

``backend`` classifies decoded images: in Serve a ``DeploymentHandle`` to the classifier replicas
(``visionray.serve.app``); in process a ``Predictor`` (``LocalBackend``). The same routes and the
same ``SanitizerMiddleware`` run in both.

Routes: ``POST /v1/classify`` (one image as the body, or several as multipart), ``GET /v1/models``,
``GET /healthz`` (the ingress is up), ``GET /readyz`` (a model answers). Every error is JSON
``{code, message, request_id}``, never a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Protocol

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from visionray.serve.config import ServeSpec
from visionray.serve.predictor import Label, Predictor
from visionray.serve.errors import Rejection
from visionray.serve.monitor import PayloadLog
from visionray.serve.pool import DecodePool
from visionray.serve.rollout import Router
from visionray.serve.sanitize import Gate, SanitizerMiddleware, check_type, load_api_keys, media_type
from visionray.serve.structure import inspect

logger = logging.getLogger(__name__)

API_VERSION = "v1"


class Backend(Protocol):
    async def info(self) -> dict[str, Any]:
        """The served model's metadata (``Predictor.info``)."""

    async def classify(self, image: np.ndarray, k: int) -> list[Label]:
        """Top-k labels of one decoded image."""


class LocalBackend:
    """A ``Predictor`` in this process (tests, and anything that needs no cluster)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    async def info(self) -> dict[str, Any]:
        return self.predictor.info()

    async def classify(self, image: np.ndarray, k: int) -> list[Label]:
        return (await asyncio.to_thread(self.predictor.predict, [image], k))[0]


class ModelFacts:
    """The served model's metadata, asked of the backend once, and the input images are decoded
    for: ``model_input`` (channels, size) when the app knew it when built, else from the metadata."""

    def __init__(self, backend: Backend, model_input: tuple[int, int] | None = None):
        self.backend, self.model_input = backend, model_input
        self.cached: dict[str, Any] = {}

    async def info(self) -> dict[str, Any]:
        if not self.cached:
            self.cached.update(await self.backend.info())
        return self.cached

    async def input(self) -> tuple[int, int]:
        if self.model_input is not None:
            return self.model_input
        wanted = (await self.info())["input"]
        return wanted["channels"], wanted["image_size"]


# --------------------------------------------------------------------------- response schemas


class LabelOut(BaseModel):
    label: str = Field(description="class name")
    index: int = Field(description="class index in the model's output")
    probability: float = Field(description="softmax probability in [0, 1]")


class ImageResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str | None = Field(None, description="multipart part's filename, if any")
    top_k: list[LabelOut] = Field(description="most probable first")


class ModelRef(BaseModel):
    name: str
    version: int | None = Field(description="registry version; null for an unregistered checkpoint")


class ClassifyResponse(BaseModel):
    request_id: str
    model: ModelRef
    results: list[ImageResult]


class ErrorResponse(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. body_too_large")
    message: str
    request_id: str


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed request (multipart, headers)", 401: "missing or wrong API key", 408: "body arrived too slowly",
    413: "body, image count or image dimensions above the limits", 415: "content type not allowed or not what the bytes are",
    422: "image truncated, corrupt or too slow to decode; bad query", 429: "rate limit", 503: "overloaded or no model (Retry-After)",
}.items()}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY,
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        },
    },
}


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def _error(status: int, code: str, message: str, request: Request, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "request_id": request_id(request)}, status, headers=headers)


async def _multipart_parts(request: Request, spec: ServeSpec) -> list[tuple[str | None, str | None, bytes]]:
    """(filename, content type, bytes) of every file part; text fields are refused."""
    parser = MultiPartParser(request.headers, request.stream(), max_files=spec.sanitizer.max_images, max_fields=0,
                             max_part_size=spec.sanitizer.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise Rejection(413, "too_many_images", f"more than {spec.sanitizer.max_images} images in one request") from None
        if exc.message.startswith("Too many fields"):
            raise Rejection(422, "unexpected_field", "multipart may only hold image files (parts with a filename)") from None
        raise Rejection(400, "bad_multipart", f"malformed multipart body: {exc.message}") from None
    parts = []
    try:
        for _, item in form.multi_items():
            parts.append((item.filename, item.content_type, await item.read()))
    finally:
        await form.close()
    if not parts:
        raise Rejection(400, "bad_multipart", "no image parts found in the multipart body (check the boundary)")
    return parts


def _add_error_handlers(app: FastAPI, on_reject: Callable[[str], None]) -> None:
    """Every failure as the JSON error body: refusals with their status, bad parameters 422,
    unknown routes 404/405, anything else 500 with the request id (logged, never the traceback)."""

    @app.exception_handler(Rejection)
    async def _rejection(request: Request, exc: Rejection) -> JSONResponse:
        on_reject(exc.code)
        return _error(exc.status, exc.code, exc.message, request, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_reject("invalid_request")
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, "invalid_request", problems, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return _error(exc.status_code, code, str(exc.detail), request, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s failed", request_id(request))
        return _error(500, "internal_error", "internal error; the request id is in the server log", request)


def _add_probes(app: FastAPI, spec: ServeSpec, backend: Backend) -> None:
    """``/healthz`` (the ingress answers) and ``/readyz`` (a model replica answers in time)."""

    @app.get("/healthz", summary="Liveness: the ingress answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model replica answers within readiness_timeout_s", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Any:
        try:
            m = await asyncio.wait_for(backend.info(), spec.readiness_timeout_s)
        except Rejection as exc:
            return _error(503, exc.code, exc.message, request, {"Retry-After": "1"})
        except asyncio.TimeoutError:
            return _error(503, "not_ready", f"no model replica answered within {spec.readiness_timeout_s} s", request,
                          {"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - a probe: any failure of the model side means not ready
            logger.warning("readiness check failed: %s: %s", type(exc).__name__, exc)
            return _error(503, "not_ready", f"the model is not available ({type(exc).__name__})", request, {"Retry-After": "1"})
        return {"status": "ready", "model": {"name": m["name"], "version": m["version"]}}


def make_gate(spec: ServeSpec) -> Gate:
    """The HTTP-facing replica's gate: its keys (a misconfigured key source raises), rate limits and
    admission limit."""
    facing = spec.http_facing
    return Gate(load_api_keys(spec.auth), spec.rate_limit, facing.admission_limit, facing.retry_after_s)


def make_api(spec: ServeSpec, backend: Backend, on_reject: Callable[[str], None] = lambda code: None,
             on_images: Callable[[int], None] = lambda n: None, echo_request_id: bool = True,
             decoder: DecodePool | None = None, facts: ModelFacts | None = None,
             gate: Gate | None = None, router: Router | None = None, payload_log: PayloadLog | None = None,
             rollout_counts: Callable[[], Any] | None = None) -> FastAPI:
    """The ASGI app: routes, error handlers and the sanitizer middleware. ``echo_request_id``:
    add X-Request-ID to responses (Serve's proxy does that itself). ``decoder``: the replica's
    started pool of sandboxed decoders; by default one that starts on the first image.
    ``facts``: the model's metadata and input (shared with the replica's gRPC ingress); by
    default asked of the backend once. ``gate``: the replica's admission limit, keys
    and rate limits (shared with its gRPC ingress); by default one from ``spec``. ``router``:
    which model answers (``visionray.serve.rollout``); by default ``backend`` alone.
    ``payload_log``: sampled request rows (``spec.monitor``). ``rollout_counts``: the whole app's
    rollout counts for ``/v1/rollout`` (default: this replica's)."""
    gate = gate or make_gate(spec)  # a misconfigured key source fails here, when the replica starts
    decoder = decoder or DecodePool(spec.sanitizer)
    if payload_log is None and spec.monitor is not None:
        payload_log = PayloadLog(spec.monitor)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await router.flush()
        if payload_log is not None:
            await asyncio.to_thread(payload_log.flush)
        decoder.close()

    app = FastAPI(
        title="VisionRay", version=API_VERSION, docs_url="/docs", redoc_url=None, lifespan=lifespan,
        description="Image classification with a signed VisionRay model. Images arrive only as the request body "
                    "(never fetched from URLs); see the sanitizer limits in the serve config.",
    )
    facts = facts or ModelFacts(backend)
    info = facts.info
    router = router or Router((backend.classify, info), None, None)

    _add_error_handlers(app, on_reject)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_CLASSIFY_BODY,
              summary="Classify one image (the body) or several (multipart/form-data)")
    async def classify(request: Request, top_k: int = Query(spec.top_k, ge=1, le=spec.max_top_k,
                                                             description="labels per image")) -> ClassifyResponse:
        started = time.perf_counter()
        ctype = request.headers.get("content-type")
        if media_type(ctype) == "multipart/form-data":
            parts = await _multipart_parts(request, spec)
        else:
            parts = [(None, ctype, await request.body())]
        declared = [check_type(c, data, spec.sanitizer) for _, c, data in parts]
        headers = [inspect(data, d, spec.sanitizer) for (_, _, data), d in zip(parts, declared)]  # before any decoder
        pixels = sum(h.pixels for h in headers)
        if pixels > spec.sanitizer.max_request_pixels:
            raise Rejection(413, "too_many_pixels", f"the {len(parts)} images declare {pixels} pixels together; the "
                            f"limit per request is {spec.sanitizer.max_request_pixels} (sanitizer.max_request_pixels)")
        channels, size = await facts.input()
        images = await asyncio.gather(*(decoder.decode(data, d, channels, size, h)
                                        for (_, _, data), d, h in zip(parts, declared, headers)))
        labels, m = await router.classify(list(images), top_k)
        on_images(len(images))
        if payload_log is not None and payload_log.sampled():
            payload_log.add(payload_log.rows_of(request_id(request), [data for _, _, data in parts], headers, labels, m,
                                             time.perf_counter() - started))
        return ClassifyResponse(
            request_id=request_id(request),
            model=ModelRef(name=m["name"], version=m["version"]),
            results=[ImageResult(index=i, filename=fn, top_k=[LabelOut(label=x.label, index=x.index, probability=x.probability) for x in top])
                     for i, ((fn, _, _), top) in enumerate(zip(parts, labels))],
        )

    @app.get("/v1/models", summary="The served model: name, version, classes, input, eval preset, metrics")
    async def models() -> dict[str, Any]:
        m = await info()
        return {"models": [m], "limits": spec.sanitizer.model_dump(mode="json")}

    @app.get("/v1/rollout", summary="The rollout (canary or shadow) and what it counted: answers per version, "
                                    "shadow agreement per class")
    async def rollout() -> dict[str, Any]:
        return await router.status(rollout_counts)

    _add_probes(app, spec, backend)
    app.add_middleware(SanitizerMiddleware, spec=spec.sanitizer, gate=gate, on_reject=on_reject,
                       echo_request_id=echo_request_id)
    return app
