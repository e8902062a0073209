"""The serving spec: VisionRay's own section of a Ray Serve config file (``applications[].args``).

A file under ``serve/`` is a plain Ray Serve config (``serve run``/``serve deploy`` read it as is);
its application's ``import_path`` is ``visionray.serve.app:build_app`` and its ``args`` are a
``ServeSpec``, validated once by ``build_app`` (and by ``visionray serve`` before it starts Ray).
Every default and its unit is here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from visionray.serve.modes import IngressMode
from visionray.spec_io import ALIAS_PATTERN, NAME_PATTERN, SpecError, Strict, format_errors, read_yaml, shown, validate_model

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
MODEL_REF = re.compile(rf"(?P<name>{NAME_PATTERN})@(?P<tag>{ALIAS_PATTERN}|[1-9][0-9]{{0,8}})")  # fullmatch
IMPORT_PATH = "visionray.serve.app:build_app"


class SanitizerSpec(Strict):
    """Limits applied to every request before (and while) any image is decoded."""

    max_body_bytes: int = Field(8 * 2**20, ge=1024, le=2**30, description="request body cap while it streams in (bytes)")
    body_timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="time allowed to receive the whole body (s); 408 after")
    body_grace_s: float = Field(1.0, gt=0.0, le=600.0, description="a body may start slowly this long (s); then min_body_bytes_per_s holds")
    min_body_bytes_per_s: int = Field(16384, ge=1, le=2**30, description="average upload rate a body must keep after body_grace_s (bytes/s); 408 below")
    max_unfinished_bodies: int = Field(16, ge=1, le=100_000, description="bodies still arriving at once per replica before newcomers get crowded_body_s")
    max_unfinished_bodies_per_client: int = Field(4, ge=1, le=100_000, description="the same per client address")
    crowded_body_s: float = Field(0.1, gt=0.0, le=60.0, description="when a request starts while those caps are reached, the time the rest of its body may take after its first part (s); 503 after")
    max_images: int = Field(16, ge=1, le=256, description="images per multipart request")
    allowed_types: list[Literal["image/png", "image/jpeg", "image/webp"]] = Field(
        default_factory=lambda: list(IMAGE_TYPES), min_length=1, description="accepted image content types"
    )
    max_width: int = Field(4096, ge=8, le=65535, description="widest image accepted, read from the header (px)")
    max_height: int = Field(4096, ge=8, le=65535, description="tallest image accepted, read from the header (px)")
    max_pixels: int = Field(16 * 2**20, ge=64, le=2**31, description="width x height cap; also Pillow's MAX_IMAGE_PIXELS (px)")
    max_request_pixels: int = Field(32 * 2**20, ge=64, le=2**33, description="declared pixels of all images of one request together (px)")
    max_progressive_pixels: int = Field(4 * 2**20, ge=64, le=2**31, description="pixel cap for progressive JPEGs (px); every scan walks them all")
    max_jpeg_scans: int = Field(32, ge=1, le=1000, description="SOS segments one JPEG may hold (baseline: 1 to 4)")
    max_png_chunks: int = Field(4096, ge=3, le=1_000_000, description="chunks one PNG may hold")
    decode_timeout_s: float = Field(2.0, gt=0.0, le=60.0, description="wall-clock budget to decode one image, from when a "
                                    "worker starts on it (s); the worker is killed and replaced after, the image gets 422")
    decode_workers: int = Field(4, ge=1, le=64, description="sandboxed decoder processes per replica (the only place untrusted bytes are decoded)")
    decode_queue: int = Field(64, ge=0, le=100_000, description="images that may wait for a free decoder; beyond: 503")
    decode_queue_timeout_s: float = Field(2.0, gt=0.0, le=600.0, description="longest wait for a free decoder (s); 503 with Retry-After after")
    decode_memory_mb: int = Field(1024, ge=128, le=65536, description="address-space limit of each decoder process (MiB)")
    decode_cpu_s: int = Field(300, ge=1, le=86400, description="CPU-seconds limit of each decoder process; it is replaced at half of it")
    decode_seccomp: bool = Field(True, description="decoders run under a seccomp filter (no sockets, exec or new processes); "
                                 "needs libseccomp (Debian libseccomp2); false: rlimits only")

    @model_validator(mode="after")
    def _check_limits(self) -> "SanitizerSpec":
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(f"max_request_pixels={self.max_request_pixels} is below max_pixels={self.max_pixels}: "
                             "an image within the per-image limit could never be sent")
        return self

    @field_validator("allowed_types")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"allowed_types {v} lists a type twice")
        return v


class AuthSpec(Strict):
    """Optional API keys: requests must send ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""

    api_keys_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]*$", description="environment variable holding comma-separated keys")
    api_keys_file: str | None = Field(None, description="file with one key per line (# comments allowed)")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


