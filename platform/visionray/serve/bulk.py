"""Bulk scoring: every image under a folder, an archive, a packed-shards manifest or an object-store
prefix classified by a verified model, one Parquet row per input (``visionray predict --batch``).

Ray Data runs it: the driver lists the inputs (names only; of a pack it reads only the manifest),
tasks read the bytes (``map_batches``; a file over the size cap is refused unread), and a pool of
actors (``BulkJob.concurrency``, each with ``num_cpus``/``num_gpus``) holds the model, verified
before its weights are read, and its own pool of sandboxed decoders (``visionray.serve.pool``): the
same sanitizer rules and the same decoding as serving, so a hostile file costs its own row (status
``rejected`` with the reason), never the actor or the run.

Output: one row per input (``ROW_SCHEMA``). Resumable: while the run goes, rows are written in
parts under ``OUT.parts/``; a rerun reads OUT and the parts, skips every input that has a row, and
at the end folds everything into OUT (written atomically) and removes the parts.
"""

from __future__ import annotations

import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field, model_validator

from visionray import storage
from visionray.data.folders import ARCHIVE_SUFFIXES, IMAGE_EXTENSIONS, extract_archive
from visionray.data.manifest import MANIFEST_FILE, ShardEntry, pack_location, read_manifest, read_shard
from visionray.data.splits import DataError
from visionray.serve.config import SanitizerSpec
from visionray.serve.errors import Rejection
from visionray.serve.pool import DecodePool
from visionray.serve.predictor import Predictor, Source, check_input, load_source, pick_device
from visionray.serve.sanitize import check_type, sniff
from visionray.serve.structure import inspect
from visionray.spec_io import Strict

PART_ROWS = 4096  # rows per part file written while a run goes (a resumed run loses at most this many)
READ_TASK_LIMIT = 4  # byte-reading tasks at once: they wait on storage, so they reserve no CPU (the
# actors may take every core: `--cpus 2` on a 2-core machine must not starve the reads)


class BulkJob(Strict):
    """How a bulk scoring run is sized; the CLI's options, validated once."""

    top_k: int = Field(5, ge=1, le=1000, description="labels per image")
    batch_size: int = Field(256, ge=1, le=65536, description="images per forward pass of one actor")
    concurrency: int | None = Field(None, ge=1, le=4096, description="actors holding the model; default: as many as "
                                    "the cluster's free CPUs (and GPUs, with num_gpus) hold when the run starts")
    num_cpus: float = Field(1.0, ge=0.0, le=256, description="CPUs reserved per actor (its torch threads)")
    num_gpus: float = Field(0.0, ge=0.0, le=8, description="GPUs per actor (fractions share one)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the actor has a GPU")
    sanitizer: SanitizerSpec = Field(default_factory=lambda: SanitizerSpec(decode_workers=2),
                                     description="limits per image, as in serving; decode_workers per actor")

    @model_validator(mode="after")
    def _sized(self) -> "BulkJob":
        if self.concurrency is None and not (self.num_cpus or self.num_gpus):
            raise ValueError(f"concurrency: give a number of actors when they reserve no CPU or GPU "
                             f"(num_cpus={self.num_cpus:g}, num_gpus={self.num_gpus:g}): nothing to size the pool by")
        return self


def actor_count(job: BulkJob) -> int:
    """``job.concurrency``, else as many actors as the cluster's free CPUs (and GPUs) hold now.
    On CPU, one-CPU actors side by side beat one actor with every core's threads (measured in
    ``benchmarks/bulk.py``: the threads of one forward pass wait on each other and on the decoders)."""
    if job.concurrency is not None:
        return job.concurrency
    import ray

    free = ray.available_resources()
    fits = [free.get(kind, 0.0) / need for kind, need in (("CPU", job.num_cpus), ("GPU", job.num_gpus)) if need]
    return max(1, int(min(fits) + 1e-9))


ROW_COLUMNS = ("path", "status", "reason", "labels", "probabilities", "model", "version")


