"""Shared fixtures: one real local Ray cluster per test session, bound to loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import CIFAR_TAR, REPO


def pytest_collection_modifyitems(config, items):
    """A test that needs the Ray cluster is slow by definition: ``-m "not slow"`` starts no Ray."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (4 logical CPUs on any machine so 2-worker jobs, a Train controller
    and Serve replicas fit on a 2-core CI box)."""
    import ray

    from visionray.cluster.local import init_ray, local_cluster_env

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray Train's controller polls its workers every 2 s by default: reports, start and end of each
    # run wait on that poll. A quarter second keeps the tests' many short runs short.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Workers import functions defined in test modules by name (tests.<stage>.test_<module>): put the
    # repository on their path.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    if not ray.is_initialized():
        with local_cluster_env():
            ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                     log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": path}})
    init_ray()  # no-op once connected; keeps the CLI's path exercised
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart_run(ray_cluster, tmp_path_factory):
    """The README's main job (jobs/quickstart.yaml as shipped), trained once per test session:
    (spec, every report of the run, Ray's Result). Tests read it; none may train it further."""
    from visionray.specs import load_spec
    from visionray.train.driver import fit_with_progress

    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"output.storage={tmp_path_factory.mktemp('runs')}"])
    reports: list[dict] = []
    result = fit_with_progress(spec, reports.append)
    return spec, reports, result


@pytest.fixture(scope="session")
def cifar_tar() -> Path:
    if not CIFAR_TAR.exists():
        pytest.skip(f"{CIFAR_TAR} not present (../shared is absent)")
    return CIFAR_TAR


@pytest.fixture
def kill_train_worker_after():
    """Start a thread that SIGKILLs one live Ray Train worker process as soon as a path matching
    ``pattern`` appears under ``root`` (a checkpoint), and return the list it fills with the pid."""
    import signal
    import threading
    import time

    threads = []

    def start(root: Path, pattern: str) -> list[int]:
        import ray
        from ray.util.state import list_actors

        killed: list[int] = []

        def run() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and not list(root.glob(pattern)):
                time.sleep(0.2)
            actors = list_actors(
                address=ray.get_runtime_context().gcs_address,
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True,
            )
            if actors:
                os.kill(actors[-1].pid, signal.SIGKILL)
                killed.append(actors[-1].pid)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return killed

    yield start
    for thread in threads:
        thread.join(timeout=310)