class RateLimitSpec(Strict):
    """A token bucket per client (its valid API key when auth is on, else its address), per ingress
    replica; failed keys are throttled per address."""

    requests_per_s: float | None = Field(None, gt=0.0, le=1e6, description="sustained rate per client (req/s); null: off")
    burst: int = Field(20, ge=1, le=100_000, description="requests a client may send at once above the rate")
    max_clients: int = Field(10_000, ge=1, le=10_000_000, description="clients tracked (least recently seen dropped)")
    failed_auth_per_s: float = Field(0.5, gt=0.0, le=1e6, description="failed API keys allowed per client address (per s); 429 beyond, on even when requests_per_s is off")
    failed_auth_burst: int = Field(10, ge=1, le=100_000, description="failed API keys an address may send at once")


class BatchSpec(Strict):
    max_batch_size: int = Field(16, ge=1, le=4096, description="images per forward pass (serve.batch)")
    # 2 ms: under load batches fill while the model runs anyway; an idle replica answers a lone
    # request 2 ms late instead of 10 (benchmarks/serve.py: same req/s at concurrency 32 on CPU)
    wait_s: float = Field(0.002, ge=0.0, le=10.0, description="longest wait to fill a batch (s)")


PROBE_HEADROOM = 8  # requests per HTTP-facing replica above the admission gate's limit: /healthz, /readyz, /docs


