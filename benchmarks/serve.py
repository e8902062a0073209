"""Serving throughput and latency, side by side in one run, per model:

(a) VisionRay: the real ``visionray.serve.app:build_app`` (sanitizer, decoding, batched inference of
    a signed registry model) over HTTP on loopback, in both topologies: ``split`` (an Ingress
    deployment calls a Classifier deployment through a handle) and ``combined`` (one deployment),
    in every serving mode (``ingress_mode``: ``proxy``, ``direct``, ``throughput``; one Ray cluster
    per mode, in a child process, since Serve reads its mode from the environment at start-up);
Ray's floor in each mode: an ingress deployment that reads the body and returns a constant;
(b) plain Ray Serve as Ray's docs write it: one deployment whose ``__call__`` reads the body, decodes the
    PNG with Pillow and runs the model on it, one request = one forward pass, no batching;
(c) the limit: ``model(batch)`` in this process at the same batch size, no HTTP, no decoding.

(a) and (b) get the same PNGs from the same load generator (``visionray.serve.client.loadtest``)
at the same fixed concurrency for the same duration. Torch threads match the replicas' (Ray gives
a 1-CPU replica OMP_NUM_THREADS=1). Reported: requests/s, p50/p99, and (a)/(c), (a)/(b), and the
p50 overhead of (a) at concurrency 1 over one direct in-process call (sanitized decode + predict),
and how much of it lies above Ray's floor in that mode. (b) runs in proxy mode, as the docs deploy it.
Goals, for each topology of (a): (a)/(c) >= 0.8 for seed_cnn; (a)/(b) >= 2; p50 overhead <= 3 ms.

    python benchmarks/serve.py [--duration 10] [--concurrency 32] [--models seed_cnn,cifar_convnet] [--modes proxy,direct,throughput] [--gpu]

``--gpu``: every model-holding process on the one GPU (Ray shares it by fractions): (a)'s classifier
in fp16 + channels_last as the product serves, (b) in fp32 as the docs write it, (c) as (a)'s model.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from starlette.requests import Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import encode, free_port, photo, register_untrained  # noqa: E402  (benchmarks/soak.py)

from visionray.serve.config import BatchSpec  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = {  # name -> (architecture, kwargs, channels, image size in px)
    "seed_cnn": ("seed_cnn", {}, 3, 224),
    "cifar_convnet": ("convnet", {"depth": 4, "width": 32}, 3, 32),
}
REPLICA_THREADS = 1  # torch threads in a 1-CPU replica, and in the in-process measurements
WARMUP_S = 2.0  # load before each measured phase (s)
DIRECT_REPEAT = 50  # single in-process calls timed for the direct latency
TOPOLOGIES = ("split", "combined")  # (a)'s, ServeSpec.topology
MODES = ("proxy", "direct", "throughput")  # ServeSpec.ingress_mode, one Ray cluster each
FLOOR_API = FastAPI()
GOALS = {"a_over_c": 0.8, "a_over_b": 2.0, "overhead_ms": 3.0}


# --------------------------------------------------------------------------- (b) plain Ray Serve

@serve.deployment(name="Plain")
class Plain:
    """The docs' pattern (Serve's quickstart): load the model in the constructor; ``__call__`` takes
    the Starlette request, decodes it and runs the model on it, one request at a time."""

    def __init__(self, checkpoint: str, device: str):
        from visionray.checkpoint import load_model
        from visionray.transforms import eval_transform

        self.device = device
        self.model, meta = load_model(checkpoint)
        self.model.to(device).eval()
        self.classes = meta.classes
        self.preset = meta.eval_preset
        self.transform = eval_transform(self.preset)

    async def __call__(self, request: Request) -> dict[str, Any]:
        import io  # imported here, not captured: this class is pickled by value into the replicas

        import numpy as np
        import torch
        from PIL import Image

        image = Image.open(io.BytesIO(await request.body())).convert("RGB" if self.preset.channels == 3 else "L")
        pixels = np.asarray(image)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        x = self.transform(torch.from_numpy(np.ascontiguousarray(pixels)))[None].to(self.device)
        with torch.no_grad():
            probs = self.model(x).softmax(1)[0]
        top = probs.topk(5)
        return {"results": [{"top_k": [{"label": self.classes[i], "index": i, "probability": p}
                                       for p, i in zip(top.values.tolist(), top.indices.tolist())]}]}


# --------------------------------------------------------------------------- measurements


def raw_forward(predictor, batch: int, size: int, duration_s: float) -> float:
    """(c): images/s of the predictor's own ``model(batch)`` (its device and precision) for ``duration_s``."""
    x = torch.randn(batch, predictor.preset.channels, size, size, device=predictor.device)
    if predictor.half:
        x = x.half().contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if predictor.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        predictor.model(x)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            predictor.model(x)
            n += batch
        sync()
    return n / (time.perf_counter() - start)


