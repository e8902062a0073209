"""How HTTP reaches the app: through Serve's proxy, or straight into the ingress replicas.

Ray Serve 2.60 reads these modes from environment variables when its processes start
(``ray/serve/_private/constants.py``), so they are a property of the cluster, not of one app:

- ``proxy`` (Serve's default): Serve's HTTP proxy listens on ``http_options.port`` and forwards
  every request to an ingress replica (one more process, two more ASGI round trips per request).
- ``direct`` (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``): every ingress replica runs its own HTTP
  server on a port Serve allocates from a range; no request crosses the proxy. Here the range
  starts at ``http_options.port`` (one port per ingress replica: the first replica answers on the
  configured port), and Serve's proxy, which direct ingress keeps on the head node for
  applications with no running replica, moves to ``port + FALLBACK_PORT_OFFSET``.
- ``throughput``: Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` bundle: direct ingress plus gRPC
  between deployments, user code and the router on the replica's main event loop, buffered
  request logs, no log copy to stderr and the garbage collector frozen after start-up.

HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY``) needs the ``haproxy`` binary on every node and binds
replicas to every interface; it is not offered (see the README, "Serving modes").

``mode_env`` gives the variables a cluster must start with; ``visionray serve`` sets them when it
starts the local cluster. ``check_replica_mode`` runs in each HTTP-facing replica: a replica whose
cluster runs another mode than its config asks for refuses to start, saying which variables.
"""

from __future__ import annotations

import os
from typing import Literal

IngressMode = Literal["proxy", "direct", "throughput"]
FALLBACK_PORT_OFFSET = 100  # Serve's proxy port in the direct modes: http_options.port + this
DRAIN_S = 2  # s a draining direct-ingress replica keeps answering (Serve's default, 30, is for external load balancers)

_DIRECT = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
_BUNDLE = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


class ModeMismatch(RuntimeError):
    """The cluster runs another serving mode than the config's ``ingress_mode``."""


def mode_env(mode: IngressMode, port: int, replicas: int) -> dict[str, str]:
    """The environment a cluster's processes need for ``mode``, with ``replicas`` ingress replicas
    listening from ``port`` up (the direct modes)."""
    if mode == "proxy":
        return {_DIRECT: "0", _BUNDLE: "0"}
    return {
        _DIRECT: "1",
        _BUNDLE: "1" if mode == "throughput" else "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + max(1, replicas)),  # exclusive: range(min, max)
        # without HAProxy nobody routes to a stale port: a replaced replica may take its port back at once
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S),
    }


def running_mode(environ: dict[str, str] | None = None) -> IngressMode:
    """The mode this process's environment puts Serve in (a replica inherits its cluster's)."""
    env = os.environ if environ is None else environ
    bundle = env.get(_BUNDLE, "0").lower() in ("1", "true")
    if bundle and env.get(_DIRECT, "1") != "0":
        return "throughput"
    return "direct" if env.get(_DIRECT, "0") == "1" else "proxy"


def check_replica_mode(mode: IngressMode) -> None:
    """Raise ``ModeMismatch`` when this replica's cluster runs another mode than ``mode``."""
    actual = running_mode()
    if actual != mode:
        wanted = " ".join(f"{k}={v}" for k, v in mode_env(mode, 8000, 1).items() if k in (_DIRECT, _BUNDLE))
        raise ModeMismatch(f"ingress_mode: {mode} but this cluster serves in {actual} mode; start the cluster with "
                           f"{wanted} in its environment (`visionray serve` does that for the local cluster it "
                           f"starts), or set ingress_mode: {actual}")


def ingress_ports(app_name: str) -> list[int]:
    """The ports ``app_name``'s HTTP-facing replicas listen on in the direct modes (empty in
    ``proxy`` mode or while none runs). Serve's public API has no call for this: it is what the
    Serve controller tells HAProxy (``get_target_groups``), read here through Ray's public actor
    API; this function is the one place that depends on that controller method."""
    import ray

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    groups = ray.get(controller.get_target_groups.remote(app_name))
    return sorted(t.port for g in groups if str(g.protocol).upper().endswith("HTTP") and g.app_name == app_name
                  for t in g.targets)
