"""The Ray Serve application: ``build_app(args)`` for ``serve run``/``serve deploy`` and ``visionray serve``.

``topology: split`` (the default), two deployments, each autoscaled on its own:

- ``Ingress``: the FastAPI app of ``visionray.serve.api`` behind ``SanitizerMiddleware`` (the
  middleware lives on the ingress: Ray 2.60 has no ``HTTPOptions.middlewares``); it decodes images
  and calls the classifier through a handle. When the classifier's queue is full
  (``max_queued_requests``) the handle raises ``BackPressureError`` and the client gets 503 JSON with
  Retry-After instead of waiting.
- ``Classifier``: loads one pinned registry version (the alias is resolved once, when the app is
  built, so every replica serves the same bytes), verifying its signature before reading weights;
  the constructor raises when verification fails, so a tampered or unsigned model never deploys.
  Inference is batched with ``@serve.batch`` (size and wait from the config), in
  ``torch.inference_mode``, fp16 + channels_last on a GPU. Its health check fails without a model.

``topology: combined``, one deployment (``Classifier``, configured by ``classifier``) that is both:
the same API, middleware, verification and batched model in one replica, so a request crosses one
process boundary fewer (6 to 11 ms less at concurrency 1 on a 2-core machine,
``benchmarks/serve.py``).

Overload, in both: the HTTP-facing deployment's admission gate (``SanitizerMiddleware``) answers
503 JSON with Retry-After beyond ``max_ongoing_requests + max_queued_requests`` per replica;
Serve's own limits for it sit above the gate (``DeploymentSpec.options(http_facing=True)``).

With ``rollout`` (``visionray.serve.rollout``): a ``Candidate`` deployment (the candidate version,
verified when the app is built; none when it was refused) and one ``RolloutStats`` replica that
adds up the HTTP-facing replicas' counts for ``/v1/rollout``. With ``monitor``: each HTTP-facing
replica writes sampled request rows (``visionray.serve.monitor``).

Prometheus (Ray's metrics endpoint): Serve's own request, latency, queue and replica metrics, plus
``visionray_serve_rejected_total{reason}``, ``visionray_serve_images_total``,
``visionray_serve_answers_total{model,version}`` and, with a shadow,
``visionray_shadow_compared_total{label}`` and ``visionray_shadow_agreed_total{label}``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter

from visionray.models import TTA_VIEWS
from visionray.serve.api import Backend, ModelFacts, make_api, make_gate
from visionray.serve.monitor import PayloadLog
from visionray.serve.rollout import Candidate, Counts, Router, resolve_candidate
from visionray.serve.config import ServeSpec, load_serve_spec
from visionray.serve.errors import Rejection
from visionray.serve.grpc_api import GrpcClassify
from visionray.serve.modes import check_replica_mode
from visionray.serve.predictor import Label, Predictor, Source, check_input, load_source, pick_device, resolve_source
from visionray.serve.pool import DecodePool

logger = logging.getLogger("ray.serve")


class ModelReplica:
    """What every model-holding replica does: load the pinned model (signature verified first; the
    constructor raises otherwise, so nothing unverified deploys) and classify batches."""

    def __init__(self, source: Source, spec: ServeSpec):
        self.predictor: Predictor | None = None
        self.in_flight = 0  # classify calls on this replica's event loop
        device = pick_device(spec.device)
        model, meta, name, version = load_source(source, device)  # raises VerificationError: no deploy
        self.predictor = Predictor(model, meta, name, version, device)
        check_input(source, self.predictor.preset)  # the ingress decodes for the input the app was built with
        self.infer.set_max_batch_size(spec.batch.max_batch_size)
        self.infer.set_batch_wait_timeout_s(spec.batch.wait_s)
        logger.info("serving %s v%s on %s, test-time augmentation %s (%d forward passes per image)",
                    name, version, device, self.predictor.tta, TTA_VIEWS[self.predictor.tta])

    def check_health(self) -> None:
        if self.predictor is None:
            raise RuntimeError("no model loaded")

    def describe(self) -> dict[str, Any]:
        self.check_health()
        return self.predictor.info()

    async def classify(self, image: np.ndarray, k: int) -> list[Label]:
        """One image's top-``k``. The batch wait adapts to load: the replica's only request goes
        straight to the model (nobody to wait for); with more in flight they are batched, waiting
        up to ``batch.wait_s`` for company."""
        self.in_flight += 1
        try:
            if self.in_flight == 1:
                return (await asyncio.to_thread(self.predictor.predict, [image], k))[0]
            return await self.infer(image, k)
        finally:
            self.in_flight -= 1

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # both set from the config in __init__
    async def infer(self, images: list[np.ndarray], ks: list[int]) -> list[list[Label]]:
        k = max(ks)
        out = await asyncio.to_thread(self.predictor.predict, images, k)
        return [labels[:want] for labels, want in zip(out, ks)]

    def __del__(self) -> None:
        self.predictor = None  # graceful shutdown: Serve drains requests first, then frees the model


class ApiReplica:
    """What every HTTP-facing replica does: serve ``make_api`` (routes and ``SanitizerMiddleware``)
    over ``backend``, counting rejections and images for Prometheus."""

    def _init_api(self, source: Source, spec: ServeSpec, backend: Backend, rollout: "RolloutParts | None" = None) -> None:
        check_replica_mode(spec.ingress_mode)  # raises ModeMismatch: a replica in the wrong mode never serves
        self.spec = spec
        self.backend = backend
        self.decoder = DecodePool(spec.sanitizer)
        sandbox = self.decoder.start()  # raises DecoderStartError: a replica that cannot sandbox never serves
        logger.info("%d sandboxed image decoders: %s", spec.sanitizer.decode_workers, sandbox)
        self.rejected = Counter("visionray_serve_rejected_total", description="requests refused, by reason",
                                tag_keys=("reason",))
        self.images = Counter("visionray_serve_images_total", description="images classified")
        self.answers = Counter("visionray_serve_answers_total", description="requests answered, by model version",
                               tag_keys=("model", "version"))
        self.gate = make_gate(spec)  # HTTP and gRPC share the admission limit, keys and rate limits
        self.facts = ModelFacts(backend, source.model_input)  # one metadata cache for HTTP and gRPC
        self.router, self.rollout_counts = self._router(backend, rollout)
        self.payload_log = PayloadLog(spec.monitor) if spec.monitor is not None else None
        self.grpc = GrpcClassify(spec, self.gate, self.decoder.decode, self.router.classify, self.facts.input,
                                 self._count_rejection, self.images.inc, self.payload_log)

    def _router(self, backend: Backend, rollout: "RolloutParts | None") -> tuple[Router, Callable[[], Any] | None]:
        """Which model answers (``visionray.serve.rollout``), and how the app's rollout counts are read."""
        def answered(model: str, version: str) -> None:
            self.answers.inc(tags={"model": model, "version": version})

        if rollout is None:
            return Router((backend.classify, self.facts.info), None, None, on_answer=answered), None
        compared = Counter("visionray_shadow_compared_total", description="requests the shadow also classified, by "
                           "the served model's top-1", tag_keys=("label",))
        agreed = Counter("visionray_shadow_agreed_total", description="of those, the shadow's top-1 was the same",
                         tag_keys=("label",))

        def on_compare(label: str, same: bool) -> None:
            compared.inc(tags={"label": label})
            if same:
                agreed.inc(tags={"label": label})

        async def flush(delta: dict[str, Any]) -> None:
            await rollout.stats.add.remote(delta)

        candidate = None
        if rollout.handle is not None:
            other = HandleBackend(rollout.handle, self.spec.rollout.candidate.retry_after_s)
            candidate = (other.classify, ModelFacts(other).info)
        router = Router((backend.classify, self.facts.info), candidate, rollout.candidate, on_answer=answered,
                        on_compare=on_compare, flush=flush)
        return router, rollout.stats.summary.remote

    async def Classify(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802 - the gRPC method's name
        """``visionray.v1.Classifier/Classify`` (``visionray.serve.grpc_api``), via Serve's gRPC proxy."""
        return await self.grpc(request, grpc_context)

    def _count_rejection(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})

    def __serve_build_asgi_app__(self):
        return make_api(self.spec, self.backend, on_reject=self._count_rejection, on_images=self.images.inc,
                        echo_request_id=False, decoder=self.decoder, facts=self.facts, gate=self.gate,
                        router=self.router, payload_log=self.payload_log,
                        rollout_counts=self.rollout_counts)  # Serve's proxy sets and echoes X-Request-ID


