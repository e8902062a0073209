"""gRPC ingress: ``visionray.v1.Classifier/Classify`` through Serve's gRPC proxy, same rules as HTTP.

The service, in proto3 (built here from its descriptor: no generated code to keep in step)::

    package visionray.v1;
    message ClassifyRequest { bytes image = 1; string content_type = 2; uint32 top_k = 3; }
    message Label { string label = 1; uint32 index = 2; float probability = 3; }
    message ClassifyReply { string request_id = 1; string model = 2; uint32 version = 3; repeated Label top_k = 4; }
    service Classifier { rpc Classify(ClassifyRequest) returns (ClassifyReply); }

Turn it on in the serve config (Serve's own ``grpc_options``)::

    grpc_options:
      port: 9000
      grpc_servicer_functions: [visionray.serve.grpc_api:add_ClassifierServicer_to_server]

Clients send the metadata ``application: <app name>`` (Serve routes on it) and, with auth on,
``authorization: Bearer KEY`` or ``x-api-key: KEY``. Every request passes the replica's ``Gate``
(admission limit, keys, rate limit: the same counters as HTTP), the size cap, the content-type
allowlist and magic bytes, the structural walk and a sandboxed decoder, as an HTTP request does. A
refusal is the gRPC status for its HTTP one (``STATUS``) with the same JSON ``{code, message,
request_id}`` as details; ``retry-after`` rides in the trailing metadata.
"""

from __future__ import annotations

import json
import uuid
import time
from typing import Any, Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.internal import builder

from visionray.serve.config import ServeSpec
from visionray.serve.errors import Rejection
from visionray.serve.sanitize import Gate, check_type
from visionray.serve.structure import inspect

SERVICE = "visionray.v1.Classifier"
SERVICER_FUNCTION = "visionray.serve.grpc_api:add_ClassifierServicer_to_server"
STATUS = {  # HTTP status of a refusal -> gRPC status code
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT, 415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE, 500: grpc.StatusCode.INTERNAL,
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    field = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="visionray/v1/classify.proto", package="visionray.v1", syntax="proto3")
    messages = {
        "ClassifyRequest": [("image", field.TYPE_BYTES, None), ("content_type", field.TYPE_STRING, None),
                            ("top_k", field.TYPE_UINT32, None)],
        "Label": [("label", field.TYPE_STRING, None), ("index", field.TYPE_UINT32, None), ("probability", field.TYPE_FLOAT, None)],
        "ClassifyReply": [("request_id", field.TYPE_STRING, None), ("model", field.TYPE_STRING, None),
                          ("version", field.TYPE_UINT32, None), ("top_k", field.TYPE_MESSAGE, ".visionray.v1.Label")],
    }
    for name, fields in messages.items():
        message = fd.message_type.add(name=name)
        for number, (fname, ftype, type_name) in enumerate(fields, 1):
            added = message.field.add(name=fname, number=number, type=ftype, label=field.LABEL_OPTIONAL)
            if type_name:
                added.label, added.type_name = field.LABEL_REPEATED, type_name
    service = fd.service.add(name="Classifier")
    service.method.add(name="Classify", input_type=".visionray.v1.ClassifyRequest", output_type=".visionray.v1.ClassifyReply")
    return fd


DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(_file_descriptor().SerializeToString())
builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, globals())  # classes importable here: Ray pickles them
ClassifyRequest: Any = globals()["ClassifyRequest"]
ClassifyReply: Any = globals()["ClassifyReply"]
Label: Any = globals()["Label"]


def add_ClassifierServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - grpc's naming, Serve imports it by name
    """What ``grpc_options.grpc_servicer_functions`` names: registers the service with a server."""
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Classify": grpc.unary_unary_rpc_method_handler(
            servicer.Classify, request_deserializer=ClassifyRequest.FromString,
            response_serializer=ClassifyReply.SerializeToString),
    })
    server.add_generic_rpc_handlers((handler,))


