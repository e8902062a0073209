"""Decoding training and evaluation images (``visionray.data.images``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from visionray.data.images import BadImage, decode, decode_batch


def _jpeg(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("side, size", [(32, 32), (32, 64), (80, 48)])
def test_a_batch_is_one_c_contiguous_array_of_the_images_decoded_one_by_one(side, size):
    blobs = [_jpeg(side, seed) for seed in range(3)]
    images, kept, bad = decode_batch(blobs, ["a", "b", "c"], 3, size)
    # Pillow's decode plus the resize give channels-last tensors: the batch must not keep that
    # layout (Ray Data would copy it again, image by image, to make its rows)
    assert images.flags.c_contiguous and images.shape == (3, 3, size, size) and list(kept) == [0, 1, 2] and not bad
    for blob, image in zip(blobs, images):
        assert torch.equal(torch.from_numpy(image), decode(blob, 3, size))


def test_a_bad_image_is_named_and_left_out_of_the_batch():
    images, kept, bad = decode_batch([_jpeg(32, 0), b"not an image", _jpeg(32, 1)], ["a", "b", "c"], 3, 32, "skip")
    assert images.shape == (2, 3, 32, 32) and list(kept) == [0, 2]
    assert len(bad) == 1 and isinstance(bad[0], BadImage) and bad[0].name == "b"
