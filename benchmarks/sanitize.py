"""Sanitizer cost: time per image of the isolated serving path (type and magic-byte checks, the
structural walk, then a sandboxed decoder process: IPC both ways, the decoder restricted to the
allowlisted format, DCT scaling/box reduction for the model's input size, EXIF transpose, mode
conversion) plus the eval preset, against a bare Pillow decode plus the same eval preset (its
resize) in this process, on the same images, side by side in one run (samples interleaved). Goal:
isolated / bare <= 1.3. The floor column is what no out-of-process decoder can beat on this host:
bare plus one pipe round trip between two processes (raw ``os.write``/``os.read`` ping-pong of a
job-sized message, at most 64 KB), over bare.

    python benchmarks/sanitize.py [--repeat 200] [--size 32]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent


def sample_images() -> dict[str, tuple[str, bytes]]:
    """Photographic-like test images (smooth gradients plus noise) in each allowlisted format."""
    rng = np.random.default_rng(0)
    out = {}
    for side in (32, 224, 640):
        y, x = np.mgrid[0:side, 0:side]
        rgb = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1) + rng.integers(0, 40, (side, side, 3))
        im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        for fmt, ct in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
            buf = io.BytesIO()
            im.save(buf, fmt, quality=90) if fmt != "PNG" else im.save(buf, fmt)
            out[f"{fmt.lower()} {side}x{side}"] = (ct, buf.getvalue())
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux), for the result file: these ratios differ between hosts."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")] \
        if info.exists() else []
    return names[0] if names else "CPU"


def median_times(fns, repeat: int) -> list[float]:
    """Median seconds per call of each function, their calls interleaved (drift hits all alike)."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm
    for _ in range(repeat):
        for fn, out in zip(fns, samples):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(out) for out in samples]


ECHO = "import os\nwhile data := os.read(0, 1 << 16):\n    os.write(1, data[:3072])"


def pipe_round_trip(nbytes: int, repeat: int) -> float:
    """Median seconds of a raw pipe round trip: ``nbytes`` to another process, 3 KB back."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    message, rfd, wfd = b"x" * nbytes, proc.stdout.fileno(), proc.stdin.fileno()

    def once() -> None:
        os.write(wfd, message)
        os.read(rfd, 1 << 16)

    try:
        return median_times([once], repeat * 5)[0]
    finally:
        proc.stdin.close()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--size", type=int, default=32, help="the model's input size (px)")
    parser.add_argument("--out", default=str(HERE / "results" / "sanitize.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from visionray.checkpoint import versions
    from visionray.serve.config import SanitizerSpec
    from visionray.serve.pool import DecodePool
    from visionray.serve.sanitize import check_type
    from visionray.serve.structure import inspect
    from visionray.specs import EvalPreset
    from visionray.transforms import eval_transform

    torch.set_num_threads(1)
    spec = SanitizerSpec(decode_workers=1)
    pool = DecodePool(spec)
    pool.start()
    tf = eval_transform(EvalPreset(image_size=args.size, channels=3, mean=[0.5] * 3, std=[0.25] * 3))

    def isolated(ct: str, data: bytes):
        declared = check_type(ct, data, spec)
        header = inspect(data, declared, spec)
        return tf(torch.from_numpy(pool.decode_blocking(data, declared, 3, args.size, header).copy()))

    def bare(data: bytes):
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        return tf(torch.from_numpy(np.ascontiguousarray(array)))

    rows = []
    try:
        for name, (ct, data) in sample_images().items():
            # the same tensor up to 2x the input size a side; larger ones are reduced first (DCT, box)
            diff = float((isolated(ct, data) - bare(data)).abs().max()) * 0.25 * 255  # in 8-bit levels
            t_iso, t_bare = median_times([lambda: isolated(ct, data), lambda: bare(data)], args.repeat)
            rtt = pipe_round_trip(min(len(data), 1 << 16), args.repeat)
            rows.append({"image": name, "bytes": len(data), "isolated_ms": t_iso * 1e3, "bare_ms": t_bare * 1e3,
                         "ratio": t_iso / t_bare, "pipe_round_trip_ms": rtt * 1e3, "floor_ratio": (t_bare + rtt) / t_bare,
                         "max_diff_levels": round(diff, 2)})
    finally:
        pool.close()
    table = Table(title=f"isolated decoder vs bare Pillow decode + eval preset ({args.size} px), median of "
                        f"{args.repeat}, 1 thread")
    for col in ("image", "bytes", "isolated ms", "bare ms", "ratio (goal <= 1.3)", "pipe RTT ms", "floor", "max diff (levels)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["image"], str(r["bytes"]), f"{r['isolated_ms']:.3f}", f"{r['bare_ms']:.3f}", f"{r['ratio']:.2f}",
                      f"{r['pipe_round_trip_ms']:.3f}", f"{r['floor_ratio']:.2f}", f"{r['max_diff_levels']:.1f}")
    Console(width=160).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": f"{cpu_model()} x{os.cpu_count()}",
                                          "size": args.size, "repeat": args.repeat, "versions": versions(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
