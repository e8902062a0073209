"""Canary and shadow rollouts and the sampled payload log, over real HTTP on the session's Serve.

The registry holds digits v1 (the quickstart model, alias best), v2 (an untrained net with the same
input: it disagrees with v1) and v3 (signed, then its weights changed: fails verification)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.helpers import SMALL, app_args, delete_apps, deploy_apps, make_checkpoint
from tests.serve.test_sanitize import PNG
from visionray.cli.app import app as cli_app
from visionray.registry.registry import Registry
from visionray.serve.app import build_app

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def rollout_registry(digits_registry, keys, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rollout") / "registry"
    shutil.copytree(digits_registry, root)
    reg = Registry(str(root))
    for version in (2, 3):
        ckpt, _ = make_checkpoint(tmp_path_factory.mktemp(f"v{version}") / "ckpt", seed=version)
        assert reg.register(ckpt, "digits", private_key=keys[0]).version == version
    weights = root / "digits" / "v3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def apps(serve_url, rollout_registry, keys, tmp_path_factory):
    """Three apps beside the session's, deployed at once: a 30% canary of v2, a shadow v2 on every
    request with every request logged, and a canary of the tampered v3."""
    log = tmp_path_factory.mktemp("payload")
    candidate = {**SMALL, "min_replicas": 1, "max_replicas": 1}
    over = {
        "canary": {"rollout": {"canary": "digits@2", "percent": 30, "candidate": candidate}},
        "shadow": {"rollout": {"shadow": "digits@2", "percent": 100, "candidate": candidate},
                   "monitor": {"path": str(log), "sample_percent": 100, "flush_rows": 5}},
        "refused": {"rollout": {"canary": "digits@3", "percent": 50, "candidate": candidate}},
    }
    deploy_apps({name: build_app(app_args(rollout_registry, keys, **o)) for name, o in over.items()})
    yield {name: f"{serve_url}/{name}" for name in over}, log
    delete_apps(*over)


def _classify(url: str) -> dict:
    r = httpx.post(f"{url}/v1/classify", content=PNG, headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _rollout_when(url: str, done) -> dict:
    deadline = time.monotonic() + 30
    while True:
        body = httpx.get(f"{url}/v1/rollout", timeout=30).json()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def test_canary_answers_its_share_and_every_response_names_its_version(apps):
    url = apps[0]["canary"]
    n, p = 400, 0.30
    versions = [_classify(url)["model"]["version"] for _ in range(n)]
    assert set(versions) <= {1, 2}
    hits = versions.count(2)
    bound = 4.5 * math.sqrt(n * p * (1 - p))  # a correct router fails this about once in 150,000 runs
    assert abs(hits - n * p) <= bound, f"canary answered {hits} of {n}, expected {n * p:.0f} +- {bound:.0f}"
    body = _rollout_when(url, lambda b: sum(b["answers"].values()) >= n)
    assert body["rollout"] == {"mode": "canary", "candidate": "digits@2", "percent": 30.0, "state": "active", "reason": None}
    assert body["answers"] == {"digits@1": n - hits, "digits@2": hits}


def test_shadow_counts_disagreements_off_the_response_path(apps):
    url = apps[0]["shadow"]
    answers = [_classify(url) for _ in range(20)]
    assert {a["model"]["version"] for a in answers} == {1}  # the shadow never answers
    body = _rollout_when(url, lambda b: sum(b["compared"].values()) >= 20)
    assert sum(body["compared"].values()) == 20 and body["shadow_errors"] == 0
    assert sum(body["agreed"].values()) < 20  # an untrained v2 disagrees with the trained v1
    assert body["agreement"] == pytest.approx(sum(body["agreed"].values()) / 20)
    res = runner.invoke(cli_app, ["status", "--url", url])
    assert res.exit_code == 0, res.output
    assert "shadow digits@2" in res.output and "agreement" in res.output


def test_a_canary_that_fails_verification_gets_no_traffic_and_the_app_says_why(apps):
    url = apps[0]["refused"]
    assert {_classify(url)["model"]["version"] for _ in range(30)} == {1}
    body = httpx.get(f"{url}/v1/rollout", timeout=30).json()
    assert body["rollout"]["state"] == "refused" and "Verification" in body["rollout"]["reason"]
    res = runner.invoke(cli_app, ["status", "--url", url, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["rollout"]["state"] == "refused"


def test_payload_log_rows_and_the_monitor_report(apps, digits_registry, keys, tmp_path):
    url, log = apps[0]["shadow"], apps[1]
    import pyarrow.parquet as pq

    def logged() -> list[dict]:
        return [r for f in log.glob("payload-*.parquet") for r in pq.read_table(f).to_pylist()]

    before = -1
    while before != len(logged()):  # earlier tests' rows settled (a file may still be on its way)
        before = len(logged())
        time.sleep(0.5)
    for _ in range(10):  # every request is logged; a file is written every 5 rows (flush_rows)
        _classify(url)
    deadline = time.monotonic() + 30
    while len(logged()) < before + 10 and time.monotonic() < deadline:
        time.sleep(0.5)
    rows = logged()
    assert len(rows) == before + 10 and len({(r["request_id"], r["index"]) for r in rows}) == len(rows)
    assert {(r["width"], r["height"], r["model"], r["version"]) for r in rows} == {(20, 12, "digits", 1)}
    assert all(0 < r["confidence"] <= 1 and r["latency_ms"] > 0 and r["bytes"] == len(PNG) for r in rows)
    assert "image" not in pq.read_table(next(log.glob("payload-*.parquet"))).column_names  # never the image by default
    png = tmp_path / "drift.png"
    res = runner.invoke(cli_app, ["monitor", str(log), "--against", "digits@best", "--registry", str(digits_registry),
                                  "-k", str(keys[1]), "--plot", str(png), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["live_count"] == len(rows) and report["reference_count"] > 100
    assert png.stat().st_size > 1000
    # every logged request is the same image, so one class has it all: far from the held-out split
    assert report["total_variation"] > 0.5


def test_promote_and_redeploy_moves_all_traffic(apps, rollout_registry, keys):
    url = apps[0]["canary"]
    res = runner.invoke(cli_app, ["models", "promote", "digits@2", "best", "--registry", str(rollout_registry),
                                  "-k", str(keys[1]), "--key", str(keys[0])])
    assert res.exit_code == 0, res.output
    deploy_apps({"canary": build_app(app_args(rollout_registry, keys))})  # the same app, rollout finished: digits@best pinned again at build
    assert {_classify(url)["model"]["version"] for _ in range(30)} == {2}
    assert httpx.get(f"{url}/v1/rollout", timeout=30).json()["rollout"] is None
