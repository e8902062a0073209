"""The cluster story: cluster.yaml against Ray's own validation, `visionray submit` preflight, and a
real two-node Ray cluster on loopback (token authentication on) running jobs through the Jobs API,
including one whose second node is killed mid-training."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from visionray.cluster.client import JobsError, check_token_transport
from visionray.cluster.jobs import detect_kind, prepare, submission_id
from visionray.registry.keys import generate_keys
from visionray.spec_io import SpecError
from tests.helpers import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
# Node addresses: loopback, but not 127.0.0.1, which `ray start` swaps for the host's network IP.
# Two addresses make the two nodes look like two hosts.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


# --------------------------------------------------------------------------- cluster.yaml


def _ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"ray\[", d))
    return re.search(r"==\s*([0-9.*]+)", spec).group(1)


def _validate(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_validation_and_matches_the_pins():
    import ray

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    config = _validate(raw)
    pin = _ray_pin()
    assert re.fullmatch(pin.replace(".", r"\.").replace("*", r"\d+"), ray.__version__), (pin, ray.__version__)
    images = [config["docker"]["image"], config["docker"]["head_image"]]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image
    assert config["docker"]["image"].endswith("-gpu")  # training workers get Ray's CUDA image
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # nothing trains on the head
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu = [n for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert cpu, "a CPU worker type for preprocessing"
    assert config["idle_timeout_minutes"] > 0
    assert "." in config["file_mounts"].values()  # this checkout, the same commit
    assert any("pip install" in c and "/home/ray/visionray" in c for c in config["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("available_node_types", "gpu", "min_workers"), "zero", "is not of type 'integer'"),
        (("available_node_types", "gpu", "resources", "GPU"), -1, "less than the minimum"),
        (("head_node_type",), "nope", "must be one of `available_node_types`"),
        (("idle_timeout_minutes",), "ten", "is not of type 'number'"),
        (("max_workers",), 0, "smaller than the sum of `min_workers`"),
        (("typo_top_level_key",), 1, "Additional properties are not allowed"),
    ],
)
def test_rays_validation_catches_broken_cluster_configs(path, value, message):
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    if path == ("max_workers",):
        raw["available_node_types"]["cpu"]["min_workers"] = 1
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(Exception, match=re.escape(message)):
        _validate(raw)


# --------------------------------------------------------------------------- submit: preflight


@pytest.mark.parametrize(
    "spec, kind",
    [("jobs/quickstart.yaml", "train"), ("jobs/cifar10-resnet.yaml", "train"), ("tune/quickstart.yaml", "tune"),
     ("serve/classifier.yaml", "serve")],
)
def test_kind_of_spec(spec, kind):
    from visionray.spec_io import read_yaml

    assert detect_kind(read_yaml(REPO / spec)) == kind


def test_train_plan_ships_the_package_and_runs_visionray_train(tmp_path):
    plan = prepare(REPO / "jobs" / "quickstart.yaml", project=REPO, storage=str(tmp_path),
                        overrides=["optim.epochs=2"], registry="s3://bucket/registry")
    assert plan.kind == "train" and plan.name == "quickstart"
    assert plan.entrypoint == (f"python -m visionray.cli train jobs/quickstart.yaml --set optim.epochs=2 "
                               f"--set output.storage={tmp_path}")
    env = plan.runtime_env
    assert env["working_dir"] == str(REPO) and env["py_modules"] == [str(REPO / "platform" / "visionray")]
    assert env["env_vars"] == {"VISIONRAY_REGISTRY": "s3://bucket/registry"}
    shipped = set(plan.upload.files)
    assert {"jobs/quickstart.yaml", "tune/quickstart.yaml", "platform/visionray/train/worker.py", "platform/visionray/registry/registry.py",
            "platform/visionray/data/sources.py", "platform/visionray/cli/__main__.py"} <= shipped
    assert not any(p.startswith(("data/", "runs/", "registry/", "tests/", "platform/visionray/tests")) for p in shipped)
    assert not [f for f in shipped if f.startswith((".git/", ".venv/", "runs/", "tests/"))]
    assert plan.upload.total < plan.upload.limit == 512 * 2**20  # Ray's GCS_STORAGE_MAX_SIZE
    assert submission_id(plan).startswith("visionray-train-quickstart-")


def test_serve_plan_deploys_detached(tmp_path):
    config = yaml.safe_load((REPO / "serve" / "classifier.yaml").read_text())
    config["applications"][0]["args"]["registry"] = "s3://bucket/registry"
    project = _copy_project(tmp_path)
    (project / "serve").mkdir()
    (project / "serve" / "cluster.yaml").write_text(yaml.safe_dump(config))
    plan = prepare(project / "serve" / "cluster.yaml", project=project, extra_args=["--host", "0.0.0.0"])
    assert plan.kind == "serve"
    assert plan.entrypoint == "python -m visionray.cli serve serve/cluster.yaml --detach --host 0.0.0.0"


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("jobs/quickstart.yaml", {}, "output.storage 'runs' is a relative path"),
        ("jobs/quickstart.yaml", {"storage": "shared/runs"}, "output.storage 'shared/runs' is a relative path"),
        ("tune/quickstart.yaml", {}, "output.storage 'runs' is a relative path"),
        ("jobs/cifar10-small.yaml", {"storage": "/mnt/runs"}, "data.path '../shared/data/cifar10/train.tar.gz' is not part of the code"),
        ("jobs/quickstart.yaml", {"storage": "/mnt/runs", "overrides": ["data.source=cifar10", "data.root=cifar"]},
         "data.root 'cifar' is not part of the code"),
        ("jobs/quickstart.yaml", {"storage": "/mnt/runs", "overrides": ["register.name=digits", "register.registry=reg"]},
         "register.registry 'reg' is a relative path"),
        ("jobs/quickstart.yaml", {"storage": "/mnt/runs", "registry": "reg"}, "--registry 'reg' is a relative path"),
        ("jobs/quickstart.yaml", {"storage": "/mnt/runs", "registry": "s3://b/r",
                                  "overrides": ["register.name=digits", "register.signing_key=keys/signing.pem"]},
         "register.signing_key 'keys/signing.pem' is a relative path"),
        ("serve/classifier.yaml", {"registry": "s3://b/r"}, "args.registry 'registry' is a relative path"),
        ("serve/classifier.yaml", {"overrides": ["a.b=1"]}, "--set applies to training and search specs"),
        ("serve/classifier.yaml", {"storage": "/mnt/runs"}, "--storage applies to training and search specs"),
        ("/etc/hostname", {}, "the spec must be inside the project"),
        ("tests/conftest.py", {}, "excluded from the upload"),
    ],
)
def test_prepare_refuses_what_would_not_work_on_a_cluster(spec, kwargs, message):
    with pytest.raises(JobsError) as info:
        prepare(REPO / spec, project=REPO, **kwargs)
    assert message in "\n".join(info.value.lines)


def test_unnamed_registry_is_left_to_the_cluster_with_a_warning():
    plan = prepare(REPO / "jobs" / "quickstart.yaml", project=REPO, storage="/mnt/runs",
                        overrides=["register.name=digits"])
    assert plan.warnings == ["register.registry is unset and no --registry was given: the cluster's "
                             "$VISIONRAY_REGISTRY decides; without it the model would land in the job's temporary directory"]
    plan = prepare(REPO / "jobs" / "quickstart.yaml", project=REPO, storage="/mnt/runs",
                        overrides=["register.name=digits"], registry="gs://bucket/registry")
    assert plan.warnings == [] and plan.runtime_env["env_vars"] == {"VISIONRAY_REGISTRY": "gs://bucket/registry"}


def test_prepare_reports_spec_errors_by_field():
    with pytest.raises(SpecError) as info:
        prepare(REPO / "jobs" / "quickstart.yaml", project=REPO, storage="/mnt/runs", overrides=["optim.epochs=0"])
    assert any(line.startswith("optim.epochs:") for line in info.value.errors)


def _copy_project(tmp_path: Path, marker: str | None = None) -> Path:
    """platform/visionray + jobs/ + tune/ + pyproject.toml: what a VisionRay checkout ships."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "platform" / "visionray", project / "platform" / "visionray",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("jobs", "tune"):
        shutil.copytree(REPO / name, project / name)
    shutil.copy(REPO / "pyproject.toml", project)
    shutil.copy(REPO / ".rayignore", project)
    if marker is not None:  # a line only this copy prints: proves the shipped code is what runs
        cli = project / "platform" / "visionray" / "cli" / "train.py"
        text = cli.read_text()
        anchor = '    console.print(f"[bold]visionray train[/] {spec.output.name} -> {run_dir(spec)}")\n'
        assert anchor in text
        cli.write_text(text.replace(anchor, anchor + f'    console.print("{marker}")\n'))
    return project