class DeploymentSpec(Strict):
    """Replicas, autoscaling and overload behaviour of one Serve deployment."""

    min_replicas: int = Field(1, ge=0, le=1024, description="autoscaling floor; 0 scales to zero when idle")
    max_replicas: int = Field(4, ge=1, le=1024, description="autoscaling ceiling")
    initial_replicas: int | None = Field(None, ge=0, le=1024, description="replicas at deploy time; default min_replicas")
    target_ongoing_requests: float = Field(8.0, gt=0.0, le=10_000, description="requests per replica the autoscaler aims for")
    upscale_delay_s: float = Field(3.0, ge=0.0, le=3600, description="load must stay high this long before scaling up (s)")
    downscale_delay_s: float = Field(60.0, ge=0.0, le=3600, description="load must stay low this long before scaling down (s)")
    metrics_interval_s: float = Field(1.0, gt=0.0, le=60, description="how often replicas report load to the autoscaler (s)")
    look_back_period_s: float = Field(10.0, gt=0.0, le=600, description="window the autoscaler averages load over (s)")
    max_ongoing_requests: int = Field(32, ge=1, le=100_000, description="requests one replica works on at once")
    max_queued_requests: int = Field(64, ge=-1, le=1_000_000, description="requests waiting for a replica; beyond: 503 (-1: unbounded)")
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After sent with 503 when overloaded (s)")
    num_cpus: float = Field(1.0, ge=0.0, le=256, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0.0, le=8, description="GPUs reserved per replica (fractions share a GPU)")
    graceful_shutdown_wait_loop_s: float = Field(2.0, ge=0.0, le=600, description="poll interval while draining (s)")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0.0, le=3600, description="drain time before a replica is killed (s)")
    health_check_period_s: float = Field(10.0, gt=0.0, le=3600, description="time between health checks (s)")
    health_check_timeout_s: float = Field(30.0, gt=0.0, le=3600, description="a health check slower than this fails (s)")
    max_constructor_retries: int = Field(3, ge=1, le=100, description="failed replica starts before the deploy fails")

    @model_validator(mode="after")
    def _check(self) -> "DeploymentSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas={self.initial_replicas} must be within [min_replicas={self.min_replicas}, "
                f"max_replicas={self.max_replicas}]"
            )
        return self

    @property
    def admission_limit(self) -> int | None:
        """Requests one replica of an HTTP-facing deployment holds before our gate answers 503 JSON:
        the ones it works on plus the ones that may wait (None: ``max_queued_requests: -1``)."""
        return None if self.max_queued_requests == -1 else self.max_ongoing_requests + self.max_queued_requests

    def options(self, http_facing: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``. ``http_facing``: the deployment clients
        reach over HTTP. Its overload is answered by our admission gate (503 JSON with Retry-After,
        ``SanitizerMiddleware``) so Serve's own limits sit above the gate's and never answer first
        (Serve's answer is plain text): each replica takes ``admission_limit`` requests plus
        ``PROBE_HEADROOM`` for the probes, and Serve queues nothing in front of the replicas itself
        (``max_queued_requests: -1``; requests wait in the proxy only while no replica is up, for
        example at a cold start from zero, up to ``http_options.request_timeout_s``)."""
        ongoing, queued = self.max_ongoing_requests, self.max_queued_requests
        if http_facing and self.admission_limit is not None:
            ongoing, queued = self.admission_limit + PROBE_HEADROOM, -1
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": self.initial_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.metrics_interval_s,
                "look_back_period_s": self.look_back_period_s,
            },
            "max_ongoing_requests": ongoing,
            "max_queued_requests": queued,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "max_constructor_retry_count": self.max_constructor_retries,
        }


def _ingress_default() -> DeploymentSpec:
    return DeploymentSpec(min_replicas=1, max_replicas=2, target_ongoing_requests=32, max_ongoing_requests=128,
                          max_queued_requests=256, num_cpus=0.5)


class RolloutSpec(Strict):
    """A second registry version next to ``model``: a canary answers ``percent``% of requests; a
    shadow classifies ``percent``% of requests too, off the response path, and agreement with the
    served model is counted. Verified (signature and files) when the app is built: a candidate
    that fails gets no traffic and ``/v1/rollout`` says why."""

    canary: str | None = Field(None, description="NAME@VERSION (or NAME@ALIAS, pinned at build) answering percent% of requests")
    shadow: str | None = Field(None, description="NAME@VERSION (or NAME@ALIAS) also classifying percent% of requests, answers discarded")
    percent: float = Field(gt=0.0, le=100.0, description="share of requests for the candidate (%)")
    candidate: DeploymentSpec = Field(default_factory=lambda: DeploymentSpec(min_replicas=1, max_replicas=2),
                                      description="the candidate's model replicas")

    @model_validator(mode="after")
    def _one(self) -> "RolloutSpec":
        if (self.canary is None) == (self.shadow is None):
            raise ValueError(f"give exactly one of canary or shadow; got canary={self.canary!r}, shadow={self.shadow!r}")
        if not MODEL_REF.fullmatch(self.ref):
            raise ValueError(f"{self.mode} {shown(self.ref)} is not NAME@VERSION or NAME@ALIAS (e.g. digits@2)")
        return self

    @property
    def mode(self) -> Literal["canary", "shadow"]:
        return "canary" if self.canary is not None else "shadow"

    @property
    def ref(self) -> str:
        return self.canary or self.shadow or ""


class MonitorSpec(Strict):
    """Sampled payload logging: a share of requests written as Parquet rows (time, size, decoded
    dimensions, top-1, confidence, latency, version); the image itself only with ``log_images``."""

    path: str = Field(description="directory or URI (s3://, gs://) the rows are written under")
    sample_percent: float = Field(1.0, gt=0.0, le=100.0, description="share of requests logged (%)")
    flush_rows: int = Field(1000, ge=1, le=1_000_000, description="rows buffered per replica before a file is written")
    flush_s: float = Field(60.0, gt=0.0, le=86400.0, description="longest time rows stay buffered (s)")
    log_images: bool = Field(False, description="also store the request's image bytes (privacy: off by default)")


class ServeSpec(Strict):
    """What ``visionray.serve.app:build_app`` serves and how."""

    model: str | None = Field(None, description="registry model reference NAME@ALIAS or NAME@VERSION, e.g. digits@best")
    registry: str | None = Field(None, description="registry root; default $VISIONRAY_REGISTRY or ./registry")
    public_keys: list[str] = Field(default_factory=list, description="PEM public keys that may have signed the model")
    allow_unsigned: bool = Field(False, description="serve a model without a valid signature (development only)")
    checkpoint: str | None = Field(None, description="a checkpoint directory instead of a registry model (needs allow_unsigned)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica has a GPU")
    top_k: int = Field(5, ge=1, le=1000, description="labels returned per image unless the request asks (?top_k=)")
    max_top_k: int = Field(20, ge=1, le=100_000, description="largest ?top_k= a request may ask for")
    readiness_timeout_s: float = Field(5.0, gt=0.0, le=600, description="/readyz waits this long for the model (s)")
    sanitizer: SanitizerSpec = Field(default_factory=SanitizerSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)
    rate_limit: RateLimitSpec = Field(default_factory=RateLimitSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    topology: Literal["split", "combined"] = Field(
        "split", description="split: an ingress deployment (sanitizer, decoding) calls the classifier replicas "
                             "through a handle, each autoscaled on its own; combined: one deployment (`classifier`) "
                             "sanitizes, decodes and classifies, one hop and one process per request fewer")
    ingress_mode: IngressMode = Field(
        "proxy", description="proxy: Serve's HTTP proxy forwards each request to an HTTP-facing replica; direct: "
                             "each HTTP-facing replica listens itself (http_options.port, then the next ports), no "
                             "proxy hop; throughput: direct plus Ray's throughput-optimized bundle. The cluster must "
                             "start in that mode (visionray.serve.modes; `visionray serve` does it locally)")
    rollout: RolloutSpec | None = Field(None, description="a canary or shadow candidate next to model")
    monitor: MonitorSpec | None = Field(None, description="sampled payload logging; null: off")
    classifier: DeploymentSpec = Field(default_factory=DeploymentSpec, description="the model replicas")
    ingress: DeploymentSpec = Field(default_factory=_ingress_default, description="the HTTP ingress replicas (sanitizer, decoding)")

    @property
    def http_facing(self) -> DeploymentSpec:
        """The deployment clients reach over HTTP: the ingress, or the classifier when combined."""
        return self.classifier if self.topology == "combined" else self.ingress

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_REF.fullmatch(v):
            raise ValueError(f"model {shown(v)} is not NAME@ALIAS or NAME@VERSION (e.g. digits@best, digits@3)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ServeSpec":
        if (self.model is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of model (a registry NAME@ALIAS) or checkpoint (a directory)"
                             f"; got model={self.model!r}, checkpoint={self.checkpoint!r}")
        if self.checkpoint is not None and not self.allow_unsigned:
            raise ValueError(f"checkpoint={self.checkpoint!r} is not signed; serve it from the registry, "
                             "or set allow_unsigned: true (development only)")
        if self.rollout is not None and self.model is None:
            raise ValueError(f"rollout ({self.rollout.mode} {self.rollout.ref}) needs model (a registry NAME@ALIAS), "
                             f"not checkpoint={self.checkpoint!r}")
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k={self.top_k} is above max_top_k={self.max_top_k}")
        if self.classifier.max_ongoing_requests < self.batch.max_batch_size:
            raise ValueError(
                f"classifier.max_ongoing_requests={self.classifier.max_ongoing_requests} is below "
                f"batch.max_batch_size={self.batch.max_batch_size}: batches could never fill"
            )
        if self.ingress_mode != "proxy" and self.http_facing.min_replicas < 1:
            which = "classifier" if self.topology == "combined" else "ingress"
            raise ValueError(f"ingress_mode={self.ingress_mode!r} needs {which}.min_replicas >= 1 (got 0): clients connect "
                             "to the HTTP-facing replicas themselves, so with none running nothing listens on the port; "
                             "scale the classifier to zero behind a split ingress instead, or use ingress_mode: proxy")
        if self.topology == "combined" and self.ingress != _ingress_default():
            raise ValueError("ingress is set but topology is 'combined': there is no separate ingress deployment; "
                             "configure the one deployment under classifier, or use topology: split")
        return self


def cpus_at_full_scale(spec: ServeSpec) -> float:
    """CPUs the app reserves when every deployment is at ``max_replicas``."""
    deployments = [spec.classifier] if spec.topology == "combined" else [spec.classifier, spec.ingress]
    return sum(d.max_replicas * d.num_cpus for d in deployments)


def load_serve_spec(args: dict[str, Any] | ServeSpec, source: str = "serve args") -> ServeSpec:
    """Validate an application's ``args`` (raises ``SpecError`` naming each bad field)."""
    if isinstance(args, ServeSpec):
        return args
    if not isinstance(args, dict):
        raise SpecError(source, [f"args must be a mapping, got {type(args).__name__}"])
    return validate_model(ServeSpec, args, source)


def read_serve_config(path: str | Path) -> dict[str, Any]:
    """A Serve config file, checked: Ray Serve's own schema for the file, ``ServeSpec`` for the
    args of each VisionRay application. Returns the raw mapping (what ``serve deploy`` reads)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema


    path = Path(path)
    raw = read_yaml(path)
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(str(path), format_errors(exc)) from None
    apps = [a for a in raw.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise SpecError(str(path), [f"applications: none has import_path {IMPORT_PATH!r}"])
    for i, app in enumerate(raw["applications"]):
        if app.get("import_path") == IMPORT_PATH:
            load_serve_spec(app.get("args") or {}, f"{path}: applications.{i}.args")
    return raw
