"""A bounded pool of sandboxed decoder processes: the only place untrusted image bytes are decoded.

``DecodePool(spec).decode(data, declared, channels, size, header)`` (async) hands the bytes to one of
``decode_workers`` processes (``python -m visionray.serve.decode``, each confined by
``visionray.serve.sandbox``) and returns the pixels, already reduced for the model's input size, so
the replica never holds full-resolution hostile pixels. The IPC is raw frames (lengths, JSON
headers, pixel bytes) checked on arrival: a decoder that an exploit took over can send nothing
that is unpickled or that is larger than the pixels asked for.

- Budget: ``decode_timeout_s`` of wall clock from when a worker starts on the image; over it the
  worker is killed (SIGKILL) and replaced, and that image gets 422 ``decode_timeout``.
- Crashes: a worker that dies under an image (segfault, abort, SIGXCPU) costs that image 422
  ``decoder_crashed``; one killed from outside (OOM killer, an operator) 503 ``decoder_lost`` with
  Retry-After. Either way it is replaced and the replica keeps serving.
- Load: when every worker is busy an image waits, the cheapest declared decode first (pixels x
  scans, so a queue of bombs does not hold up a thumbnail), at most ``decode_queue`` of them and at
  most ``decode_queue_timeout_s``; beyond either it gets 503 ``decoders_busy`` with Retry-After:
  a valid image is never answered 422 because of someone else's load.
- Workers are replaced at half their CPU-seconds limit, and killed when the pool is closed or
  garbage-collected; one whose replica died reads the end of its job pipe and exits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from visionray.serve.config import SanitizerSpec
from visionray.serve.decode import MAX_HEADER_BYTES, MESSAGE_CHARS, frames
from visionray.serve.errors import Rejection
from visionray.serve.structure import Header

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a new decoder process must say it is ready within this (s)
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL, signal.SIGXCPU, signal.SIGSYS}


class DecoderStartError(RuntimeError):
    """A decoder process could not start or confine itself; the message says why."""


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


def _child_env() -> dict[str, str]:
    """The decoder's environment: what Python and numpy need, none of the replica's secrets."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ") or k.startswith("OPENBLAS_")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _wait_fd(fd: int, deadline: float, write: bool = False) -> None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        ready = select.select([], [fd], [], remaining)[1] if write else select.select([fd], [], [], remaining)[0]
        if ready:
            return