def _cli(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionray.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd, timeout=timeout)


def test_upload_over_rays_limit_is_refused_naming_the_largest_paths(tmp_path):
    project = _copy_project(tmp_path)
    (project / "checkpoints").mkdir()
    (project / "checkpoints" / "model.safetensors").write_bytes(os.urandom(3 * 2**20))  # incompressible
    limit = {"RAY_max_grpc_message_size": str(2**20)}  # Ray's own knob for its package limit: 1 MiB
    out = _cli("submit", str(project / "jobs" / "quickstart.yaml"), "--project-dir", str(project),
               "--storage", str(tmp_path / "runs"), "--dry-run", env=limit)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "upload too large" in out.stderr and "Ray accepts packages under 1.0 MiB" in out.stderr
    assert "checkpoints/: 3.0 MiB" in out.stderr and "checkpoints/model.safetensors: 3.0 MiB" in out.stderr
    assert "Traceback" not in out.stderr

    (project / ".rayignore").write_text("checkpoints/\n")  # the fix the message names
    out = _cli("submit", str(project / "jobs" / "quickstart.yaml"), "--project-dir", str(project),
               "--storage", str(tmp_path / "runs"), "--dry-run", env=limit)
    assert out.returncode == 0, out.stderr
    assert '"kind": "train"' in out.stdout


