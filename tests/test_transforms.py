"""Augmentation policies and the shared eval preset."""

from __future__ import annotations

import pytest
import torch

from visionray.ops import AUGMENT_OPS
from visionray.specs import EvalPreset, TrainSpec
from visionray.transforms import eval_transform, normalize_batch, train_transform


def _preset(channels: int, **kw) -> EvalPreset:
    return EvalPreset(image_size=32, channels=channels, mean=[0.5] * channels, std=[0.25] * channels, **kw)


def _images(channels: int) -> torch.Tensor:
    """Four images with structure (a ramp, so crops and flips show) and a narrow range (so contrast
    stretching shows), plus noise."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(60, 180, 32).view(1, 1, 1, 32).expand(4, channels, 32, 32)
    noise = torch.randint(-20, 20, (4, channels, 32, 32), generator=g)
    tint = torch.randint(-15, 15, (4, channels, 1, 1), generator=g)
    return (ramp + noise + tint).clamp(0, 255).to(torch.uint8)


RANDOM_OPS = ("flip_crop", "autoaugment", "randaugment", "trivialaugment", "brightness_contrast", "color_balance")
IDENTITY = {("none", 1), ("none", 3), ("grayscale", 1), ("color_balance", 1)}  # grey images have no colour to change


@pytest.mark.parametrize("op", AUGMENT_OPS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_is_deterministic_under_a_seed(op, channels):
    """Same seed, same output; and the op does something: it changes the images (unless it is an
    identity by definition), and a random op draws differently under another seed."""
    spec = TrainSpec.model_validate({"augment": [op]})
    tf = train_transform(_preset(channels), spec.augment)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([tf(im) for im in _images(channels)])

    first, again = run(123), run(123)
    assert first.shape == (4, channels, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again)
    plain = torch.stack([eval_transform(_preset(channels))(im) for im in _images(channels)])
    assert torch.equal(first, plain) == ((op, channels) in IDENTITY)
    if op in RANDOM_OPS and (op, channels) not in IDENTITY:
        assert any(not torch.equal(first, run(seed)) for seed in (1, 2, 3))


def test_binarize_leaves_two_levels():
    spec = TrainSpec.model_validate({"augment": [{"op": "binarize", "threshold": 100}]})
    tf = train_transform(EvalPreset(image_size=32, channels=3, mean=[0, 0, 0], std=[1, 1, 1]), spec.augment)
    out = tf(_images(3)[0])
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_grayscale_keeps_channels_and_equalises_them():
    spec = TrainSpec.model_validate({"augment": ["grayscale"]})
    out = train_transform(_preset(3), spec.augment)(_images(3)[0])
    assert out.shape[0] == 3 and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_training_with_no_augmentation_equals_evaluation():
    preset = _preset(3, preprocess=TrainSpec.model_validate({"data": {"preprocess": ["autocontrast"]}}).data.preprocess)
    im = _images(3)[0]
    assert torch.equal(train_transform(preset, []).__call__(im), eval_transform(preset)(im))


def test_eval_preset_resizes_any_input():
    out = eval_transform(_preset(1))(torch.zeros(1, 100, 60, dtype=torch.uint8))
    assert out.shape == (1, 32, 32) and torch.allclose(out, torch.full_like(out, -2.0))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_batched_normalisation_is_the_eval_presets_exactly_and_leaves_its_input_alone(channels):
    preset = EvalPreset(image_size=32, channels=channels, mean=[0.4, 0.5, 0.6][:channels], std=[0.2, 0.25, 0.3][:channels])
    images = _images(channels)
    before = images.clone()
    batch = normalize_batch(preset, images)
    assert torch.equal(images, before)
    for image, normalised in zip(images, batch):
        assert torch.equal(normalised, eval_transform(preset)(image))
