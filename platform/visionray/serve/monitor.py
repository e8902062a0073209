"""Sampled payload monitoring: a share of requests written as Parquet rows (``ServeSpec.monitor``),
and the comparison of such a log with a model's own held-out split (``visionray monitor``).

Rows (``ROW_SCHEMA``): time, request id, image index, bytes, declared width and height, top-1
label and confidence, latency, model name and version; the image bytes only with ``log_images``.
Each HTTP-facing replica buffers its rows and writes a file of them under ``monitor.path`` when
``flush_rows`` are buffered or ``flush_s`` passed, and when it stops; a file is written whole or
not at all (``storage.write_atomic``). Logging never fails a request: a failed write is logged and
its rows kept for the next try (at most ``10 * flush_rows``; beyond, the oldest are dropped and
counted).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from visionray import storage
from visionray.serve.config import MonitorSpec

logger = logging.getLogger(__name__)


def row_schema(with_images: bool = False):
    import pyarrow as pa

    fields = [
        ("time", pa.timestamp("ms", tz="UTC")), ("request_id", pa.string()), ("index", pa.int32()),
        ("bytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("label", pa.string()),
        ("confidence", pa.float32()), ("latency_ms", pa.float32()), ("model", pa.string()), ("version", pa.int64()),
    ]
    return pa.schema(fields + ([("image", pa.binary())] if with_images else []))


class PayloadLog:
    """One replica's sampler and writer."""

    def __init__(self, spec: MonitorSpec, seed: int | None = None):
        self.spec = spec
        self.fs, self.base = storage.resolve(spec.path)
        self.rng = random.Random(seed)
        self.rows: list[dict[str, Any]] = []
        self.dropped = 0
        self.writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._last = time.monotonic()
        self._writing: asyncio.Task | None = None

    def rows_of(self, request_id: str, images: list[bytes], headers: list, labels: list, model: dict[str, Any],
             seconds: float) -> list[dict[str, Any]]:
        """The rows of one answered request: its images' bytes, their ``structure.Header`` and top-k."""
        now = datetime.now(timezone.utc)
        rows = []
        for i, (data, h, top) in enumerate(zip(images, headers, labels)):
            row = {"time": now, "request_id": request_id, "index": i, "bytes": len(data), "width": h.width,
                   "height": h.height, "label": top[0].label, "confidence": top[0].probability,
                   "latency_ms": seconds * 1000, "model": model["name"], "version": model["version"]}
            if self.spec.log_images:
                row["image"] = data
            rows.append(row)
        return rows

    def sampled(self) -> bool:
        return self.rng.random() * 100 < self.spec.sample_percent

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        limit = 10 * self.spec.flush_rows
        if len(self.rows) > limit:
            self.dropped += len(self.rows) - limit
            del self.rows[: len(self.rows) - limit]
        due = len(self.rows) >= self.spec.flush_rows or time.monotonic() - self._last >= self.spec.flush_s
        if due and (self._writing is None or self._writing.done()):
            self._writing = asyncio.ensure_future(asyncio.to_thread(self.flush))

    def flush(self) -> str | None:
        """Write the buffered rows as one file; returns its path (None when nothing was buffered)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, self.rows = self.rows, []
        self._last = time.monotonic()
        if not rows:
            return None
        path = f"{self.base.rstrip('/')}/payload-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{self.writer}-{uuid.uuid4().hex[:6]}.parquet"
        try:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=row_schema(self.spec.log_images)), buf)
            storage.write_atomic(self.fs, path, buf.getvalue())
        except Exception as exc:  # noqa: BLE001 - monitoring never fails serving; the rows wait for the next try
            logger.warning("payload log not written to %s (%s: %s); %d rows kept", path, type(exc).__name__, exc, len(rows))
            self.rows = rows + self.rows
            return None
        return path


# --------------------------------------------------------------------------- reading a log


def read_log(path: str):
    """Every row file under ``path`` (a directory or URI prefix) as one table (image bytes left out)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from visionray.data.splits import DataError

    fs, base = storage.resolve(path)
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                   if f.type == pafs.FileType.File and f.base_name.startswith("payload-") and f.path.endswith(".parquet"))
    if not files:
        raise DataError(f"{path!r}: no payload-*.parquet files there (is monitor.path of the serve config this?)")
    columns = row_schema().names
    tables = []
    for f in files:
        with fs.open_input_file(f) as fh:
            tables.append(pq.read_table(fh, columns=columns).cast(row_schema()))
    return pa.concat_tables(tables)


@dataclass
class Drift:
    """The live class distribution and confidence beside the model's own on its held-out split."""

    classes: list[str]
    live_share: np.ndarray        # per class, of the logged images' top-1
    reference_share: np.ndarray   # per class, of the model's top-1 on its held-out split
    live_confidence: np.ndarray   # top-1 probabilities
    reference_confidence: np.ndarray
    live_count: int
    reference_count: int
    reference: str                # what the reference is

    @property
    def total_variation(self) -> float:
        """Half the L1 distance between the two class distributions (0: same, 1: disjoint)."""
        return float(np.abs(self.live_share - self.reference_share).sum() / 2)

    def to_json(self) -> dict[str, Any]:
        q = (0.1, 0.5, 0.9)
        return {
            "live_count": self.live_count, "reference_count": self.reference_count, "reference": self.reference,
            "total_variation": self.total_variation,
            "per_class": [{"class": c, "live": float(a), "reference": float(b)}
                          for c, a, b in zip(self.classes, self.live_share, self.reference_share)],
            "confidence": {"live": dict(zip(map(str, q), np.quantile(self.live_confidence, q).tolist())),
                           "reference": dict(zip(map(str, q), np.quantile(self.reference_confidence, q).tolist()))},
        }


def compare(log, model, meta) -> Drift:
    """The log's rows against ``model`` on its own held-out split (the validation split of the data
    it trained on, rebuilt from its recorded spec: the same images training never saw)."""
    import torch

    from visionray.evaluate import eval_arrays, predict_logits

    classes = list(meta.classes)
    probs = predict_logits(model, meta, eval_arrays(meta, "val").images).softmax(1)
    conf, top = probs.max(1)
    ref_share = np.bincount(top.numpy(), minlength=len(classes)) / max(1, len(top))
    labels = log.column("label").to_pylist()
    index = {c: i for i, c in enumerate(classes)}
    live = np.array([index[x] for x in labels if x in index], dtype=np.int64)
    live_share = np.bincount(live, minlength=len(classes)) / max(1, len(live))
    return Drift(classes, live_share, ref_share, np.asarray(log.column("confidence").to_pylist(), dtype=np.float32),
                 conf.to(torch.float32).numpy(), len(live), len(top), "the model's held-out validation split")


def plot_drift(drift: Drift, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, hist) = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(drift.classes))
    bars.bar(x - 0.2, drift.reference_share, 0.4, label=f"held-out split ({drift.reference_count})")
    bars.bar(x + 0.2, drift.live_share, 0.4, label=f"logged requests ({drift.live_count})")
    bars.set_xticks(x, drift.classes, rotation=45, ha="right")
    bars.set_ylabel("share of top-1")
    bars.set_title(f"class distribution (total variation {drift.total_variation:.3f})")
    bars.legend()
    bins = np.linspace(0, 1, 21)
    hist.hist(drift.reference_confidence, bins, alpha=0.6, density=True, label="held-out split")
    hist.hist(drift.live_confidence, bins, alpha=0.6, density=True, label="logged requests")
    hist.set_xlabel("top-1 confidence")
    hist.set_title("confidence")
    hist.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
