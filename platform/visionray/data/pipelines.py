"""A training worker's data, behind one interface whatever the pipeline (``Pipeline``):

- ``PerSamplePipeline``: the splits in memory, torchvision ops per image in a ``DataLoader``;
- ``BatchedPipeline``: the splits on the worker's device, preprocessed once, flip/crop on batches;
- ``StreamedPipeline``: a Ray Data shard per worker (image folders larger than memory).

Each gives an epoch's train and val batches, the last batch sizes (for compile warm-up) and
sample images (for data-dependent init such as airbench's whitening). ``open_pipeline`` picks one
from the spec; the worker never asks which one it has.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visionray.data.sources import load_splits
from visionray.data.splits import DataSplits, ImageArrays, batch_chunks, shard_indices, steps_per_epoch
from visionray.data.streaming import StreamInfo, iter_stream
from visionray.specs import EvalPreset, TrainSpec
from visionray.transforms import batch_augment, eval_transform, normalize_batch, preprocess_all, train_transform

SAMPLE_IMAGES = 5000  # images given to data-dependent init


class Pipeline(Protocol):
    classes: list[str]
    skipped: tuple[str, ...]  # images left out because they did not decode (data.on_bad_file: skip)
    preset: EvalPreset  # the eval preset, with the data's channel count
    steps_per_epoch: int

    def epoch(self, epoch: int) -> tuple[Iterable, Iterable]:
        """(train batches, val batches) of (images, labels) for this worker and epoch."""

    def last_batch_sizes(self) -> tuple[int | None, int | None]:
        """Sizes of an epoch's last train and val batches (None: not known ahead)."""

    def sample_images(self) -> torch.Tensor | None:
        """Up to ``SAMPLE_IMAGES`` normalised, unaugmented training images (None: not at hand)."""


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


class _InMemory:
    """Splits held by this worker: its shard of the training set per epoch, its part of val."""

    def __init__(self, spec: TrainSpec, splits: DataSplits, rank: int, world: int):
        self.spec, self.splits, self.rank, self.world = spec, splits, rank, world
        self.classes, self.skipped = splits.classes, splits.skipped
        self.preset = spec.eval_preset(splits.channels)
        self.steps_per_epoch = steps_per_epoch(len(splits.train), world, spec.optim.batch_size)

    def chunks(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """This worker's index chunks of the train and val splits, one per batch."""
        bs, n = self.spec.optim.batch_size, len(self.splits.train)
        train_idx = shard_indices(n, self.rank, self.world, self.spec.seed, epoch)
        val_idx = np.array_split(np.arange(len(self.splits.val)), self.world)[self.rank]
        return batch_chunks(train_idx, self.steps_per_epoch, bs), [val_idx[i:i + bs] for i in range(0, len(val_idx), bs)]

    def last_batch_sizes(self) -> tuple[int | None, int | None]:
        train, val = self.chunks(0)
        return len(train[-1]), (len(val[-1]) if val else None)


class PerSamplePipeline(_InMemory):
    def __init__(self, spec: TrainSpec, splits: DataSplits, rank: int, world: int):
        super().__init__(spec, splits, rank, world)
        self.train_tf = train_transform(self.preset, spec.augment)
        self.eval_tf = eval_transform(self.preset)

    def epoch(self, epoch: int) -> tuple[Iterable, Iterable]:
        train, val = self.chunks(epoch)
        workers = self.spec.data.loader_workers
        return (loader(self.splits.train, self.train_tf, train, workers, self.spec.seed + epoch),
                loader(self.splits.val, self.eval_tf, val or [np.arange(0)], workers, 0))

    def sample_images(self) -> torch.Tensor:
        return torch.stack([self.eval_tf(im) for im in self.splits.train.images[:SAMPLE_IMAGES]])


class BatchedPipeline(_InMemory):
    """The whole split on the device, preprocessed once; ``none``/``flip_crop`` run on batches."""

    def __init__(self, spec: TrainSpec, splits: DataSplits, rank: int, world: int, device: torch.device):
        preset = spec.eval_preset(splits.channels)
        splits = DataSplits(*(
            ImageArrays(preprocess_all(preset, a.images).to(device), a.labels.to(device)) for a in (splits.train, splits.val)
        ), splits.classes, splits.skipped)
        super().__init__(spec, splits, rank, world)
        self.augment = batch_augment(spec.augment, torch.Generator().manual_seed(spec.seed * 1000 + rank),
                                     len(splits.train), spec.seed)

    def epoch(self, epoch: int) -> tuple[Iterable, Iterable]:
        train, val = self.chunks(epoch)
        dev, tr, va = self.splits.train.images.device, self.splits.train, self.splits.val
        return (
            ((self.augment(normalize_batch(self.preset, tr.images[c]), c, epoch), tr.labels[c])
             for c in (torch.as_tensor(c, device=dev) for c in train)),
            ((normalize_batch(self.preset, va.images[c]), va.labels[c]) for c in (torch.as_tensor(c, device=dev) for c in val)),
        )

    def sample_images(self) -> torch.Tensor:
        return normalize_batch(self.preset, self.splits.train.images[:SAMPLE_IMAGES])


class StreamedPipeline:
    """This worker's Ray Data shards (``ray.train.get_dataset_shard``), shuffled through a buffer."""

    def __init__(self, spec: TrainSpec, stream: StreamInfo, rank: int):
        self.spec, self.rank = spec, rank
        self.classes, self.steps_per_epoch = stream.classes, stream.steps_per_epoch
        self.skipped = stream.skipped
        self.preset = spec.eval_preset(stream.channels)

    def epoch(self, epoch: int) -> tuple[Iterable, Iterable]:
        import ray.train

        bs = self.spec.optim.batch_size
        return (
            iter_stream(ray.train.get_dataset_shard("train"), bs, self.preset, self.spec.augment,
                        shuffle_seed=self.spec.seed * 1000 + epoch * 10 + self.rank),
            iter_stream(ray.train.get_dataset_shard("val"), bs, self.preset),
        )

    def last_batch_sizes(self) -> tuple[None, None]:
        return None, None  # a stream's batch sizes are not known ahead

    def sample_images(self) -> None:
        return None


def open_pipeline(spec: TrainSpec, rank: int, world: int, device: torch.device, stream: StreamInfo | None = None
                  ) -> Pipeline:
    """This worker's pipeline: streamed when the driver counted a stream, else the spec's in-memory one."""
    if stream is not None:
        return StreamedPipeline(spec, stream, rank)
    splits = load_splits(spec.data)
    if spec.data.pipeline == "batched":
        return BatchedPipeline(spec, splits, rank, world, device)
    return PerSamplePipeline(spec, splits, rank, world)