@serve.deployment(name="Classifier")
class Classifier(ModelReplica):
    """``topology: split``: the model replicas, called by the ingress through a handle."""


class HandleBackend:
    """The classifier deployment seen from the ingress; overload becomes 503 JSON."""

    def __init__(self, handle: DeploymentHandle, retry_after_s: int):
        self.handle = handle
        self.retry_after = {"Retry-After": str(max(1, retry_after_s))}

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except BackPressureError as exc:
            raise Rejection(503, "overloaded", f"all model replicas are busy ({exc.message}); retry later", self.retry_after) from None
        except DeploymentUnavailableError as exc:
            raise Rejection(503, "model_unavailable", exc.message, self.retry_after) from None
        except RayActorError:  # the replica died under this request; Serve replaces it
            raise Rejection(503, "model_unavailable", "the model replica serving this request stopped; retry",
                            self.retry_after) from None

    async def info(self) -> dict[str, Any]:
        return await self._call("describe")

    async def classify(self, image: np.ndarray, k: int) -> list[Label]:
        return await self._call("classify", image, k)


class RolloutParts:
    """What an HTTP-facing replica gets for a rollout: the candidate's handle (None when it was
    refused), the app's ``RolloutStats`` and the rollout as built."""

    def __init__(self, candidate: Candidate, handle: DeploymentHandle | None, stats: DeploymentHandle):
        self.candidate, self.handle, self.stats = candidate, handle, stats


