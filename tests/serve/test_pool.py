"""The sandboxed decoder processes, as real processes: confinement, budgets, kills, the bounded queue.
``tests/serve/test_app.py`` does the same over real Serve and HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from tests.serve.test_sanitize import JPEG, PNG, encode, noise, png_chunk

from visionray.serve.config import SanitizerSpec
from visionray.serve.errors import Rejection
from visionray.serve import pool as pool_module
from visionray.serve.decode import pack_job
from visionray.serve.pool import DecodePool
from visionray.serve.structure import inspect

@pytest.fixture(scope="module")
def heavy() -> bytes:
    """A real CPU-heavy image: 4096x4096 noise, progressive, quality 100 (24 MB, ~0.5 s to decode)."""
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (4096, 4096, 3), dtype=np.uint8)), "JPEG", progressive=True, quality=100)


def decode(pool: DecodePool, data: bytes, declared: str | None = None, size: int = 16) -> np.ndarray:
    declared = declared or ("image/jpeg" if data[:2] == b"\xff\xd8" else "image/png")
    return asyncio.run(pool.decode(data, declared, 3, size, inspect(data, declared, pool.spec)))


def stop_all(pool: DecodePool) -> list[int]:
    """SIGSTOP every decoder: each hangs like a runaway decode, without using the CPU."""
    pids = pool.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


@pytest.fixture
def pool():
    p = DecodePool(SanitizerSpec(decode_workers=2, decode_timeout_s=10))
    p.start()
    yield p
    p.close()


def test_decoders_run_confined_and_without_the_replicas_secrets(monkeypatch):
    monkeypatch.setenv("VISIONRAY_API_KEYS", "secret-key")
    p = DecodePool(SanitizerSpec(decode_workers=1, decode_memory_mb=512))
    try:
        assert p.start()["seccomp"] is True
        [pid] = p.pids()
        status = open(f"/proc/{pid}/status").read()
        assert "Seccomp:\t2" in status  # filter mode
        limits = open(f"/proc/{pid}/limits").read()
        assert f"Max address space         {512 * 2**20}" in limits
        assert b"secret-key" not in open(f"/proc/{pid}/environ", "rb").read()
        assert decode(p, PNG).shape == (3, 12, 20)
    finally:
        p.close()
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()


CONFINED = """
import errno, os, socket, subprocess, sys
from visionray.serve.config import SanitizerSpec
from visionray.serve.sandbox import confine
confine(SanitizerSpec(decode_memory_mb=256))
out = []
for name, attempt in [
    ("socket", lambda: socket.socket()),
    ("exec", lambda: subprocess.run(["/bin/true"])),
    ("fork", lambda: os.fork()),
    ("write_file", lambda: os.open("/tmp/vr-confined-%d" % os.getpid(), os.O_WRONLY | os.O_CREAT)),
    ("remove_file", lambda: os.unlink("/etc/hostname")),
    ("memory", lambda: bytearray(512 * 2**20)),
]:
    try:
        attempt()
        out.append(name + ":allowed")
    except (OSError, MemoryError) as exc:
        out.append(name + ":refused")
