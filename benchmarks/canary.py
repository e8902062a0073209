"""Canary share over real HTTP: ``visionray serve`` with ``rollout: {canary: digits@2, percent: P}``
(from ``serve/digits.yaml``), N requests through the Python client, the share the canary answered
and whether every response named its version.

Two signed versions of the digits model are registered in a temporary registry: v1 (the stable
one) and v2 (another seed of the same net: the canary). ``visionray serve`` starts its own local
Ray, as a user runs it; the script stops it with SIGTERM at the end.

    python benchmarks/canary.py [--percent 10] [--requests 1000]

Writes ``benchmarks/results/canary.json``; exits 1 when the share is outside the binomial bound
(4.5 standard deviations) or a response names no version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from soak import free_port, register_untrained  # noqa: E402  (benchmarks/soak.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--percent", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", default=str(HERE / "results" / "canary.json"))
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from visionray.serve.client import Client

    from visionray.specs import load_spec

    tmp = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    quick = load_spec(REPO / "jobs" / "quickstart.yaml")  # v1 and v2: two seeds of the quickstart net, untrained
    registry, public = register_untrained(tmp, "digits", quick.model.name, quick.model.kwargs(), channels=1,
                                          size=quick.data.image_size, versions=2)
    config = yaml.safe_load((REPO / "serve" / "digits.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]["args"]
    app.update(model="digits@1", registry=str(registry), public_keys=[str(public)],
               rollout={"canary": "digits@2", "percent": args.percent})
    app["classifier"].update(min_replicas=1)
    path = tmp / "canary.yaml"
    path.write_text(yaml.safe_dump(config))

    png = tmp / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(png)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    log = tmp / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "visionray.cli", "serve", str(path)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**env, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    versions: list[int | None] = []
    try:
        deadline = time.time() + 300
        while "Ctrl-C" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        if proc.poll() is not None or "Ctrl-C" not in log.read_text():
            sys.exit(f"visionray serve did not come up:\n{log.read_text()[-3000:]}")
        t0 = time.perf_counter()
        with Client(f"http://127.0.0.1:{port}") as client:
            for _ in range(args.requests):
                versions.append((client.classify([png]).get("model") or {}).get("version"))
            rollout = client.rollout()
        seconds = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    n, p = args.requests, args.percent / 100
    hits = versions.count(2)
    bound = 4.5 * math.sqrt(n * p * (1 - p))
    result = {
        "config": "serve/digits.yaml + rollout {canary: digits@2, percent: %g}" % args.percent,
        "requests": n, "canary_answers": hits, "stable_answers": versions.count(1),
        "unnamed": sum(v not in (1, 2) for v in versions), "share": hits / n,
        "points_off": round(abs(hits / n - p) * 100, 2),  # percentage points from the configured share
        "expected": p, "bound_answers": [math.ceil(n * p - bound), math.floor(n * p + bound)],
        "within_bound": abs(hits - n * p) <= bound, "seconds": seconds,
        "rollout_endpoint": rollout, "cores": os.cpu_count(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rollout_endpoint"}, indent=2))
    if not result["within_bound"] or result["unnamed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