@serve.deployment(name="RolloutStats", num_replicas=1, ray_actor_options={"num_cpus": 0})
class RolloutStats:
    """The whole app's rollout counts: every HTTP-facing replica sends its own every second."""

    def __init__(self) -> None:
        self.counts = Counts()

    def add(self, delta: dict[str, Any]) -> None:
        self.counts.merge(delta)

    def summary(self) -> dict[str, Any]:
        return self.counts.to_json()


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress(ApiReplica):
    """``topology: split``: sanitizes and decodes, then calls the Classifier deployment."""

    def __init__(self, classifier: DeploymentHandle, source: Source, spec: ServeSpec, candidate: Candidate | None = None,
                 candidate_handle: DeploymentHandle | None = None, stats: DeploymentHandle | None = None):
        parts = RolloutParts(candidate, candidate_handle, stats) if candidate is not None else None
        self._init_api(source, spec, HandleBackend(classifier, spec.classifier.retry_after_s), parts)


class ReplicaBackend:
    """The replica's own batched model, seen from its API (``topology: combined``)."""

    def __init__(self, replica: ModelReplica):
        self.replica = replica

    async def info(self) -> dict[str, Any]:
        return self.replica.describe()

    async def classify(self, image: np.ndarray, k: int) -> list[Label]:
        return await self.replica.classify(image, k)


@serve.deployment(name="Classifier")
@serve.ingress()
class CombinedClassifier(ModelReplica, ApiReplica):
    """``topology: combined``: one deployment sanitizes, decodes and classifies (batched across the
    replica's concurrent requests): no ingress -> classifier hop, no second process per request."""

    def __init__(self, source: Source, spec: ServeSpec, candidate: Candidate | None = None,
                 candidate_handle: DeploymentHandle | None = None, stats: DeploymentHandle | None = None):
        ModelReplica.__init__(self, source, spec)
        parts = RolloutParts(candidate, candidate_handle, stats) if candidate is not None else None
        self._init_api(source, spec, ReplicaBackend(self), parts)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for ``serve run``/``serve deploy`` (``import_path: visionray.serve.app:build_app``):
    ``args`` is validated as a ``ServeSpec``; the model alias is pinned to its current version."""
    spec = load_serve_spec(args)
    source = resolve_source(spec)
    rollout: dict[str, Any] = {}
    candidate = resolve_candidate(spec, source)  # verified here; a refused one gets no deployment and no traffic
    if candidate is not None:
        handle = None
        if candidate.source is not None:
            handle = Classifier.options(name="Candidate", **spec.rollout.candidate.options()).bind(candidate.source, spec)
        rollout = {"candidate": candidate, "candidate_handle": handle, "stats": RolloutStats.bind()}
    if spec.topology == "combined":
        return CombinedClassifier.options(**spec.classifier.options(http_facing=True)).bind(source, spec, **rollout)
    classifier = Classifier.options(**spec.classifier.options()).bind(source, spec)
    return Ingress.options(**spec.ingress.options(http_facing=True)).bind(classifier, source, spec, **rollout)
