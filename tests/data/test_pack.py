"""Packed shards: `visionray data pack`, the manifest, checksums, resuming, and bad images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import REPO
from visionray import defaults
from visionray.cli import app
from visionray.data.images import BadImagesError
from visionray.data.manifest import MANIFEST_FILE, ShardError, read_manifest
from visionray.data.pack import JOURNAL_DIR, pack
from visionray.data.sources import load_splits
from visionray.specs import DataSpec

runner = CliRunner()


def write_ids(root: Path, n: int, classes=("a", "b", "c")) -> None:
    """PNGs whose pixels encode their number (8x8 grey: lossless, no resize at image_size 8)."""
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        a = np.full((8, 8), i % 251, np.uint8)
        a[0, 0], a[0, 1] = i // 256, i % 256
        Image.fromarray(a, "L").save(d / f"{i:05d}.png")


def image_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def truncated_jpeg(path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])


def noise_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")


def test_pack_splits_checksums_counts_bad_files_and_a_second_run_changes_nothing(tmp_path):
    write_ids(tmp_path / "src", 300)
    truncated_jpeg(tmp_path / "src" / "a" / "broken.jpg")
    result = pack(str(tmp_path / "src"), str(tmp_path / "pack"), shard_mib=0.005, val_fraction=0.2, seed=3)
    m = result.manifest
    assert [b.name for b in m.bad_files] == ["a/broken.jpg"] and "broken.jpg" not in json.dumps(
        [s.name for s in m.train.shards])
    assert m.train.count + m.val.count == 300 and len(m.train.shards) > 2
    assert sum(m.train.per_class) == m.train.count and m.classes == ["a", "b", "c"]
    names = []
    for split in (m.train, m.val):
        assert sum(s.rows for s in split.shards) == split.count
        for s in split.shards:
            table = pq.read_table(tmp_path / "pack" / s.name)
            assert table.num_rows == s.rows and (tmp_path / "pack" / s.name).stat().st_size == s.bytes
            names += table.column("name").to_pylist()
    assert len(names) == len(set(names)) == 300  # every image once, the bad one nowhere
    assert m.images.min_width == m.images.max_width == 8 and m.images.modes == {"L": 300}
    # the split made at pack time is the in-memory path's: same seed and fraction, same held-out images
    in_memory = load_splits(DataSpec(source="imagefolder", path=str(tmp_path / "src"), image_size=8, channels=1,
                                     val_fraction=0.2, split_seed=3, on_bad_file="skip"))
    packed = load_splits(DataSpec(source="shards", path=str(tmp_path / "pack" / MANIFEST_FILE), image_size=8,
                                  channels=1, streaming=False))
    assert sorted(image_ids(packed.val.images)) != [] and len(packed.val) == m.val.count
    # the bad file shifts nothing: the in-memory split of the same files holds the same val images
    assert abs(len(in_memory.val) - len(packed.val)) <= 1
    manifest = tmp_path / "pack" / MANIFEST_FILE
    before = (manifest.stat().st_mtime_ns, {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pack").iterdir()})
    again = pack(str(tmp_path / "src"), str(tmp_path / "pack"), shard_mib=0.005, val_fraction=0.2, seed=3)
    assert again.written == [] and not again.manifest_changed and again.manifest == m
    assert (manifest.stat().st_mtime_ns, {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pack").iterdir()}) == before
    with pytest.raises(ShardError, match="other images or arguments"):
        pack(str(tmp_path / "src"), str(tmp_path / "pack"), shard_mib=0.005, val_fraction=0.3, seed=3)


def test_pack_split_equals_the_in_memory_split_of_the_same_folder(tmp_path):
    write_ids(tmp_path / "src", 200)
    pack(str(tmp_path / "src"), str(tmp_path / "pack"), shard_mib=0.01, val_fraction=0.25, seed=7)
    common = {"image_size": 8, "channels": 1, "val_fraction": 0.25, "split_seed": 7}
    in_memory = load_splits(DataSpec(source="imagefolder", path=str(tmp_path / "src"), **common))
    packed = load_splits(DataSpec(source="shards", path=str(tmp_path / "pack"), streaming=False, **common))
    assert sorted(image_ids(packed.val.images)) == sorted(image_ids(in_memory.val.images))
    assert sorted(image_ids(packed.train.images)) == sorted(image_ids(in_memory.train.images))
    assert packed.classes == in_memory.classes


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "swap"])
def test_a_shard_that_does_not_match_its_checksum_is_refused_by_name(tmp_path, damage):
    write_ids(tmp_path / "src", 120)
    m = pack(str(tmp_path / "src"), str(tmp_path / "pack"), shard_mib=0.003).manifest
    victim = tmp_path / "pack" / m.train.shards[1].name
    data = bytearray(victim.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[:-10]
    else:  # another valid shard put in its place
        data = bytearray((tmp_path / "pack" / m.train.shards[0].name).read_bytes())
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=m.train.shards[1].name):
        load_splits(DataSpec(source="shards", path=str(tmp_path / "pack"), image_size=8, channels=1, streaming=False))


def test_an_interrupted_pack_resumes_without_duplicating_rows(tmp_path):
    """A real `visionray data pack` process, SIGKILLed mid-run, then run again."""
    noise_folder(tmp_path / "src", 1500)
    cmd = [sys.executable, "-m", "visionray.cli", "data", "pack", str(tmp_path / "src"), str(tmp_path / "pack"),
           "--shard-mib", "0.02", "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = tmp_path / "pack" / JOURNAL_DIR
    deadline = time.time() + 120
    while time.time() < deadline and len(list(journal.glob("*.json"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = {p.name.removesuffix(".json") for p in journal.glob("*.json")}
    assert done_before and not (tmp_path / "pack" / MANIFEST_FILE).exists(), "the pack finished before it was killed"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert done_before <= set(summary["kept"]) and not set(summary["written"]) & set(summary["kept"])
    m = read_manifest(str(tmp_path / "pack" / MANIFEST_FILE))
    names = [n for s in m.train.shards + m.val.shards for n in pq.read_table(tmp_path / "pack" / s.name).column("name").to_pylist()]
    assert len(names) == len(set(names)) == m.train.count + m.val.count == 1500
    leftovers = [p.name for p in (tmp_path / "pack").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] or all(n.split(".parquet")[0] + ".parquet" not in done_before for n in leftovers)


def test_cli_pack_bad_input_exits_2(tmp_path):
    result = runner.invoke(app, ["data", "pack", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--set", "data.source=shards"])
    assert result.exit_code == 2 and "data.path" in result.output


# --------------------------------------------------------------------------- bad files in folders


@pytest.fixture
def folder_with_a_bad_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(defaults, "CACHE_DIR", tmp_path / "cache")
    write_ids(tmp_path / "imgs", 60, classes=("0", "1"))
    truncated_jpeg(tmp_path / "imgs" / "1" / "cut.jpg")
    return tmp_path / "imgs"


def test_a_truncated_file_fails_naming_it_or_is_skipped_and_counted(folder_with_a_bad_file):
    spec = DataSpec(source="imagefolder", path=str(folder_with_a_bad_file), image_size=8, channels=1)
    with pytest.raises(BadImagesError, match="cut.jpg") as info:
        load_splits(spec)
    assert "on_bad_file" in str(info.value)
    splits = load_splits(spec.model_copy(update={"on_bad_file": "skip"}))
    assert splits.skipped == (str(folder_with_a_bad_file / "1" / "cut.jpg"),)
    assert len(splits.train) + len(splits.val) == 60


def test_cli_evaluate_of_a_folder_with_a_bad_file_exits_2_naming_it(folder_with_a_bad_file):
    from tests.helpers import make_checkpoint

    ckpt, _ = make_checkpoint(folder_with_a_bad_file.parent / "ckpt", classes=["0", "1"], size=8, channels=1)
    result = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(folder_with_a_bad_file)])
    assert result.exit_code == 2, result.output
    assert "cut.jpg" in result.output and "Traceback" not in result.output


def test_an_unknown_class_folder_is_reported_before_any_image_is_decoded(folder_with_a_bad_file):
    from tests.helpers import make_checkpoint

    (folder_with_a_bad_file / "zebra").mkdir()
    truncated_jpeg(folder_with_a_bad_file / "zebra" / "z.jpg")
    ckpt, _ = make_checkpoint(folder_with_a_bad_file.parent / "ckpt", classes=["0", "1"], size=8, channels=1)
    result = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(folder_with_a_bad_file)])
    assert result.exit_code == 2 and "zebra" in result.output
    assert "cut.jpg" not in result.output  # the structure was checked first: nothing was decoded


# --------------------------------------------------------------------------- streaming shards through Ray


def _shard_probe(config):
    """A real Ray Train worker reporting, per epoch, the training indices the in-memory path gives
    it and the image ids it streams from a pack."""
    import ray.train

    from visionray.data.splits import shard_indices
    from visionray.data.streaming import iter_stream

    ctx = ray.train.get_context()
    n = len(load_splits(DataSpec()).train)
    preset = config["preset"]
    std, mean = preset.std[0], preset.mean[0]
    for epoch in range(2):
        seen = []
        for x, _ in iter_stream(ray.train.get_dataset_shard("train"), 16, preset, (), shuffle_seed=epoch):
            u = ((x * std + mean) * 255).round().long()  # back to the stored bytes (no resize at size 8)
            seen += (u[:, 0, 0, 0] * 256 + u[:, 0, 0, 1]).tolist()
        idx = shard_indices(n, ctx.get_world_rank(), ctx.get_world_size(), seed=0, epoch=epoch)
        ray.train.report({"rank": ctx.get_world_rank(), "epoch": epoch, "n": n, "indices": idx.tolist(), "ids": seen})


def test_two_ray_train_workers_see_disjoint_parts_that_cover_the_set_in_memory_and_streamed(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from visionray.data.streaming import streaming_datasets
    from visionray.specs import TrainSpec

    write_ids(tmp_path / "src", 400)
    m = pack(str(tmp_path / "src"), str(tmp_path / "pack"), shard_mib=0.004, val_fraction=0.1).manifest
    assert len(m.train.shards) >= 4
    spec = DataSpec(source="shards", path=str(tmp_path / "pack" / MANIFEST_FILE), image_size=8, channels=1)
    preset = TrainSpec(data=spec).eval_preset(1)
    datasets, info = streaming_datasets(spec, preset, 2, 16)
    assert info.classes == m.classes
    queue = Queue()

    class Forward(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put(metrics)

    TorchTrainer(_shard_probe, train_loop_config={"preset": preset}, scaling_config=ScalingConfig(num_workers=2),
                 datasets=datasets, run_config=RunConfig(name="probe", storage_path=str(tmp_path / "runs"),
                                                         callbacks=[Forward()])).fit()
    train_ids = sorted(image_ids(load_splits(spec.model_copy(update={"streaming": False})).train.images))
    for epoch in range(2):
        metrics = queue.get(timeout=30)
        assert sorted(r["rank"] for r in metrics) == [0, 1] and {r["epoch"] for r in metrics} == {epoch}
        a, b = (set(r["indices"]) for r in metrics)  # in memory: shard_indices
        assert a and b and not a & b and a | b == set(range(metrics[0]["n"]))
        a, b = (r["ids"] for r in metrics)  # streamed: Ray Data's split of the pack
        assert a and b and not set(a) & set(b)
        assert sorted(a + b) == train_ids  # every training image once per epoch, no val image


def test_a_pack_of_digits_holds_the_in_memory_split_exactly():
    """``visionray data pack digits``: the source's arrays in their own order, so the pack's split is
    the in-memory source's, image for image (after the same resize)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pack("digits", tmp, val_fraction=0.15, seed=0)
        packed = load_splits(DataSpec(source="shards", path=tmp, image_size=16, val_fraction=0.15, streaming=False))
    memory = load_splits(DataSpec(source="digits", image_size=16, val_fraction=0.15))
    for a, b in ((packed.val, memory.val), (packed.train, memory.train)):
        key = lambda arrays: sorted(zip(arrays.images.flatten(1).tolist(), arrays.labels.tolist()))  # noqa: E731
        assert key(a) == key(b)


