"""Named data sources, the seeded train/val split and per-worker shards.

Every in-memory source yields uint8 images (N, C, H, W) already resized with the eval preset's
own ``resize`` (the same code serving runs), integer labels and class names. Each training worker
takes a disjoint shard of the training set every epoch (``shard_indices``); the shards cover it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visionray import defaults
from visionray.specs import DataSpec, EvalPreset
from visionray.transforms import resize

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DataError(ValueError):
    """Data that cannot be loaded as the spec asks; the message says what to change."""


@dataclass(frozen=True)
class ImageArrays:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | torch.Tensor) -> "ImageArrays":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageArrays(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DataSplits:
    train: ImageArrays
    val: ImageArrays
    classes: list[str]

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])


# --------------------------------------------------------------------------- splits and shards


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic split of range(n): the same (n, fraction, seed) always gives the same sets."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def limit_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Positions of the training images ``data.limit`` keeps: a seeded random ``limit`` of range(n),
    in order. Never the first ``limit``: class folders are listed class by class, so the head of
    the list holds only the first classes."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n]).permutation(n)[:limit])


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This worker's indices for one epoch: a seeded shuffle of range(n) cut into ``world_size``
    contiguous parts. Parts are disjoint, cover range(n) and differ in size by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return np.array_split(order, world_size)[rank]


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Equal on every worker (DDP needs that): batches of the smallest shard; the larger shards'
    extra image joins their last batch, so nothing is dropped."""
    return max(1, math.ceil((n // world_size) / batch_size))


def batch_chunks(index: np.ndarray, steps: int, batch_size: int) -> list[np.ndarray]:
    chunks = [index[i * batch_size:(i + 1) * batch_size] for i in range(steps - 1)]
    chunks.append(index[(steps - 1) * batch_size:])
    return chunks


class TransformedImages(Dataset):
    def __init__(self, arrays: ImageArrays, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.arrays = arrays
        self.transform = transform

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.arrays.images[i]), self.arrays.labels[i]


def loader(
    arrays: ImageArrays, transform: Callable, chunks: list[np.ndarray], workers: int, seed: int
) -> DataLoader:
    """Batches of (transformed images, labels) in the order of ``chunks``."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        TransformedImages(arrays, transform), batch_sampler=[c.tolist() for c in chunks],
        num_workers=workers, persistent_workers=False, generator=gen,
    )


# --------------------------------------------------------------------------- sources

Source = Callable[[DataSpec, EvalPreset | None], DataSplits]
_SOURCES: dict[str, Source] = {}


def register_source(name: str) -> Callable[[Source], Source]:
    def add(fn: Source) -> Source:
        _SOURCES[name] = fn
        return fn
    return add


def list_sources() -> list[str]:
    return sorted(_SOURCES)


def load_splits(spec: DataSpec, preset: EvalPreset | None = None) -> DataSplits:
    """Load a source in memory and split it. ``preset`` fixes size and channels (a checkpoint's);
    without it they come from the spec, or from the source when the spec leaves channels open."""
    try:
        fn = _SOURCES[spec.source]
    except KeyError:
        raise DataError(f"unknown data source {spec.source!r}; valid: {', '.join(list_sources())}") from None
    splits = fn(spec, preset)
    if spec.limit is not None and len(splits.train) > spec.limit:
        splits = DataSplits(splits.train.subset(limit_indices(len(splits.train), spec.limit, spec.split_seed)),
                            splits.val, splits.classes)
    return splits


def _finish(images: torch.Tensor, labels: np.ndarray | torch.Tensor, classes: list[str], spec: DataSpec,
            preset: EvalPreset | None) -> DataSplits:
    """Convert channels, resize with the preset's own resize, then split off validation."""
    images = to_channels(images, preset.channels if preset else spec.channels)
    images = resize_all(images, preset.image_size if preset else spec.image_size)
    arrays = ImageArrays(images.contiguous(), torch.as_tensor(labels, dtype=torch.long))
    train_idx, val_idx = split_indices(len(arrays), spec.val_fraction, spec.split_seed)
    return DataSplits(arrays.subset(train_idx), arrays.subset(val_idx), classes)


def to_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 3 and c == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 1 and c == 3:  # ITU-R 601-2 luma, as Pillow's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def resize_all(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    fake = EvalPreset(image_size=size, channels=images.shape[1], mean=[0.0] * images.shape[1], std=[1.0] * images.shape[1])
    out = [resize(fake)(chunk) for chunk in images.split(4096)]
    return torch.cat(out)


@register_source("digits")
def _digits(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16): offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    return _finish(images, d.target, [str(c) for c in d.target_names], spec, preset)


@register_source("synthetic")
def _synthetic(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    """Random images with a per-class mean colour (learnable), for throughput work."""
    c = (preset.channels if preset else spec.channels) or 3
    size = preset.image_size if preset else spec.image_size
    g = torch.Generator().manual_seed(spec.split_seed)
    labels = torch.randint(0, spec.num_classes, (spec.num_samples,), generator=g)
    centres = torch.randint(40, 216, (spec.num_classes, c, 1, 1), generator=g)
    noise = torch.randint(-40, 40, (spec.num_samples, c, size, size), generator=g)
    images = (centres[labels] + noise).clamp(0, 255).to(torch.uint8)
    return _finish(images, labels, [f"class_{i}" for i in range(spec.num_classes)], spec, preset)


_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def torchvision_arrays(spec: DataSpec, train: bool) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    import torchvision

    root = Path(spec.root or defaults.CACHE_DIR / "torchvision").expanduser()
    cls = getattr(torchvision.datasets, _TORCHVISION[spec.source])
    try:
        ds = cls(str(root), train=train, download=spec.download)
    except Exception as exc:  # torchvision raises RuntimeError (missing) or URLError/OSError (download)
        hint = "set data.download: true where the network allows" if not spec.download else "the download failed"
        raise DataError(
            f"{spec.source}: no usable copy under data.root={str(root)!r} ({exc}); {hint}, "
            f"or put the files there"
        ) from None
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.permute(0, 3, 1, 2) if data.ndim == 4 else data.unsqueeze(1)
    return images, np.asarray(ds.targets), list(ds.classes)


def _torchvision_source(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    images, labels, classes = torchvision_arrays(spec, train=True)
    return _finish(images, labels, classes, spec, preset)


for _name in _TORCHVISION:
    register_source(_name)(_torchvision_source)


# --------------------------------------------------------------------------- image folders


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
            import shutil

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


def decode_file(path: Path, channels: int, size: int) -> torch.Tensor:
    """One image file as uint8 (C, size, size), through Pillow and the preset's resize."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        t = F.pil_to_tensor(im)
    return resize_all(t.unsqueeze(0), size)[0]


def decode_files(files: list[Path], labels: np.ndarray, channels: int, size: int) -> ImageArrays:
    """Decode image files into memory, cached as .npy (never pickled) per file list, each file's
    size and modification time (an edited file is decoded again), channels and size."""
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    digest.update(f"|{channels}|{size}".encode())
    cache = defaults.CACHE_DIR / "decoded" / f"{digest.hexdigest()[:24]}.npy"
    if cache.exists():
        images = torch.from_numpy(np.load(cache, allow_pickle=False))
    else:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            images = torch.stack(list(pool.map(lambda f: decode_file(f, channels, size), files, chunksize=256)))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, images.numpy(), allow_pickle=False)
        os.replace(tmp, cache)
    return ImageArrays(images, torch.as_tensor(labels, dtype=torch.long))


def decode_folder(root: Path, channels: int, size: int) -> tuple[ImageArrays, list[str]]:
    """Every image of a class-folder tree, decoded, and the class names."""
    files, labels, classes = list_folder(root)
    return decode_files(files, labels, channels, size), classes


@register_source("imagefolder")
def _imagefolder(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    """A directory (or archive) of class folders; ``train``/``val`` subfolders are used as given.
    The split and ``limit`` are decided on the file list, so only the images used are decoded."""
    root = resolve_folder(spec.path)
    channels = (preset.channels if preset else spec.channels) or 3
    size = preset.image_size if preset else spec.image_size
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
    train = decode_files([files[i] for i in train_idx], labels[train_idx], channels, size)
    return DataSplits(train, decode_files(val_files, val_labels, channels, size), classes)


# --------------------------------------------------------------------------- streaming (Ray Data)


def streaming_datasets(spec: DataSpec, preset: EvalPreset) -> tuple[dict, list[str]]:
    """Ray Datasets for data larger than memory: images are read and resized by Ray Data tasks
    and each training worker iterates its own shard (``ray.train.get_dataset_shard``). Only the
    file list is held in memory: the split is the in-memory path's (same seed, same images), and
    the training files are read in a seeded random order, so no class arrives in one block."""
    import ray.data

    root = resolve_folder(spec.path)
    val_root = resolve_folder(spec.val_path) if spec.val_path else None
    if val_root is None and (root / "train").is_dir() and (root / "val").is_dir():
        root, val_root = root / "train", root / "val"
    files, _, classes = list_folder(root)
    if val_root is not None:
        val_files, _, val_classes = list_folder(val_root)
        if val_classes != classes:
            raise DataError(f"validation classes {val_classes} differ from training classes {classes}")
        train_files = files
    else:
        train_idx, val_idx = split_indices(len(files), spec.val_fraction, spec.split_seed)
        train_files, val_files = [files[i] for i in train_idx], [files[i] for i in val_idx]
    train_files = [train_files[i] for i in limit_indices(len(train_files), spec.limit, spec.split_seed)]
    order = np.random.default_rng(spec.split_seed).permutation(len(train_files))
    index = {name: i for i, name in enumerate(classes)}
    to_size = resize(preset)

    def to_row(row: dict) -> dict:  # images sit in their class folder: the label is its name
        image = torch.from_numpy(np.ascontiguousarray(row["image"]))
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        return {"image": to_size(image).numpy(), "label": index[Path(row["path"]).parent.name]}

    def read(paths: list[Path]):
        return ray.data.read_images([str(p) for p in paths], mode="L" if preset.channels == 1 else "RGB", include_paths=True)

    return {"train": read([train_files[i] for i in order]).map(to_row), "val": read(val_files).map(to_row)}, classes


STREAM_SHUFFLE_BUFFER = 4096  # images held per worker to shuffle a stream that arrives in file order


def iter_stream(shard, batch_size: int, transform: Callable, shuffle_seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from a Ray Data shard; ``shuffle_seed`` shuffles through a local buffer (training)."""
    shuffle = {} if shuffle_seed is None else {
        "local_shuffle_buffer_size": max(STREAM_SHUFFLE_BUFFER, 4 * batch_size), "local_shuffle_seed": shuffle_seed,
    }
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.long}, **shuffle):
        images = torch.stack([transform(img) for img in batch["image"]])
        yield images, batch["label"]
