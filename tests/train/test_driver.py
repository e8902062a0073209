"""Ray Train end to end on a real local cluster: accuracy, checkpoints, resume, worker loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from visionray import checkpoint as ckpt
from visionray.runs import best_checkpoint, completed_epochs, run_dir
from visionray.train.driver import fit_with_progress
from visionray.cli import app
from visionray.data.sources import load_splits
from visionray.evaluate import evaluate_checkpoint
from visionray.specs import load_spec
from tests.helpers import REPO

QUICKSTART = REPO / "jobs" / "quickstart.yaml"
runner = CliRunner()

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, *overrides: str):
    return load_spec(QUICKSTART, [f"output.storage={tmp_path}", *overrides])


def _csv_column(spec, name: str) -> dict[int, float]:
    """epoch -> the value of one metrics.csv column."""
    lines = (Path(run_dir(spec)) / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index(name)
    return {int(row.split(",")[0]): float(row.split(",")[col]) for row in lines[1:]}


def _epochs_in_csv(spec) -> list[int]:
    lines = (Path(run_dir(spec)) / "metrics.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


def test_quickstart_reaches_95_percent_and_checkpoints_round_trip(quickstart_run):
    spec, reports, result = quickstart_run
    metrics = [r["metrics"] for r in reports if "metrics" in r]
    assert [m["epoch"] for m in metrics] == list(range(1, spec.optim.epochs + 1))
    assert all(len(r["workers"]) == 2 for r in reports if "metrics" in r)
    best = best_checkpoint(run_dir(spec))
    model, meta = ckpt.load_model(best)
    assert meta.metrics["val_acc"] >= 0.95
    assert meta.spec == spec.model_dump(mode="json", by_alias=True)  # the resolved spec travels along
    # checkpoint.keep: the best `keep` by val_acc stay, and the latest (Ray keeps it to resume from)
    kept = {int(p.name.rsplit("_", 1)[1]) for p in Path(run_dir(spec)).glob("checkpoint_epoch_*")}
    acc = _csv_column(spec, "val_acc")
    assert spec.optim.epochs in kept and len(kept) in (spec.checkpoint.keep, spec.checkpoint.keep + 1)
    ranked = kept - {spec.optim.epochs}
    assert all(acc[d] <= min(acc[k] for k in ranked) for d in set(acc) - kept), (kept, acc)
    assert max(acc.values()) == max(acc[k] for k in kept)
    # reloaded weights give the logits the evaluation reports, on the held-out split
    ev = evaluate_checkpoint(model, meta, "val")
    assert ev.top1 == pytest.approx(meta.metrics["val_acc"], abs=1e-6)
    assert result.checkpoint is not None
    assert _epochs_in_csv(spec) == list(range(1, spec.optim.epochs + 1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir(spec)) / "tensorboard"))
    events.Reload()
    for tag in ("val_acc", "train_loss"):  # one scalar per epoch, the values the CSV holds
        assert {e.step: pytest.approx(e.value) for e in events.Scalars(tag)} == _csv_column(spec, tag)


def test_same_name_resumes_from_latest_checkpoint(ray_cluster, tmp_path):
    first = _spec(tmp_path, "optim.epochs=2")
    fit_with_progress(first, lambda item: None)
    assert completed_epochs(first) == 2
    second = _spec(tmp_path, "optim.epochs=4")
    seen = []
    fit_with_progress(second, lambda item: seen.append(item["metrics"]["epoch"]) if "metrics" in item else None)
    assert seen == [3, 4]  # epochs 1-2 were not recomputed
    assert _epochs_in_csv(second) == [1, 2, 3, 4]
    assert completed_epochs(second) == 4


def test_killed_worker_recovers_and_completes_every_epoch(ray_cluster, tmp_path, kill_train_worker_after):
    # Synthetic data big enough that an epoch lasts a few seconds: the kill lands mid-run.
    spec = _spec(
        tmp_path, "output.name=killed", "optim.epochs=4", "data.source=synthetic", "data.num_samples=6000",
        "data.image_size=32", "data.channels=3", "data.val_fraction=0.1", "augment=[]", "model.width=32",
    )
    killed = kill_train_worker_after(Path(run_dir(spec)), "checkpoint_epoch_0001")
    items = []
    fit_with_progress(spec, items.append)
    assert killed, "no worker was killed"
    assert any("error" in item for item in items), "the controller never saw the worker die"
    epochs = [item["metrics"]["epoch"] for item in items if "metrics" in item]
    assert epochs[-1] == 4 and sorted(set(epochs)) == [1, 2, 3, 4]
    # at most the epoch in flight was recomputed (checkpoints every epoch)
    assert len(epochs) - 4 <= 1
    assert completed_epochs(spec) == 4


def test_cli_evaluate_then_train_again_of_the_finished_quickstart(quickstart_run, tmp_path):
    """`visionray evaluate` of the main job's run directory, then `visionray train` of the same job:
    a finished job trains nothing, says so and prints its summary. (The CLI's training path runs in
    test_relative_data_path_means_where_the_command_runs and the registry's train-and-register test.)"""
    spec = quickstart_run[0]
    run = Path(run_dir(spec))
    result = runner.invoke(app, ["evaluate", str(run), "--json", "--plot", str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["count"] == 270 and 0.95 <= report["top1"] <= 1.0
    assert sum(map(sum, report["confusion"])) == 270
    assert (tmp_path / "cm.png").stat().st_size > 1000
    before = sorted(p.name for p in run.glob("checkpoint_*"))
    again = runner.invoke(app, ["train", "--set", f"output.storage={spec.output.storage}"])
    assert again.exit_code == 0, again.output
    assert f"already finished {spec.optim.epochs}/{spec.optim.epochs}" in again.output
    assert "val accuracy" in again.output and "checkpoint" in again.output
    assert sorted(p.name for p in run.glob("checkpoint_*")) == before  # nothing trained


@pytest.mark.parametrize("args,word", [
    (["train", "--set", "optim.lr=-1"], "optim.lr"),
    (["train", "--set", "model.name=vgg"], "unknown model"),
    (["train", "--workers", "0"], "--workers"),
    (["evaluate", "/nonexistent/run"], "/nonexistent/run"),
    (["train", "--set", "data.source=imagefolder", "--set", "data.path=no/such.tar.gz"], "data.path: 'no/such.tar.gz' does not exist"),
])
def test_cli_bad_input_exits_2(args, word):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert word in result.output and "Traceback" not in result.output


def test_relative_data_path_means_where_the_command_runs(ray_cluster, tmp_path, monkeypatch):
    """Ray Train's workers run in directories of their own: `data.path: imgs` must still name
    ./imgs of the shell that ran `visionray train`, and the checkpoint records the absolute path."""
    from PIL import Image

    for c, name in enumerate(["dark", "light"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(20):
            Image.new("L", (12, 12), 30 + 150 * c + i).save(tmp_path / "imgs" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--set", "data.source=imagefolder", "--set", "data.path=imgs",
                                 "--set", "data.channels=1", "--set", "optim.epochs=1", "--set", "output.storage=runs",
                                 "--set", "output.name=relative"])
    assert result.exit_code == 0, result.output
    _, meta = ckpt.load_model(best_checkpoint(str(tmp_path / "runs" / "relative")))
    assert meta.spec["data"]["path"] == str(tmp_path / "imgs") and meta.classes == ["dark", "light"]


@pytest.mark.cifar
def test_cifar10_job_from_the_shared_tar_scores_unseen_images(ray_cluster, tmp_path, cifar_tar):
    spec = load_spec(REPO / "jobs" / "cifar10-small.yaml", [
        f"data.path={cifar_tar}", f"output.storage={tmp_path}", "optim.epochs=2", "data.limit=8000", "optim.lr=0.02",
    ])
    fit_with_progress(spec, lambda item: None)
    model, meta = ckpt.load_model(best_checkpoint(run_dir(spec)))
    ev = evaluate_checkpoint(model, meta, "val")
    assert ev.count == 5000 and ev.top1 > 0.15  # above chance (0.1 +- 0.004 on 5,000) after two short epochs
    held_out = load_splits(spec.data).val  # the seeded split training never drew from
    assert ev.confusion.sum(1).tolist() == torch.bincount(held_out.labels, minlength=10).tolist()


def test_streaming_imagefolder_through_ray_data(ray_cluster, tmp_path):
    """data.streaming: Ray Data reads and resizes the images, each worker iterates its own shard."""
    from PIL import Image

    root = tmp_path / "imgs"
    for c, name in enumerate(["dark", "light"]):
        (root / name).mkdir(parents=True)
        for i in range(40):
            Image.new("L", (20, 20), 30 + 150 * c + i).save(root / name / f"{i}.png")
    spec = load_spec(QUICKSTART, [
        f"output.storage={tmp_path}", "output.name=stream", "data.source=imagefolder", f"data.path={root}",
        "data.streaming=true", "data.channels=1", "data.val_fraction=0.25", "optim.epochs=3", "optim.batch_size=8",
        "optim.lr=0.64", "augment=[]",
    ])
    reports = []
    fit_with_progress(spec, reports.append)
    metrics = [r for r in reports if "metrics" in r]
    assert [r["metrics"]["epoch"] for r in metrics] == [1, 2, 3]
    last = metrics[-1]["metrics"]
    seen = last["images_per_s"] * last["epoch_s"]  # images trained on by both workers together
    assert 40 <= round(seen) <= 80  # the training split (about 60 of 80), not twice it
    assert last["val_acc"] > 0.8
    _, meta = ckpt.load_model(best_checkpoint(run_dir(spec)))
    assert meta.classes == ["dark", "light"] and meta.eval_preset.image_size == 16