print(" ".join(out))
"""


def test_confinement_refuses_sockets_exec_fork_file_writes_and_memory():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", CONFINED], capture_output=True, text=True, timeout=60, env=env)
    assert r.stdout.split() == ["socket:refused", "exec:refused", "fork:refused", "write_file:refused", "remove_file:refused", "memory:refused"], r.stderr


def test_decoders_killed_between_requests_are_replaced_before_the_next_image(pool):
    before = pool.pids()
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert decode(pool, PNG).shape == (3, 12, 20)
    assert decode(pool, PNG).shape == (3, 12, 20)
    assert not set(pool.pids()) & set(before)


def test_a_decoder_killed_mid_image_costs_that_image_only(pool):
    before = stop_all(pool)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(_outcome(pool, PNG)))
    worker.start()
    time.sleep(0.3)  # the image is with a decoder, which does not answer
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    worker.join(30)
    assert result == [(503, "decoder_lost")], result
    assert decode(pool, PNG).shape == (3, 12, 20)
    assert not set(pool.pids()) & set(before)  # replaced


def test_a_runaway_decode_is_killed_at_its_budget_while_valid_images_decode(heavy):
    p = DecodePool(SanitizerSpec(decode_workers=2, decode_timeout_s=0.2, max_progressive_pixels=16 * 2**20))
    p.start()
    try:
        before = set(p.pids())
        slow: list = []
        t = threading.Thread(target=lambda: slow.append(_outcome(p, heavy)))
        t.start()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            assert decode(p, PNG).shape == (3, 12, 20)
            times.append(time.perf_counter() - t0)
        t.join(30)
        assert slow == [(422, "decode_timeout")]
        assert max(times) < 2.0, times
        assert len(set(p.pids()) - before) == 1  # the runaway's worker was replaced
    finally:
        p.close()


def test_every_decoder_busy_gives_503_with_retry_after_not_a_422():
    p = DecodePool(SanitizerSpec(decode_workers=1, decode_queue=1, decode_queue_timeout_s=0.3, decode_timeout_s=1.5))
    p.start()
    try:
        stop_all(p)
        outcomes: dict = {}
        threads = [threading.Thread(target=lambda i=i: outcomes.update({i: _outcome(p, PNG)})) for i in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(60)
        # the first holds the only decoder (which hangs), the second waits 0.3 s, the third finds the queue full
        assert outcomes == {0: (422, "decode_timeout"), 1: (503, "decoders_busy"), 2: (503, "decoders_busy")}
        assert decode(p, PNG).shape == (3, 12, 20)
    finally:
        p.close()


def test_reduced_for_the_model_and_exact_below_twice_its_size(pool):
    big = encode(noise(1000, 700), "JPEG")
    a = decode(pool, big, "image/jpeg", size=32)
    assert a.shape[0] == 3 and 64 <= min(a.shape[1:]) and max(a.shape[1:]) <= 128
    small = np.asarray(Image.open(__import__("io").BytesIO(JPEG)).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(decode(pool, JPEG, "image/jpeg", size=16), small)  # 20x12 <= 2 x 16: untouched


def _outcome(pool: DecodePool, data: bytes):
    try:
        decode(pool, data)
        return "ok"
    except Rejection as rej:
        return rej.status, rej.code


def test_a_decoder_process_loads_no_framework():
    """The decoder's module tree pulls in neither torch, torchvision nor Ray: a worker starts fast
    and fits its small address-space limit (``decode_memory_mb``)."""
    out = subprocess.run([sys.executable, "-c", "import sys, visionray.serve.decode; "
                          "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# An impostor decoder (what an exploit that took a decoder over could send): it says it is ready,
# then answers every job with the lie named by its argument.
IMPOSTOR = r"""
import json, os, sys
from visionray.serve.decode import ANSWER, JOB, read_message, write_message
lie = sys.argv[1]
ready = json.dumps({"sandbox": {}}).encode()
write_message(1, ANSWER.pack(200, 0, 0, 0, 0.0, len(ready)), ready)
while read_message(0, JOB, 1 << 26, bytearray(JOB.size + 65536)) is not None:
    c, h, w = {"larger": (3, 9999, 9999), "channels": (1, 16, 16)}.get(lie, (3, 16, 16))
    n = {"short": c * h * w - 1, "huge": 2**31}.get(lie, c * h * w)
    status = {"status": 500, "refusal": 422}.get(lie, 200)
    body = {"refusal": b"not json", "status": json.dumps({"code": "corrupt_image", "message": "x"}).encode()}.get(lie)
    body = bytes(min(n, 1 << 20)) if body is None else body
    write_message(1, ANSWER.pack(status, c, h, w, 0.0, len(body) if status != 200 else n), body)
"""


@pytest.mark.parametrize("lie", ["larger", "channels", "short", "huge", "status", "refusal"])
def test_an_answer_that_is_not_what_was_asked_ends_that_decoder(lie):
    """Checked on arrival: more pixels than asked, other channels, a body shorter than its shape, a
    length nobody asked for (nothing allocated for it), a status no image has, a refusal that is
    not JSON: each is a decoder that cannot be trusted further (``_Died``), never pixels."""
    spec = SanitizerSpec()
    proc = pool_module.DecoderProcess(spec.model_dump_json(), [sys.executable, "-c", IMPOSTOR, lie])
    try:
        header = inspect(PNG, "image/png", spec)
        with pytest.raises(pool_module._Died):
            proc.run(pack_job("image/png", 3, 16, header, len(PNG)), PNG, 10.0, 3, 64)
    finally:
        proc.kill()


def test_an_honest_answer_passes_the_same_checks():
    """The impostor's control: the same process answering what was asked (16x16, 3 channels) is believed."""
    spec = SanitizerSpec()
    proc = pool_module.DecoderProcess(spec.model_dump_json(), [sys.executable, "-c", IMPOSTOR, "honest"])
    try:
        header = inspect(PNG, "image/png", spec)
        assert proc.run(pack_job("image/png", 3, 16, header, len(PNG)), PNG, 10.0, 3, 64).shape == (3, 16, 16)
    finally:
        proc.kill()


def _cut_png(side: int = 1024) -> bytes:
    """A structurally whole PNG (IHDR, IDAT, IEND) of noise whose zlib stream stops at 90%: Pillow
    decodes the rows it has (real CPU), then refuses it as truncated."""
    rng = np.random.default_rng(0)
    rows = zlib.compress(b"".join(b"\x00" + rng.integers(0, 256, side, dtype=np.uint8).tobytes() for _ in range(side)), 1)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = rows[:len(rows) * 9 // 10]
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_cpu_spent_on_refused_images_counts_towards_replacement():
    """A stream of images that cost real CPU and are then refused: the worker is replaced at half
    its CPU-seconds limit like any other, instead of running into RLIMIT_CPU (SIGXCPU) mid-image."""
    p = DecodePool(SanitizerSpec(decode_workers=1, decode_cpu_s=1))
    p.start()
    try:
        first, cut, outcomes = p.pids(), _cut_png(), []
        deadline = time.monotonic() + 120  # a bound in time, not images: one costs 1 to 3 ms of CPU by host
        while p.pids() == first and time.monotonic() < deadline:
            outcomes.append(_outcome(p, cut))
        assert p.pids() != first, f"never replaced after {len(outcomes)} refused images"
        assert set(outcomes) == {(422, "truncated_image")}, outcomes
    finally:
        p.close()
