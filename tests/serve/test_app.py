"""Real Ray Serve over real HTTP on loopback: a trained, signed, registered digits model; the
hostile-input table; overload; autoscaling; a tampered model; the CLI (serve, predict, loadtest)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from tests.serve.test_sanitize import HOSTILE, JPEG, MULTI_OK, PNG, encode
from visionray.registry.keys import generate_keys
from visionray.registry.layout import VerificationError
from visionray.registry.registry import Registry
from visionray.cli import app as cli_app
from visionray.data.folders import list_folder
from visionray.evaluate import eval_arrays, evaluate_checkpoint, predict_logits
from visionray.serve.client import Client, loadtest, read_images
from visionray.specs import EvalPreset
from tests.helpers import REPO, SMALL, app_args, delete_apps, free_port, make_checkpoint

pytestmark = pytest.mark.slow

runner = CliRunner()


def running_replicas(app: str, deployment: str = "Classifier") -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments[deployment]
    return dep.replica_states.get("RUNNING", 0)


def ok(url: str) -> None:
    r = httpx.post(f"{url}/v1/classify", content=PNG, headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- agreement with evaluate


def render_digits(root: Path, count: int = 120) -> Path:
    """Held-out digits (the checkpoint's own val split) as 8x8 grey PNGs in class folders."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(1)
    for i in rng.choice(len(d.images), count, replace=False):
        folder = root / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{i}.png")
    return root


def expected_top1(registry: Path, keys, ref: str, folder: Path) -> tuple[list[Path], list[str], float]:
    """Per-file top-1 labels through visionray.evaluate's own path, and its reported accuracy."""
    model, meta = Registry(str(registry)).load(ref, public_keys=[keys[1]])
    files, _, _ = list_folder(folder)
    logits = predict_logits(model, meta, eval_arrays(meta, str(folder)).images)
    ev = evaluate_checkpoint(model, meta, str(folder))
    return files, [meta.classes[i] for i in logits.argmax(1).tolist()], ev.top1


def served_top1(url: str, files: list[Path], per_request: int) -> list[str]:
    out = []
    with Client(url) as client:
        for i in range(0, len(files), per_request):
            result = client.classify(files[i:i + per_request], top_k=1)
            out += [r["top_k"][0]["label"] for r in result["results"]]
    return out


def test_digits_png_top1_matches_evaluate(serve_url, digits_registry, keys, tmp_path):
    folder = render_digits(tmp_path / "digits")
    files, expected, top1 = expected_top1(digits_registry, keys, "digits@best", folder)
    assert served_top1(serve_url, files, per_request=16) == expected  # multipart batches
    assert served_top1(serve_url, files[:20], per_request=1) == expected[:20]  # one image per request
    truth = [f.parent.name for f in files]
    assert np.mean([a == b for a, b in zip(expected, truth)]) == pytest.approx(top1)
    assert top1 > 0.8  # a trained model, not noise


@pytest.mark.cifar
def test_cifar_jpegs_top1_matches_evaluate(serve_url, cifar_tar, tmp_path, keys):
    """CIFAR-10 JPEGs (20 per class from the shared archive) through a second app at /cifar."""
    from ray import serve

    from visionray.serve.app import build_app

    folder = tmp_path / "cifar"
    taken: dict[str, int] = {}
    with tarfile.open(cifar_tar) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2 or not member.name.endswith(".jpg"):
                continue
            cls = parts[-2]
            if taken.get(cls, 0) < 20:
                taken[cls] = taken.get(cls, 0) + 1
                (folder / cls).mkdir(parents=True, exist_ok=True)
                (folder / cls / parts[-1]).write_bytes(tar.extractfile(member).read())
            if len(taken) == 10 and all(v == 20 for v in taken.values()):
                break
    classes = sorted(taken)
    preset = EvalPreset(image_size=32, channels=3, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    ckpt_dir = make_checkpoint(tmp_path / "ckpt", preset=preset, classes=classes, metrics={})[0]
    registry = tmp_path / "registry"
    Registry(str(registry)).register(ckpt_dir, "cifar", alias="best", private_key=keys[0])
    serve.run(build_app(app_args(registry, keys, model="cifar@best")), name="cifar", route_prefix="/cifar")
    try:
        files, expected, _ = expected_top1(registry, keys, "cifar@best", folder)
        assert served_top1(f"{serve_url}/cifar", files, per_request=16) == expected
        assert len(set(expected)) > 1
    finally:
        serve.delete("cifar")


# --------------------------------------------------------------------------- hostile inputs


# httpx refuses to send a malformed Content-Length: sent by hand in test_malformed_content_length.
REAL_HOSTILE = [h for h in HOSTILE if h[0] != "bad content-length"]


@pytest.mark.parametrize("name,body,headers,status,code", REAL_HOSTILE, ids=[h[0] for h in REAL_HOSTILE])
def test_hostile_inputs_over_real_http(serve_url, name, body, headers, status, code):
    t0 = time.perf_counter()
    r = httpx.post(f"{serve_url}/v1/classify", content=body, headers=headers, timeout=30)
    elapsed = time.perf_counter() - t0
    assert r.status_code == status, r.text
    out = r.json()
    assert set(out) == {"code", "message", "request_id"} and (code is None or out["code"] == code)
    assert r.headers.get_list("x-request-id") == [out["request_id"]]  # Serve's id, once
    if "bomb" in name or "65500" in name:
        assert elapsed < 2.0  # refused from the header, nothing decoded
    ok(serve_url)


def test_multipart_over_real_http(serve_url):
    body, headers = MULTI_OK
    r = httpx.post(f"{serve_url}/v1/classify", content=body, headers=headers, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert r.json()["model"] == {"name": "digits", "version": 1}


def decoder_pids() -> list[int]:
    """The sandboxed decoder processes of the Serve replicas (not of this test process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if b"visionray.serve.decode" in cmdline and ppid != os.getpid():
            found.append(int(entry))
    return found


def test_a_decoder_killed_mid_request_costs_that_request_only(serve_url):
    import signal
    import threading

    pids = decoder_pids()
    assert pids, "no decoder processes found"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # every decoder hangs: the next image is mid-decode when they die
    result: list[httpx.Response] = []
    t = threading.Thread(target=lambda: result.append(
        httpx.post(f"{serve_url}/v1/classify", content=PNG, headers={"content-type": "image/png"}, timeout=30)))
    t.start()
    time.sleep(1.0)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t.join(30)
    [r] = result
    assert r.status_code == 503 and r.json()["code"] == "decoder_lost" and r.headers["retry-after"], r.text
    t0 = time.perf_counter()
    ok(serve_url)  # replacements started; the replica never stopped serving
    assert time.perf_counter() - t0 < 10
    assert not set(decoder_pids()) & set(pids)


def test_cpu_bombs_in_flight_do_not_hold_up_valid_requests(serve_url):
    """Attackers keep decoders busy with the costliest images the limits allow, plus the bombs the
    structural walk refuses; valid requests sent meanwhile all get 200 within a few seconds."""
    import threading

    from tests.serve.test_sanitize import jpeg_declaring, multipart, png_declaring, progressive_jpeg

    rng = np.random.default_rng(0)
    heavy = encode(Image.fromarray(rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)), "JPEG", progressive=True, quality=100)
    bombs = [
        (heavy, {"content-type": "image/jpeg"}),  # at the progressive limit, real data: ~0.15 s of CPU each
        multipart([(f"{i}.png", "image/png", png_declaring(4096, 4096)) for i in range(2)]),  # 32 MP of zeros
        (jpeg_declaring(4096, 4096), {"content-type": "image/jpeg"}),  # 48 MiB declared by a few hundred bytes
        (progressive_jpeg(scan_copies=10), {"content-type": "image/jpeg"}),  # 100 scans
        (progressive_jpeg(4096, 4096, scan_copies=300), {"content-type": "image/jpeg"}),  # 3,000 scans over 16 MP
    ]
    stop = threading.Event()
    statuses: list[int] = []

    def attack(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            for n in range(200):  # bounded in count and in time
                if stop.is_set():
                    return
                body, headers = bombs[(i + n) % len(bombs)]
                statuses.append(c.post(f"{serve_url}/v1/classify", content=body, headers=headers).status_code)

    attackers = [threading.Thread(target=attack, args=(i,)) for i in range(8)]
    for t in attackers:
        t.start()
    try:
        time.sleep(1.0)
        latencies = []
        for _ in range(15):
            t0 = time.perf_counter()
            ok(serve_url)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in attackers:
            t.join(120)
    assert max(latencies) < 5.0, latencies
    assert statuses and all(s < 500 or s == 503 for s in statuses), sorted(set(statuses))
    ok(serve_url)


def _raw(port: int, head: bytes, body_chunks, read_timeout: float = 15.0) -> tuple[bytes, int]:
    """Send a request by hand; stop sending as soon as the server answers. (response, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        deadline = time.time() + read_timeout
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            if time.time() > deadline:
                break
            part = s.recv(65536)
            if not part:
                break
            data += part
    return data, sent


def test_streaming_body_cap_without_content_length(serve_url):
    """Chunked upload of an endless body: 413 arrives while the client is still sending."""
    port = int(serve_url.rsplit(":", 1)[1])
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b"\x00" * 0x10000 + b"\r\n"
    cap = 8 * 2**20

    def endless():
        for _ in range(10 * cap // len(chunk)):
            yield chunk
            time.sleep(0.0005)

    response, sent = _raw(port, head, endless())
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"body_too_large"' in response
    assert sent < 4 * cap  # the rest was never read
    ok(serve_url)


def test_lying_content_length_times_out_with_408(serve_url):
    port = int(serve_url.rsplit(":", 1)[1])
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    t0 = time.time()
    response, _ = _raw(port, head + PNG[:100], [])  # 100 of 100000 promised bytes, then silence
    assert response.startswith(b"HTTP/1.1 408"), response[:300]
    assert b'"body_too_slow"' in response and time.time() - t0 < 5  # cut after the grace period, not the timeout
    ok(serve_url)


def test_malformed_content_length(serve_url):
    """Refused by the proxy's HTTP parser (uvicorn/h11) before it reaches the app: a plain 400."""
    port = int(serve_url.rsplit(":", 1)[1])
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: abc\r\n\r\n"
    response, _ = _raw(port, head + PNG, [], read_timeout=5)
    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    ok(serve_url)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x00\x01\x00\x00WEBP"]),
       ctype=st.sampled_from(["image/png", "image/jpeg", "image/webp", "multipart/form-data; boundary=b", "x/y"]))
def test_fuzzed_bytes_over_real_http_never_5xx(serve_url, data, prefix, ctype):
    r = httpx.post(f"{serve_url}/v1/classify", content=prefix + data, headers={"content-type": ctype}, timeout=30)
    assert r.status_code < 500, r.text


def test_models_health_ready_docs(serve_url):
    m = httpx.get(f"{serve_url}/v1/models").json()["models"][0]
    assert (m["name"], m["version"], m["input"]["channels"]) == ("digits", 1, 1)
    assert httpx.get(f"{serve_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{serve_url}/readyz").json()["model"] == {"name": "digits", "version": 1}
    assert "/v1/classify" in httpx.get(f"{serve_url}/openapi.json").json()["paths"]
    assert httpx.get(f"{serve_url}/docs").status_code == 200


def test_prometheus_counts_rejections_by_reason(serve_url):
    import re

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    for _ in range(3):
        httpx.post(f"{serve_url}/v1/classify", content=b"GIF89a....", headers={"content-type": "image/png"})
    pattern = re.compile(r'visionray_serve_rejected_total\{[^}]*reason="content_mismatch"[^}]*\} (\d+)')
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if (m := pattern.search(text)) and int(m.group(1)) >= 3:
            break
        time.sleep(2)
    else:
        pytest.fail(f"no rejection counter on :{port}/metrics: {[ln for ln in text.splitlines() if 'visionray' in ln]}")
    assert "ray_serve_" in text  # Serve's own metrics on the same endpoint


# --------------------------------------------------------------------------- refusing bad models


def test_health_check_fails_without_a_model():
    from visionray.serve.app import Classifier

    cls = Classifier.func_or_class
    replica = cls.__new__(cls)
    replica.predictor = None
    with pytest.raises(RuntimeError, match="no model loaded"):
        replica.check_health()


def test_tampered_or_untrusted_models_refuse_to_deploy(serve_url, digits_registry, keys, tmp_path):
    """Two tampered registries deployed at once: each app fails, its replica saying why; an alias
    signed by an untrusted key is refused before deploying; the good app keeps serving."""
    import shutil

    from ray import serve
    from ray.serve.api import RunTarget

    from visionray.cli.serve import _deploy_failure
    from visionray.serve.app import build_app

    targets = []
    for attack in ("weights", "metadata", "key"):
        root = tmp_path / attack
        shutil.copytree(digits_registry, root)
        version = root / "digits" / "v1"
        public = keys[1]
        if attack == "weights":
            data = bytearray((version / "model.safetensors").read_bytes())
            data[-1] ^= 0x01
            (version / "model.safetensors").write_bytes(bytes(data))
        elif attack == "metadata":
            meta = json.loads((version / "metadata.json").read_text())
            meta["classes"][0], meta["classes"][1] = meta["classes"][1], meta["classes"][0]
            (version / "metadata.json").write_text(json.dumps(meta))
        else:  # another key is trusted: the alias record itself is refused when the app is built
            public = generate_keys(tmp_path / "other")[1]
            with pytest.raises(VerificationError, match="digits@best: the alias record .* not signed by a trusted key"):
                build_app(app_args(root, keys, public_keys=[str(public)]))
            continue
        app = build_app(app_args(root, keys, public_keys=[str(public)], classifier={"max_constructor_retries": 1}))
        targets.append(RunTarget(app, name=f"bad-{attack}", route_prefix=f"/bad-{attack}"))
    serve.run_many(targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    names = [t.name for t in targets]
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            states = {n: serve.status().applications[n].status for n in names}
            if all(st == "DEPLOY_FAILED" for st in states.values()):
                break
            assert "RUNNING" not in states.values(), states
            time.sleep(2)
        assert all(st == "DEPLOY_FAILED" for st in states.values()), states
        for name in names:
            message = " ".join(_deploy_failure(name))
            assert "VerificationError" in message, message
    finally:
        delete_apps(*names)
    ok(serve_url)


# --------------------------------------------------------------------------- overload and autoscaling


def test_overload_answers_503_with_retry_after_instead_of_waiting(serve_url, digits_registry, keys, tmp_path):
    from ray import serve

    from visionray.serve.app import build_app

    tight = app_args(digits_registry, keys, batch={"max_batch_size": 1, "wait_s": 0.0},
                     classifier={"max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2})
    serve.run(build_app(tight), name="tight", route_prefix="/tight")
    try:
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "a.jpg").write_bytes(JPEG)
        report = asyncio.run(loadtest(f"{serve_url}/tight", read_images(tmp_path / "img"), concurrency=24,
                                      duration_s=4.0, timeout_s=10.0))
        assert report.statuses[503] > 0 and report.statuses[200] > 0, report.to_json()
        assert set(report.statuses) <= {200, 503}, report.to_json()  # no timeouts, no 5xx other than 503

        async def burst():
            async with httpx.AsyncClient(timeout=10) as ac:
                return await asyncio.gather(*(ac.post(f"{serve_url}/tight/v1/classify", content=JPEG,
                                                      headers={"content-type": "image/jpeg"}) for _ in range(24)))

        r503 = next((r for r in asyncio.run(burst()) if r.status_code == 503), None)
        assert r503 is not None
        assert r503.headers["retry-after"] == "2" and r503.json()["code"] == "overloaded"
        with Client(f"{serve_url}/tight", retries=5) as client:  # retries after Retry-After and gets through
            assert client.classify([JPEG])["results"]
    finally:
        serve.delete("tight")


def test_combined_topology_serves_the_same_answers_in_one_deployment(serve_url, digits_registry, keys, tmp_path):
    """topology: combined: one deployment (named Classifier) sanitizes, decodes and classifies: the same
    answers as evaluate, the same JSON rejections, and overload is our 503 JSON with Retry-After."""
    from ray import serve

    from visionray.serve.app import build_app

    args = app_args(digits_registry, keys, topology="combined", batch={"max_batch_size": 1, "wait_s": 0.0},
                    classifier={"max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2})
    del args["ingress"]
    serve.run(build_app(args), name="combined", route_prefix="/combined")
    try:
        url = f"{serve_url}/combined"
        assert set(serve.status().applications["combined"].deployments) == {"Classifier"}
        folder = render_digits(tmp_path / "digits", count=30)
        files, expected, _ = expected_top1(digits_registry, keys, "digits@best", folder)
        assert served_top1(url, files, per_request=1) == expected
        bad = httpx.post(f"{url}/v1/classify", content=b"GIF89a....", headers={"content-type": "image/png"}, timeout=30)
        assert bad.status_code == 415 and bad.json()["code"] == "content_mismatch"
        assert httpx.get(f"{url}/readyz", timeout=30).json()["model"] == {"name": "digits", "version": 1}
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "a.jpg").write_bytes(JPEG)
        report = asyncio.run(loadtest(url, read_images(tmp_path / "img"), concurrency=24, duration_s=3.0, timeout_s=10.0))
        assert report.statuses[503] > 0 and report.statuses[200] > 0, report.to_json()
        assert set(report.statuses) <= {200, 503}, report.to_json()

        async def burst():
            async with httpx.AsyncClient(timeout=10) as ac:
                return await asyncio.gather(*(ac.post(f"{url}/v1/classify", content=JPEG,
                                                      headers={"content-type": "image/jpeg"}) for _ in range(24)))

        r503 = next((r for r in asyncio.run(burst()) if r.status_code == 503), None)
        assert r503 is not None and r503.headers["retry-after"] == "2"
        body = r503.json()  # our admission gate's JSON, not Serve's plain-text backpressure answer
        assert body["code"] == "overloaded" and set(body) == {"code", "message", "request_id"}, r503.text
        with Client(url, retries=5) as client:
            assert client.classify([JPEG])["results"]
    finally:
        serve.delete("combined")


def test_trickling_bodies_cost_only_their_senders(serve_url, digits_registry, keys):
    """64 clients trickle their bodies (a byte every 0.2 s) at a combined deployment with the
    shipped limits (max_ongoing_requests 32), each opening a new one half a second after it is cut:
    valid requests sent meanwhile are answered within seconds (they waited out the whole 10 s body
    timeout before)."""
    from ray import serve

    from visionray.serve.app import build_app

    args = app_args(digits_registry, keys, topology="combined", sanitizer={"body_timeout_s": 10.0, "decode_workers": 4})
    del args["ingress"]
    serve.run(build_app(args), name="trickle", route_prefix="/trickle")
    port = int(serve_url.rsplit(":", 1)[1])
    head = (b"POST /trickle/v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n")
    stop_at = time.monotonic() + 8.0
    answers: list[bytes] = []

    async def trickler() -> None:
        while time.monotonic() < stop_at:  # reconnects whenever it is cut, until the test ends
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.write(head)
            try:
                while time.monotonic() < stop_at:
                    writer.write(b"\x00")
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(200), 0.2)
                    except asyncio.TimeoutError:
                        continue
                    answers.append(data[:12])
                    await asyncio.sleep(0.5)
                    break
            except OSError:
                pass
            finally:
                writer.close()

    async def valid() -> list[float]:
        await asyncio.sleep(1.0)
        latencies = []
        async with httpx.AsyncClient(timeout=30) as c:
            while time.monotonic() < stop_at - 0.5:
                t0 = time.perf_counter()
                r = await c.post(f"{serve_url}/trickle/v1/classify", content=PNG, headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.2)
        return latencies

    async def go() -> list[float]:
        results = await asyncio.gather(valid(), *(trickler() for _ in range(64)))
        return results[0]

    try:
        latencies = asyncio.run(go())
    finally:
        serve.delete("trickle")
    assert len(latencies) >= 5 and max(latencies) < 3.0, latencies
    assert answers and all(a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")) for a in answers), set(answers)


def test_replicas_scale_up_under_load_and_back_down(serve_url, digits_registry, keys, tmp_path):
    from ray import serve

    from visionray.serve.app import build_app

    scaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
               "downscale_delay_s": 3.0, "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
               "max_ongoing_requests": 8, "max_queued_requests": 1000}
    serve.run(build_app(app_args(digits_registry, keys, batch={"max_batch_size": 4, "wait_s": 0.05}, classifier=scaling)),
              name="scale", route_prefix="/scale")
    try:
        assert running_replicas("scale") == 1
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "a.png").write_bytes(PNG)
        images = read_images(tmp_path / "img")
        seen: list[tuple[int, str]] = []

        async def load_and_watch():
            task = asyncio.create_task(loadtest(f"{serve_url}/scale", images, concurrency=16, duration_s=8.0, timeout_s=30.0))
            while not task.done():
                dep = serve.status().applications["scale"].deployments["Classifier"]
                seen.append((dep.replica_states.get("RUNNING", 0), str(dep.status)))
                await asyncio.sleep(0.5)
            return await task

        reports = []
        for _ in range(8):  # sustained load, 8 s at a time, until a second replica runs (<= 64 s)
            reports.append(asyncio.run(load_and_watch()))
            if max(n for n, _ in seen) > 1:
                break
        assert all(r.statuses[200] > 0 for r in reports), [r.to_json() for r in reports]
        assert max(n for n, _ in seen) > 1, f"(running, status) under load: {seen}; {[r.to_json() for r in reports]}"
        deadline = time.time() + 90
        while running_replicas("scale") > 1 and time.time() < deadline:
            time.sleep(1)
        assert running_replicas("scale") == 1
    finally:
        serve.delete("scale")


# --------------------------------------------------------------------------- the CLI


def test_cli_serve_predict_loadtest(serve_url, digits_registry, keys, tmp_path):
    import ray
    import yaml
    from ray import serve

    config = yaml.safe_load((REPO / "serve" / "digits.yaml").read_text())
    app = config["applications"][0]
    app.update(name="cli", route_prefix="/cli")
    app["args"].update(registry=str(digits_registry), public_keys=[str(keys[1])], classifier={**SMALL, "min_replicas": 1},
                       ingress={**SMALL, "min_replicas": 1, "max_replicas": 1})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    address = ray.get_runtime_context().gcs_address
    log = tmp_path / "serve.log"
    # started as a shell's `cmd &` starts it: SIGINT ignored; SIGTERM must still drain and stop it
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionray.cli", "serve", str(path), "--model", "digits@1", "--address", address],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.time() + 300
    while "Ctrl-C" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None and "ready" in log.read_text(), log.read_text()
    try:
        url = f"{serve_url}/cli"
        png = tmp_path / "seven.png"
        png.write_bytes(encode(Image.new("L", (8, 8), 0), "PNG"))
        result = runner.invoke(cli_app, ["predict", str(png), str(png), "--url", url, "--top-k", "2", "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        assert out["model"] == {"name": "digits", "version": 1} and len(out["results"]) == 2
        assert len(out["results"][0]["top_k"]) == 2
        result = runner.invoke(cli_app, ["loadtest", url, "--images", str(tmp_path), "--concurrency", "4",
                                         "--duration", "5", "--max-requests", "30", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["requests"] == 30 and report["by_status"] == {"200": 30} and report["p99_ms"] >= report["p50_ms"]
        bad = runner.invoke(cli_app, ["predict", str(tmp_path / "serve.yaml"), "--url", url])
        assert bad.exit_code == 2 and "not a PNG, JPEG or WebP" in bad.output
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
        out = log.read_text()
        assert "stopped" in out and "Traceback" not in out and "will not be applied" not in out, out
        assert "cli" not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()
        serve.delete("cli")


@pytest.mark.parametrize("args,message", [
    (["--model", "Nope"], "not NAME@ALIAS"),
    (["--model", "missing@best"], "no model 'missing'"),
])
def test_cli_serve_bad_input_exits_2(digits_registry, args, message, tmp_path):
    import yaml

    config = yaml.safe_load((REPO / "serve" / "digits.yaml").read_text())
    config["applications"][0]["args"]["registry"] = str(digits_registry)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(cli_app, ["serve", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_predict_unreachable_server_is_a_clean_error(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(PNG)
    result = runner.invoke(cli_app, ["predict", str(png), "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "cannot reach the server" in result.output