@pytest.mark.parametrize("ignore_gitignore", ["0", "1"])
def test_submit_refuses_to_upload_private_keys_and_names_them(tmp_path, ignore_gitignore):

    project = _copy_project(tmp_path)
    generate_keys(project / "keys" / "signer")  # excluded by name: never shipped
    (project / "deploy.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (project / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (project / "jobs" / "notes.txt").write_bytes((project / "keys" / "signer.key").read_bytes())  # a key by content
    env = {"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": ignore_gitignore}
    out = _cli("submit", str(project / "jobs" / "quickstart.yaml"), "--project-dir", str(project),
               "--storage", str(tmp_path / "runs"), "--dry-run", env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    text = " ".join(out.stderr.split())
    assert "refusing to upload secrets" in text and "jobs/notes.txt: holds a PEM private key" in text
    assert "Traceback" not in out.stderr
    (project / "jobs" / "notes.txt").unlink()
    out = _cli("submit", str(project / "jobs" / "quickstart.yaml"), "--project-dir", str(project),
               "--storage", str(tmp_path / "runs"), "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    from visionray.cluster.upload import measure_upload

    os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = ignore_gitignore
    try:
        shipped = set(measure_upload(project).files)
    finally:
        del os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"]
    assert not {"keys/signer.key", "keys/signer.pub", "deploy.pem", ".env"} & shipped, shipped


@pytest.mark.parametrize("url, insecure, allowed", [
    ("http://10.1.2.3:8265", False, False), ("http://head.internal:8265", False, False),
    ("http://127.0.0.1:8265", False, True), ("http://localhost:8265", False, True), ("http://[::1]:8265", False, True),
    ("https://head.internal:8265", False, True), ("http://head.internal:8265", True, True),
])
def test_the_token_goes_over_plain_http_only_to_loopback_or_with_the_flag(url, insecure, allowed):

    if allowed:
        check_token_transport(url, insecure)
    else:
        with pytest.raises(JobsError, match="plain http") as e:
            check_token_transport(url, insecure)
        assert "--insecure-token" in " ".join(e.value.lines)


def test_a_loopback_head_asking_for_the_token_gets_it_and_only_in_the_header(tmp_path):
    """In a fresh interpreter: Ray's token loader is one per process and keeps the first token it reads."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list[str | None] = []

    class Head(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            body = b'{"authentication_mode": "token"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer((LOOPBACK, 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = ("import json, sys; from visionray.cluster.client import auth_headers; "
              "print(json.dumps(auth_headers(sys.argv[1])))")
    try:
        out = subprocess.run([sys.executable, "-c", script, f"http://{LOOPBACK}:{server.server_port}"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAY_AUTH_TOKEN": "t" * 32, "HOME": str(tmp_path)})
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"Authorization": "Bearer " + "t" * 32}
    assert seen == [None]  # the mode probe never carries the token


def test_unreachable_head_is_a_clear_error():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    out = _cli("jobs", "list", "--address", f"http://{LOOPBACK}:{port}", timeout=120)
    assert out.returncode == 1
    assert "cannot reach the Ray cluster" in out.stderr and f"{LOOPBACK}:{port}" in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- a real two-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: a node's raylet, GCS, agents and workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL, grace_s: float = 0.0) -> None:
        """The node's processes (raylet, GCS, agents, workers) and `ray start --block` itself: its
        process tree and its process group (started in a session of its own), nothing else."""
        pids = [*reversed(_descendants(self.proc.pid)), self.proc.pid]
        for s in (sig, signal.SIGKILL) if grace_s else (sig,):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s or 30)


@dataclass
class LocalCluster:
    """A head and a worker node started with `ray start` on loopback, 1 CPU each, token auth on."""

    temp_dir: Path
    log_dir: Path
    env: dict[str, str]
    token: str
    dashboard: str = ""
    gcs: str = ""
    nodes: list[Node] = field(default_factory=list)

    def _start(self, name: str, ip: str, *args: str) -> Node:
        log = self.log_dir / f"{name}-{len(self.nodes)}.log"
        proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--node-ip-address={ip}",
             "--num-cpus=1", f"--dashboard-agent-listen-port={_free_port()}", *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        node = Node(proc, log)
        self.nodes.append(node)
        return node

    def start_head(self) -> None:
        port = _free_port()
        self.dashboard = f"http://{LOOPBACK}:{port}"
        self._start("head", HEAD_IP, "--head", "--port=0", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                    f"--dashboard-host={LOOPBACK}", f"--dashboard-port={port}",
                    f"--ray-client-server-port={_free_port()}")
        address_file = self.temp_dir / "ray_current_cluster"
        self._wait(lambda: address_file.exists() and address_file.read_text().strip(), "the head's GCS address")
        self.gcs = address_file.read_text().strip()

    def start_worker(self) -> Node:
        return self._start("worker", WORKER_IP, f"--address={self.gcs}")

    def api(self, path: str) -> dict:
        r = httpx.get(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        r.raise_for_status()
        return r.json()

    def alive_nodes(self) -> list[str]:
        try:
            rows = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except httpx.HTTPError:
            return []
        return [n["node_id"] for n in rows if n["state"] == "ALIVE"]

    def _wait(self, ready, what: str, timeout: float = 180.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if ready():
                return
            dead = [n for n in self.nodes if n.proc.poll() is not None and n.proc.returncode != 0]
            if dead:
                raise RuntimeError(f"ray start exited: {dead[0].log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}")

    def wait_for_nodes(self, n: int) -> None:
        self._wait(lambda: len(self.alive_nodes()) == n, f"{n} alive nodes")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM, grace_s=10)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    # A short temp dir of our own: Ray's socket paths must stay under 108 bytes, and stopping
    # exactly our processes never touches another cluster on this machine.
    temp_dir = Path(tempfile.mkdtemp(prefix="vr-", dir="/tmp"))
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)  # the nodes import visionray only from the venv or what a job ships
    cluster = LocalCluster(temp_dir=temp_dir, log_dir=tmp_path_factory.mktemp("ray-start"), env=env, token=token)
    try:
        cluster.start_head()
        cluster.start_worker()
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _client_env(cluster: LocalCluster, home: Path) -> dict[str, str]:
    """The submitting user's environment: the cluster's token, nothing else of the cluster's."""
    env = {"RAY_AUTH_TOKEN": cluster.token, "HOME": str(home)}
    return env


def _epochs(csv: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in csv.read_text().splitlines()[1:]]


def _submission_id(out: subprocess.CompletedProcess) -> str:
    match = re.search(r"submitted (visionray-train-[A-Za-z0-9_-]+)", out.stdout)
    assert match, out.stdout + out.stderr
    return match.group(1)


@pytest.mark.slow
def test_token_is_required_and_a_wrong_one_is_refused(two_nodes, tmp_path):
    out = _cli("jobs", "list", "--address", two_nodes.dashboard, env={"HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 2 and "authentication required" in out.stderr, out.stderr
    assert "RAY_AUTH_TOKEN" in out.stderr and "Traceback" not in out.stderr
    out = _cli("jobs", "list", "--address", two_nodes.dashboard, env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "wrong"},
               timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.returncode == 2 and "authentication failed" in out.stderr and "Forbidden" in out.stderr, out.stderr


@pytest.mark.slow
def test_submit_quickstart_runs_on_both_nodes_and_logs_its_epochs(two_nodes, tmp_path):
    marker = f"shipped-code-{secrets.token_hex(4)}"
    project = _copy_project(tmp_path, marker)
    shared = tmp_path / "shared"  # one directory both nodes reach, as S3/GCS/NFS would be
    env = _client_env(two_nodes, tmp_path)
    out = _cli("submit", "jobs/quickstart.yaml", "--project-dir", str(project), "--storage", str(shared),
               "--set", "optim.epochs=2", "--address", two_nodes.dashboard, "--wait", env=env, cwd=project)
    assert out.returncode == 0, out.stdout + out.stderr
    sid = _submission_id(out)
    assert f"job {sid}: SUCCEEDED" in out.stdout

    logs = _cli("jobs", "logs", sid, "--address", two_nodes.dashboard, env=env, timeout=120)
    assert logs.returncode == 0, logs.stderr
    assert marker in logs.stdout  # the copy's code ran, not the venv's
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}/2: train_loss \S+ val_loss \S+ val_acc 0\.\d+", logs.stdout, re.M), logs.stdout
    assert (shared / "quickstart" / "metrics.csv").exists()
    assert sorted(p.name for p in (shared / "quickstart").glob("checkpoint_*"))

    info = two_nodes.api(f"/api/jobs/{sid}")
    assert info["status"] == "SUCCEEDED" and info["metadata"]["visionray_kind"] == "train"
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    assert info["runtime_env"]["py_modules"][0].startswith("gcs://_ray_pkg_")
    actors = two_nodes.api("/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D"
                           "&filter_values=RayTrainWorker")["data"]["result"]["result"]
    nodes = {a["node_id"] for a in actors if a["job_id"] == info["job_id"]}
    assert len(nodes) == 2, actors  # 1 CPU per node: the 2 workers ran on different nodes

    listed = _cli("jobs", "list", "--address", two_nodes.dashboard, "--json", env=env, timeout=120)
    assert listed.returncode == 0 and f'"id": "{sid}", "status": "SUCCEEDED"' in listed.stdout
    status = _cli("jobs", "status", sid, env={**env, "RAY_ADDRESS": two_nodes.dashboard}, timeout=120)  # RAY_ADDRESS
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "visionray.cli train" in status.stdout
    stop = _cli("jobs", "stop", sid, "--address", two_nodes.dashboard,  # --address wins over RAY_ADDRESS
                env={**env, "RAY_ADDRESS": "http://127.0.0.1:9"}, timeout=120)
    assert stop.returncode == 0 and f"job {sid}: already ended (SUCCEEDED)" in stop.stdout, stop.stdout + stop.stderr
    missing = _cli("jobs", "status", "visionray-train-nope", "--address", two_nodes.dashboard, env=env, timeout=120)
    assert missing.returncode == 2 and "no such job" in missing.stderr


@pytest.mark.slow
def test_killing_the_worker_node_mid_training_still_succeeds(two_nodes, tmp_path):
    epochs, every = 6, 2
    shared = tmp_path / "shared"
    env = _client_env(two_nodes, tmp_path)
    out = _cli("submit", "jobs/quickstart.yaml", "--storage", str(shared), "--set", f"optim.epochs={epochs}",
               "--set", f"checkpoint.every_epochs={every}", "--set", "output.name=fault",
               "--address", two_nodes.dashboard, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    sid = _submission_id(out)

    csv = shared / "fault" / "metrics.csv"
    end = time.time() + 300
    while not (csv.exists() and len(_epochs(csv)) >= 3):  # mid-training: past the checkpoint at epoch 2
        assert time.time() < end, _cli("jobs", "logs", sid, "--address", two_nodes.dashboard, env=env).stdout
        time.sleep(0.2)
    two_nodes.nodes[-1].kill()  # the (latest) worker node dies: raylet, its Train worker, everything
    time.sleep(5)
    two_nodes.start_worker()  # capacity comes back (an autoscaler would launch a replacement)

    follow = _cli("jobs", "logs", sid, "--follow", "--address", two_nodes.dashboard, env=env)
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert f"job {sid}: SUCCEEDED" in follow.stdout
    seen = _epochs(csv)
    assert seen[-1] == epochs
    restart = next(i for i in range(1, len(seen)) if seen[i] <= seen[i - 1])  # the first epoch after the restore
    restored_from, reached = seen[restart] - 1, seen[restart - 1]
    assert restored_from % every == 0 and restored_from >= 2, seen  # a real checkpoint, not from scratch
    assert reached - restored_from + 1 <= every, seen  # epochs recomputed (incl. the one in flight)
    assert seen[restart:] == list(range(restored_from + 1, epochs + 1)), seen


# --------------------------------------------------------------------------- KubeRay manifests


def test_kuberay_manifests_match_the_pins_and_serve_config_validates(tmp_path):
    import ray

    from visionray.serve.config import read_serve_config

    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    job = yaml.safe_load((REPO / "k8s" / "rayjob-train.yaml").read_text())
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    assert (job["kind"], service["kind"]) == ("RayJob", "RayService")
    for cluster in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        assert cluster["rayVersion"] == ray.__version__
        pods = [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]]]
        for pod in pods:
            env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert job["spec"]["entrypoint"].startswith("python -m visionray.cli train jobs/")
    assert (REPO / job["spec"]["entrypoint"].split()[4]).is_file()
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text(service["spec"]["serveConfigV2"])
    raw = read_serve_config(serve_config)  # Serve's schema for the file, VisionRay's ServeSpec for the args
    assert raw["applications"][0]["args"]["registry"].startswith("s3://")


def test_tune_plan_runs_visionray_tune(tmp_path):
    plan = prepare(REPO / "tune" / "quickstart.yaml", project=REPO, storage=str(tmp_path),
                        overrides=["search.num_samples=2"])
    assert plan.kind == "tune" and plan.name == "quickstart-search"
    assert plan.entrypoint == (f"python -m visionray.cli tune tune/quickstart.yaml --set search.num_samples=2 "
                               f"--set output.storage={tmp_path}")
    assert "jobs/quickstart.yaml" in plan.upload.files  # the search's base job travels with it
