"""Decoding untrusted image bytes: ``decode_image`` and the decoder process that runs it.

``decode_image(data, declared, channels, spec, size)``: the structural walk
(``visionray.serve.structure``), then the decoder, restricted to the declared format. JPEGs with 1
or 3 components go through libjpeg-turbo (simplejpeg) in strict mode: its corrupt-data warnings
(a file cut short but ended with EOI, bad Huffman data) are errors; with ``size`` it decodes at the
smallest DCT scale that keeps both sides at or above ``2 * size``. CMYK JPEGs, PNG and WebP go
through Pillow (``LOAD_TRUNCATED_IMAGES`` off, its bomb warning an error). The first frame of an
animation is used; EXIF orientation is applied; only pixels are kept (all metadata dropped),
converted to the model's mode (L or RGB) exactly as training decodes files (``Image.convert``;
alpha dropped, 16-bit samples scaled to 8 bits). With ``size``, a side above ``2 * size`` is then
box-reduced by an integer factor, so what leaves the decoder is at most about ``4 * size`` a side
and the model's own resize (training's) does the rest; images up to ``2 * size`` a side are
untouched.

``python -m visionray.serve.decode SPEC_JSON`` is a decoder process (``visionray.serve.pool``
starts them): it confines itself (``visionray.serve.sandbox``), says it is ready, then answers
jobs on a private pipe pair, framed as 4-byte big-endian lengths: a job is a JSON header
``{"type", "channels", "size", "components"}`` (the replica walked the container already) and the
image bytes; an answer is a JSON header (``{"ok": true,
"shape": [c, h, w], "cpu_s"}`` then the raw pixels, or ``{"ok": false, "status", "code",
"message"}``). Nothing is pickled in either direction.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from visionray.serve.config import SanitizerSpec
from visionray.serve.errors import Rejection
from visionray.serve.structure import inspect

logger = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is an error, never grey-filled

PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MAX_HEADER_BYTES = 64 * 1024  # a JSON frame header on the pipe, either way
MESSAGE_CHARS = 300  # longest decoder message passed to a client

# EXIF orientation -> the transposes that make the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
                4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
                6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_90,)}


def configure_pillow(spec: SanitizerSpec) -> None:
    """Set Pillow's process-wide decompression-bomb threshold to our pixel cap (explicitly)."""
    Image.MAX_IMAGE_PIXELS = spec.max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def to_model_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode to L (channels=1) or RGB (channels=3), deterministically: 16- and 32-bit
    integer samples keep their top 8 bits (Pillow would clip them), everything else through
    ``Image.convert`` as training's decoder does (palette expanded, alpha dropped, CMYK and YCbCr
    to RGB, RGB to L by ITU-R 601-2 luma)."""
    target = "L" if channels == 1 else "RGB"
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.nan_to_num(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    return im if im.mode == target else im.convert(target)


def _jpeg_turbo(data: bytes, components: int, size: int | None) -> Image.Image:
    """libjpeg-turbo, strict, DCT-scaled to >= 2*size a side; EXIF orientation from Pillow's header parse."""
    import simplejpeg

    floor = 2 * size if size else 0
    pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if components == 1 else "RGB", strict=True,
                                    min_height=floor, min_width=floor)
    im = Image.fromarray(pixels[:, :, 0] if components == 1 else pixels, "L" if components == 1 else "RGB")
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as head:  # markers only: no pixel is decoded here
        orientation = head.getexif().get(0x0112)
    for step in _ORIENTATION.get(orientation, ()):
        im = im.transpose(step)
    return im


_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _pillow(data: bytes, declared: str, size: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[declared]])
        if size and declared == "image/jpeg":
            im.draft(im.mode, (2 * size, 2 * size))
        im.load()  # frame 0 of an animation
        return ImageOps.exif_transpose(im)


