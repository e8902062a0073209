"""Hostile metadata in otherwise valid images: compressed text and ICC-profile bombs in PNG chunks,
oversized and repeated EXIF/ICC segments in JPEG, a huge EXIF chunk in WebP. Each either decodes
to pixels (metadata dropped) or is refused with a 4xx, quickly; none raises anything else."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from tests.serve.test_sanitize import LIMITS, encode, png_chunk

from visionray.serve.decode import configure_pillow, decode_image
from visionray.serve.errors import Rejection
from visionray.serve.sanitize import check_type


def _flat(value: int) -> Image.Image:
    return Image.fromarray(np.full((16, 16, 3), value, np.uint8))


def _png(extra_chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A valid 16x16 RGB PNG with chunks inserted after IHDR (8-byte signature + 25-byte IHDR)."""
    data = encode(_flat(120), "PNG")
    return data[:33] + b"".join(png_chunk(kind, body) for kind, body in extra_chunks) + data[33:]


def _zbomb(size: int) -> bytes:
    return zlib.compress(b"\0" * size, 9)


def _jpeg(**kw) -> bytes:
    return encode(_flat(80), "JPEG", **kw)


def _jpeg_with_segments(marker: int, body: bytes, count: int) -> bytes:
    data = _jpeg()
    segment = struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body
    return data[:2] + segment * count + data[2:]


def _webp_with_exif(size: int) -> bytes:
    return encode(_flat(60), "WEBP", exif=b"Exif\0\0" + b"\0" * size)


CASES = {
    "png zTXt bomb (200 MB of text)": ("image/png", lambda: _png([(b"zTXt", b"Comment\0\0" + _zbomb(200 * 2**20))])),
    "png iCCP bomb (200 MB profile)": ("image/png", lambda: _png([(b"iCCP", b"icc\0\0" + _zbomb(200 * 2**20))])),
    "png iTXt bomb": ("image/png", lambda: _png([(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + _zbomb(100 * 2**20))])),
    "png 5,000 tEXt chunks": ("image/png", lambda: _png([(b"tEXt", b"k\0" + b"v" * 100)] * 5000)),
    "png 4 MB tEXt chunk": ("image/png", lambda: _png([(b"tEXt", b"k\0" + b"v" * (4 * 2**20))])),
    "jpeg 60 KB EXIF": ("image/jpeg", lambda: _jpeg(exif=b"Exif\0\0" + b"\0" * 60_000)),
    "jpeg 100 APP1 segments": ("image/jpeg", lambda: _jpeg_with_segments(0xE1, b"Exif\0\0" + b"\xff" * 60_000, 100)),
    "jpeg 60 KB ICC profile x 100": ("image/jpeg", lambda: _jpeg_with_segments(0xE2, b"ICC_PROFILE\0\1\1" + b"\0" * 60_000, 100)),
    "jpeg malformed EXIF": ("image/jpeg", lambda: _jpeg(exif=b"Exif\0\0MM\0*\0\0\0\x08\xff\xff" + b"\x01" * 2000)),
    "webp 3 MB EXIF chunk": ("image/webp", lambda: _webp_with_exif(3 * 2**20)),
}


@pytest.mark.timeout(60)  # a runaway decompression would hang here
@pytest.mark.parametrize("name", list(CASES))
def test_metadata_bombs_decode_or_are_refused_quickly(name):
    configure_pillow(LIMITS)
    content_type, make = CASES[name]
    data = make()
    try:
        declared = check_type(content_type, data, LIMITS)
        pixels = decode_image(data, declared, 3, LIMITS)
    except Rejection as exc:
        assert 400 <= exc.status < 500, (name, exc.status)
    else:
        assert pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8