class DecoderProcess:
    """One confined decoder and its two pipes."""

    def __init__(self, spec_json: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-m", "visionray.serve.decode", spec_json], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=_child_env(), close_fds=True, cwd="/",
        )
        self.pid = self.proc.pid
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.cpu_s = 0.0
        try:
            ready = json.loads(self._read_frame(time.monotonic() + START_TIMEOUT_S, MAX_HEADER_BYTES))
        except (_Timeout, _Died, ValueError) as exc:
            self.kill()
            raise DecoderStartError(f"decoder process {self.pid} did not start ({type(exc).__name__}, exit code "
                                    f"{self.proc.poll()}); see the replica's stderr") from None
        if not ready.get("ready"):
            self.kill()
            raise DecoderStartError(str(ready.get("message", "the decoder refused to start"))[:MESSAGE_CHARS])
        self.sandbox = ready.get("sandbox", {})

    # -- framing
    def _read_into(self, buf: memoryview, deadline: float) -> None:
        fd, got = self.proc.stdout.fileno(), 0
        while got < len(buf):
            _wait_fd(fd, deadline)
            n = os.readv(fd, [buf[got:]])
            if n == 0:
                raise _Died
            got += n

    def _read_frame(self, deadline: float, limit: int) -> bytearray:
        head = bytearray(4)
        self._read_into(memoryview(head), deadline)
        n = int.from_bytes(head, "big")
        if n > limit:
            raise _Died  # a decoder that answers more than it was asked for is not trusted further
        body = bytearray(n)
        self._read_into(memoryview(body), deadline)
        return body

    def _write(self, buffer: bytes, deadline: float) -> None:
        fd, view = self.proc.stdin.fileno(), memoryview(buffer)
        while view:
            try:
                view = view[os.write(fd, view):]  # non-blocking: what the pipe takes now
            except BlockingIOError:
                _wait_fd(fd, deadline, write=True)  # a hung decoder times out here, it cannot block us
            except OSError:  # BrokenPipeError included: the decoder is gone
                raise _Died from None

    def run(self, job: dict, data: bytes, timeout_s: float, max_side: int) -> np.ndarray:
        """The decoded (C, H, W) pixels; ``Rejection`` for the image's own refusals; ``_Timeout``
        or ``_Died`` when the process must be replaced."""
        deadline = time.monotonic() + timeout_s
        self._write(frames(json.dumps(job).encode(), data), deadline)
        try:
            head = json.loads(self._read_frame(deadline, MAX_HEADER_BYTES))
        except ValueError:
            raise _Died from None
        if not head.get("ok"):
            status, code = int(head.get("status", 422)), str(head.get("code", "corrupt_image"))[:64]
            if status not in (413, 415, 422):
                raise _Died
            raise Rejection(status, code, str(head.get("message", ""))[:MESSAGE_CHARS])
        c, h, w = (int(v) for v in head["shape"])
        if c != job["channels"] or not (1 <= h <= max_side and 1 <= w <= max_side):
            raise _Died
        pixels = self._read_frame(deadline, c * h * w)
        if len(pixels) != c * h * w:
            raise _Died
        self.cpu_s = float(head.get("cpu_s", 0.0))
        return np.frombuffer(pixels, np.uint8).reshape(c, h, w)

    def kill(self) -> None:
        _kill(self.proc)

    def died_of(self) -> int | None:
        """The signal that ended the process (None: still running, or exited)."""
        try:
            rc = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None
        return -rc if rc < 0 else None


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.error("decoder process %d did not exit after SIGKILL", proc.pid)
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass


def _kill_all(procs: set) -> None:
    for p in list(procs):
        _kill(p.proc)
    procs.clear()