def direct_call(predictor, pngs: list[bytes], channels: int) -> dict[str, float]:
    """Median ms of one in-process call: the sanitizer's decode (in this process: the baseline
    without the decoder processes' pipe trips) plus ``Predictor.predict``."""
    from visionray.serve.config import SanitizerSpec
    from visionray.serve.decode import configure_pillow, decode_image
    from visionray.serve.sanitize import check_type

    spec = SanitizerSpec()
    configure_pillow(spec)
    decode_s, predict_s = [], []
    for i in range(DIRECT_REPEAT + 1):
        data = pngs[i % len(pngs)]
        t0 = time.perf_counter()
        image = decode_image(data, check_type("image/png", data, spec), channels, spec)
        t1 = time.perf_counter()
        predictor.predict([image], 5)
        t2 = time.perf_counter()
        if i:  # the first is a warm-up
            decode_s.append(t1 - t0)
            predict_s.append(t2 - t1)
    decode_ms, predict_ms = statistics.median(decode_s) * 1e3, statistics.median(predict_s) * 1e3
    return {"decode_ms": decode_ms, "predict_ms": predict_ms, "total_ms": decode_ms + predict_ms}


async def grpc_load(address: str, app: str, images: list[tuple[str, bytes, str]], concurrency: int,
                    duration_s: float) -> dict[str, Any]:
    """``visionray.v1.Classifier/Classify`` calls from ``concurrency`` coroutines for ``duration_s``
    (grpc.aio, one channel): the same fields as ``loadtest``'s report, "200" for OK."""
    import grpc

    from visionray.serve.grpc_api import SERVICE, ClassifyReply, ClassifyRequest

    requests = [ClassifyRequest(image=data, content_type=ctype, top_k=5) for _, data, ctype in images]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Classify", request_serializer=ClassifyRequest.SerializeToString,
                                   response_deserializer=ClassifyReply.FromString)
        start = time.perf_counter()
        end = start + duration_s

        async def client(i: int) -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await call(requests[i % len(requests)], metadata=(("application", app),), timeout=60)
                    status = "200"
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                statuses[status] = statuses.get(status, 0) + 1
                i += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    pick = (lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3, 2)) if latencies else (lambda q: None)
    return {"requests": sum(statuses.values()), "duration_s": round(elapsed, 3), "concurrency": concurrency,
            "ok_per_s": statuses.get("200", 0) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "by_status": statuses}


def load(url: str, images: list[tuple[str, bytes, str]], concurrency: int, duration_s: float) -> dict[str, Any]:
    from visionray.serve.client import loadtest

    asyncio.run(loadtest(url, images, concurrency, WARMUP_S, timeout_s=60.0))
    return asyncio.run(loadtest(url, images, concurrency, duration_s, timeout_s=60.0, seed=1)).to_json()


@serve.deployment(name="Floor")
@serve.ingress(FLOOR_API)
class Floor:
    """Ray's own floor in a mode: an ingress that reads the body and returns a constant."""

    @FLOOR_API.post("/v1/classify")
    async def classify(self, request: Request) -> dict[str, int]:
        await request.body()
        return {"ok": 1}


