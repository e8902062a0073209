"""Decoding untrusted image bytes: ``decode_image`` and the decoder process that runs it.

``decode_image(data, declared, channels, spec, size)``: the structural walk
(``visionray.serve.structure``), then the decoder, restricted to the declared format. JPEGs with 1
or 3 components go through libjpeg-turbo (simplejpeg) in strict mode: its corrupt-data warnings
(a file cut short but ended with EOI, bad Huffman data) are errors; with ``size`` it decodes at the
smallest DCT scale that keeps both sides at or above ``2 * size``. CMYK JPEGs, PNG and WebP go
through Pillow (``LOAD_TRUNCATED_IMAGES`` off, its bomb warning an error). The first frame of an
animation is used; EXIF (or XMP) orientation is applied; only pixels are kept (all metadata dropped),
converted to the model's mode (L or RGB) exactly as training decodes files (``Image.convert``;
alpha dropped, 16-bit samples scaled to 8 bits). With ``size``, a side above ``2 * size`` is then
box-reduced by an integer factor, so what leaves the decoder is at most about ``4 * size`` a side
and the model's own resize (training's) does the rest; images up to ``2 * size`` a side are
untouched.

``python -m visionray.serve.decode SPEC_JSON`` is a decoder process (``visionray.serve.pool``
starts them): it confines itself (``visionray.serve.sandbox``), says it is ready, then answers
jobs on a private pipe pair. Each message is a fixed binary header (``JOB``: format, channels,
size and the replica's structural header of the bytes; ``ANSWER``: status, shape, CPU seconds)
whose last field counts the bytes that follow: the image, the raw pixels, or a JSON refusal. Both
go in one write and usually one read, so a small image costs little more than its decode. Nothing
is pickled in either direction.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import sys
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps

from visionray.serve.config import SanitizerSpec
from visionray.serve.errors import Rejection
from visionray.serve.structure import Header, inspect

logger = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is an error, never grey-filled

PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MAX_JSON_BYTES = 64 * 1024  # a JSON message body on the pipe (the ready message, a refusal)
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


def _jpeg_turbo(data: bytes, header: Header, size: int | None) -> Image.Image:
    """libjpeg-turbo, strict, DCT-scaled to >= 2*size a side; EXIF/XMP orientation from Pillow's
    parse of the markers, where the walk saw an APP1 segment (no other segment holds one)."""
    import simplejpeg

    floor = 2 * size if size else 0
    gray = header.components == 1
    pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", strict=True,
                                    min_height=floor, min_width=floor)
    im = Image.fromarray(pixels[:, :, 0] if gray else pixels, "L" if gray else "RGB")
    if header.app1:
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


def decode_image(data: bytes | bytearray, declared: str, channels: int, spec: SanitizerSpec, size: int | None = None,
                 header: Header | None = None) -> np.ndarray:
    """Checked bytes (see ``sanitize.check_type``) to a uint8 (C, H, W) array in the model's mode,
    reduced for a model input of ``size`` px when given. ``header``: the structural walk already
    made of these bytes (the pool's replica makes it); without it the walk runs here."""
    header = inspect(data, declared, spec) if header is None else header
    try:
        if declared == "image/jpeg" and header.components in (1, 3):
            im = _jpeg_turbo(data, header, size)
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

# A job: the declared format (an index in FORMATS), channels, the model's input size (0: none), the
# replica's structural header of the bytes, then the image's byte count; the bytes follow.
JOB = struct.Struct("<BBHIIBIBBI")
# An answer: status (200: pixels follow; 413/415/422: a JSON {code, message} follows; for the ready
# message 200 with JSON {sandbox, pid}, else 500 with JSON {message}), channels, height, width, the
# decoder's CPU seconds so far, then the byte count of what follows.
ANSWER = struct.Struct("<HHIIdI")
FORMATS = tuple(PIL_FORMATS)
SCRATCH_BYTES = 1 << 16  # the first read of a message takes its header and up to this much of its body


def pack_job(declared: str, channels: int, size: int | None, header: Header, nbytes: int) -> bytes:
    return JOB.pack(FORMATS.index(declared), channels, size or 0, header.width, header.height, header.progressive,
                    header.scans, header.components, header.app1, nbytes)


def unpack_job(fields: tuple) -> tuple[str, int, int | None, Header]:
    fmt, channels, size, width, height, progressive, scans, components, app1, _ = fields
    return FORMATS[fmt], channels, size or None, Header(width, height, bool(progressive), scans, components, bool(app1))


def _read_at_least(fd: int, view: memoryview, need: int, wait: Callable[[], None]) -> int | None:
    """Read into ``view`` until ``need`` bytes are there (None at end of file); ``wait`` is called
    when a non-blocking pipe has nothing yet (it raises past a deadline)."""
    got = 0
    while got < need:
        try:
            n = os.readv(fd, [view[got:]])
        except BlockingIOError:
            wait()
            continue
        if n == 0:
            return None
        got += n
    return got


def read_message(fd: int, layout: struct.Struct, max_body: int, scratch: bytearray,
                 wait: Callable[[], None] = lambda: None) -> tuple[tuple, bytearray] | None:
    """A fixed header (``layout``; its last field the body's byte count) and its body; None at end of
    file; ``ValueError`` for a body over ``max_body`` bytes (nothing is allocated for it). Small
    messages take one read. Either side sends one message and waits for the other's, so nothing of
    a next message is read here."""
    view = memoryview(scratch)
    got = _read_at_least(fd, view, layout.size, wait)
    if got is None:
        return None
    fields = layout.unpack_from(scratch)
    n = fields[-1]
    if n > max_body:
        raise ValueError(f"a message of {n} bytes; at most {max_body} were expected")
    body = bytearray(n)
    first = min(got - layout.size, n)
    body[:first] = view[layout.size:layout.size + first]
    if first < n and _read_at_least(fd, memoryview(body)[first:], n - first, wait) is None:
        return None
    return fields, body


def write_message(fd: int, head: bytes, body: bytes | memoryview = b"") -> None:
    """Header and body in as few writes as the pipe allows (a blocking pipe)."""
    parts = [memoryview(head), memoryview(body).cast("B")]
    while parts:
        n = os.writev(fd, parts)
        while parts and n >= len(parts[0]):
            n -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][n:]


def _json_answer(status: int, fields: dict, cpu: float = 0.0) -> tuple[bytes, bytes]:
    body = json.dumps(fields).encode()
    return ANSWER.pack(status, 0, 0, 0, cpu, len(body)), body


def _serve(spec: SanitizerSpec, rfd: int, wfd: int) -> None:
    scratch = bytearray(JOB.size + SCRATCH_BYTES)
    while True:
        try:  # the replica is trusted; a job larger than this process may hold ends it
            message = read_message(rfd, JOB, spec.decode_memory_mb * 2**20, scratch)
        except ValueError:
            return
        if message is None:
            return
        fields, data = message
        declared, channels, size, header = unpack_job(fields)
        try:
            array = decode_image(data, declared, channels, spec, size, header)
        except Rejection as rej:
            write_message(wfd, *_json_answer(rej.status, {"code": rej.code, "message": rej.message}, sum(os.times()[:2])))
            continue
        c, h, w = array.shape
        write_message(wfd, ANSWER.pack(200, c, h, w, sum(os.times()[:2]), array.nbytes), memoryview(array))


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
        write_message(wfd, *_json_answer(500, {"message": str(exc)}))
        return 1
    write_message(wfd, *_json_answer(200, {"sandbox": applied, "pid": os.getpid()}))
    _serve(spec, rfd, wfd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
