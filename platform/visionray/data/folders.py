"""Image folders on disk: archives extracted once into the cache, class folders listed, the
train/val file split, and decoding into memory (cached as .npy, never pickled)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from visionray import defaults
from visionray.data.splits import DataError, ImageArrays, limit_indices, split_indices
from visionray.data.images import BadImage, BadImagesError, decode_or_bad

if TYPE_CHECKING:  # specs derives its source names from visionray.data.sources
    from visionray.specs import DataSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def extract_archive(path: Path) -> Path:
    """Extract a .tar/.tar.gz once into the cache (keyed by path, size and mtime) and return it.
    Extraction goes to a temporary directory renamed into place, so readers never see half of it;
    members that would escape the directory or are not plain files and folders are refused."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = defaults.CACHE_DIR / "extracted" / f"{path.name.split('.')[0]}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # another process won the race: fine; otherwise a real error
            raise
    except tarfile.TarError as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_folder(path: str) -> Path:
    """A directory of class folders, from a directory or an archive of one. Single wrapping
    directories (``train/`` in the CIFAR-10 archive) are descended into."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist; give a directory of class folders or a .tar/.tar.gz")
    if p.is_file():
        if not p.name.endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"data path {str(p)!r} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        p = extract_archive(p)
    while True:
        subdirs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if len(subdirs) == 1 and not files:
            p = subdirs[0]
            continue
        return p


def list_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s); an image folder needs at least 2 (root/<class>/<image>)")
    files, labels = [], []
    for i, name in enumerate(classes):
        found = sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        files += found
        labels += [i] * len(found)
    if not files:
        raise DataError(f"{root}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return files, np.asarray(labels), classes


def decode_files(files: list[Path], labels: np.ndarray, channels: int, size: int, on_bad: str = "fail"
                 ) -> tuple[ImageArrays, list[BadImage]]:
    """Decode image files into memory, cached as .npy (never pickled) per file list, each file's
    size and modification time (an edited file is decoded again), channels and size. Files that do
    not decode raise ``BadImagesError`` naming them (``on_bad="fail"``) or are left out and
    returned (``"skip"``; such a set is not cached, so they are reported every time)."""
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    digest.update(f"|{channels}|{size}".encode())
    cache = defaults.CACHE_DIR / "decoded" / f"{digest.hexdigest()[:24]}.npy"
    if cache.exists():
        return ImageArrays(torch.from_numpy(np.load(cache, allow_pickle=False)), torch.as_tensor(labels, dtype=torch.long)), []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # Pillow decodes without the GIL
        results = list(pool.map(lambda f: decode_or_bad(f, str(f), channels, size), files, chunksize=256))
    bad = [r for r in results if isinstance(r, BadImage)]
    ok = np.array([not isinstance(r, BadImage) for r in results], dtype=bool)
    images = np.stack([r.numpy() for r in results if not isinstance(r, BadImage)]) if ok.any() else \
        np.zeros((0, channels, size, size), np.uint8)
    if bad:
        if on_bad == "fail":
            raise BadImagesError(sorted(bad, key=lambda b: b.name), len(files))
        return ImageArrays(torch.from_numpy(images), torch.as_tensor(labels[ok], dtype=torch.long)), bad
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, images, allow_pickle=False)
    os.replace(tmp, cache)
    return ImageArrays(torch.from_numpy(images), torch.as_tensor(labels, dtype=torch.long)), []


@dataclass(frozen=True)
class FolderFiles:
    """The files of an image-folder source, split: ``train`` (after ``limit``) and ``val``."""

    train: list[Path]
    train_labels: np.ndarray
    val: list[Path]
    val_labels: np.ndarray
    classes: list[str]


def folder_files(spec: DataSpec) -> FolderFiles:
    """The train/val file lists of ``data.path``: ``val_path`` or ``train``/``val`` subfolders as
    given, else the seeded split; ``limit`` applied to the training files. Decided on names only,
    so only the images used are ever read."""
    root = resolve_folder(spec.path)
    val_root = resolve_folder(spec.val_path) if spec.val_path else None
    if val_root is None and (root / "train").is_dir() and (root / "val").is_dir():
        root, val_root = root / "train", root / "val"
    files, labels, classes = list_folder(root)
    if val_root is not None:
        val_files, val_labels, val_classes = list_folder(val_root)
        if val_classes != classes:
            raise DataError(f"validation classes {val_classes} differ from training classes {classes}")
        train_idx = np.arange(len(files))
    else:
        train_idx, val_idx = split_indices(len(files), spec.val_fraction, spec.split_seed)
        val_files, val_labels = [files[i] for i in val_idx], labels[val_idx]
    train_idx = train_idx[limit_indices(len(train_idx), spec.limit, spec.split_seed)]
    return FolderFiles([files[i] for i in train_idx], labels[train_idx], val_files, val_labels, classes)