def bench_model(key: str, mode: str, proxy_port: int, grpc_port: int | None, args: argparse.Namespace,
                workdir: Path) -> dict[str, Any]:
    """One model's rows in this process's serving mode: (a) in both topologies, Ray's floor, and in
    proxy mode (b); (c) and the direct call in this process."""
    from visionray.registry.registry import Registry
    from visionray.serve.app import build_app
    from visionray.serve.modes import ingress_ports
    from visionray.serve.predictor import Predictor

    arch, kwargs, channels, size = MODELS[key]
    name = key.replace("_", "-")
    registry, public = register_untrained(workdir / key, name, arch, kwargs, channels, size)
    model, meta = Registry(str(registry)).load(f"{name}@best", public_keys=[public])
    pngs = [encode(photo(size, seed=s, mode="RGB" if channels == 3 else "L"), "PNG") for s in range(8)]
    images = [(f"{s}.png", data, "image/png") for s, data in enumerate(pngs)]
    row: dict[str, Any] = {"model": key, "architecture": arch, "kwargs": kwargs, "input": [channels, size, size],
                           "png_bytes": statistics.median(len(p) for p in pngs)}

    # (c) and the direct call, in this process, before any load
    predictor = Predictor(model, meta, name, 1, torch.device("cuda" if args.gpu else "cpu"))
    row["c_images_per_s"] = raw_forward(predictor, args.batch, size, args.duration / 2)
    row["direct"] = direct_call(predictor, pngs, channels)

    # (a) VisionRay over HTTP
    serve_args = {
        "model": f"{name}@best", "registry": str(registry), "public_keys": [str(public)],
        "device": "cuda" if args.gpu else "cpu", "ingress_mode": mode,
        "batch": {"max_batch_size": args.batch, "wait_s": args.batch_wait_s},
        "classifier": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "num_gpus": 0.5 if args.gpu else 0,
                       "max_ongoing_requests": max(args.batch, args.concurrency), "max_queued_requests": 4 * args.concurrency},
    }

    def phase(path: str, app) -> None:
        """Deploy ``app`` at /<path>-<key>, load it at full and at single concurrency, remove it."""
        app_name = f"{path}-{key}"
        serve.run(app, name=app_name, route_prefix=f"/{app_name}")
        try:
            port = proxy_port if mode == "proxy" else ingress_ports(app_name)[0]
            url = f"http://127.0.0.1:{port}/{app_name}"
            row[path] = load(url, images, args.concurrency, args.duration)
            row[f"{path}_c1"] = load(url, images, 1, args.duration / 2)
            if grpc_port and path == "a_combined":  # the gRPC ingress of the same deployment, through Serve's gRPC proxy
                address = f"127.0.0.1:{grpc_port}"
                asyncio.run(grpc_load(address, app_name, images, args.concurrency, WARMUP_S))
                row["a_combined_grpc"] = asyncio.run(grpc_load(address, app_name, images, args.concurrency, args.duration))
                row["a_combined_grpc_c1"] = asyncio.run(grpc_load(address, app_name, images, 1, args.duration / 2))
        finally:
            serve.delete(app_name)

    for topology in TOPOLOGIES:
        ingress = {"ingress": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}} if topology == "split" else {}
        phase(f"a_{topology}", build_app({**serve_args, "topology": topology, **ingress}))
    phase("floor", Floor.options(num_replicas=1, max_ongoing_requests=4 * args.concurrency,
                                 ray_actor_options={"num_cpus": 1}).bind())

    # (b) plain Ray Serve, as the docs deploy it (proxy mode)
    if mode == "proxy":
        checkpoint = workdir / key / "ckpt" / name
        gpus = 0.5 / args.plain_replicas if args.gpu else 0  # (b)'s replicas share the other half of the GPU
        plain = Plain.options(num_replicas=args.plain_replicas, ray_actor_options={"num_cpus": 1, "num_gpus": gpus}).bind(
            str(checkpoint), "cuda" if args.gpu else "cpu")
        phase("b", plain)
    return row