def reduce_for_model(im: Image.Image, size: int) -> Image.Image:
    """Box-reduce each side above ``2 * size`` by an integer factor (to below ``4 * size``)."""
    fx, fy = max(1, im.width // (2 * size)), max(1, im.height // (2 * size))
    return im.reduce((fx, fy)) if fx > 1 or fy > 1 else im


def decode_image(data: bytes, declared: str, channels: int, spec: SanitizerSpec, size: int | None = None,
                 components: int | None = None) -> np.ndarray:
    """Checked bytes (see ``sanitize.check_type``) to a uint8 (C, H, W) array in the model's mode,
    reduced for a model input of ``size`` px when given. ``components``: the JPEG component count
    from a structural walk already made of these bytes (the pool's replica makes it); without it
    the walk runs here."""
    header = inspect(data, declared, spec) if components is None else None
    components = header.components if header is not None else components
    try:
        if declared == "image/jpeg" and components in (1, 3):
            im = _jpeg_turbo(data, components, size)
        else:
            im = _pillow(data, declared, size)
        im = to_model_mode(im, channels)
        if size:
            im = reduce_for_model(im, size)
        array = np.array(im, dtype=np.uint8, copy=True)  # pixels only: every metadata field is left behind
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own text quotes its internal limit (twice MAX_IMAGE_PIXELS for the error): name ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "more pixels than its header declared"
        raise Rejection(413, "image_too_large", f"the decoded image has {size}; the limit is {spec.max_width}x"
                        f"{spec.max_height} and {spec.max_pixels} pixels (sanitizer.max_pixels)") from None
    except MemoryError:
        raise Rejection(413, "image_too_large", f"decoding needs more than the decoder's "
                        f"{spec.decode_memory_mb} MiB (sanitizer.decode_memory_mb)") from None
    except Exception as exc:  # noqa: BLE001 - the trust boundary: any decoder failure is the input's fault
        # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError, ... on hostile input;
        # simplejpeg ValueError with libjpeg's message.
        # without the repr of our in-memory buffer ("cannot identify image file <_io.BytesIO object at 0x...>")
        text = _BUFFER_REPR.sub("", str(exc)).rstrip() or type(exc).__name__
        code = "truncated_image" if "truncated" in text.lower() or "premature end" in text.lower() else "corrupt_image"
        raise Rejection(422, code, f"the {declared} image cannot be decoded ({type(exc).__name__}: "
                        f"{text[:MESSAGE_CHARS]})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


# --------------------------------------------------------------------------- the decoder process


def read_exact(fd: int, n: int) -> bytes | None:
    """``n`` bytes from a pipe, or None at end of file."""
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def frames(*payloads: bytes | memoryview) -> bytes:
    """Frames, each its 4-byte big-endian length then its bytes, as one buffer (one write, one
    wake-up of the reader)."""
    return b"".join(part for p in payloads for part in (len(p).to_bytes(4, "big"), bytes(p)))


def write_frame(fd: int, *payloads: bytes | memoryview) -> None:
    view = memoryview(frames(*payloads))
    while view:
        view = view[os.write(fd, view):]


def _serve(spec: SanitizerSpec, rfd: int, wfd: int) -> None:
    while True:
        raw = read_exact(rfd, 4)
        if raw is None:
            return
        head = read_exact(rfd, min(int.from_bytes(raw, "big"), MAX_HEADER_BYTES))
        raw = read_exact(rfd, 4)
        data = read_exact(rfd, int.from_bytes(raw, "big")) if raw else None
        if head is None or data is None:
            return
        job = json.loads(head)
        try:
            array = decode_image(data, job["type"], int(job["channels"]), spec, job.get("size"), int(job["components"]))
        except Rejection as rej:
            write_frame(wfd, json.dumps({"ok": False, "status": rej.status, "code": rej.code, "message": rej.message}).encode())
            continue
        cpu = sum(os.times()[:2])
        write_frame(wfd, json.dumps({"ok": True, "shape": list(array.shape), "cpu_s": cpu}).encode(),
                    memoryview(array).cast("B"))


def main(argv: list[str]) -> int:
    """The decoder process: the protocol on private copies of stdin/stdout; stdout itself goes to
    stderr so a stray print cannot corrupt a frame."""
    from visionray.serve import sandbox

    spec = SanitizerSpec.model_validate_json(argv[1])
    warnings.simplefilter("ignore")  # Pillow's per-file notes; the bomb warning is an error where it matters
    configure_pillow(spec)
    Image.init()  # every plugin imported now: no module is opened after confinement
    import simplejpeg  # noqa: F401 - loaded before confinement, like the plugins

    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    try:
        applied = sandbox.confine(spec)
    except sandbox.SandboxError as exc:
        write_frame(wfd, json.dumps({"ready": False, "message": str(exc)}).encode())
        return 1
    write_frame(wfd, json.dumps({"ready": True, "sandbox": applied, "pid": os.getpid()}).encode())
    _serve(spec, rfd, wfd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
