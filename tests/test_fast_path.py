"""The fast paths: batched device-resident pipeline, airbench's whitening, TTA, compile warm-up.
On CPU they must stay correct; their speed is measured in benchmarks/, not here."""

from __future__ import annotations

import pytest
import torch

from visionray.specs import EvalPreset, TrainSpec, load_spec
from visionray.train import Worker
from visionray.transforms import BatchFlipCrop, eval_transform, normalize_batch

PRESET = EvalPreset(image_size=12, channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])


def _images(n=6, size=12):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_batched_normalisation_is_the_eval_preset():
    x = _images()
    per_image = torch.stack([eval_transform(PRESET)(im) for im in x])
    assert torch.allclose(normalize_batch(PRESET, x), per_image, atol=1e-6)


def test_batched_crop_is_a_window_of_the_reflect_padded_image():
    x = normalize_batch(PRESET, _images())
    out = BatchFlipCrop(padding=2, flip=False, generator=torch.Generator().manual_seed(0))(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 12, dx:dx + 12] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_batched_flip_only_mirrors():
    x = normalize_batch(PRESET, _images(64))
    out = BatchFlipCrop(padding=0, flip=True, generator=torch.Generator().manual_seed(0))(x)
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54


def test_cifar10_fast_recipe_runs_correctly_on_cpu():
    """jobs/cifar10-fast.yaml's options (airbench, batched pipeline, whitening, label smoothing,
    flip TTA) on CPU with digits standing in for the archive: it learns."""
    spec = load_spec("jobs/cifar10-fast.yaml", [
        "data.source=digits", "data.path=null", "data.channels=3", "data.mean=null", "data.std=null",
        "model.width=8", "optim.epochs=3", "optim.batch_size=128", "scaling.gpu=false", "scaling.compile=false",
        "scaling.precision=fp32",
    ])
    worker = Worker(spec, 0, 1, torch.device("cpu"))
    assert worker.data.train.images.device.type == "cpu" and not worker.model.whiten.weight.requires_grad
    first = worker.model.whiten.weight.clone()
    metrics = [worker.run_epoch(e) for e in range(3)]
    assert torch.equal(first, worker.model.whiten.weight)  # whitening stays frozen
    assert metrics[-1]["val_acc"] > 0.5 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]


@pytest.mark.slow
def test_compile_warm_up_is_timed_apart_and_changes_no_weight():
    """Warm-up compiles every graph of an epoch (a short last batch, eval with flip TTA), so the
    first epoch compiles nothing more and its epoch_s measures steps only."""
    from torch._dynamo.utils import counters

    spec = TrainSpec.model_validate({
        "data": {"image_size": 8, "limit": 70}, "model": {"name": "convnet", "depth": 1, "width": 4},
        "optim": {"epochs": 1, "batch_size": 32}, "scaling": {"compile": True}, "evaluation": {"tta": "flip"},
    })
    plain = Worker(spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"compile": False})}), 0, 1, torch.device("cpu"))
    compiled = Worker(spec, 0, 1, torch.device("cpu"))
    assert len(compiled.data.train) % 32 and compiled.compile_s > 0  # the epoch ends on a short batch
    for a, b in zip(plain.model.state_dict().values(), compiled.model.state_dict().values()):
        assert torch.equal(a, b)
    graphs = counters["stats"]["unique_graphs"]
    metrics = compiled.run_epoch(0)
    assert counters["stats"]["unique_graphs"] == graphs, "the first epoch compiled a graph the warm-up missed"
    assert metrics["compile_s"] == compiled.compile_s and metrics["epoch_s"] > 0
