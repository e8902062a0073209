"""Structural refusals before any decoder runs: a pure-Python walk over the container of an image.

``inspect(data, declared, spec)`` reads only lengths and headers (no pixel data, no C code), in
steps bounded by the spec, and returns the declared ``Header``. It refuses:

- JPEG: a marker walk from SOI to EOI. Data after EOI (polyglots), a missing EOI (truncation),
  more than ``max_jpeg_scans`` SOS segments (the many-scan CPU bomb), frame types other than
  baseline, extended sequential and progressive, a second frame header, a scan before the frame
  header, DNL-defined heights; progressive images above ``max_progressive_pixels`` (libjpeg keeps
  every coefficient of a progressive image in memory and walks them once per scan).
- PNG: the chunk walk (IEND must be the last bytes), at most ``max_png_chunks`` chunks, IHDR first.
- WebP: the RIFF size must cover the body exactly; the VP8/VP8L/VP8X header gives the size.
- All: width, height and pixel count above the limits (413), a zero dimension (422).

A JPEG cut short but ended with EOI passes this walk; the decoder refuses it (libjpeg-turbo's
"premature end of data segment" warning is an error there, ``visionray.serve.decode``).
"""

from __future__ import annotations

from dataclasses import dataclass

from visionray.serve.config import SanitizerSpec
from visionray.serve.errors import Rejection

_SOF_SUPPORTED = {0xC0: False, 0xC1: False, 0xC2: True}  # marker -> progressive
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_MAX_JPEG_SEGMENTS = 4096  # non-scan segments (APPn, DQT, DHT, COM, ...) in one file


@dataclass(frozen=True)
class Header:
    """What the container declares: size, and for JPEG its scans and component count."""

    width: int
    height: int
    progressive: bool = False
    scans: int = 1
    components: int = 3
    app1: bool = False  # a JPEG APP1 segment (EXIF or XMP, where Pillow finds an orientation): parsed only then

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def cost(self) -> int:
        """Decode work in pixel visits: every scan of a JPEG walks the whole image."""
        return self.pixels * max(1, self.scans)


def _corrupt(message: str) -> Rejection:
    return Rejection(422, "corrupt_image", message)


def _truncated(message: str) -> Rejection:
    return Rejection(422, "truncated_image", message)


