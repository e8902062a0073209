"""Packed data: the manifest of a directory of Parquet shards (``visionray data pack`` writes it,
``data.source: shards`` reads it), and reading one shard with its checksum verified.

A pack is ``manifest.json`` plus ``train-00000.parquet``, ``val-00000.parquet``, ... Each shard
holds rows of (``image``: the encoded file's bytes, ``label``: the class index, ``name``: the file
it came from). The driver of a training run reads only the manifest: how long a run takes to start
depends on the number of shards, never on the number of images.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, ValidationError

from visionray import storage
from visionray.data.splits import DataError
from visionray.spec_io import Strict, format_errors

FORMAT = "visionray-shards/1"
MANIFEST_FILE = "manifest.json"
SHARD_NAME = r"(train|val)-[0-9]{5}\.parquet"
SPLITS = ("train", "val")
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}  # Pillow modes that decode to one channel


class ShardError(DataError):
    """A pack or a shard that cannot be used as its manifest says; the message names it."""


class ShardEntry(Strict):
    name: str = Field(pattern=SHARD_NAME, description="file name inside the pack directory")
    rows: int = Field(ge=0, description="images in the shard")
    bytes: int = Field(ge=0, description="size of the shard file")
    sha256: str = Field(pattern=r"[0-9a-f]{64}", description="SHA-256 of the shard file")


class SplitEntry(Strict):
    count: int = Field(ge=0, description="images in the split (bad files excluded)")
    per_class: list[int] = Field(description="images per class, in the order of the manifest's classes")
    shards: list[ShardEntry]


class ImageStats(Strict):
    """Sizes of the packed images as stored (before any resize)."""

    min_width: int = 0
    max_width: int = 0
    min_height: int = 0
    max_height: int = 0
    mean_width: float = 0.0
    mean_height: float = 0.0
    modes: dict[str, int] = Field(default_factory=dict, description="images per Pillow mode (RGB, L, ...)")


class BadFile(Strict):
    name: str
    split: Literal["train", "val"]
    error: str


class ShardManifest(Strict):
    """``manifest.json`` of a pack: written last, so a pack with a manifest is complete."""

    format: Literal["visionray-shards/1"] = FORMAT
    source: str = Field(description="what was packed, as given to `visionray data pack`")
    classes: list[str] = Field(min_length=2)
    split_seed: int = Field(ge=0, description="seed of the train/val split made at pack time")
    val_fraction: float = Field(gt=0.0, lt=0.9)
    shard_bytes: int = Field(gt=0, description="target size of a shard file")
    shard_rows: int = Field(gt=0, description="most images in a shard")
    plan: str = Field(pattern=r"[0-9a-f]{64}", description="digest of the inputs and arguments; a resumed pack must match")
    train: SplitEntry
    val: SplitEntry
    images: ImageStats
    bad_files: list[BadFile] = Field(default_factory=list, description="images Pillow could not decode: not packed")

    @property
    def channels(self) -> int:
        """1 when every packed image is greyscale, else 3: the default ``data.channels`` of a pack."""
        return 1 if self.images.modes and set(self.images.modes) <= GREY_MODES else 3


def parse_manifest(text: str | bytes, label: str) -> ShardManifest:
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise ShardError(f"{label}: not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ShardError(f"{label}: format {got!r}, expected {FORMAT!r} (a manifest written by `visionray data pack`)")
    try:
        return ShardManifest.model_validate(raw)
    except ValidationError as exc:
        raise ShardError(f"{label}: " + "; ".join(format_errors(exc))) from None


def pack_location(path: str) -> tuple[Any, str]:
    """(filesystem, pack directory) of a manifest path or URI (or of the directory holding one)."""
    fs, inner = storage.resolve(path)
    return fs, inner[: -len(MANIFEST_FILE) - 1] if inner.endswith("/" + MANIFEST_FILE) or inner == MANIFEST_FILE else inner.rstrip("/")


def read_manifest(path: str) -> ShardManifest:
    """The manifest at ``path`` (a manifest.json, or the pack directory), validated."""
    fs, base = pack_location(path)
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST_FILE}") as fh:
            return parse_manifest(fh.read(), path)
    except FileNotFoundError:
        raise ShardError(f"data.path {path!r}: no {MANIFEST_FILE} there; pack the images first "
                         "(visionray data pack SRC DEST) and give DEST/manifest.json") from None


def read_shard(fs: Any, base: str, entry: ShardEntry):
    """A shard as a pyarrow Table, after its bytes matched the manifest's size and SHA-256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open_input_stream(f"{base}/{entry.name}") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ShardError(f"shard {entry.name} is missing from {base}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.bytes or digest != entry.sha256:
        raise ShardError(f"shard {entry.name}: {len(data)} bytes with SHA-256 {digest[:16]}..., the manifest says "
                         f"{entry.bytes} bytes and {entry.sha256[:16]}...; refused (changed or corrupted "
                         "since packing: pack again)")
    table = pq.read_table(pa.BufferReader(data))
    if table.num_rows != entry.rows:
        raise ShardError(f"shard {entry.name}: {table.num_rows} rows, the manifest says {entry.rows}")
    return table
