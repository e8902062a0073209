"""Named, composable image policies on torchvision transforms v2.

Images enter as uint8 tensors (C, H, W). ``eval_transform(preset)`` is the one path from a decoded
image to a model input: training appends it after augmentation, evaluation and serving use it alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torchvision.transforms import v2

from visionray.ops import BATCHED_OPS, AugmentOp

if TYPE_CHECKING:  # specs imports the data registry, which uses these transforms
    from visionray.specs import EvalPreset


def _compose(ops: Sequence[AugmentOp], image_size: int) -> list[v2.Transform]:
    return [t for t in (op.build(image_size) for op in ops) if t is not None]


def resize_to(size: int) -> v2.Transform:
    """The one resize of the platform: data sources, streaming, evaluation and serving use it."""
    return v2.Resize((size, size), antialias=True)


def resize(preset: EvalPreset) -> v2.Transform:
    return resize_to(preset.image_size)


def _finish(preset: EvalPreset) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(preset.mean, preset.std)]


def eval_transform(preset: EvalPreset) -> v2.Compose:
    """Resize, deterministic preprocessing, scale to [0,1], normalise: uint8 (C,H,W) -> float."""
    return v2.Compose([resize(preset), *_compose(preset.preprocess, preset.image_size), *_finish(preset)])


def train_transform(preset: EvalPreset, augment: Sequence[AugmentOp]) -> v2.Compose:
    """The eval path with the augmentation policy between preprocessing and normalisation."""
    return v2.Compose([
        resize(preset),
        *_compose(preset.preprocess, preset.image_size),
        *_compose(augment, preset.image_size),
        *_finish(preset),
    ])


# --------------------------------------------------------------------------- batched (device-resident) path


def preprocess_all(preset: EvalPreset, images: torch.Tensor) -> torch.Tensor:
    """Apply the preset's deterministic preprocessing to every uint8 image once (batched pipeline)."""
    ops = _compose(preset.preprocess, preset.image_size)
    if not ops:
        return images
    tf = v2.Compose(ops)
    return torch.stack([tf(im) for im in images])


def normalize_batch(preset: EvalPreset, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,C,H,W) -> float, exactly the eval preset's scale and normalise, on the batch's device.
    The images must already be resized and preprocessed (``preprocess_all``)."""
    mean = torch.tensor(preset.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, device=images.device).view(1, -1, 1, 1)
    # torchvision's own steps (ToDtype's multiply by 1/255, Normalize's subtract and divide), in
    # place on one new tensor (copy=True: never the caller's): a batch of 224 px images is 19 MiB
    # of floats, and every temporary of that size is a fresh mapping whose pages fault in
    # (measured: 11x faster than out of place)
    return images.to(torch.float32, copy=True).mul_(1.0 / 255).sub_(mean).div_(std)


class BatchFlipCrop:
    """``flip_crop`` on whole float batches on their device: reflect-pad, one random crop offset
    and one coin flip per image. Per-pixel normalisation commutes with both, so the result matches
    the per-sample op applied before normalising. ``flip="alternate"`` (airbench94): image ``i`` is
    mirrored in epoch ``e`` when ``base[i] xor (e odd)``, ``base`` a seeded coin per image of the
    split, so every image is seen both ways in any two epochs in a row."""

    def __init__(self, padding: int, flip: bool | str, generator: torch.Generator | None = None,
                 base_flips: torch.Tensor | None = None):
        assert flip != "alternate" or base_flips is not None, "alternate flips need the split's base_flips"
        self.padding = padding
        self.flip = flip
        self.generator = generator
        self.base_flips = base_flips

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        if self.padding:
            p = self.padding
            xp = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (b,), generator=self.generator).to(dev)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=self.generator).to(dev)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            x = xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(x.shape[1], device=dev)[None, :, None, None], rows, cols]
        if self.flip == "alternate":
            if self.base_flips.device != dev:
                self.base_flips = self.base_flips.to(dev)
            mask = self.base_flips[index] ^ bool(epoch % 2)
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        elif self.flip:
            mask = (torch.rand(b, generator=self.generator) < 0.5).to(dev)
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x


def batch_augment(augment: Sequence[AugmentOp], generator: torch.Generator, num_images: int, seed: int
                  ) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The batched form of a policy made only of ``none`` and ``flip_crop`` ops (the spec checks
    that): ``apply(batch, its indices in the split, epoch)``. ``generator`` draws this worker's
    crops and coin flips; alternate flips' base coins come from ``seed``, the same on every worker
    (indices are the whole split's)."""
    alternate = any(op.op == "flip_crop" and op.flip == "alternate" for op in augment)
    base = torch.rand(num_images, generator=torch.Generator().manual_seed(seed)) < 0.5 if alternate else None
    steps = [BatchFlipCrop(op.padding, op.flip, generator, base) for op in augment if op.op == "flip_crop"]

    def apply(x: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        for step in steps:
            x = step(x, index, epoch)
        return x

    return apply


def augment_batches(preset: EvalPreset, augment: Sequence[AugmentOp], generator: torch.Generator
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Streamed batches (uint8, resized and preprocessed already) to normalised floats, with a
    policy of batched ops (``none``, ``flip_crop``) applied to the whole batch."""
    assert all(op.op in BATCHED_OPS for op in augment), "ops without a batched form run in augment_each"
    steps = [BatchFlipCrop(op.padding, op.flip, generator) for op in augment if op.op == "flip_crop"]

    def batched(x: torch.Tensor) -> torch.Tensor:
        x = normalize_batch(preset, x)
        for step in steps:
            x = step(x)
        return x
    return batched


def augment_each(preset: EvalPreset, augment: Sequence[AugmentOp], images: torch.Tensor) -> torch.Tensor:
    """A policy applied image by image to uint8 (N, C, H, W), staying uint8 (streaming's decode tasks)."""
    tf = v2.Compose(_compose(augment, preset.image_size))
    return torch.stack([tf(im) for im in images])

