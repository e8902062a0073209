"""Decoding training and evaluation images: one file or encoded blob to uint8 (C, size, size)
through Pillow, ``Image.convert`` and the preset's resize (the same resize serving runs), and a
batch decode that keeps going past bad images and names them.

Bytes from shared storage are not trusted: a truncated file is an error (never grey-filled), and
an image declaring more than ``MAX_PIXELS`` is refused before its pixels are decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from visionray.data.splits import DataError
from visionray.transforms import resize_to

MAX_PIXELS = 64_000_000  # pixels an image may declare (an 8000x8000 photo); more is a bomb
BAD_FILES_SHOWN = 5  # files named in an error about bad images


@dataclass(frozen=True)
class BadImage:
    """An image that did not decode: which one and why."""

    name: str
    error: str


class BadImagesError(DataError):
    """Images that do not decode, with ``data.on_bad_file: fail``: the first few are named."""

    def __init__(self, bad: Sequence[BadImage], total: int):
        self.bad, self.total = list(bad), total
        shown = "; ".join(f"{b.name}: {b.error}" for b in self.bad[:BAD_FILES_SHOWN])
        more = f" (and {len(self.bad) - BAD_FILES_SHOWN} more)" if len(self.bad) > BAD_FILES_SHOWN else ""
        super().__init__(f"{len(self.bad)} of {total} images cannot be decoded: {shown}{more}; fix or remove "
                         "them, or set data.on_bad_file: skip to train without them (they are counted)")

    def __reduce__(self):  # rebuilt from its fields when Ray returns it from a worker
        return (type(self), (self.bad, self.total))


def open_checked(src: bytes | Path):
    """A Pillow image whose header was read and whose declared size is within ``MAX_PIXELS``."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise DataError(f"declares {im.width}x{im.height} pixels, more than the {MAX_PIXELS:,} allowed")
    return im


def decode(src: bytes | Path, channels: int, size: int) -> torch.Tensor:
    """One image (a file or its bytes) as uint8 (channels, size, size)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open_checked(src) as im:
            t = F.pil_to_tensor(im.convert("L" if channels == 1 else "RGB"))
    return t if t.shape[-2:] == (size, size) else resize_to(size)(t)


def describe_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def decode_or_bad(item: bytes | Path, name: str, channels: int, size: int) -> torch.Tensor | BadImage:
    """``decode``, or the ``BadImage`` saying why it failed."""
    try:
        return decode(item, channels, size)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault; it is named
        return BadImage(name, describe_error(exc))


def decode_batch(items: Sequence[bytes | Path], names: Sequence[str], channels: int, size: int, on_bad: str = "skip"
                 ) -> tuple[np.ndarray, np.ndarray, list[BadImage]]:
    """Decode a batch: (uint8 (N, C, size, size) of the images that decoded, their positions in
    ``items``, the ones that did not). ``on_bad="fail"`` raises ``BadImagesError`` naming them."""
    results = [decode_or_bad(item, name, channels, size) for item, name in zip(items, names)]
    bad = [r for r in results if isinstance(r, BadImage)]
    if bad and on_bad == "fail":
        raise BadImagesError(bad, len(items))
    kept = [i for i, r in enumerate(results) if not isinstance(r, BadImage)]
    # copied into one C-contiguous array: the resize may return channels-last tensors, and
    # np.stack keeps their layout (a later reshape or Arrow conversion would copy them again)
    images = np.empty((len(kept), channels, size, size), np.uint8)
    for row, i in zip(images, kept):
        row[...] = results[i].numpy()
    return images, np.asarray(kept, dtype=np.int64), bad