def test_training_on_a_pack_matches_training_in_memory_on_the_same_split(quickstart_run, tmp_path):
    """The README's main job streamed from a pack of its own data: the same validation accuracy
    (within 1 point) as the session's in-memory run of it, for the same epochs."""
    from visionray.specs import load_spec
    from visionray.train.driver import fit_with_progress

    memory_spec, memory_reports, _ = quickstart_run
    pack("digits", str(tmp_path / "pack"), shard_mib=0.02, val_fraction=memory_spec.data.val_fraction,
         seed=memory_spec.data.split_seed)
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [
        f"output.storage={tmp_path / 'runs'}", "data.source=shards", f"data.path={tmp_path / 'pack' / MANIFEST_FILE}"])
    assert spec.data.streaming and spec.optim.epochs == memory_spec.optim.epochs
    reports: list[dict] = []
    fit_with_progress(spec, reports.append)
    streamed = [r["metrics"] for r in reports if "metrics" in r]
    memory = [r["metrics"] for r in memory_reports if "metrics" in r]
    assert [m["epoch"] for m in streamed] == list(range(1, spec.optim.epochs + 1))
    assert abs(streamed[-1]["val_acc"] - memory[-1]["val_acc"]) <= 0.01, (streamed[-1], memory[-1])


def test_a_bad_image_error_from_a_ray_worker_still_names_the_file_and_exits_2():
    """Ray returns a worker's exception by pickling it; the CLI finds the DataError inside Ray
    Train's WorkerGroupError and exits 2 with its message."""
    import pickle

    from ray.train import WorkerGroupError

    from visionray.cli.train import data_error_in
    from visionray.data.images import BadImage

    err = BadImagesError([BadImage("a/cut.jpg", "OSError: Truncated File Read")], 10)
    back = pickle.loads(pickle.dumps(err))  # what Ray's transport does (our own exception, our own bytes)
    assert isinstance(back, BadImagesError) and str(back) == str(err) and "a/cut.jpg" in str(back)
    wrapped = WorkerGroupError("worker 0 failed", {0: back})
    assert data_error_in(wrapped) is back
    try:
        raise RuntimeError("streaming failed") from ShardError("shard train-00003.parquet: refused")
    except RuntimeError as chained:
        assert "train-00003.parquet" in str(data_error_in(chained))
    assert data_error_in(WorkerGroupError("worker 0 failed", {0: ValueError("not data")})) is None


