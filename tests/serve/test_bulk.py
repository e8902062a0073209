"""Bulk scoring (``visionray predict --batch``) on the real session cluster: a folder with a hostile
file, a resumed run, a pack manifest, and agreement with ``visionray evaluate`` on the same files."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from visionray.cli.app import app
from visionray.serve.bulk import BulkJob, actor_count, folder_accuracy, list_inputs, read_done, score
from visionray.serve.predictor import resolve_registry_model

runner = CliRunner()


def _png_bomb() -> bytes:
    """A valid-looking PNG whose header declares 60000x60000 pixels (over every sanitizer limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """120 scikit-learn digits as PNG files in class folders (the quickstart model's classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits") / "images"
    for i in range(120):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def source(digits_registry, keys):
    return resolve_registry_model("digits@best", str(digits_registry), (str(keys[1]),))


def _hostile_copy(digit_folder: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(digit_folder, src)
    (src / "3" / "bomb.png").write_bytes(_png_bomb())
    (src / "README.txt").write_text("not an image")
    return src


def test_folder_with_a_hostile_file_scores_the_rest_as_evaluate_does(ray_cluster, digit_folder, source, digits_registry,
                                                                      keys, tmp_path):
    from visionray.evaluate import evaluate_checkpoint
    from visionray.registry.registry import Registry

    src = _hostile_copy(digit_folder, tmp_path)
    out = str(tmp_path / "out.parquet")
    result = score(list_inputs(str(src)), source, BulkJob(batch_size=16, concurrency=2, num_cpus=0.5), out)
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 121 and result.scored == 121 and result.rejected == 1 and result.ignored == 1
    bomb = rows["3/bomb.png"]
    assert bomb["status"] == "rejected" and bomb["reason"].startswith("image_too_large") and bomb["labels"] == []
    ok = [r for p, r in rows.items() if p != "3/bomb.png"]
    assert all(r["status"] == "ok" and len(r["labels"]) == 5 and r["model"] == "digits" and r["version"] == 1 for r in ok)
    assert all(abs(sum(r["probabilities"]) - 1) < 0.05 and r["probabilities"] == sorted(r["probabilities"], reverse=True) for r in ok)
    assert not Path(out + ".parts").exists()
    # the 120 valid files score as `visionray evaluate` scores them (the bomb is rejected, not counted)
    accuracy = folder_accuracy(read_done(out), source.classes)
    model, meta = Registry(str(digits_registry)).load(source.ref, [str(keys[1])])
    ev = evaluate_checkpoint(model, meta, str(digit_folder))
    assert accuracy["count"] == ev.count == 120
    # the same number of correct images (evaluate's top-1 is a float32 mean: compare within half an image)
    assert accuracy["top1"] == pytest.approx(ev.top1, abs=0.5 / ev.count)
    assert accuracy["top1"] > 0.8  # the quickstart model is good on digits: the rows are real predictions


def test_a_resumed_run_scores_only_what_has_no_row(ray_cluster, digit_folder, source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(digit_folder, src)
    held_back = sorted(src.glob("*/*.png"))[:7]
    for p in held_back:
        p.rename(p.with_suffix(".later"))
    out = str(tmp_path / "out.parquet")
    first = score(list_inputs(str(src)), source, BulkJob(concurrency=1), out)
    before = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    # an interrupted run's part: rows kept and not rescored
    for p in held_back[:2]:
        p.with_suffix(".later").rename(p)
    parts = Path(out + ".parts")
    parts.mkdir()
    fake = read_done(out).slice(0, 0).to_pylist() + [
        {"path": str(p.relative_to(src)), "status": "ok", "reason": None, "labels": ["x"], "probabilities": [1.0],
         "model": "from-the-interrupted-run", "version": 1} for p in held_back[:2]]
    import pyarrow as pa

    from visionray.serve.bulk import row_schema

    pq.write_table(pa.Table.from_pylist(fake, schema=row_schema()), parts / "part-0.parquet")
    for p in held_back[2:]:
        p.with_suffix(".later").rename(p)
    second = score(list_inputs(str(src)), source, BulkJob(concurrency=1), out)
    after = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert first.scored == 113 and second.scored == 5 and second.skipped == 115
    assert len(after) == 120 and all(after[p] == r for p, r in before.items())
    assert {after[str(p.relative_to(src))]["model"] for p in held_back[:2]} == {"from-the-interrupted-run"}
    third = score(list_inputs(str(src)), source, BulkJob(concurrency=1), out)
    assert third.scored == 0 and third.actors == 0 and pq.read_table(out).num_rows == 120


def test_a_pack_manifest_is_scored_from_its_verified_shards(ray_cluster, digit_folder, source, tmp_path):
    from visionray.data.pack import pack

    pack(str(digit_folder), str(tmp_path / "pack"), shard_rows=50, val_fraction=0.2, seed=0)
    out = str(tmp_path / "out.parquet")
    result = score(list_inputs(str(tmp_path / "pack" / "manifest.json")), source, BulkJob(concurrency=1), out)
    rows = pq.read_table(out).to_pylist()
    assert result.scored == len(rows) == 120 and {r["status"] for r in rows} == {"ok"}
    assert len({r["path"] for r in rows}) == 120


def test_cli_batch_prints_its_summary_and_refuses_bad_options(ray_cluster, digit_folder, digits_registry, keys, tmp_path):
    out = tmp_path / "cli.parquet"
    base = ["predict", "--batch", str(digit_folder), "--registry", str(digits_registry), "-k", str(keys[1])]
    res = runner.invoke(app, [*base, "--output", str(out), "--model", "digits@best", "--json", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["scored"] == 120 and summary["folder_accuracy"]["count"] == 120
    assert 1 <= summary["actors"] <= ray_cluster.cluster_resources()["CPU"]  # default: as many 1-CPU actors as fit
    assert {len(r["labels"]) for r in pq.read_table(out).to_pylist()} == {2}
    res = runner.invoke(app, [*base, "--output", str(out)])
    assert res.exit_code == 2 and "--model" in res.output
    res = runner.invoke(app, [*base, "--output", str(out), "--model", "digits@nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["predict", "--batch", str(tmp_path / "missing"), "--output", str(out), "--model", "digits@best",
                              "--registry", str(digits_registry), "-k", str(keys[1])])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())


def test_the_default_pool_is_as_many_actors_as_the_free_resources_hold(ray_cluster):
    free = ray_cluster.available_resources()
    assert actor_count(BulkJob(num_cpus=0.5)) == max(1, int(free["CPU"] / 0.5))
    assert actor_count(BulkJob(num_cpus=1, concurrency=7)) == 7
    assert actor_count(BulkJob(num_cpus=free["CPU"] * 4)) == 1  # a bigger actor than fits still gets one (it waits)


@pytest.mark.parametrize("options, message", [
    ({"num_cpus": 0}, "concurrency: give a number of actors"),
    ({"concurrency": 0}, "concurrency"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_bulk_options_name_the_field(options, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        BulkJob(**options)
