"""``visionray data pack SRC DEST``: an image folder, an archive of one, or a torchvision source
turned into Parquet shards plus ``manifest.json`` (``visionray.data.manifest``).

Why Parquet rather than WebDataset tars: Ray Data, pyarrow and every query engine read it
natively, each file's footer carries its row count, and columns can be read alone (labels without
image bytes). Images are stored as the source's encoded bytes (no re-encoding, no quality loss);
the arrays of ``digits`` and the torchvision sources are stored as PNG.

The plan is fixed before a byte is written: the seeded train/val split (the in-memory path's own
``split_indices``, so a pack and an in-memory run of the same folder hold out the same images), a
seeded order (shards mix the classes) and shard boundaries by size. Every shard is written whole
(temporary file and rename, or one object PUT) and journaled with its checksum under ``.pack/``,
so an interrupted pack resumes with the shards already written and verified, and a second run with
the same arguments changes nothing. Images Pillow cannot decode are not packed; the manifest counts
and names them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from pydantic import Field

from visionray import storage
from visionray.data.folders import list_folder, resolve_folder
from visionray.data.images import describe_error, open_checked
from visionray.data.manifest import (FORMAT, MANIFEST_FILE, SPLITS, BadFile, ImageStats, ShardEntry, ShardError,
                                     ShardManifest, SplitEntry, parse_manifest)
from visionray.data.sources import TORCHVISION_SOURCES, source_arrays
from visionray.data.splits import split_indices
from visionray.spec_io import Strict

DEFAULT_SHARD_MIB = 128  # MiB of encoded images per shard
DEFAULT_SHARD_ROWS = 8192  # images per shard at most: small images still give a stream several shards to read at once
ROW_GROUP = 256  # images per Parquet row group (the unit a reader decodes at a time)
JOURNAL_DIR = ".pack"
PACKABLE_SOURCES = ("digits", *TORCHVISION_SOURCES)  # in-memory sources packed as PNGs, in their own order


@dataclass(frozen=True)
class Item:
    name: str  # relative path in the source (or "<index>.png" for arrays)
    label: int
    size: int  # bytes, known before reading (file size, or the raw array size)
    load: Callable[[], bytes] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Planned:
    split: str
    index: int  # shard number in its split
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"


class ShardRecord(Strict):
    """The journal of one written shard (``.pack/<shard>.json``)."""

    plan: str
    entry: ShardEntry
    per_class: list[int]
    widths: list[int] = Field(description="min, max, sum")
    heights: list[int] = Field(description="min, max, sum")
    modes: dict[str, int]
    bad: list[BadFile]


@dataclass(frozen=True)
class PackResult:
    manifest: ShardManifest
    written: list[str]  # shards written by this run
    kept: list[str]  # shards a previous run wrote, verified and kept
    manifest_changed: bool


def source_items(src: str, root: str | None = None) -> tuple[list[Item], list[str]]:
    """The images of ``src``: a folder or archive of class folders, or a source name in
    ``PACKABLE_SOURCES`` (its arrays in their own order, stored as PNG)."""
    if src in PACKABLE_SOURCES:
        images, labels, classes = source_arrays(src, root)
        arrays = images.numpy()

        def png(i: int) -> Callable[[], bytes]:
            def load() -> bytes:
                from PIL import Image

                a = arrays[i]
                buf = io.BytesIO()
                Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(buf, format="PNG")
                return buf.getvalue()
            return load

        return [Item(f"{i:07d}.png", int(labels[i]), int(arrays[i].size), png(i)) for i in range(len(arrays))], classes
    folder = resolve_folder(src)
    files, labels, classes = list_folder(folder)
    return [Item(str(f.relative_to(folder)), int(y), f.stat().st_size, f.read_bytes) for f, y in zip(files, labels)], classes


def plan_shards(items: list[Item], classes: list[str], val_fraction: float, seed: int, shard_bytes: int,
                shard_rows: int) -> tuple[str, list[Planned]]:
    """(digest of the plan, the shards): same inputs and arguments, same plan."""
    train_idx, val_idx = split_indices(len(items), val_fraction, seed)
    digest = hashlib.sha256(json.dumps([FORMAT, classes, val_fraction, seed, shard_bytes, shard_rows]).encode())
    planned: list[Planned] = []
    for split, idx in (("train", train_idx), ("val", val_idx)):
        order = idx[np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(idx))]
        current: list[Item] = []
        size = 0
        for i in order:
            item = items[i]
            digest.update(f"{split}|{item.name}|{item.label}|{item.size}\n".encode())
            if current and (size + item.size > shard_bytes or len(current) == shard_rows):
                planned.append(Planned(split, sum(p.split == split for p in planned), current))
                current, size = [], 0
            current.append(item)
            size += item.size
        if current or not any(p.split == split for p in planned):
            planned.append(Planned(split, sum(p.split == split for p in planned), current))
    return digest.hexdigest(), planned


def _read(fs: Any, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except (FileNotFoundError, OSError):
        return None


def _check(item: Item) -> tuple[bytes, int, int, str] | str:
    """The item's bytes and size and mode after a full decode, or why it does not decode."""
    try:
        data = item.load()
        with open_checked(data) as im:
            im.load()  # every pixel decoded once: a file that packs is a file that trains
            return data, im.width, im.height, im.mode
    except Exception as exc:  # noqa: BLE001 - a bad image is counted and named, never packed
        return describe_error(exc)


