"""Faults on real Ray Serve over real HTTP (loopback): a Classifier replica SIGKILLed under load is
replaced while retrying clients see no failure; the Serve controller killed and restarted does not
drop the running app; and a short soak (benchmarks/soak.py) with hostile input mixed in."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from visionray.serve.client import Client
from tests.helpers import REPO

pytestmark = pytest.mark.slow

APP = "faults"
ROUTE = "/faults"
CLASSIFIERS = 2  # replicas of the model: one may die while the other answers


def _load_soak():
    spec = importlib.util.spec_from_file_location("visionray_bench_soak", REPO / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def controller():
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


@pytest.fixture(scope="module")
def serve_port(ray_cluster) -> int:
    """The port of the session's Serve: started here on a free loopback port unless another module
    already runs it (then left running for its owner)."""
    import ray
    from ray import serve

    try:
        controller()
        started = False
    except ValueError:
        started = True
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    yield ray.get(controller().get_http_config.remote()).port
    if started:
        serve.shutdown()


@pytest.fixture(scope="module")
def fault_app(serve_port, tmp_path_factory) -> str:
    """An untrained, signed digits-sized convnet (1x16x16) with two Classifier replicas at /faults."""
    from ray import serve

    from visionray.serve.app import build_app

    registry, public = soak.register_untrained(tmp_path_factory.mktemp("faults"), "faults", "convnet",
                                               {"depth": 2, "width": 8}, channels=1, size=16)
    replicas = {"min_replicas": CLASSIFIERS, "max_replicas": CLASSIFIERS, "num_cpus": 0.25,
                "health_check_period_s": 1.0, "health_check_timeout_s": 10.0}
    args = {"model": "faults@best", "registry": str(registry), "public_keys": [str(public)],
            "classifier": replicas, "ingress": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}}
    serve.run(build_app(args), name=APP, route_prefix=ROUTE)
    yield f"http://127.0.0.1:{serve_port}{ROUTE}"
    serve.delete(APP)


PNG = soak.encode(soak.photo(16, mode="L"), "PNG")


def classifier_pids() -> set[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                         filters=[("state", "=", "ALIVE"), ("class_name", "=", f"ServeReplica:{APP}:Classifier")])
    return {a.pid for a in actors}


def app_state() -> tuple[str, int]:
    from ray import serve

    app = serve.status().applications[APP]
    return str(app.status), app.deployments["Classifier"].replica_states.get("RUNNING", 0)


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - polling a component that is restarting
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(poll_s)
    pytest.fail(f"{what} within {timeout_s} s (last: {last})")


def healthy() -> bool:
    return app_state() == ("ApplicationStatus.RUNNING", CLASSIFIERS) and len(classifier_pids()) == CLASSIFIERS


def replaced(victim: int) -> set[int] | None:
    """The Classifier pids once a new replica runs in place of ``victim``, else None."""
    pids = classifier_pids()
    if len(pids) == CLASSIFIERS and victim not in pids and app_state() == ("ApplicationStatus.RUNNING", CLASSIFIERS):
        return pids
    return None


class Load:
    """Threads posting a PNG back to back through the project's retrying ``Client`` (503/429 are
    retried after Retry-After); anything the client finally raises is a failed request."""

    def __init__(self, url: str, threads: int = 4, retries: int = 8):
        self.url, self.retries = url, retries
        self.ok_at: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with Client(self.url, timeout_s=30.0, retries=self.retries) as client:
            while not self.stop.is_set():
                try:
                    result = client.classify([PNG], top_k=1)
                    assert len(result["results"]) == 1
                    self.ok_at.append(time.time())
                except Exception as exc:  # noqa: BLE001 - every failure is recorded, whatever it is
                    self.failures.append(f"{time.time():.1f} {type(exc).__name__}: {exc}")

    def ok_since(self, t: float) -> int:
        return sum(1 for x in self.ok_at if x >= t)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_killed_classifier_replica_is_replaced_without_failed_requests(fault_app):
    wait_until(healthy, 120, "the app RUNNING with its replicas")
    before = classifier_pids()
    with Load(fault_app) as load:
        wait_until(lambda: len(load.ok_at) >= 10, 60, "answers before the kill")
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        after = wait_until(lambda: replaced(victim), 120, "a replacement replica RUNNING")
        replaced_at = time.time()
        wait_until(lambda: load.ok_since(replaced_at) >= 10, 60, "answers after the replacement")
    assert not load.failures, load.failures[:5]
    assert len(after) == CLASSIFIERS and victim not in after and after & before  # one new, one survivor
    assert load.ok_since(killed_at) >= 10
    assert app_state() == ("ApplicationStatus.RUNNING", CLASSIFIERS)


def test_controller_restart_does_not_drop_the_app(fault_app):
    import ray

    wait_until(healthy, 120, "the app RUNNING with its replicas")
    before = classifier_pids()
    old_controller_pid = ray.get(controller().__ray_call__.remote(lambda self: os.getpid()))
    with Load(fault_app) as load:
        wait_until(lambda: len(load.ok_at) >= 10, 60, "answers before the kill")
        ray.kill(controller(), no_restart=False)
        killed_at = time.time()
        # keeps answering while the controller is down and while it recovers
        wait_until(lambda: load.ok_since(killed_at) >= 20, 60, "answers after the controller was killed")
        new_pid = wait_until(lambda: ray.get(controller().__ray_call__.remote(lambda self: os.getpid()), timeout=10),
                             120, "the controller back")
        wait_until(healthy, 120, "the app RUNNING after the controller restarted")
        recovered_at = time.time()
        wait_until(lambda: load.ok_since(recovered_at) >= 10, 60, "answers after the recovery")
    assert new_pid != old_controller_pid  # it really was restarted
    assert not load.failures, load.failures[:5]
    assert classifier_pids() == before  # the running replicas were adopted, not redeployed


@pytest.mark.parametrize("topology,replicas", [("split", {"Classifier", "Ingress"}), ("combined", {"Classifier"})])
def test_short_soak_has_no_5xx_no_drops_and_bounded_memory(serve_port, tmp_path, topology, replicas):
    out = tmp_path / "soak.json"
    code = soak.main(["--duration", "10", "--concurrency", "8", "--port", str(serve_port), "--out", str(out),
                      "--topology", topology])
    report = json.loads(out.read_text())
    assert code == 0, report["failures"]
    assert report["five_xx"] == 0 and report["transport_errors"] == 0 and report["timeouts"] == 0
    assert report["by_status"].get("200", 0) > 0
    assert {"413", "415", "422"} <= set(report["by_status"])  # hostile input was sent and refused
    assert {m["replica"].split()[0] for m in report["memory"]} == replicas
    assert not any(m["too_much"] for m in report["memory"])
