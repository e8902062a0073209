"""A bounded pool of sandboxed decoder processes: the only place untrusted image bytes are decoded.

``DecodePool(spec).decode(data, declared, channels, size, header)`` (async) hands the bytes to one of
``decode_workers`` processes (``python -m visionray.serve.decode``, each confined by
``visionray.serve.sandbox``) and returns the pixels, already reduced for the model's input size, so
the replica never holds full-resolution hostile pixels. The IPC is fixed binary headers, pixel
bytes and JSON refusals, checked on arrival: a decoder that an exploit took over can send nothing
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
import fcntl
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
from visionray.serve.decode import ANSWER, MAX_JSON_BYTES, MESSAGE_CHARS, SCRATCH_BYTES, pack_job, read_message
from visionray.serve.errors import Rejection
from visionray.serve.structure import Header

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a new decoder process must say it is ready within this (s)
MMAP_BYTES = 16 * 2**20  # a decoder's heap blocks above this are mapped on their own (bytes)
TRIM_BYTES = 64 * 2**20  # freed heap a decoder keeps for the next image (bytes)
PIPE_BYTES = 2**20  # job pipe capacity: images up to this go in one write (bytes; Linux's default cap)
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL, signal.SIGXCPU, signal.SIGSYS}


class DecoderStartError(RuntimeError):
    """A decoder process could not start or confine itself; the message says why."""


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


def _child_env() -> dict[str, str]:
    """The decoder's environment: what Python and numpy need, none of the replica's secrets. glibc
    keeps freed heap memory up to ``TRIM_BYTES`` and maps only blocks above ``MMAP_BYTES`` on their
    own: otherwise every decode of a large image maps, faults in and unmaps its buffers afresh
    (measured: a 640x640 PNG decoded about 1.4x slower in the worker than in a long-lived process)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ") or k.startswith("OPENBLAS_")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_=str(MMAP_BYTES), MALLOC_TRIM_THRESHOLD_=str(TRIM_BYTES))
    return env


def _widen(fd: int) -> None:
    """Let a whole job (up to ``PIPE_BYTES``) go into the pipe in one write, where the host allows."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError as exc:  # EPERM above /proc/sys/fs/pipe-max-size: larger jobs take several writes
        logger.info("job pipe kept at its default size (%s); larger images take several writes", exc)


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

    def __init__(self, spec_json: str, command: list[str] | None = None):
        """``command``: what runs instead of ``python -m visionray.serve.decode SPEC_JSON`` (the tests'
        impostor decoders)."""
        self.proc = subprocess.Popen(
            command or [sys.executable, "-s", "-m", "visionray.serve.decode", spec_json], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=_child_env(), close_fds=True, cwd="/",
        )
        self.pid = self.proc.pid
        _widen(self.proc.stdin.fileno())
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.cpu_s = 0.0
        self._scratch = bytearray(ANSWER.size + SCRATCH_BYTES)
        try:
            status, _, body = self._answer(time.monotonic() + START_TIMEOUT_S, MAX_JSON_BYTES)
            ready = json.loads(body)
        except (_Timeout, _Died, ValueError) as exc:
            self.kill()
            raise DecoderStartError(f"decoder process {self.pid} did not start ({type(exc).__name__}, exit code "
                                    f"{self.proc.poll()}); see the replica's stderr") from None
        if status != 200:
            self.kill()
            raise DecoderStartError(str(ready.get("message", "the decoder refused to start"))[:MESSAGE_CHARS])
        self.sandbox = ready.get("sandbox", {})

    # -- messages (visionray.serve.decode's JOB and ANSWER)
    def _answer(self, deadline: float, max_body: int) -> tuple[int, tuple[int, int, int], bytearray]:
        """The next answer's status, shape and body (pixels or JSON); ``_Died`` at end of file or for
        an answer longer than ``max_body``, ``_Timeout`` past ``deadline``."""
        fd = self.proc.stdout.fileno()
        try:
            message = read_message(fd, ANSWER, max_body, self._scratch, lambda: _wait_fd(fd, deadline))
        except ValueError:
            raise _Died from None  # a decoder that answers more than it was asked for is not trusted further
        if message is None:
            raise _Died
        (status, c, h, w, cpu_s, _), body = message
        self.cpu_s = cpu_s
        return status, (c, h, w), body

    def _write(self, buffer: bytes, deadline: float) -> None:
        fd, view = self.proc.stdin.fileno(), memoryview(buffer)
        while view:
            try:
                view = view[os.write(fd, view):]  # non-blocking: what the pipe takes now
            except BlockingIOError:
                _wait_fd(fd, deadline, write=True)  # a hung decoder times out here, it cannot block us
            except OSError:  # BrokenPipeError included: the decoder is gone
                raise _Died from None

    def run(self, job: bytes, data: bytes, timeout_s: float, channels: int, max_side: int) -> np.ndarray:
        """The decoded (C, H, W) pixels of a ``pack_job`` job; ``Rejection`` for the image's own
        refusals; ``_Timeout`` or ``_Died`` when the process must be replaced. Checked on arrival:
        the shape asked for, at most ``max_side`` a side, a refusal only with an image's status."""
        deadline = time.monotonic() + timeout_s
        self._write(job + data, deadline)
        status, (c, h, w), body = self._answer(deadline, max(channels * max_side * max_side, MAX_JSON_BYTES))
        if status != 200:
            if status not in (413, 415, 422):
                raise _Died
            try:
                refusal = json.loads(body)
            except ValueError:
                raise _Died from None
            raise Rejection(status, str(refusal.get("code", "corrupt_image"))[:64], str(refusal.get("message", ""))[:MESSAGE_CHARS])
        if c != channels or not (1 <= h <= max_side and 1 <= w <= max_side) or len(body) != c * h * w:
            raise _Died
        return np.frombuffer(body, np.uint8).reshape(c, h, w)

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
        job = pack_job(declared, channels, size, header, len(data))
        max_side = 4 * size if size else max(self.spec.max_width, self.spec.max_height)
        replace = True
        try:
            array = proc.run(job, data, self.spec.decode_timeout_s, channels, max_side)
            replace = proc.cpu_s > self.spec.decode_cpu_s / 2
            return array
        except Rejection:  # the image's own refusal; its CPU counts towards the worker's budget as well
            replace = proc.cpu_s > self.spec.decode_cpu_s / 2
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
