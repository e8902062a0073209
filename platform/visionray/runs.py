"""Where runs live and how the driver reaches Ray: local Ray start-up (``init_ray``), the run
directory layout, and the checkpoints in it (``best_checkpoint``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any


from visionray import checkpoint as ckpt
from visionray.specs import TrainSpec


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local cluster bound to loopback.

    Unless ``verbose``, worker and controller output stays in Ray's log files (under
    /tmp/ray/session_latest/logs): Ray's repeated internal lines are kept out of the user's way,
    while real errors still surface as exceptions and through ``ReportToQueue.after_exception``."""
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
    even when other Ray clusters run on the same machine. The driver's environment is restored."""
    import os
    import socket

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


def storage_path(spec: TrainSpec) -> str:
    """Ray's storage path: a URI as given, a local path made absolute (Ray requires that)."""
    storage = spec.output.storage
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def run_dir(spec: TrainSpec) -> str:
    """Where Ray keeps this job's checkpoints: ``<storage>/<name>``."""
    return f"{storage_path(spec).rstrip('/')}/{spec.output.name}"


def local_log_dir(spec: TrainSpec) -> Path:
    """Where the driver writes metrics.csv and TensorBoard events: the run directory when it is
    local, else ``runs/<name>`` under the current directory."""
    if "://" in spec.output.storage:
        return Path("runs") / spec.output.name
    return Path(run_dir(spec))


def list_checkpoints(directory: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """A run directory's checkpoints with their metadata, oldest epoch first."""
    found = []
    for d in sorted(Path(directory).glob("checkpoint_*")):
        try:
            found.append((d, ckpt.read_metadata(d)))
        except ckpt.CheckpointError:
            continue  # a checkpoint Ray is still writing, or one of another format
    return sorted(found, key=lambda item: item[1]["epoch"])


def completed_epochs(spec: TrainSpec) -> int:
    """Epochs the job's latest checkpoint holds (0 for a new job or a remote store)."""
    if "://" in spec.output.storage:
        return 0
    found = list_checkpoints(run_dir(spec))
    return found[-1][1]["epoch"] if found else 0


def best_checkpoint(directory: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's best by val_acc (ties: later epoch)."""
    directory = Path(directory)
    if (directory / ckpt.METADATA_FILE).exists():
        return directory
    found = list_checkpoints(directory)
    if not found:
        raise ckpt.CheckpointError(f"{directory}: neither a checkpoint nor a run directory with checkpoints")
    return max(found, key=lambda item: (item[1]["metrics"].get("val_acc", 0.0), item[1]["epoch"]))[0]
