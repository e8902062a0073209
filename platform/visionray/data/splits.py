"""In-memory images and labels, the seeded train/val split, ``limit``, and per-worker shards.

Each training worker takes a disjoint shard of the training set every epoch (``shard_indices``);
the shards cover it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


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
    skipped: tuple[str, ...] = ()  # images that did not decode and were left out (data.on_bad_file: skip)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])


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