def run_mode(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every model's rows in ``mode``, on a Ray cluster of this process started in that mode."""
    import ray

    torch.set_num_threads(REPLICA_THREADS)
    ray.init(num_cpus=max(4, os.cpu_count() or 4), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    from visionray.serve.grpc_api import SERVICER_FUNCTION

    port = free_port()
    grpc_port = free_port() if mode == "proxy" else None  # the gRPC row: proxy mode (Serve's gRPC proxy)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]} if grpc_port else None)
        with tempfile.TemporaryDirectory() as tmp:
            for key in args.models.split(","):
                rows.append(bench_model(key, mode, port, grpc_port, args, Path(tmp)))
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def ratios(row: dict[str, Any], mode_row: dict[str, Any], batch_wait_s: float) -> dict[str, dict[str, float | None]]:
    """(a)/(c), (a)/(b) and the c=1 overhead over the direct call, per topology of one mode."""
    out = {}
    for topology in TOPOLOGIES:
        a, a_c1 = mode_row[f"a_{topology}"], mode_row[f"a_{topology}_c1"]
        overhead = a_c1["p50_ms"] - row["direct"]["total_ms"] if a_c1["p50_ms"] else None
        out[topology] = {
            "a_over_c": a["ok_per_s"] / row["c_images_per_s"],
            "a_over_b": a["ok_per_s"] / row["b"]["ok_per_s"] if row["b"]["ok_per_s"] else None,
            "overhead_ms": overhead,
            # what is ours: the overhead less Ray's own floor in this mode (a constant answered over HTTP)
            "ours_ms": overhead - mode_row["floor_c1"]["p50_ms"] if overhead is not None else None,
        }
    return out


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase (c=1 phases: half)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in the throughput phases")
    parser.add_argument("--batch", type=int, default=16, help="max batch size of (a), and (c)'s batch")
    parser.add_argument("--batch-wait-s", type=float, default=BatchSpec().wait_s, help="(a)'s batch wait (s); default: the product's")
    parser.add_argument("--plain-replicas", type=int, default=2,
                        help="replicas of (b): as many model-holding processes as (a) has replicas")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"serving modes, comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--gpu", action="store_true", help="models on the GPU (a: fp16 as served, b: fp32 as in Ray's docs)")
    parser.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    parser.add_argument("--worker-mode", choices=MODES, help=argparse.SUPPRESS)  # one mode's cluster, in a child process
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no CUDA device here")
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in MODELS]:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if "proxy" not in modes:
        parser.error("--modes must include proxy: (b), Ray's docs-style deployment, is measured there")
    args.models = ",".join(keys)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if args.worker_mode:
        Path(args.out).write_text(json.dumps(run_mode(args.worker_mode, args)))
        return

    from rich.console import Console
    from rich.table import Table

    from visionray.checkpoint import versions
    from visionray.serve.modes import mode_env

    load_before = os.getloadavg()
    started = time.time()
    by_mode: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:  # one Ray cluster per mode: Serve reads its mode from the environment at start-up
            out = Path(tmp) / f"{mode}.json"
            env = {**os.environ, **mode_env(mode, free_port_range(8), 8)}
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker-mode", mode, "--out", str(out)]
            subprocess.run(cmd, env=env, check=True)
            by_mode[mode] = json.loads(out.read_text())
    rows = []
    for i, key in enumerate(keys):
        proxy_row = by_mode["proxy"][i]
        row = {k: v for k, v in proxy_row.items() if not k.startswith(("a_", "floor"))}
        row["modes"] = {m: {k: v for k, v in by_mode[m][i].items() if k.startswith(("a_", "floor"))} for m in modes}
        row["grpc"] = {"combined": row["modes"]["proxy"].pop("a_combined_grpc"), "combined_c1": row["modes"]["proxy"].pop("a_combined_grpc_c1")}
        row["ratios"] = {m: ratios(row, row["modes"][m], args.batch_wait_s) for m in modes}
        rows.append(row)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    console = Console(width=160)
    table = Table(title=f"serving, concurrency {args.concurrency}, {args.duration:g} s per phase, batch {args.batch}, "
                        f"{device_name()}{', CPU x' + str(os.cpu_count()) if torch.cuda.is_available() else ''}, load avg {load_before[0]:.1f}")
    for col in ("model", "mode", "path", "req/s", "p50 ms", "p99 ms", "c=1 p50 ms", "non-200"):
        table.add_column(col, justify="right")
    for r in rows:
        paths = [(m, f"(a) VisionRay {t}", r["modes"][m][f"a_{t}"], r["modes"][m][f"a_{t}_c1"]) for m in modes for t in TOPOLOGIES]
        paths += [(m, "Ray's floor (constant)", r["modes"][m]["floor"], r["modes"][m]["floor_c1"]) for m in modes]
        paths += [("proxy", "(a) VisionRay combined, gRPC", r["grpc"]["combined"], r["grpc"]["combined_c1"])]
        paths += [("proxy", "(b) plain Serve", r["b"], r["b_c1"])]
        for mode, path, main_, c1 in paths:
            bad = {k: v for k, v in main_["by_status"].items() if k != "200"}
            table.add_row(r["model"], mode, path, f"{main_['ok_per_s']:.1f}", ms(main_["p50_ms"]), ms(main_["p99_ms"]),
                          ms(c1["p50_ms"]), str(bad or "-"))
        table.add_row(r["model"], "", f"(c) model(batch {args.batch})", f"{r['c_images_per_s']:.1f}", "", "", "", "")
        table.add_row(r["model"], "", "direct decode+predict", "", "", "", ms(r["direct"]["total_ms"]), "", end_section=True)
    console.print(table)
    goals = Table(title="goals")
    for col in ("model", "mode", "(a) topology", f"(a)/(c) (goal >= {GOALS['a_over_c']}, seed_cnn)", f"(a)/(b) (goal >= {GOALS['a_over_b']:g})",
                f"c=1 overhead ms (goal <= {GOALS['overhead_ms']:g})", "of which not Ray's floor ms"):
        goals.add_column(col, justify="right")
    for r in rows:
        for m in modes:
            for t in TOPOLOGIES:
                q = r["ratios"][m][t]
                goals.add_row(r["model"], m, t, f"{q['a_over_c']:.2f}", "-" if q["a_over_b"] is None else f"{q['a_over_b']:.2f}",
                              ms(q["overhead_ms"]), ms(q["ours_ms"]))
    console.print(goals)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": device_name(),
        "versions": versions(), "load_average": {"before": load_before, "after": os.getloadavg()},
        "wall_s": round(time.time() - started, 1), "settings": vars(args), "replica_threads": REPLICA_THREADS,
        "goals": GOALS, "rows": rows,
    }, indent=2))


def free_port_range(n: int) -> int:
    """The first of ``n`` consecutive ports free on loopback now (the direct modes' replica ports)."""
    for _ in range(100):
        first = free_port()
        if first + n < 65536 and all(port_free(first + i) for i in range(n)):
            return first
    raise RuntimeError(f"no {n} consecutive free ports found")


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    main()
