"""Streaming through Ray Data, for image folders larger than memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from visionray.data.folders import folder_files
from visionray.transforms import resize

if TYPE_CHECKING:
    from visionray.specs import DataSpec, EvalPreset


@dataclass(frozen=True)
class StreamInfo:
    """What a worker needs to know about a streamed dataset (counted on the driver)."""

    classes: list[str]
    channels: int
    steps_per_epoch: int


def streaming_datasets(spec: DataSpec, preset: EvalPreset) -> tuple[dict, list[str]]:
    """Ray Datasets for data larger than memory: images are read and resized by Ray Data tasks
    and each training worker iterates its own shard (``ray.train.get_dataset_shard``). Only the
    file list is held in memory: the split is the in-memory path's (same seed, same images), and
    the training files are read in a seeded random order, so no class arrives in one block."""
    import ray.data

    files = folder_files(spec)
    train_files, val_files, classes = files.train, files.val, files.classes
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
