"""Named, composable image policies on torchvision transforms v2.

Images enter as uint8 tensors (C, H, W). ``eval_transform(preset)`` is the one path from a decoded
image to a model input: training appends it after augmentation, evaluation and serving use it alone.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visionray.specs import AugmentOp, EvalPreset


class Binarize(v2.Transform):
    """Threshold a uint8 image: pixels >= ``threshold`` become 255, the rest 0 (the article's
    binarisation), with probability ``p``."""

    def __init__(self, threshold: int = 128, p: float = 1.0):
        super().__init__()
        self.threshold = threshold
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"apply": self.p >= 1.0 or torch.rand(()).item() < self.p}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"] or not isinstance(inpt, torch.Tensor):
            return inpt
        return torch.where(inpt >= self.threshold, 255, 0).to(inpt.dtype)


class ColorBalance(v2.Transform):
    """PIL's ImageEnhance.Color on tensors: saturation factor drawn from [1-x, 1+x]; grey images
    (one channel) pass through unchanged."""

    def __init__(self, saturation: float):
        super().__init__()
        self.saturation = saturation

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"factor": 1.0 + (torch.rand(()).item() * 2 - 1) * self.saturation}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.shape[-3] != 3:
            return inpt
        return F.adjust_saturation(inpt, params["factor"])


def build_op(op: AugmentOp, image_size: int) -> v2.Transform | None:
    """One spec op as a torchvision transform (None for the identity)."""
    match op.op:
        case "none":
            return None
        case "flip_crop":
            crop = v2.RandomCrop(image_size, padding=op.padding, padding_mode="reflect") if op.padding else None
            flip = v2.RandomHorizontalFlip() if op.flip else None
            parts = [t for t in (crop, flip) if t is not None]
            return v2.Compose(parts) if parts else None
        case "autoaugment":
            return v2.AutoAugment(v2.AutoAugmentPolicy(op.policy))
        case "randaugment":
            return v2.RandAugment(num_ops=op.n, magnitude=op.m)
        case "trivialaugment":
            return v2.TrivialAugmentWide()
        case "brightness_contrast":
            return v2.ColorJitter(brightness=op.brightness, contrast=op.contrast)
        case "grayscale":
            return v2.RandomGrayscale(p=op.p)
        case "autocontrast":
            return v2.RandomAutocontrast(p=op.p)
        case "equalize":
            return v2.RandomEqualize(p=op.p)
        case "color_balance":
            return ColorBalance(op.saturation)
        case "binarize":
            return Binarize(op.threshold, op.p)
    raise AssertionError(f"op {op.op!r} has no builder")


def _compose(ops: Sequence[AugmentOp], image_size: int) -> list[v2.Transform]:
    return [t for t in (build_op(op, image_size) for op in ops) if t is not None]


def resize(preset: EvalPreset) -> v2.Transform:
    return v2.Resize((preset.image_size, preset.image_size), antialias=True)


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
    return (images.float() / 255.0 - mean) / std


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
