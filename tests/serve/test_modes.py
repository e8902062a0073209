"""Serving modes (``visionray.serve.modes``): the environment each needs, the replica's check, the
spec's rules, and one real `visionray serve` in direct mode on its own local cluster: the replica
itself listens on the configured port, hostile input gets its JSON 4xx, overload its JSON 503,
Prometheus has our counters, SIGTERM drains and stops it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tests.helpers import REPO
from tests.helpers import free_port
from tests.serve.test_sanitize import JPEG, PNG
from visionray.cli import app as cli_app
from visionray.serve.config import load_serve_spec
from visionray.serve.grpc_api import SERVICER_FUNCTION, GrpcClient, GrpcError
from visionray.serve.modes import FALLBACK_PORT_OFFSET, ModeMismatch, check_replica_mode, mode_env, running_mode
from visionray.spec_io import SpecError

runner = CliRunner()


@pytest.mark.parametrize("mode", ["proxy", "direct", "throughput"])
def test_mode_env_is_what_the_replica_reads_back(mode):
    assert running_mode(mode_env(mode, 9000, 3)) == mode


def test_direct_modes_put_the_replicas_on_the_configured_port_and_up():
    env = mode_env("direct", 9000, 3)
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("9000", "9003")
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"  # a replaced replica takes its port back


@pytest.mark.parametrize("environ,mode", [
    ({}, "proxy"),
    ({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}, "direct"),
    ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, "throughput"),  # the bundle turns direct ingress on itself
    ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "true", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}, "proxy"),
])
def test_running_mode_reads_serves_variables(environ, mode):
    assert running_mode(environ) == mode


def test_a_replica_in_the_wrong_mode_refuses_to_start(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    check_replica_mode("proxy")
    with pytest.raises(ModeMismatch, match="RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        check_replica_mode("direct")


@pytest.mark.parametrize("args,message", [
    ({"ingress_mode": "direct", "ingress": {"min_replicas": 0}}, "needs ingress.min_replicas >= 1"),
    ({"ingress_mode": "throughput", "topology": "combined", "classifier": {"min_replicas": 0}},
     "needs classifier.min_replicas >= 1"),
    ({"ingress_mode": "haproxy"}, "ingress_mode"),
])
def test_bad_mode_specs_name_the_field(args, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        load_serve_spec({"model": "digits@best", **args})


def test_split_direct_may_scale_the_classifier_to_zero_behind_its_ingress():
    spec = load_serve_spec({"model": "digits@best", "ingress_mode": "direct", "classifier": {"min_replicas": 0}})
    assert spec.http_facing is spec.ingress


def listener_cmdline(port: int) -> str:
    """The command line of the process listening on ``port``, bound to loopback only (from /proc;
    empty when nothing listens there or the socket is bound to another address)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state == "0A" and local == f"0100007F:{port:04X}":  # LISTEN on 127.0.0.1
            inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            if any(f"socket:[{i}]" in links for i in inodes):
                return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
    return ""


def test_direct_mode_serves_from_the_replica_with_every_guarantee(digits_registry, keys, tmp_path):
    config = yaml.safe_load((REPO / "serve" / "digits.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(registry=str(digits_registry), public_keys=[str(keys[1])], ingress_mode="direct", topology="combined",
                batch={"max_batch_size": 1, "wait_s": 0.0}, sanitizer={"decode_workers": 1},
                classifier={"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 1,
                            "max_queued_requests": 1, "retry_after_s": 2})
    del args["ingress"]
    args["monitor"] = {"path": str(tmp_path / "payload"), "sample_percent": 100, "flush_rows": 1}
    grpc_port = free_port()
    config["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    path = tmp_path / "direct.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "visionray.cli", "serve", str(path)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**env, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    try:
        deadline = time.time() + 300
        while "Ctrl-C" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        out = log.read_text()
        assert proc.poll() is None and f"127.0.0.1:{port}/v1/classify" in out, out
        assert f":{port + FALLBACK_PORT_OFFSET}" in out, out  # where Serve's fallback proxy went
        url = f"http://127.0.0.1:{port}"
        assert "ServeReplica" in listener_cmdline(port), listener_cmdline(port)  # on loopback, no proxy in front

        r = httpx.post(f"{url}/v1/classify", content=PNG, headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == {"name": "digits", "version": 1}, r.text
        bad = httpx.post(f"{url}/v1/classify", content=b"GIF89a....", headers={"content-type": "image/png"}, timeout=30)
        assert bad.status_code == 415 and bad.json()["code"] == "content_mismatch"
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200

        # gRPC: the same model, the same refusals (the HTTP status's gRPC code, the same JSON as details)
        with GrpcClient(f"127.0.0.1:{grpc_port}") as client:
            answer = client.classify([PNG], top_k=3)
            assert answer["model"] == {"name": "digits", "version": 1} and len(answer["results"][0]["top_k"]) == 3
            with pytest.raises(GrpcError) as refused:
                client.classify_one(b"GIF89a....", "image/png", 1)
            assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT and refused.value.code == "content_mismatch"
        png = tmp_path / "a.png"
        png.write_bytes(PNG)
        cli = runner.invoke(cli_app, ["predict", str(png), "--grpc", f"127.0.0.1:{grpc_port}", "--json"])
        assert cli.exit_code == 0 and json.loads(cli.output)["model"]["name"] == "digits", cli.output

        async def burst():
            async with httpx.AsyncClient(timeout=30) as ac:
                return await asyncio.gather(*(ac.post(f"{url}/v1/classify", content=JPEG,
                                                      headers={"content-type": "image/jpeg"}) for _ in range(24)))

        answers = asyncio.run(burst())
        assert {a.status_code for a in answers} <= {200, 503}, [a.text for a in answers]
        r503 = next((a for a in answers if a.status_code == 503), None)
        assert r503 is not None and r503.headers["retry-after"] == "2" and r503.json()["code"] == "overloaded", r503

        metrics = re.search(r"Prometheus metrics: http://127\.0\.0\.1:(\d+)/metrics", out)  # the local cluster's
        assert metrics, out
        deadline, text = time.time() + 90, ""
        expected = ('reason="content_mismatch"', 'reason="overloaded"', 'visionray_serve_answers_total')
        while time.time() < deadline and not all(e in text for e in expected):  # each series appears at its own export
            text = httpx.get(f"http://127.0.0.1:{metrics.group(1)}/metrics", timeout=10).text
            time.sleep(2)
        assert 'visionray_serve_rejected_total' in text and 'reason="overloaded"' in text, text[-2000:]
        assert 'visionray_serve_answers_total' in text and 'version="1"' in text, text[-2000:]
        # every answered request is logged, gRPC ones too: the PNG went once over HTTP, twice over gRPC
        import pyarrow.parquet as pq

        rows = [r for f in (tmp_path / "payload").glob("payload-*.parquet") for r in pq.read_table(f).to_pylist()]
        assert sum(r["bytes"] == len(PNG) for r in rows) == 3, rows
        assert {(r["width"], r["height"], r["model"], r["version"]) for r in rows} == {(20, 12, "digits", 1)}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
        assert "stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
