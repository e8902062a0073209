"""Augmentation policies and the shared eval preset."""

from __future__ import annotations

import pytest
import torch

from visionray.ops import AUGMENT_OPS
from visionray.specs import EvalPreset, TrainSpec
from visionray.transforms import eval_transform, train_transform


def _preset(channels: int, **kw) -> EvalPreset:
    return EvalPreset(image_size=32, channels=channels, mean=[0.5] * channels, std=[0.25] * channels, **kw)


def _images(channels: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, channels, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("op", AUGMENT_OPS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_is_deterministic_under_a_seed(op, channels):
    spec = TrainSpec.model_validate({"augment": [op]})
    tf = train_transform(_preset(channels), spec.augment)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(torch.stack([tf(im) for im in _images(channels)]))
    assert outs[0].shape == (4, channels, 32, 32) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1])


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