def _build_shard(shard: Planned, plan: str, num_classes: int, pool: ThreadPoolExecutor,
                 progress: Callable[[int], None]) -> tuple[bytes, ShardRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs, labels, names, bad = [], [], [], []
    widths, heights, modes = [], [], {}
    for i, checked in enumerate(pool.map(_check, shard.items, chunksize=64)):
        item = shard.items[i]
        if isinstance(checked, str):
            bad.append(BadFile(name=item.name, split=shard.split, error=checked))
        else:
            data, w, h, mode = checked
            blobs.append(data)
            labels.append(item.label)
            names.append(item.name)
            widths.append(w)
            heights.append(h)
            modes[mode] = modes.get(mode, 0) + 1
        if i % 1024 == 1023:
            progress(1024)
    progress(len(shard.items) % 1024)
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(labels, pa.int32()),
                      "name": pa.array(names, pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="none")  # images are compressed already
    data = buf.getvalue()
    entry = ShardEntry(name=shard.name, rows=len(blobs), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    per_class = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    return data, ShardRecord(plan=plan, entry=entry, per_class=per_class, widths=_min_max_sum(widths),
                             heights=_min_max_sum(heights), modes=modes, bad=bad)


def _min_max_sum(values: list[int]) -> list[int]:
    return [min(values), max(values), sum(values)] if values else [0, 0, 0]


def _kept(fs: Any, base: str, shard: Planned, plan: str) -> ShardRecord | None:
    """The journal of a shard a previous run of this plan wrote, if the file still matches it."""
    raw = _read(fs, f"{base}/{JOURNAL_DIR}/{shard.name}.json")
    if raw is None:
        return None
    try:
        record = ShardRecord.model_validate_json(raw)
    except ValueError:
        return None  # a journal we cannot read is redone, not trusted
    data = _read(fs, f"{base}/{shard.name}")
    if record.plan != plan or data is None or hashlib.sha256(data).hexdigest() != record.entry.sha256:
        return None
    return record


def _manifest(src: str, classes: list[str], seed: int, val_fraction: float, shard_bytes: int, shard_rows: int,
              plan: str, records: list[ShardRecord]) -> ShardManifest:
    splits = {}
    for split in SPLITS:
        rs = [r for r in records if r.entry.name.startswith(split)]
        per_class = np.sum([r.per_class for r in rs], axis=0).astype(int).tolist() if rs else [0] * len(classes)
        splits[split] = SplitEntry(count=sum(r.entry.rows for r in rs), per_class=per_class, shards=[r.entry for r in rs])
    n = sum(s.count for s in splits.values())
    full = [r for r in records if r.entry.rows]
    modes: dict[str, int] = {}
    for r in records:
        for m, c in r.modes.items():
            modes[m] = modes.get(m, 0) + c
    stats = ImageStats(
        min_width=min((r.widths[0] for r in full), default=0), max_width=max((r.widths[1] for r in full), default=0),
        min_height=min((r.heights[0] for r in full), default=0), max_height=max((r.heights[1] for r in full), default=0),
        mean_width=round(sum(r.widths[2] for r in records) / max(n, 1), 2),
        mean_height=round(sum(r.heights[2] for r in records) / max(n, 1), 2), modes=dict(sorted(modes.items())),
    )
    return ShardManifest(source=src, classes=classes, split_seed=seed, val_fraction=val_fraction, shard_bytes=shard_bytes,
                         shard_rows=shard_rows, plan=plan, train=splits["train"], val=splits["val"], images=stats,
                         bad_files=[b for r in records for b in r.bad])


def pack(src: str, dest: str, *, shard_mib: float = DEFAULT_SHARD_MIB, shard_rows: int = DEFAULT_SHARD_ROWS,
         val_fraction: float = 0.1, seed: int = 0, root: str | None = None, workers: int | None = None,
         progress: Callable[[int, int], None] | None = None) -> PackResult:
    """Pack ``src`` into ``dest`` (a local path or URI); ``progress(images done, images in all)``."""
    if not 0 < val_fraction < 0.9:
        raise ShardError(f"val_fraction {val_fraction} must be in (0, 0.9)")
    if shard_mib <= 0 or shard_rows < 1:
        raise ShardError(f"shard size {shard_mib} MiB and {shard_rows} rows must be positive")
    items, classes = source_items(src, root)
    shard_bytes = int(shard_mib * (1 << 20))
    plan, shards = plan_shards(items, classes, val_fraction, seed, shard_bytes, shard_rows)
    fs, base = storage.resolve(dest)
    base = base.rstrip("/")
    old_text = _read(fs, f"{base}/{MANIFEST_FILE}")
    if old_text is not None and parse_manifest(old_text, f"{dest}/{MANIFEST_FILE}").plan != plan:
        raise ShardError(f"{dest} holds a pack of other images or arguments; pack into an empty directory "
                         "(or remove it first)")
    fs.create_dir(f"{base}/{JOURNAL_DIR}", recursive=True)
    done = 0
    records: dict[str, ShardRecord] = {}
    written: list[str] = []

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(items))

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:  # Pillow decodes without the GIL
        for shard in shards:
            record = _kept(fs, base, shard, plan)
            if record is None:
                data, record = _build_shard(shard, plan, len(classes), pool, advance)
                storage.write_atomic(fs, f"{base}/{shard.name}", data)
                storage.write_atomic(fs, f"{base}/{JOURNAL_DIR}/{shard.name}.json", record.model_dump_json().encode())
                written.append(shard.name)
            else:
                advance(len(shard.items))
            records[shard.name] = record
    manifest = _manifest(src, classes, seed, val_fraction, shard_bytes, shard_rows, plan, [records[s.name] for s in shards])
    text = manifest.model_dump_json(indent=2)
    changed = old_text is None or old_text.decode() != text
    if changed:
        storage.write_atomic(fs, f"{base}/{MANIFEST_FILE}", text.encode())  # last: a manifest means a complete pack
    return PackResult(manifest, written, [s.name for s in shards if s.name not in written], changed)
