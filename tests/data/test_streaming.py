"""Streaming through Ray Data (``visionray.data.streaming``): what holds without a cluster; the
streams themselves run in ``tests/data/test_pack.py`` and ``tests/train/test_driver.py``."""

from __future__ import annotations

import pytest

from visionray.data.streaming import STREAM_SHUFFLE_BUFFER, STREAM_SHUFFLE_BYTES, shuffle_buffer_images
from visionray.specs import EvalPreset


@pytest.mark.parametrize("size, channels, batch, expected", [
    (32, 3, 128, STREAM_SHUFFLE_BUFFER),  # small images: the image count bounds it
    (224, 3, 32, STREAM_SHUFFLE_BYTES // (3 * 224 * 224)),  # large ones: the bytes do
    (224, 1, 32, STREAM_SHUFFLE_BUFFER),
    (1024, 3, 64, 4 * 64),  # never under four batches
])
def test_the_shuffle_buffer_is_bounded_in_images_and_bytes(size, channels, batch, expected):
    preset = EvalPreset(image_size=size, channels=channels, mean=[0.5] * channels, std=[0.25] * channels)
    held = shuffle_buffer_images(preset, batch)
    assert held == expected
    assert held <= STREAM_SHUFFLE_BUFFER and (held * channels * size * size <= STREAM_SHUFFLE_BYTES or held == 4 * batch)