class DecodePool:
    """``decode_workers`` decoder processes, started on first use (or ``start()``)."""

    def __init__(self, spec: SanitizerSpec):
        self.spec = spec
        self._spec_json = spec.model_dump_json()
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()
        self._procs: set[DecoderProcess] = set()
        self._idle: list[DecoderProcess] = []
        self._waiters: list[tuple[int, int]] = []
        self._seq = itertools.count()
        self._inflight = 0
        self._spawning = 0
        self._started = False
        self._threads = ThreadPoolExecutor(max_workers=spec.decode_workers + spec.decode_queue, thread_name_prefix="decode")
        self._finalizer = weakref.finalize(self, _kill_all, self._procs)
        self.retry_after = {"Retry-After": "1"}

    # -- life cycle
    def start(self) -> dict:
        """Start every worker now (in parallel); raises ``DecoderStartError``. Returns the sandbox applied."""
        with self._start_lock:
            if not self._started:
                with ThreadPoolExecutor(self.spec.decode_workers) as ex:
                    futures = [ex.submit(DecoderProcess, self._spec_json) for _ in range(self.spec.decode_workers)]
                    errors = []
                    for f in futures:
                        try:
                            self._add(f.result())
                        except DecoderStartError as exc:
                            errors.append(exc)
                if errors:
                    _kill_all(self._procs)
                    raise errors[0]
                self._started = True
                logger.info("%d decoder processes started, sandbox %s", len(self._procs),
                            next(iter(self._procs)).sandbox)
        return next(iter(self._procs)).sandbox if self._procs else {}

    def _add(self, proc: DecoderProcess) -> None:
        with self._cond:
            self._procs.add(proc)
            self._idle.append(proc)
            self._cond.notify_all()

    def pids(self) -> list[int]:
        return sorted(p.pid for p in self._procs)

    def close(self) -> None:
        self._finalizer()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- decoding
    async def decode(self, data: bytes, declared: str, channels: int, size: int | None, header: Header) -> np.ndarray:
        """The pixels of checked bytes whose ``structure.inspect`` header is ``header``."""
        with self._cond:
            if self._inflight >= self.spec.decode_workers + self.spec.decode_queue:
                raise Rejection(503, "decoders_busy", f"all {self.spec.decode_workers} image decoders are busy and "
                                f"{self.spec.decode_queue} images wait; retry later", self.retry_after)
            self._inflight += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, self.decode_blocking, data, declared, channels, size, header)
        finally:
            with self._cond:
                self._inflight -= 1

    def decode_blocking(self, data: bytes, declared: str, channels: int, size: int | None, header: Header) -> np.ndarray:
        if not self._started:
            self.start()
        self._heal()
        proc = self._checkout(header.cost, time.monotonic() + self.spec.decode_queue_timeout_s)
        if proc.proc.poll() is not None:  # died while idle (killed from outside): this image gets a new one
            proc = self._replace(proc)
            if proc is None:
                raise Rejection(503, "decoder_lost", "no image decoder could be started; retry", self.retry_after)
        job = {"type": declared, "channels": channels, "size": size, "components": header.components}
        max_side = 4 * size if size else max(self.spec.max_width, self.spec.max_height)
        replace = True
        try:
            array = proc.run(job, data, self.spec.decode_timeout_s, max_side)
            replace = proc.cpu_s > self.spec.decode_cpu_s / 2
            return array
        except Rejection:
            replace = False
            raise
        except _Timeout:
            proc.kill()
            raise Rejection(422, "decode_timeout", f"decoding took longer than {self.spec.decode_timeout_s} s "
                            "(sanitizer.decode_timeout_s); the decoder was stopped") from None
        except _Died:
            sig = proc.died_of()
            if sig is None or sig in _CRASH_SIGNALS:
                raise Rejection(422, "decoder_crashed", "the image crashed or confused its decoder "
                                f"({signal.Signals(sig).name if sig else 'bad answer'}); it is not accepted") from None
            raise Rejection(503, "decoder_lost", f"the decoder of this image was stopped from outside "
                            f"({signal.Signals(sig).name}); retry", self.retry_after) from None
        finally:
            self._checkin(proc, replace)

    def _heal(self) -> None:
        """Bring the pool back to size after replacements that failed to start."""
        with self._cond:
            missing = self.spec.decode_workers - len(self._procs) - self._spawning
            if missing <= 0:
                return
            self._spawning += 1
        try:
            self._add(DecoderProcess(self._spec_json))
        except DecoderStartError as exc:
            logger.error("decoder pool is %d short: %s", missing, exc)
        finally:
            with self._cond:
                self._spawning -= 1

    def _checkout(self, cost: int, deadline: float) -> DecoderProcess:
        entry = (cost, next(self._seq))
        with self._cond:
            heapq.heappush(self._waiters, entry)
            try:
                while not (self._idle and self._waiters[0] == entry):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Rejection(503, "decoders_busy", f"no image decoder was free within "
                                        f"{self.spec.decode_queue_timeout_s} s; retry later", self.retry_after)
                    self._cond.wait(remaining)
                return self._idle.pop(0)  # round robin: CPU use spread, dead ones found early
            finally:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
                self._cond.notify_all()

    def _checkin(self, proc: DecoderProcess | None, replace: bool) -> None:
        if proc is None:
            return
        if not replace:
            self._add(proc)
            return
        fresh = self._replace(proc)
        if fresh is not None:
            self._add(fresh)

    def _replace(self, proc: DecoderProcess) -> DecoderProcess | None:
        """Kill ``proc`` and start its successor (None when that fails: the pool is one short
        until a later replacement works, and says so in the log)."""
        proc.kill()
        with self._cond:
            self._procs.discard(proc)
            self._spawning += 1
        fresh = None
        try:
            if self._finalizer.alive:
                fresh = DecoderProcess(self._spec_json)
        except DecoderStartError as exc:
            logger.error("could not replace decoder process %d: %s", proc.pid, exc)
        finally:
            with self._cond:
                self._spawning -= 1
                if fresh is not None:
                    self._procs.add(fresh)
        return fresh