def _peer_address(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` / ``ipv6:[::1]:5555`` -> the address without the port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    return rest.rsplit(":", 1)[0] if kind == "ipv4" else peer


class GrpcClassify:
    """``Classify`` for an HTTP-facing replica: its gate, decoder and backend, the HTTP route's rules."""

    def __init__(self, spec: ServeSpec, gate: Gate, decode: Callable, route: Callable,
                 model_input: Callable, on_reject: Callable[[str], None], on_images: Callable[[int], None],
                 payload_log: Any = None):
        """``route``: the replica's ``rollout.Router.classify`` (images, k) -> (labels, answering model).
        ``payload_log``: the replica's ``monitor.PayloadLog`` (HTTP and gRPC requests are sampled alike)."""
        self.spec, self.gate, self.payload_log = spec, gate, payload_log
        self.decode, self.route, self.model_input = decode, route, model_input
        self.on_reject, self.on_images = on_reject, on_images

    async def __call__(self, request: Any, context: Any) -> Any:
        request_id = context.request_id() or uuid.uuid4().hex
        try:
            with self.gate.admitted():
                return await self._answer(request, context, request_id)
        except Rejection as rej:
            self.on_reject(rej.code)
            context.set_code(STATUS.get(rej.status, grpc.StatusCode.UNKNOWN))
            context.set_details(json.dumps({"code": rej.code, "message": rej.message, "request_id": request_id}))
            if "Retry-After" in rej.headers:
                context.set_trailing_metadata([("retry-after", rej.headers["Retry-After"])])
            return ClassifyReply()

    async def _answer(self, request: Any, context: Any, request_id: str) -> Any:
        sanitizer = self.spec.sanitizer
        metadata = {k.lower().encode(): v.encode() for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.gate.check_client(metadata, _peer_address(context.peer()))
        data = request.image
        if len(data) > sanitizer.max_body_bytes:
            raise Rejection(413, "body_too_large", f"image of {len(data)} bytes is above the {sanitizer.max_body_bytes}-byte limit")
        top_k = request.top_k or self.spec.top_k
        if top_k > self.spec.max_top_k:
            raise Rejection(422, "invalid_request", f"top_k={top_k} is above max_top_k={self.spec.max_top_k}")
        started = time.perf_counter()
        declared = check_type(request.content_type, data, sanitizer)
        header = inspect(data, declared, sanitizer)
        channels, size = await self.model_input()
        image = await self.decode(data, declared, channels, size, header)
        (labels,), info = await self.route([image], top_k)
        self.on_images(1)
        if self.payload_log is not None and self.payload_log.sampled():
            self.payload_log.add(self.payload_log.rows_of(request_id, [data], [header], [labels], info,
                                                       time.perf_counter() - started))
        return ClassifyReply(request_id=request_id, model=info["name"], version=info["version"] or 0,
                             top_k=[Label(label=x.label, index=x.index, probability=x.probability) for x in labels])


# --------------------------------------------------------------------------- client

RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class GrpcError(RuntimeError):
    """The server refused over gRPC: its status, and the JSON ``code``/``message``/``request_id``."""

    def __init__(self, status: grpc.StatusCode, details: str):
        try:
            body = json.loads(details)
        except (TypeError, ValueError):
            body = {"code": status.name.lower(), "message": details or "", "request_id": None}
        self.status, self.code, self.message, self.request_id = status, body.get("code"), body.get("message"), body.get("request_id")
        super().__init__(f"gRPC {status.name} {self.code}: {self.message}"
                         + (f" (request {self.request_id})" if self.request_id else ""))


class GrpcClient:
    """``GrpcClient("127.0.0.1:9000").classify([bytes_or_path, ...], top_k=5)`` -> the same dict as
    the HTTP ``Client`` returns, one RPC per image; retries UNAVAILABLE and RESOURCE_EXHAUSTED
    after the server's ``retry-after``."""

    def __init__(self, address: str, app: str = "visionray", api_key: str | None = None, timeout_s: float = 30.0,
                 retries: int = 3):
        self.channel = grpc.insecure_channel(address)
        self.call = self.channel.unary_unary(f"/{SERVICE}/Classify", request_serializer=ClassifyRequest.SerializeToString,
                                             response_deserializer=ClassifyReply.FromString)
        self.metadata = [("application", app)] + ([("authorization", f"Bearer {api_key}")] if api_key else [])
        self.timeout_s, self.retries = timeout_s, retries

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def classify_one(self, data: bytes, content_type: str, top_k: int) -> Any:
        import time

        for attempt in range(self.retries + 1):
            try:
                return self.call(ClassifyRequest(image=data, content_type=content_type, top_k=top_k),
                                 metadata=self.metadata, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if exc.code() not in RETRY_CODES or attempt == self.retries:
                    raise GrpcError(exc.code(), exc.details()) from None
                wait = dict(exc.trailing_metadata() or ()).get("retry-after", "")
                time.sleep(min(float(wait) if wait.isdigit() else 0.5 * 2**attempt, 30.0))
        raise AssertionError("unreachable")

    def classify(self, images: list[Any], top_k: int = 5) -> dict[str, Any]:
        from pathlib import Path

        from visionray.serve.client import content_type

        results, reply = [], None
        for i, image in enumerate(images):
            name = str(image) if isinstance(image, Path) else None
            data = Path(image).read_bytes() if isinstance(image, Path) else image
            reply = self.classify_one(data, content_type(data, name or f"image {i}"), top_k)
            results.append({"index": i, "filename": name, "request_id": reply.request_id,
                            "top_k": [{"label": x.label, "index": x.index, "probability": x.probability} for x in reply.top_k]})
        return {"request_id": reply.request_id if reply else None,
                "model": {"name": reply.model, "version": reply.version or None} if reply else None, "results": results}