def row_schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()),             # relative to SRC (a pack: the packed file's name)
        ("status", pa.string()),           # ok | rejected
        ("reason", pa.string()),           # rejected: "code: message" (the serving API's code), else null
        ("labels", pa.list_(pa.string())),  # top-k, most probable first (empty when rejected)
        ("probabilities", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("version", pa.int64()),           # null for an unregistered checkpoint
    ])


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What SRC holds: files under ``base`` of ``filesystem`` (``names`` relative to it), or the
    shards of a pack. ``ignored``: files without an image suffix (counted, not scored)."""

    src: str
    filesystem: Any
    base: str
    names: list[str] = field(default_factory=list)
    shards: list[ShardEntry] = field(default_factory=list)
    total: int = 0
    ignored: int = 0


def list_inputs(src: str) -> Inputs:
    """The inputs of a folder, a .tar/.tar.gz, a manifest (or a pack directory holding one) or a URI prefix."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(src)
    if storage.is_local(fs):
        base = str(Path(base).expanduser().absolute())  # pyarrow's local filesystem wants absolute paths
    if base.endswith(MANIFEST_FILE) or _exists(fs, f"{base.rstrip('/')}/{MANIFEST_FILE}"):
        manifest = read_manifest(src)
        fs, base = pack_location(src)
        shards = manifest.train.shards + manifest.val.shards
        return Inputs(src, fs, base, shards=shards, total=sum(s.rows for s in shards))
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{src!r} does not exist; give a folder, a {'/'.join(ARCHIVE_SUFFIXES)} archive, a "
                        "manifest.json of `visionray data pack`, or an s3:// or gs:// prefix")
    if info.type == pafs.FileType.File:
        if not storage.is_local(fs) or not base.endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"{src!r} is a file but not a local archive ({', '.join(ARCHIVE_SUFFIXES)}) or a manifest.json")
        fs, base = pafs.LocalFileSystem(), str(extract_archive(Path(base)))
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = sorted(f.path for f in found if f.type == pafs.FileType.File and not f.base_name.startswith("."))
    images = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS)]
    prefix = base.rstrip("/") + "/"
    names = [p[len(prefix):] if p.startswith(prefix) else p for p in images]
    return Inputs(src, fs, base.rstrip("/"), names=names, total=len(names), ignored=len(files) - len(images))


