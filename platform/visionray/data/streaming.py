"""Streaming through Ray Data, for data larger than memory: image folders and packed shards.

Both streams decode in ``map_batches`` (uint8 images already resized and preprocessed with the eval
preset's deterministic ops, one flat row of C*size*size bytes each, at most ``DECODE_BATCH_BYTES``
per call; ``iter_stream`` gives them back their shape), in at most ``data.decode_cpus`` concurrent
tasks reserving ``data.decode_task_cpus`` each; a folder's file list is cut into blocks of about
``FOLDER_BLOCK_IMAGES`` files, one task's work (Ray Data's default, a task per 200-odd files, cost
about as much as the decoding). Every training worker iterates its own part of the stream
(``ray.train.get_dataset_shard``), shuffled through a local buffer. A policy of batched ops
(``flip_crop``) runs on whole batches in the training worker; a policy with any other op runs
image by image in the decode tasks, in parallel, so the training loop only normalises.

The driver holds only what it must: the file list for a folder, the manifest for a pack (time to
the first batch grows with the number of shards, never with the number of images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from visionray.data.folders import folder_files
from visionray.data.images import decode_batch
from visionray.data.manifest import ShardEntry, ShardManifest, pack_location, read_manifest, read_shard
from visionray.ops import BATCHED_OPS
from visionray.transforms import augment_batches, augment_each, preprocess_all

if TYPE_CHECKING:
    from visionray.ops import AugmentOp
    from visionray.specs import DataSpec, EvalPreset

DECODE_BATCH = 256  # images per decode call, at most
DECODE_BATCH_BYTES = 4 << 20  # decoded bytes per decode call, at most (a 256-image batch of 224 px images is
# 38 MiB, mapped and faulted in afresh by every call: 4 MiB calls decoded 1.3x faster, measured in one process)
STREAM_BLOCK_BYTES = 8 << 20  # bytes per block a decode task emits: a block reaches the trainers as soon as it is full
FOLDER_BLOCK_IMAGES = 4096  # images per block of a folder's file list (one decode task's work)
MAX_READ_BLOCKS = 256  # blocks the shard list is cut into: planning stays flat in the shard count
STREAM_SHUFFLE_BUFFER = 4096  # images held per worker to shuffle a stream, at most
STREAM_SHUFFLE_BYTES = 512 << 20  # decoded bytes that buffer may hold per worker (3,566 images at 224 px, 682 at 512)


def _image_bytes(preset: EvalPreset) -> int:
    """Bytes of one decoded image: a flat row of the stream."""
    return preset.channels * preset.image_size**2


@dataclass(frozen=True)
class StreamInfo:
    """What a worker needs to know about a streamed dataset (from the driver's listing or manifest)."""

    classes: list[str]
    channels: int
    steps_per_epoch: int
    skipped: tuple[str, ...] = ()  # images a pack left out (its manifest's bad files)


class Decoder:
    """Encoded images (file paths or bytes) to preprocessed uint8 batches, in a Ray Data task;
    ``augment``: a training policy with ops that have no batched form, applied here image by
    image (in the parallel decode tasks, not in the training loop). Bad images stop the run naming
    them (``on_bad="fail"``) or are left out (``"skip"``)."""

    def __init__(self, preset: EvalPreset, on_bad: str, augment: Sequence[AugmentOp] = ()):
        self.preset, self.on_bad, self.augment = preset, on_bad, tuple(augment)
        self.batch_size = max(1, min(DECODE_BATCH, DECODE_BATCH_BYTES // _image_bytes(preset)))

    def __call__(self, items: Sequence[Any], names: Sequence[str], labels: np.ndarray) -> dict[str, np.ndarray]:
        images, kept, _ = decode_batch(items, names, self.preset.channels, self.preset.image_size, self.on_bad)
        if self.preset.preprocess and len(images):
            images = preprocess_all(self.preset, torch.from_numpy(images)).numpy()
        if self.augment and len(images):
            images = augment_each(self.preset, self.augment, torch.from_numpy(images)).numpy()
        # one flat row per image: Ray Data turns an (N, C, H, W) array into an Arrow tensor column
        # about 300x slower than an (N, C*H*W) one (measured: 142 against 0.5 us per 224 px image)
        return {"image": images.reshape(len(images), -1), "label": np.asarray(labels, dtype=np.int64)[kept]}


def decoded_augment(augment: Sequence[AugmentOp]) -> tuple[AugmentOp, ...]:
    """The part of a training policy the decode tasks apply: all of it when any op lacks a batched
    form (order kept), else nothing (the training worker runs it on whole batches)."""
    return () if all(op.op in BATCHED_OPS for op in augment) else tuple(augment)


def _folder_decode(decoder: Decoder) -> Callable[[dict], dict]:
    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        return decoder([Path(p) for p in paths], paths, batch["label"])
    return decode


def _shard_decode(decoder: Decoder, fs: Any, base: str) -> Callable[[dict], Iterator[dict]]:
    def decode(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for raw in batch["entry"]:
            table = read_shard(fs, base, ShardEntry.model_validate_json(raw))  # checksum verified first
            for part in table.to_batches(max_chunksize=decoder.batch_size):
                yield decoder(part.column("image").to_pylist(), part.column("name").to_pylist(),
                              part.column("label").to_numpy())
    return decode


def streaming_datasets(spec: DataSpec, preset: EvalPreset, workers: int, batch_size: int,
                       augment: Sequence[AugmentOp] = (), manifest: ShardManifest | None = None
                       ) -> tuple[dict, StreamInfo]:
    """Ray Datasets ``train`` and ``val`` for the spec's folder or pack, and what workers need to
    know; ``augment`` is the training policy (see ``decoded_augment``); ``manifest``: the pack's,
    when the caller read it already."""
    import ray.data

    train_decoder = Decoder(preset, spec.on_bad_file, decoded_augment(augment))
    decoder = Decoder(preset, spec.on_bad_file)
    step = {"num_cpus": spec.decode_task_cpus, "compute": ray.data.TaskPoolStrategy(size=spec.decode_cpus),
            **({"label_selector": spec.decode_on} if spec.decode_on else {})}
    if spec.source == "shards":
        manifest = manifest or read_manifest(spec.path)
        fs, base = pack_location(spec.path)

        def read(entries: list[ShardEntry], seed: int | None):
            decode = _shard_decode(train_decoder if seed is not None else decoder, fs, base)
            order = np.random.default_rng(seed).permutation(len(entries)) if seed is not None else range(len(entries))
            rows = [{"entry": entries[i].model_dump_json()} for i in order]
            blocks = max(1, min(len(rows), MAX_READ_BLOCKS))  # a block of shard entries is one decode task's work
            return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(decode, batch_size=1, **step)

        train, val = read(manifest.train.shards, spec.split_seed), read(manifest.val.shards, None)
        classes, n_train = manifest.classes, manifest.train.count
        skipped = tuple(b.name for b in manifest.bad_files)
        if spec.limit is not None and spec.limit < n_train:
            train, n_train = train.limit(spec.limit), spec.limit
    else:
        files = folder_files(spec)
        order = np.random.default_rng(spec.split_seed).permutation(len(files.train))  # no class arrives in one block

        def listed(paths: list[Path], labels: np.ndarray, with_decoder: Decoder):
            rows = [{"path": str(p), "label": int(y)} for p, y in zip(paths, labels)]
            # enough blocks for every decode CPU, else about FOLDER_BLOCK_IMAGES files each, at most MAX_READ_BLOCKS
            blocks = max(spec.decode_cpus, min(MAX_READ_BLOCKS, len(rows) // FOLDER_BLOCK_IMAGES))
            blocks = max(1, min(len(rows), blocks))
            return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                _folder_decode(with_decoder), batch_size=with_decoder.batch_size, **step)

        train = listed([files.train[i] for i in order], files.train_labels[order], train_decoder)
        val = listed(files.val, files.val_labels, decoder)
        classes, n_train, skipped = files.classes, len(files.train), ()
    for ds in (train, val):  # Ray Data's default (128 MiB) would hold a small-image shard's first batch until all of it decoded
        ds.context.target_max_block_size = STREAM_BLOCK_BYTES
    steps = max(1, -(-n_train // (workers * batch_size)))
    return {"train": train, "val": val}, StreamInfo(classes, preset.channels, steps, skipped)


def shuffle_buffer_images(preset: EvalPreset, batch_size: int) -> int:
    """Images a worker's shuffle buffer holds: ``STREAM_SHUFFLE_BUFFER``, fewer where they would
    take more than ``STREAM_SHUFFLE_BYTES``, never under four batches."""
    return max(4 * batch_size, min(STREAM_SHUFFLE_BUFFER, STREAM_SHUFFLE_BYTES // _image_bytes(preset)))


def iter_stream(shard, batch_size: int, preset: EvalPreset, augment: Sequence[AugmentOp] = (),
                shuffle_seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (and, for training, augmented) batches from a worker's Ray Data shard;
    ``shuffle_seed`` shuffles through a local buffer (training)."""
    shuffle = {} if shuffle_seed is None else {
        "local_shuffle_buffer_size": shuffle_buffer_images(preset, batch_size), "local_shuffle_seed": shuffle_seed,
    }
    batched = () if decoded_augment(augment) else tuple(augment)  # the rest was applied in the decode tasks
    apply = augment_batches(preset, batched, torch.Generator().manual_seed(shuffle_seed or 0))
    shape = (preset.channels, preset.image_size, preset.image_size)  # the decode tasks' rows are flat
    for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.long}, **shuffle):
        yield apply(batch["image"].reshape(-1, *shape)), batch["label"]
