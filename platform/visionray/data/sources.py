"""Named data sources, registered once with ``@register_source``: the spec's allowed
``data.source`` values are this registry's names.

Every source yields uint8 images (N, C, H, W) already resized with the platform's one resize
(the same code serving runs), integer labels and class names, split into train and val.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from visionray import defaults
from visionray.data.folders import decode_files, folder_files
from visionray.data.splits import DataError, DataSplits, ImageArrays, limit_indices, split_indices
from visionray.transforms import resize_to

if TYPE_CHECKING:  # specs imports this registry to validate data.source
    from visionray.specs import DataSpec, EvalPreset


Source = Callable[..., DataSplits]  # (DataSpec, EvalPreset | None) -> DataSplits
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
                            splits.val, splits.classes, splits.skipped)
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
    return torch.cat([resize_to(size)(chunk) for chunk in images.split(4096)])


def digits_arrays() -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 handwritten digits as uint8 (1,797, 1, 8, 8), labels, class names."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    return images, d.target, [str(c) for c in d.target_names]


@register_source("digits")
def _digits(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16): offline."""
    return _finish(*digits_arrays(), spec, preset)


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


TORCHVISION_SOURCES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def torchvision_arrays(spec: DataSpec, train: bool) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    import torchvision

    root = Path(spec.root or defaults.CACHE_DIR / "torchvision").expanduser()
    cls = getattr(torchvision.datasets, TORCHVISION_SOURCES[spec.source])
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


def source_arrays(name: str, root: str | None = None) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The unsplit arrays of an in-memory source (``digits`` or a torchvision one), in its own
    order: what ``visionray data pack`` stores, so a pack splits exactly as the source does."""
    if name == "digits":
        return digits_arrays()
    if name not in TORCHVISION_SOURCES:
        raise DataError(f"{name!r} is not a source with arrays to pack; use digits, {', '.join(TORCHVISION_SOURCES)}, "
                        "or an image folder")
    from visionray.specs import DataSpec

    images, labels, classes = torchvision_arrays(DataSpec(source=name, root=root), train=True)
    return images, labels, classes


def _torchvision_source(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    images, labels, classes = torchvision_arrays(spec, train=True)
    return _finish(images, labels, classes, spec, preset)


for _name in TORCHVISION_SOURCES:
    register_source(_name)(_torchvision_source)


@register_source("imagefolder")
def _imagefolder(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    """A directory (or archive) of class folders; ``train``/``val`` subfolders are used as given.
    The split and ``limit`` are decided on the file list, so only the images used are decoded."""
    channels = (preset.channels if preset else spec.channels) or 3
    size = preset.image_size if preset else spec.image_size
    files = folder_files(spec)
    train, bad_train = decode_files(files.train, files.train_labels, channels, size, spec.on_bad_file)
    val, bad_val = decode_files(files.val, files.val_labels, channels, size, spec.on_bad_file)
    return DataSplits(train, val, files.classes, skipped=tuple(b.name for b in bad_train + bad_val))


@register_source("shards")
def _shards(spec: DataSpec, preset: EvalPreset | None) -> DataSplits:
    """A pack (``visionray data pack``) decoded into memory: its own train/val split. Streaming
    (the default for packs) reads it through Ray Data instead."""
    from visionray.data.images import decode_batch
    from visionray.data.manifest import pack_location, read_manifest, read_shard

    manifest = read_manifest(spec.path)
    channels = (preset.channels if preset else spec.channels) or manifest.channels
    size = preset.image_size if preset else spec.image_size
    fs, base = pack_location(spec.path)
    splits, skipped = [], []
    for entry in (manifest.train, manifest.val):
        images, labels = [], []
        for shard in entry.shards:
            table = read_shard(fs, base, shard)
            decoded, kept, bad = decode_batch(table.column("image").to_pylist(), table.column("name").to_pylist(),
                                              channels, size, spec.on_bad_file)
            skipped += [b.name for b in bad]
            images.append(torch.from_numpy(decoded))
            labels.append(torch.from_numpy(table.column("label").to_numpy().astype(np.int64)[kept]))
        splits.append(ImageArrays(torch.cat(images) if images else torch.zeros((0, channels, size, size), dtype=torch.uint8),
                                  torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)))
    return DataSplits(splits[0], splits[1], manifest.classes, skipped=tuple(skipped))
