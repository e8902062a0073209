"""Which model answers a request: the served one, or with a rollout (``ServeSpec.rollout``) a
candidate registry version next to it.

- ``canary``: ``percent``% of requests (each request as a whole: all its images) are answered by
  the candidate; every response names the version that answered.
- ``shadow``: ``percent``% of requests are also classified by the candidate, in a task of their
  own after the response is sent (the client never waits for it); top-1 agreement with the served
  model is counted per class (the served model's top-1).

The candidate is verified when the app is built (signature and every file, ``resolve_candidate``);
one that fails is never called and ``/v1/rollout`` says why. A canary whose replicas fail at run
time answers nothing wrong either: that request is answered by the served model and the failure
is counted (``candidate_errors``), as in ``/v1/rollout``.

Counts: each HTTP-facing replica adds its own to Prometheus and sends them every second to one
``RolloutStats`` replica, which ``/v1/rollout`` (and ``visionray status``) reads: the whole app's
counts, not one replica's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from visionray.serve.config import RolloutSpec, ServeSpec
from visionray.serve.errors import Rejection
from visionray.serve.predictor import Label, Source, resolve_registry_model

logger = logging.getLogger(__name__)

FLUSH_S = 1.0  # how often a replica sends its counts to RolloutStats (s)


@dataclass(frozen=True)
class Candidate:
    """The rollout as built: the candidate's source, or why it gets no traffic."""

    spec: RolloutSpec
    source: Source | None
    refused: str | None = None


def resolve_candidate(spec: ServeSpec, stable: Source) -> Candidate | None:
    """Pin and verify the rollout's candidate (its signed record and every file against the keys)
    where the app is built; a candidate that fails verification, or whose input differs from the
    served model's (the ingress decodes for one input), is refused with the reason."""
    from visionray.registry.layout import RegistryError
    from visionray.registry.registry import Registry

    if spec.rollout is None:
        return None
    try:
        source = resolve_registry_model(spec.rollout.ref, stable.registry, stable.public_keys)
        Registry(source.registry).verify(source.ref, list(stable.public_keys))
    except RegistryError as exc:
        logger.error("rollout %s %s refused, it gets no traffic: %s", spec.rollout.mode, spec.rollout.ref, exc)
        return Candidate(spec.rollout, None, f"{type(exc).__name__}: {exc}")
    if source.model_input != stable.model_input:
        reason = (f"the candidate takes {source.model_input} (channels, px), the served model {stable.model_input}: "
                  "one app decodes for one input")
        logger.error("rollout %s %s refused: %s", spec.rollout.mode, source.ref, reason)
        return Candidate(spec.rollout, None, reason)
    return Candidate(spec.rollout, source)


@dataclass
class Counts:
    """What a rollout counted; adds up across replicas (``merge``)."""

    answers: Tally = field(default_factory=Tally)            # "name@version" -> requests answered
    compared: Tally = field(default_factory=Tally)           # served top-1 label -> shadow comparisons
    agreed: Tally = field(default_factory=Tally)             # served top-1 label -> candidate agreed
    candidate_errors: int = 0
    shadow_errors: int = 0

    def merge(self, other: dict[str, Any]) -> None:
        for name in ("answers", "compared", "agreed"):
            getattr(self, name).update(other.get(name, {}))
        self.candidate_errors += other.get("candidate_errors", 0)
        self.shadow_errors += other.get("shadow_errors", 0)

    def to_json(self) -> dict[str, Any]:
        return {"answers": dict(self.answers), "compared": dict(self.compared), "agreed": dict(self.agreed),
                "candidate_errors": self.candidate_errors, "shadow_errors": self.shadow_errors}

    def __bool__(self) -> bool:
        return bool(self.answers or self.compared or self.candidate_errors or self.shadow_errors)


def summary(candidate: Candidate | None, counts: dict[str, Any]) -> dict[str, Any]:
    """``/v1/rollout``'s body: the rollout as built and the app's counts, with agreement per class."""
    if candidate is None:
        return {"rollout": None, **counts}
    compared, agreed = counts.get("compared", {}), counts.get("agreed", {})
    total = sum(compared.values())
    return {
        "rollout": {"mode": candidate.spec.mode, "candidate": candidate.source.ref if candidate.source else candidate.spec.ref,
                    "percent": candidate.spec.percent, "state": "refused" if candidate.refused else "active",
                    "reason": candidate.refused},
        **counts,
        "agreement": (sum(agreed.values()) / total) if total else None,
        "agreement_per_class": {c: agreed.get(c, 0) / n for c, n in sorted(compared.items())},
    }