def test_skipped_images_are_counted_in_the_metrics_and_named_in_the_checkpoint(folder_with_a_bad_file, tmp_path):
    from visionray.checkpoint import read_metadata
    from visionray.specs import load_spec
    from visionray.train.worker import Worker

    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [
        "data.source=imagefolder", f"data.path={folder_with_a_bad_file}", "data.channels=1", "data.image_size=8",
        "data.on_bad_file=skip", "scaling.workers=1", "optim.epochs=1"])
    worker = Worker(spec, 0, 1, torch.device("cpu"))
    metrics = worker.run_epoch(0)
    assert metrics["skipped_images"] == 1
    worker.save(tmp_path / "ckpt", metrics, 1)
    meta = read_metadata(tmp_path / "ckpt")
    assert meta.skipped_images == [str(folder_with_a_bad_file / "1" / "cut.jpg")]


def test_a_pack_in_an_object_store_is_written_and_read_through_the_storage_layer():
    """fsspec's in-memory filesystem stands in for S3/GCS: writes are single PUTs, no rename."""
    import uuid

    import fsspec

    dest = f"memory://packs/{uuid.uuid4().hex}"
    m = pack("digits", dest, shard_mib=0.01, val_fraction=0.15).manifest
    assert read_manifest(f"{dest}/{MANIFEST_FILE}") == m and len(m.train.shards) > 1
    fs = fsspec.filesystem("memory")
    assert not [p for p in fs.find(dest.removeprefix("memory://")) if p.endswith(".tmp")]
    packed = load_splits(DataSpec(source="shards", path=f"{dest}/{MANIFEST_FILE}", image_size=16, streaming=False))
    assert len(packed.train) == m.train.count and packed.classes == [str(i) for i in range(10)]
    again = pack("digits", dest, shard_mib=0.01, val_fraction=0.15)
    assert again.written == [] and not again.manifest_changed