def _next_marker(data: bytes, pos: int) -> int:
    """The position of the marker that ends the entropy-coded data starting at ``pos``: the first
    0xFF (fill bytes included) not followed by 0x00 (stuffing) or an RSTn."""
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            raise _truncated("JPEG truncated inside its image data (no EOI)")
        nxt = data[pos + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
            pos += 2
            continue
        if nxt == 0xFF:
            end = pos + 1
            while end < n and data[end] == 0xFF:
                end += 1
            if end >= n:
                raise _truncated("JPEG truncated inside its image data (no EOI)")
            if data[end] == 0x00 or 0xD0 <= data[end] <= 0xD7:
                pos = end + 1
                continue
        return pos


def jpeg_header(data: bytes, spec: SanitizerSpec) -> Header:
    n = len(data)
    pos, frame, scans, segments, app1 = 2, None, 0, 0, False
    while True:
        if pos >= n:
            raise _truncated(f"JPEG truncated: no EOI marker in {n} bytes")
        if data[pos] != 0xFF:
            raise _corrupt(f"JPEG corrupt: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _truncated("JPEG truncated inside a marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            if pos != n:
                raise Rejection(422, "trailing_data", f"JPEG has {n - pos} bytes after its EOI marker (polyglot or corrupt file)")
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0xD8, 0x00):
            raise _corrupt(f"JPEG corrupt: marker 0x{marker:02x} at byte {pos - 1} (a second SOI or stuffing outside a scan)")
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            raise Rejection(413, "too_many_segments", f"JPEG has more than {_MAX_JPEG_SEGMENTS} marker segments")
        if pos + 2 > n:
            raise _truncated(f"JPEG truncated: segment length at byte {pos}")
        length = int.from_bytes(data[pos:pos + 2], "big")
        end = pos + length
        if length < 2:
            raise _corrupt(f"JPEG corrupt: segment 0xff{marker:02x} declares length {length}")
        if end > n:
            raise _truncated(f"JPEG truncated: segment 0xff{marker:02x} needs {length} bytes, {n - pos} left")
        if marker in _SOF_ALL:
            if frame is not None:
                raise _corrupt("JPEG corrupt: a second frame header (SOF)")
            if marker not in _SOF_SUPPORTED:
                raise Rejection(415, "unsupported_jpeg", f"JPEG coding 0xff{marker:02x} (lossless, hierarchical or arithmetic) "
                                "is not accepted; send a baseline or progressive JPEG")
            if length < 8:
                raise _corrupt("JPEG corrupt: frame header too short")
            height = int.from_bytes(data[pos + 3:pos + 5], "big")
            width = int.from_bytes(data[pos + 5:pos + 7], "big")
            if height == 0:
                raise _corrupt("JPEG declares its height later (DNL): not accepted")
            frame = (width, height, _SOF_SUPPORTED[marker], data[pos + 7])
        elif marker == 0xDA:  # SOS: then entropy-coded data up to the next marker
            if frame is None:
                raise _corrupt("JPEG corrupt: image data before the frame header")
            scans += 1
            if scans > spec.max_jpeg_scans:
                raise Rejection(413, "too_many_scans", f"JPEG has more than {spec.max_jpeg_scans} scans "
                                f"(sanitizer.max_jpeg_scans); re-encode it")
            pos = _next_marker(data, end)
            continue
        elif marker == 0xDC:
            raise _corrupt("JPEG declares its height later (DNL): not accepted")
        elif marker == 0xE1:
            app1 = True
        pos = end
    if frame is None or scans == 0:
        raise _corrupt("JPEG has no " + ("frame header" if frame is None else "image data (no scan)"))
    width, height, progressive, components = frame
    return Header(width, height, progressive, scans, components, app1)


def png_header(data: bytes, spec: SanitizerSpec) -> Header:
    """Walk the PNG chunk headers (not their content): IHDR first, IEND the last bytes."""
    pos, n, chunks, size = 8, len(data), 0, None
    while True:
        if pos + 12 > n:
            raise _truncated(f"PNG truncated: chunk header at byte {pos} of {n}")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if length > 2**31 - 1 or end > n:
            raise _truncated(f"PNG truncated: chunk {kind!r} needs {length} bytes, {n - pos - 12} left")
        chunks += 1
        if chunks > spec.max_png_chunks:
            raise Rejection(413, "too_many_chunks", f"PNG has more than {spec.max_png_chunks} chunks (sanitizer.max_png_chunks)")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise _corrupt("PNG corrupt: the first chunk is not a 13-byte IHDR")
            size = (int.from_bytes(data[pos + 8:pos + 12], "big"), int.from_bytes(data[pos + 12:pos + 16], "big"))
        pos = end
        if kind == b"IEND":
            break
    if pos != n:
        raise Rejection(422, "trailing_data", f"PNG has {n - pos} bytes after its IEND chunk (polyglot or corrupt file)")
    return Header(*size)


def webp_header(data: bytes, spec: SanitizerSpec) -> Header:
    """The RIFF size must cover the body exactly (one pad byte allowed); the size from the first chunk."""
    size = int.from_bytes(data[4:8], "little") + 8
    if size > len(data):
        raise _truncated(f"WebP truncated: RIFF declares {size} bytes, got {len(data)}")
    if len(data) - size > 1:
        raise Rejection(422, "trailing_data", f"WebP has {len(data) - size} bytes after its RIFF container")
    if len(data) < 30:
        raise _truncated(f"WebP truncated: {len(data)} bytes hold no image header")
    kind = data[12:16]
    if kind == b"VP8X":
        return Header(1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little"))
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _corrupt("WebP corrupt: no VP8 start code")
        return Header(int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF)
    if kind == b"VP8L":
        if data[20] != 0x2F:
            raise _corrupt("WebP corrupt: no VP8L signature")
        bits = int.from_bytes(data[21:25], "little")
        return Header(1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    raise _corrupt(f"WebP corrupt: first chunk {kind!r} is not VP8, VP8L or VP8X")


_WALKS = {"image/jpeg": jpeg_header, "image/png": png_header, "image/webp": webp_header}


def inspect(data: bytes, declared: str, spec: SanitizerSpec) -> Header:
    """The checked header of an image whose bytes ``check_type`` matched to ``declared``."""
    header = _WALKS[declared](data, spec)
    w, h = header.width, header.height
    if w > spec.max_width or h > spec.max_height or header.pixels > spec.max_pixels:
        raise Rejection(413, "image_too_large", f"image is {w}x{h} px; the limit is {spec.max_width}x{spec.max_height} "
                        f"and {spec.max_pixels} pixels")
    if w < 1 or h < 1:
        raise _corrupt(f"image declares {w}x{h} px")
    if header.progressive and header.pixels > spec.max_progressive_pixels:
        raise Rejection(413, "image_too_large", f"progressive JPEG of {w}x{h} px is above the "
                        f"{spec.max_progressive_pixels}-pixel limit for progressive images; send it baseline")
    return header