def _exists(fs: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def read_files(batch: dict[str, np.ndarray], filesystem: Any, base: str, max_bytes: int) -> dict[str, np.ndarray]:
    """(path, image bytes, error) of each named file; files over ``max_bytes`` are not read."""
    images, errors = [], []
    for name in batch["path"]:
        data, error = b"", ""
        try:
            with filesystem.open_input_file(f"{base}/{name}") as fh:
                if fh.size() > max_bytes:
                    error = f"file_too_large: {fh.size()} bytes; the limit is {max_bytes} (sanitizer.max_body_bytes)"
                else:
                    data = fh.read()
        except OSError as exc:
            error = f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"
        images.append(data)
        errors.append(error)
    return {"path": batch["path"], "image": np.array(images, dtype=object), "error": np.array(errors, dtype=object)}


def read_shard_rows(batch: dict[str, np.ndarray], filesystem: Any, base: str, done: frozenset[str]) -> dict[str, np.ndarray]:
    """The rows of each shard (checksum verified against the manifest first) not already scored."""
    paths, images = [], []
    for entry_json in batch["shard"]:
        table = read_shard(filesystem, base, ShardEntry.model_validate_json(entry_json))
        for name, data in zip(table.column("name").to_pylist(), table.column("image").to_pylist()):
            if name not in done:
                paths.append(name)
                images.append(data)
    return {"path": np.array(paths, dtype=object), "image": np.array(images, dtype=object),
            "error": np.array([""] * len(paths), dtype=object)}


# --------------------------------------------------------------------------- the scoring actor


class Scorer:
    """One actor of the pool: the verified model and its sandboxed decoders."""

    def __init__(self, source: Source, job: BulkJob):
        import torch

        torch.set_num_threads(max(1, round(job.num_cpus)))  # the actor's CPUs, whatever OMP_NUM_THREADS says
        device = pick_device(job.device)
        model, meta, name, version = load_source(source, device)  # raises VerificationError: nothing scores
        self.predictor = Predictor(model, meta, name, version, device)
        check_input(source, self.predictor.preset)
        self.job = job
        self.pool = DecodePool(job.sanitizer)
        self.pool.start()  # raises DecoderStartError: an actor that cannot sandbox never scores
        self.threads = ThreadPoolExecutor(job.sanitizer.decode_workers)

    def _decode(self, data: bytes, error: str) -> np.ndarray | str:
        if error:
            return error
        try:
            declared = sniff(data) if data else None
            if data and declared is None:
                raise Rejection(415, "unsupported_media_type", "the bytes are no known image format; accepted: "
                                f"{', '.join(self.job.sanitizer.allowed_types)}")
            check_type(declared or self.job.sanitizer.allowed_types[0], data, self.job.sanitizer)  # empty, not allowed
            header = inspect(data, declared, self.job.sanitizer)
            preset = self.predictor.preset
            return self.pool.decode_blocking(data, declared, preset.channels, preset.image_size, header)
        except Rejection as exc:
            return f"{exc.code}: {exc.message}"

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        decoded = list(self.threads.map(self._decode, batch["image"], batch["error"]))
        ok = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        top = self.predictor.predict([decoded[i] for i in ok], self.job.top_k) if ok else []
        by_row = dict(zip(ok, top))
        rows = {c: [] for c in ROW_COLUMNS}
        for i, path in enumerate(batch["path"]):
            labels = by_row.get(i, [])
            rows["path"].append(str(path))
            rows["status"].append("ok" if i in by_row else "rejected")
            rows["reason"].append(None if i in by_row else decoded[i])
            rows["labels"].append([x.label for x in labels])
            rows["probabilities"].append([x.probability for x in labels])
            rows["model"].append(self.predictor.name)
            rows["version"].append(self.predictor.version)
        return pa.Table.from_pydict(rows, schema=row_schema())


# --------------------------------------------------------------------------- output, resume, the run


@dataclass
class BulkResult:
    output: str
    scored: int       # rows written by this run
    skipped: int      # inputs that already had a row (a resumed run)
    rejected: int     # of this run's rows
    ignored: int      # files without an image suffix
    seconds: float
    actors: int       # holding the model (0: nothing left to score)


def _parts_dir(output: str) -> str:
    return output.rstrip("/") + ".parts"


def read_done(output: str):
    """The rows already written for ``output``: OUT itself and the parts of an interrupted run."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    fs, path = storage.resolve(output)
    tables = []
    if _exists(fs, path):
        tables.append(_read_table(fs, path))
    parts = fs.get_file_info(pafs.FileSelector(_parts_dir(path), allow_not_found=True))
    tables += [_read_table(fs, p.path) for p in sorted(parts, key=lambda p: p.path) if p.path.endswith(".parquet")]
    return pa.concat_tables(tables) if tables else row_schema().empty_table()


def _read_table(fs: Any, path: str):
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as fh:
        table = pq.read_table(fh)
    if set(table.column_names) != set(ROW_COLUMNS):
        raise DataError(f"{path}: columns {table.column_names} are not a bulk scoring output ({', '.join(ROW_COLUMNS)}); "
                        "give another --output")
    return table.select(list(ROW_COLUMNS)).cast(row_schema())


def _write_table(fs: Any, path: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_atomic(fs, path, buf.getvalue())


def _read_tasks() -> dict[str, Any]:
    import ray

    return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=READ_TASK_LIMIT)}


def score(inputs: Inputs, source: Source, job: BulkJob, output: str,
          on_progress: Callable[[int, int], None] = lambda done, total: None) -> BulkResult:
    """Score every input of ``inputs`` without a row in ``output`` yet; needs ``ray.init`` first."""
    import pyarrow as pa
    import ray

    t0 = time.perf_counter()
    actors = actor_count(job)
    fs, path = storage.resolve(output)
    done = frozenset(read_done(output).column("path").to_pylist())
    if inputs.shards:
        already = len(done)
        ds = ray.data.from_items([{"shard": s.model_dump_json()} for s in inputs.shards]).map_batches(
            read_shard_rows, batch_size=1, fn_kwargs={"filesystem": inputs.filesystem, "base": inputs.base, "done": done},
            **_read_tasks())
    else:
        todo = [n for n in inputs.names if n not in done]
        already = len(inputs.names) - len(todo)
        blocks = min(len(todo), max(2 * actors, len(todo) // 1024))  # every actor busy; ~1,024 names a read task
        ds = ray.data.from_items([{"path": n} for n in todo], override_num_blocks=blocks).map_batches(
            read_files, batch_size=256, fn_kwargs={"filesystem": inputs.filesystem, "base": inputs.base,
                                                   "max_bytes": job.sanitizer.max_body_bytes},
            **_read_tasks()) if todo else None
    if ds is not None:
        ds = ds.map_batches(Scorer, fn_constructor_kwargs={"source": source, "job": job}, batch_size=job.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=job.num_cpus,
                            num_gpus=job.num_gpus)
    written, rejected, buffer = 0, 0, []
    already = len(done & set(inputs.names)) if inputs.names else len(done)
    on_progress(already, inputs.total)

    def flush() -> None:
        if buffer:
            _write_table(fs, f"{_parts_dir(path)}/part-{uuid.uuid4().hex}.parquet", pa.concat_tables(buffer))
            buffer.clear()

    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None) if ds is not None else ():
        block = block.cast(row_schema())
        buffer.append(block)
        written += block.num_rows
        rejected += pa.compute.sum(pa.compute.equal(block.column("status"), "rejected")).as_py() or 0
        on_progress(already + written, inputs.total)
        if sum(b.num_rows for b in buffer) >= PART_ROWS:
            flush()
    flush()
    everything = read_done(output)
    _write_table(fs, path, everything)
    fs.delete_dir_contents(_parts_dir(path), missing_dir_ok=True)
    try:
        fs.delete_dir(_parts_dir(path))
    except (FileNotFoundError, OSError):
        pass
    return BulkResult(output, written, already, rejected, inputs.ignored, time.perf_counter() - t0,
                      actors if ds is not None else 0)


def folder_accuracy(table, classes: tuple[str, ...]) -> dict[str, Any] | None:
    """Top-1 of the scored rows against their parent folder's name, when every scored row sits in
    a folder named after one of the model's classes (an image folder like training's); else None."""
    ok = [(p, labels) for p, s, labels in zip(table.column("path").to_pylist(), table.column("status").to_pylist(),
                                               table.column("labels").to_pylist()) if s == "ok"]
    folders = [p.rsplit("/", 2)[-2] if p.count("/") else None for p, _ in ok]
    if not ok or not classes or any(f not in classes for f in folders):
        return None
    hits = sum(labels[0] == f for (_, labels), f in zip(ok, folders))
    return {"top1": hits / len(ok), "count": len(ok)}
