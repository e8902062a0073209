"""Augmentation and preprocessing ops: each one a named, validated step with its torchvision
builder, registered once with ``@register_op``. The spec's allowed ops (``AugmentOp``), the
deterministic ones a preset may hold (``PREPROCESS_OPS``) and ``visionray.transforms`` all come
from this registry: adding an op is one class here.

The classic ops (``CLASSIC_OPS``) are the preprocessing VisionRay started from:
``brightness_contrast``, ``grayscale``, ``autocontrast`` and ``equalize`` (contrast enhancement),
``color_balance`` and ``binarize``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import Field
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visionray.spec_io import UNION_TAGS, Strict

Probability = Annotated[float, Field(ge=0.0, le=1.0)]

_OPS: dict[str, type["Op"]] = {}


class Op(Strict):
    """One step of a policy, applied to uint8 images (C, H, W) before scaling and normalisation."""

    preprocess: ClassVar[bool] = False  # may sit in an eval preset (deterministic when p == 1)
    batched: ClassVar[bool] = False  # the batched pipeline runs it on whole batches (transforms.batch_augment)
    classic: ClassVar[bool] = False  # one of the classic ops VisionRay started from

    def build(self, image_size: int) -> v2.Transform | None:
        """The torchvision transform (None for the identity)."""
        raise NotImplementedError


def register_op(cls: type[Op]) -> type[Op]:
    name = cls.model_fields["op"].default
    assert name not in _OPS, f"op {name!r} registered twice"
    _OPS[name] = cls
    UNION_TAGS.add(name)
    return cls


class Binarize(v2.Transform):
    """Threshold a uint8 image: pixels >= ``threshold`` become 255, the rest 0, with probability ``p``."""

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


@register_op
class NoneOp(Op):
    op: Literal["none"] = "none"
    batched: ClassVar[bool] = True

    def build(self, image_size: int) -> None:
        return None


@register_op
class FlipCropOp(Op):
    op: Literal["flip_crop"] = "flip_crop"
    padding: int = Field(4, ge=0, le=64, description="reflect padding before the random crop (px)")
    flip: bool | Literal["alternate"] = Field(True, description="random horizontal flip; turn off for digits and text; "
                                              "alternate (airbench94, data.pipeline batched): each image mirrored in every "
                                              "other epoch, starting from a seeded random half")
    batched: ClassVar[bool] = True

    def build(self, image_size: int) -> v2.Transform | None:
        crop = v2.RandomCrop(image_size, padding=self.padding, padding_mode="reflect") if self.padding else None
        flip = v2.RandomHorizontalFlip() if self.flip else None
        parts = [t for t in (crop, flip) if t is not None]
        return v2.Compose(parts) if parts else None


@register_op
class AutoAugmentOp(Op):
    op: Literal["autoaugment"] = "autoaugment"
    policy: Literal["imagenet", "cifar10", "svhn"] = "cifar10"

    def build(self, image_size: int) -> v2.Transform:
        return v2.AutoAugment(v2.AutoAugmentPolicy(self.policy))


@register_op
class RandAugmentOp(Op):
    op: Literal["randaugment"] = "randaugment"
    n: int = Field(2, ge=1, le=10, description="ops applied per image")
    m: int = Field(9, ge=0, le=30, description="magnitude on torchvision's 0..30 scale")

    def build(self, image_size: int) -> v2.Transform:
        return v2.RandAugment(num_ops=self.n, magnitude=self.m)


@register_op
class TrivialAugmentOp(Op):
    op: Literal["trivialaugment"] = "trivialaugment"

    def build(self, image_size: int) -> v2.Transform:
        return v2.TrivialAugmentWide()


@register_op
class BrightnessContrastOp(Op):
    """A classic op: brightness and contrast factors drawn from [1-x, 1+x]."""

    op: Literal["brightness_contrast"] = "brightness_contrast"
    brightness: float = Field(0.2, ge=0.0, le=1.0)
    contrast: float = Field(0.2, ge=0.0, le=1.0)
    classic: ClassVar[bool] = True

    def build(self, image_size: int) -> v2.Transform:
        return v2.ColorJitter(brightness=self.brightness, contrast=self.contrast)


class _ProbabilityOp(Op):
    """A deterministic op (when ``p`` is 1) that torchvision applies with probability ``p``."""

    p: Probability = 1.0
    preprocess: ClassVar[bool] = True
    classic: ClassVar[bool] = True
    transform: ClassVar[type[v2.Transform]]

    def build(self, image_size: int) -> v2.Transform:
        return self.transform(p=self.p)


@register_op
class GrayscaleOp(_ProbabilityOp):
    """A classic op: grayscale conversion; the channel count is kept."""

    op: Literal["grayscale"] = "grayscale"
    transform: ClassVar[type[v2.Transform]] = v2.RandomGrayscale


@register_op
class AutocontrastOp(_ProbabilityOp):
    """A classic op: contrast enhancement, each channel stretched to the full range."""

    op: Literal["autocontrast"] = "autocontrast"
    transform: ClassVar[type[v2.Transform]] = v2.RandomAutocontrast


@register_op
class EqualizeOp(_ProbabilityOp):
    """A classic op: contrast enhancement by histogram equalisation."""

    op: Literal["equalize"] = "equalize"
    transform: ClassVar[type[v2.Transform]] = v2.RandomEqualize


@register_op
class ColorBalanceOp(Op):
    """A classic op: colour balance (PIL's ImageEnhance.Color), saturation in [1-x, 1+x]."""

    op: Literal["color_balance"] = "color_balance"
    saturation: float = Field(0.3, ge=0.0, le=1.0)
    classic: ClassVar[bool] = True

    def build(self, image_size: int) -> v2.Transform:
        return ColorBalance(self.saturation)


@register_op
class BinarizeOp(Op):
    """A classic op: binarisation; pixels at or above ``threshold`` become 255, the rest 0."""

    op: Literal["binarize"] = "binarize"
    threshold: int = Field(128, ge=0, le=255, description="uint8 intensity")
    p: Probability = 1.0
    preprocess: ClassVar[bool] = True
    classic: ClassVar[bool] = True

    def build(self, image_size: int) -> v2.Transform:
        return Binarize(self.threshold, self.p)


AUGMENT_OPS = tuple(_OPS)  # every registered op, in registration order
PREPROCESS_OPS = tuple(name for name, cls in _OPS.items() if cls.preprocess)
CLASSIC_OPS = tuple(name for name, cls in _OPS.items() if cls.classic)
BATCHED_OPS = tuple(name for name, cls in _OPS.items() if cls.batched)
AugmentOp = Annotated[Union[tuple(_OPS.values())], Field(discriminator="op")]  # one of the registered ops
