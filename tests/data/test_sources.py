"""Data sources, the seeded split and per-worker shards (including under a real 2-worker Ray Train run)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import time

import numpy as np
import pytest
import torch
from PIL import Image

from visionray import defaults
from visionray.data.folders import decode_files
from visionray.data.sources import load_splits
from visionray.data.splits import DataError, batch_chunks, limit_indices, shard_indices, split_indices, steps_per_epoch
from visionray.specs import DataSpec


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (1797, 3), (5, 5)])
def test_shards_are_disjoint_and_cover(n, world):
    for epoch in range(2):
        shards = [shard_indices(n, r, world, seed=0, epoch=epoch) for r in range(world)]
        joined = np.concatenate(shards)
        assert len(joined) == n and set(joined.tolist()) == set(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shards_reshuffle_per_epoch_and_repeat_per_seed():
    a = shard_indices(100, 0, 2, seed=1, epoch=0)
    assert not np.array_equal(a, shard_indices(100, 0, 2, seed=1, epoch=1))
    assert np.array_equal(a, shard_indices(100, 0, 2, seed=1, epoch=0))


@pytest.mark.parametrize("n,world,bs", [(11, 2, 2), (1527, 2, 32), (64, 2, 32), (3, 2, 8)])
def test_every_worker_runs_the_same_number_of_steps_and_nothing_is_dropped(n, world, bs):
    steps = steps_per_epoch(n, world, bs)
    seen = []
    for r in range(world):
        chunks = batch_chunks(shard_indices(n, r, world, 0, 0), steps, bs)
        assert len(chunks) == steps
        seen += [i for c in chunks for i in c.tolist()]
    assert sorted(seen) == list(range(n))


def test_split_is_deterministic_and_disjoint():
    tr, va = split_indices(1000, 0.2, seed=3)
    tr2, va2 = split_indices(1000, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 200 and not set(tr) & set(va) and len(tr) + len(va) == 1000
    assert not np.array_equal(va, split_indices(1000, 0.2, seed=4)[1])


def test_digits_default_source():
    splits = load_splits(DataSpec(image_size=16))
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (1, 16, 16)
    assert len(splits.train) + len(splits.val) == 1797 and splits.classes == [str(i) for i in range(10)]


def test_synthetic_any_shape():
    splits = load_splits(DataSpec(source="synthetic", image_size=224, channels=3, num_classes=7, num_samples=64))
    assert splits.train.images.shape[1:] == (3, 224, 224) and int(splits.train.labels.max()) < 7


def test_torchvision_source_without_files_or_network_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.download"):
        load_splits(DataSpec(source="cifar10", root=str(tmp_path)))


def _write_folder(root: Path, classes=("cat", "dog"), per_class=6, size=(20, 12)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * c + i, 100, 200 - i)).save(root / name / f"{i}.png")


def test_imagefolder_directory_and_tar(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "CACHE_DIR", tmp_path / "cache")
    _write_folder(tmp_path / "imgs" / "wrapper")
    spec = DataSpec(source="imagefolder", path=str(tmp_path / "imgs"), image_size=16, val_fraction=0.25)
    from_dir = load_splits(spec)
    assert from_dir.classes == ["cat", "dog"] and from_dir.train.images.shape[1:] == (3, 16, 16)
    assert len(from_dir.train) + len(from_dir.val) == 12
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "imgs" / "wrapper", arcname="wrapper")
    from_tar = load_splits(spec.model_copy(update={"path": str(archive)}))
    assert torch.equal(from_tar.train.images, from_dir.train.images)
    assert torch.equal(from_tar.val.labels, from_dir.val.labels)


def test_the_decoded_image_cache_sees_an_edited_file(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "CACHE_DIR", tmp_path / "cache")
    (tmp_path / "a").mkdir()
    files = [tmp_path / "a" / f"{i}.bmp" for i in range(2)]  # uncompressed: an edit keeps the byte size
    for i, f in enumerate(files):
        Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(f)
    first = decode_files(files, np.zeros(2, dtype=np.int64), 3, 8)[0].images
    size = files[0].stat().st_size
    time.sleep(0.01)
    Image.new("RGB", (8, 8), (255, 255, 255)).save(files[0])  # same path, same size, new pixels
    assert files[0].stat().st_size == size
    again = decode_files(files, np.zeros(2, dtype=np.int64), 3, 8)[0].images
    assert not torch.equal(first[0], again[0]) and int(again[0].min()) == 255
    assert torch.equal(first[1], again[1])


def test_limit_keeps_a_seeded_sample_of_every_class_not_the_head_of_the_list(tmp_path):
    """Folders are listed class by class: ``data.limit`` must not keep only the first classes."""
    classes = tuple(f"c{i}" for i in range(5))
    _write_folder(tmp_path / "imgs", classes=classes, per_class=20, size=(8, 8))
    spec = DataSpec(source="imagefolder", path=str(tmp_path / "imgs"), image_size=8, val_fraction=0.2, limit=30)
    splits = load_splits(spec)
    full = load_splits(spec.model_copy(update={"limit": None}))
    assert len(splits.train) == 30 and set(splits.train.labels.tolist()) == set(range(5))
    assert torch.equal(splits.val.labels, full.val.labels)  # the held-out images do not move
    assert torch.equal(load_splits(spec).train.images, splits.train.images)  # same seed, same sample
    kept = {bytes(im.numpy()) for im in splits.train.images}
    assert kept <= {bytes(im.numpy()) for im in full.train.images}  # a subset of the training split
    other = load_splits(spec.model_copy(update={"split_seed": 1}))
    assert not torch.equal(other.train.labels, splits.train.labels) or not torch.equal(other.train.images, splits.train.images)


@pytest.mark.parametrize("n,limit", [(100, 10), (7, 7), (7, 20), (5, None)])
def test_limit_indices_are_sorted_distinct_and_bounded(n, limit):
    idx = limit_indices(n, limit, seed=0)
    assert len(idx) == min(n, limit or n) and len(set(idx.tolist())) == len(idx)
    assert np.all(np.diff(idx) > 0) and (len(idx) == 0 or (idx.min() >= 0 and idx.max() < n))


@pytest.mark.parametrize("member, kind, refused", [
    ("../escaped.txt", tarfile.REGTYPE, True),  # would land next to the extraction directory (cache/extracted/)
    ("../../escaped.txt", tarfile.REGTYPE, True),  # in cache/
    ("../../../escaped.txt", tarfile.REGTYPE, True),  # beside cache/
    ("/tmp/escaped-{tmp}.txt", tarfile.REGTYPE, False),  # absolute: made relative, stays inside
    ("link", tarfile.SYMTYPE, True),  # a link out of the tree, then a file through it
])
def test_imagefolder_refuses_archive_members_escaping_the_cache(tmp_path, monkeypatch, member, kind, refused):
    monkeypatch.setattr(defaults, "CACHE_DIR", tmp_path / "work" / "cache")
    archive = tmp_path / "evil.tar"
    outside = tmp_path / "outside"
    outside.mkdir()
    member = member.format(tmp=f"{tmp_path.parent.parent.name}-{tmp_path.name}")  # unique per run
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(member)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = str(outside)
            tar.addfile(info)
            info = tarfile.TarInfo("link/escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match="not a readable tar archive" if refused else "at least 2"):
        load_splits(DataSpec(source="imagefolder", path=str(archive)))
    extracted = defaults.CACHE_DIR / "extracted"
    landed = [p for p in tmp_path.rglob("escaped*") if p.is_file() and extracted not in p.parents]
    assert landed == [] and not list(Path("/tmp").glob(f"escaped-{tmp_path.parent.parent.name}-{tmp_path.name}.txt"))
    if refused:  # nothing of a refused archive stays in the cache
        assert not extracted.exists() or not any(p.name.startswith("evil") for p in extracted.iterdir())


@pytest.mark.parametrize("make,word", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "not an archive"),
    (lambda p: (p.mkdir(), (p / "only").mkdir()), "at least 2"),
])
def test_imagefolder_errors(tmp_path, make, word):
    path = tmp_path / "data"
    make(path)
    with pytest.raises(DataError, match=word):
        load_splits(DataSpec(source="imagefolder", path=str(path)))


@pytest.mark.cifar
def test_cifar10_tar_as_imagefolder(cifar_tar):
    splits = load_splits(DataSpec(source="imagefolder", path=str(cifar_tar), val_fraction=0.1))
    assert splits.classes[:3] == ["airplane", "automobile", "bird"] and len(splits.classes) == 10
    assert len(splits.train) == 45_000 and len(splits.val) == 5_000
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(splits.val.labels, minlength=10).min() > 400