Classify = Callable[[np.ndarray, int], Awaitable[list[Label]]]
Info = Callable[[], Awaitable[dict[str, Any]]]


class Router:
    """Answers a request's images with the served model or the canary; runs the shadow after."""

    def __init__(self, stable: tuple[Classify, Info], candidate: tuple[Classify, Info] | None,
                 rollout: Candidate | None, on_answer: Callable[[str, str], None] = lambda name, version: None,
                 on_compare: Callable[[str, bool], None] = lambda label, agreed: None,
                 flush: Callable[[dict[str, Any]], Awaitable[None]] | None = None, seed: int | None = None):
        self.stable, self.candidate = stable, candidate if rollout and rollout.source else None
        self.rollout = rollout
        self.mode = rollout.spec.mode if rollout else None
        self.share = rollout.spec.percent / 100 if rollout else 0.0
        self.on_answer, self.on_compare, self._flush = on_answer, on_compare, flush
        self.counts = Counts()  # since the last flush
        self.total = Counts()   # this replica's, since it started (used when there is no flush)
        self.rng = random.Random(seed)
        self._tasks: set[asyncio.Task] = set()
        self._last_flush = time.monotonic()

    async def classify(self, images: list[np.ndarray], k: int) -> tuple[list[list[Label]], dict[str, Any]]:
        """(top-k per image, the answering model's metadata)."""
        canary = self.mode == "canary" and self.candidate is not None and self.rng.random() < self.share
        labels, info = None, None
        if canary:
            try:
                labels, info = await self._run(self.candidate, images, k)
            except Rejection as exc:  # the candidate's replicas are down or full: the served model answers
                logger.warning("canary failed (%s: %s); the served model answers this request", exc.code, exc.message)
                self._add(candidate_errors=1)
        if labels is None:
            labels, info = await self._run(self.stable, images, k)
        self.on_answer(str(info["name"]), str(info["version"]))
        self._add(answers={f"{info['name']}@{info['version']}": 1})
        if self.mode == "shadow" and self.candidate is not None and self.rng.random() < self.share:
            self._spawn(self._shadow(images, labels))
        self._maybe_flush()
        return labels, info

    async def _run(self, pair: tuple[Classify, Info], images: list[np.ndarray], k: int) -> tuple[list[list[Label]], dict]:
        classify, info = pair
        labels = await asyncio.gather(*(classify(im, k) for im in images))
        return list(labels), await info()

    async def _shadow(self, images: list[np.ndarray], served: list[list[Label]]) -> None:
        try:
            theirs, _ = await self._run(self.candidate, images, 1)
        except Exception as exc:  # noqa: BLE001 - off the response path: a failing shadow is counted, never raised
            logger.warning("shadow classification failed: %s: %s", type(exc).__name__, exc)
            self._add(shadow_errors=1)
            return
        for ours, other in zip(served, theirs):
            same = ours[0].label == other[0].label
            self.on_compare(ours[0].label, same)
            self._add(compared={ours[0].label: 1}, agreed={ours[0].label: int(same)})

    def _add(self, **delta: Any) -> None:
        for counts in (self.counts, self.total):
            counts.merge(delta)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _maybe_flush(self) -> None:
        if self._flush is not None and self.counts and time.monotonic() - self._last_flush >= FLUSH_S:
            self._spawn(self.flush())

    async def flush(self) -> None:
        """Send the counts since the last flush to the app's ``RolloutStats``."""
        if self._flush is None or not self.counts:
            return
        delta, self.counts = self.counts.to_json(), Counts()
        self._last_flush = time.monotonic()
        try:
            await self._flush(delta)
        except Exception as exc:  # noqa: BLE001 - counts are kept for the next flush, never lost silently
            logger.warning("rollout counts not sent (%s: %s); kept for the next flush", type(exc).__name__, exc)
            self.counts.merge(delta)

    async def drain(self) -> None:
        """Wait for running shadow classifications (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def status(self, read_all: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> dict[str, Any]:
        """The rollout and its counts: the whole app's (``read_all``, after this replica's flush), else this replica's."""
        if read_all is None:
            return summary(self.rollout, self.total.to_json())
        await self.flush()
        return summary(self.rollout, await read_all())
