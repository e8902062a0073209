"""How the driver reaches Ray: connect to a cluster, or start a local one bound to loopback."""

from __future__ import annotations

import contextlib
from typing import Any


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local cluster bound to loopback.

    Unless ``verbose``, worker and controller output stays in Ray's log files (under
    /tmp/ray/session_latest/logs): Ray's repeated internal lines are kept out of the user's way,
    while real errors still surface as exceptions and through
    ``visionray.train.progress.ReportToQueue.after_exception``."""
    import logging
    import os

    import ray

    from visionray.defaults import LOCAL_HOST

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
    }
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves Ray's state API (Train's placement-group cleaner polls it) and the
        # Jobs API; both listen on loopback only.
        with local_cluster_env():
            ray.init(address="local", include_dashboard=True, dashboard_host=LOCAL_HOST,
                     _node_ip_address=LOCAL_HOST, **kwargs)


@contextlib.contextmanager
def local_cluster_env():
    """Start a local cluster on a known GCS port and give its processes RAY_ADDRESS: Ray's own
    state-API lookups inside the cluster (Train's placement-group cleaner) then find this cluster
    even when other Ray clusters run on the same machine. The driver's environment is restored,
    except that Ray Train's preemption watcher stays off for this driver and the cluster's
    processes: it polls for node drains, which only a cloud provider or KubeRay announce, and it
    would start one more Python process for every training run and every trial."""
    import os
    import socket

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
