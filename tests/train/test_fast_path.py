"""The fast paths: batched device-resident pipeline, airbench's whitening, TTA, compile warm-up.
On CPU they must stay correct; their speed is measured in benchmarks/, not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visionray.models import tta_logits
from visionray.specs import EvalPreset, TrainSpec, load_spec
from visionray.train.worker import Worker
from visionray.transforms import BatchFlipCrop, eval_transform, normalize_batch
from tests.helpers import make_checkpoint

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


def test_alternating_flips_mirror_each_image_every_other_epoch():
    """airbench94's alternating flip: a seeded coin per image of the split, flipped in odd epochs;
    the same coins on every worker (indices are the split's), whatever the worker's generator."""
    from visionray.ops import FlipCropOp
    from visionray.transforms import batch_augment

    x = normalize_batch(PRESET, _images(40))
    index = torch.arange(100, 140)
    op = FlipCropOp(padding=0, flip="alternate")
    rank0 = batch_augment([op], torch.Generator().manual_seed(0), num_images=200, seed=7)
    rank1 = batch_augment([op], torch.Generator().manual_seed(1), num_images=200, seed=7)

    def mirrored(out):
        assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(out, x))
        return torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])

    e0, e1, e2 = (mirrored(rank0(x, index, e)) for e in range(3))
    assert torch.equal(e1, ~e0) and torch.equal(e2, e0) and 5 < e0.sum() < 35
    assert torch.equal(mirrored(rank1(x, index, 0)), e0)
    assert not torch.equal(mirrored(rank0(x, torch.arange(40), 0)), e0)  # another image, another coin


def test_onecycle_shape_is_airbench94s_triangle():
    from visionray.specs import OptimSpec
    from visionray.train.optim import lr_factor

    default = lr_factor(OptimSpec(epochs=4), steps_per_epoch=25)  # 100 steps: 0 -> 1 at step 25 -> 0
    assert [default(s) for s in (0, 25, 100)] == [0.0, 1.0, 0.0] and default(50) == pytest.approx(2 / 3)
    tri = lr_factor(OptimSpec(epochs=4, onecycle={"start": 0.2, "peak_at": 0.23, "end": 0.07}), steps_per_epoch=25)
    assert tri(0) == pytest.approx(0.2) and tri(23) == pytest.approx(1.0) and tri(100) == pytest.approx(0.07)
    assert tri(10) == pytest.approx(0.2 + 0.8 * 10 / 23) and tri(60) == pytest.approx(1 - 0.93 * 37 / 77)


def test_whitening_bias_trains_only_its_epochs():
    spec = load_spec("jobs/cifar10-fast.yaml", [
        "data.source=digits", "data.path=null", "data.channels=3", "data.mean=null", "data.std=null",
        "model.width=8", "model.whiten_bias_epochs=1", "optim.lookahead=null", "optim.epochs=3", "optim.batch_size=256",
        "scaling.gpu=false", "scaling.compile=false", "scaling.precision=fp32",
    ])
    worker = Worker(spec, 0, 1, torch.device("cpu"))
    bias = worker.model.whiten.bias
    start = bias.detach().clone()
    worker.run_epoch(0)
    after_first = bias.detach().clone()
    worker.run_epoch(1)
    assert not torch.equal(start, after_first) and torch.equal(after_first, bias)
    group = next(g for g in worker.optimizer.param_groups if "train_epochs" in g)
    assert group["params"] == [bias] and group["lr"] == 0.0 and worker.optimizer.param_groups[0]["lr"] > 0


def test_cifar10_fast_recipe_runs_correctly_on_cpu():
    """jobs/cifar10-fast.yaml's options (airbench, batched pipeline, whitening, label smoothing,
    flip TTA) on CPU with digits standing in for the archive: it learns."""
    spec = load_spec("jobs/cifar10-fast.yaml", [
        "data.source=digits", "data.path=null", "data.channels=3", "data.mean=null", "data.std=null",
        "model.width=8", "optim.epochs=3", "optim.batch_size=128", "scaling.gpu=false", "scaling.compile=false",
        "scaling.precision=fp32",
    ])
    worker = Worker(spec, 0, 1, torch.device("cpu"))
    assert worker.data.splits.train.images.device.type == "cpu" and not worker.model.whiten.weight.requires_grad
    first = worker.model.whiten.weight.clone()
    metrics = [worker.run_epoch(e) for e in range(3)]
    assert torch.equal(first, worker.model.whiten.weight)  # whitening stays frozen
    assert metrics[-1]["val_acc"] > 0.5 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]


class _PixelLinear(torch.nn.Module):
    """Logits that are a fixed linear function of the pixels: TTA views give different logits."""

    def __init__(self, pixels: int):
        super().__init__()
        self.fc = torch.nn.Linear(pixels, 4)
        torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_tta_views_are_averaged_as_airbench_does():
    x = normalize_batch(PRESET, _images())
    model = _PixelLinear(3 * 12 * 12)
    mirrored = lambda v: (model(v) + model(v.flip(-1))) / 2  # noqa: E731
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = 0.5 * mirrored(x) + 0.25 * (mirrored(padded[..., :12, :12]) + mirrored(padded[..., 2:, 2:]))
    with torch.no_grad():
        assert torch.equal(tta_logits(model, x, "none"), model(x))
        assert torch.allclose(tta_logits(model, x, "flip"), mirrored(x))
        assert torch.allclose(tta_logits(model, x, "flip_translate"), expected)
        assert not torch.allclose(tta_logits(model, x, "flip_translate"), mirrored(x))
    with pytest.raises(ValueError, match="flip_translate"):
        tta_logits(model, x, "flop")
    from typing import get_args

    from visionray.models import TTA_MODES
    from visionray.specs import EvaluationSpec
    assert get_args(EvaluationSpec.model_fields["tta"].annotation) == TTA_MODES  # the spec offers what exists


def test_serving_applies_the_checkpoints_tta_like_evaluate(tmp_path):
    """A checkpoint evaluated with TTA is served with the same views: same probabilities."""
    import numpy as np

    from visionray.checkpoint import CheckpointError, load_model
    from visionray.evaluate import predict_logits
    from visionray.serve.predictor import Predictor

    make_checkpoint(tmp_path / "c", preset=PRESET, tta="flip_translate", classes=[f"c{i}" for i in range(10)], metrics={})
    model, meta = load_model(tmp_path / "c")
    images = _images(5)
    expected = predict_logits(model, meta, images).softmax(1)
    predictor = Predictor(model, meta, "tta", None, torch.device("cpu"))
    served = predictor.predict([np.asarray(im) for im in images], 10)
    assert predictor.info()["tta"] == "flip_translate"
    for row, labels in zip(expected, served):
        assert [lab.probability for lab in labels] == pytest.approx(sorted(row.tolist(), reverse=True), abs=1e-5)
        assert labels[0].index == int(row.argmax())

    raw = json.loads((tmp_path / "c" / "metadata.json").read_text())
    raw["tta"] = raw["spec"]["evaluation"]["tta"] = "mirror_rotate"  # written by some other version: refused at load
    (tmp_path / "c" / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="mirror_rotate.*flip_translate"):
        load_model(tmp_path / "c")


def test_airbench_net_follows_airbench94():
    """Dirac-initialised convs, BatchNorm scales fixed at 1 and left out of the optimiser, and
    ``optim.norm_bias_lr_scale`` putting the norm biases in their own group at 64x lr."""
    from visionray.models import create_model
    from visionray.specs import OptimSpec
    from visionray.train.optim import build_optimizer

    model = create_model("airbench", 10, 3, 32, width=32)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.momentum == 0.4 for m in norms)
    conv = model.body[1][0]  # 24 whitened channels in, 32 out: 24 identity filters, 8 random
    identity = torch.zeros_like(conv.weight[:conv.in_channels])
    torch.nn.init.dirac_(identity)
    assert torch.equal(conv.weight[:conv.in_channels], identity)
    assert not torch.equal(conv.weight[conv.in_channels:], torch.zeros_like(conv.weight[conv.in_channels:]))

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    plain = build_optimizer(OptimSpec(name="sgd"), model, 0.1)
    assert len(plain.param_groups) == 2 and {id(p) for g in plain.param_groups for p in g["params"]} == trainable
    scaled = build_optimizer(OptimSpec(name="sgd", norm_bias_lr_scale=64), model, 0.1)
    assert {id(p) for g in scaled.param_groups for p in g["params"]} == trainable
    assert {id(p) for p in scaled.param_groups[2]["params"]} == {id(m.bias) for m in norms}
    assert scaled.param_groups[2]["lr"] == pytest.approx(6.4) and scaled.param_groups[2]["weight_decay"] == 0.0


def test_muon_orthogonalises_conv_filter_updates_and_resumes_from_its_state():
    """optim.name: muon: the conv filters (4-D) in groups of their own at muon.lr, every update of
    theirs a near-orthogonal matrix per filter bank and the bank at unit RMS per filter; the rest
    SGD. A state dict written the checkpoint's way (safetensors + JSON) continues the same steps."""
    import tempfile

    from visionray.checkpoint import load_train_state, save_train_state
    from visionray.models import create_model
    from visionray.specs import MuonSpec, OptimSpec
    from visionray.train.optim import build_optimizer, orthogonalise

    g = torch.randn(16, 72, generator=torch.Generator().manual_seed(0))
    o = orthogonalise(g, steps=5)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.5 and singular.max() < 1.5  # Newton-Schulz: every singular value near 1

    def trained(steps: int, optimizer_state=None):
        torch.manual_seed(0)
        model = create_model("airbench", 10, 3, 32, width=16)
        opt = build_optimizer(OptimSpec(name="muon", muon=MuonSpec(lr=0.2)), model, 0.05)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model, opt

    model, opt = trained(2)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert muon and all(p.ndim == 4 for g in muon for p in g["params"]) and all(g["lr"] == 0.2 for g in muon)
    assert all(p.ndim != 4 for g in opt.param_groups if not g["muon"] for p in g["params"])
    filters = muon[0]["params"][0]
    assert filters.detach().flatten(1).norm() ** 2 / len(filters) == pytest.approx(1.0, rel=0.2)  # unit RMS per filter

    with tempfile.TemporaryDirectory() as tmp:  # resume: 2 steps, save, load, 1 more == 3 steps straight
        save_train_state(Path(tmp), {"optimizer": opt.state_dict(), "model": model.state_dict()})
        state = load_train_state(Path(tmp))
    resumed = create_model("airbench", 10, 3, 32, width=16)
    resumed.load_state_dict(state["model"])
    opt2 = build_optimizer(OptimSpec(name="muon", muon=MuonSpec(lr=0.2)), resumed, 0.05)
    opt2.load_state_dict(state["optimizer"])
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
    opt2.zero_grad()
    torch.nn.functional.cross_entropy(resumed(x), y).backward()
    opt2.step()
    straight, _ = trained(3)
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_lookahead_pulls_weights_to_their_running_average():
    """every 2 steps: average <- keep * average + (1 - keep) * weights, then weights <- average;
    after the last step (5) the weights are the average."""
    from visionray.specs import LookaheadSpec
    from visionray.train.optim import Lookahead

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    la = Lookahead(model, LookaheadSpec(every_steps=2, decay=0.5, power=0.0), total_steps=5)
    average, seen = 0.0, []
    for step in range(1, 6):
        with torch.no_grad():
            model.weight += 1.0  # an optimiser step
        la.step()
        w = 0.0 if not seen else seen[-1]
        w += 1.0
        if step % 2 == 0:
            average = 0.5 * average + 0.5 * w
            w = average
        elif step == 5:
            w = average  # the last step: the weights become the average
        seen.append(w)
        assert model.weight.item() == pytest.approx(w), step
    assert la.average["weight"].item() == pytest.approx(model.weight.item())


def test_lookahead_state_is_checkpointed_and_restored(tmp_path):
    spec = TrainSpec.model_validate({
        "data": {"image_size": 8, "limit": 200}, "model": {"name": "convnet", "depth": 1, "width": 4},
        "optim": {"epochs": 2, "batch_size": 32, "lookahead": {"every_steps": 3}},
    })
    worker = Worker(spec, 0, 1, torch.device("cpu"))
    worker.run_epoch(0)
    worker.save(tmp_path, {}, 1)
    resumed = Worker(spec, 0, 1, torch.device("cpu"), restore_dir=tmp_path)
    assert resumed.lookahead.steps == worker.lookahead.steps == worker.scheduler.last_epoch > 0  # steps of epoch 1
    for name, average in worker.lookahead.average.items():
        assert torch.equal(resumed.lookahead.average[name], average), name
    resumed.run_epoch(1)  # the last epoch ends on the last step: the weights are the average
    for name, value in resumed.model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, resumed.lookahead.average[name]), name


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
    assert len(compiled.data.splits.train) % 32 and compiled.compile_s > 0  # the epoch ends on a short batch
    for a, b in zip(plain.model.state_dict().values(), compiled.model.state_dict().values()):
        assert torch.equal(a, b)
    graphs = counters["stats"]["unique_graphs"]
    metrics = compiled.run_epoch(0)
    assert counters["stats"]["unique_graphs"] == graphs, "the first epoch compiled a graph the warm-up missed"
    assert metrics["compile_s"] == compiled.compile_s and metrics["epoch_s"] > 0


def test_fastest_precision_trains_in_bf16_exactly_when_the_probe_measures_it_faster():
    """`scaling.precision: fastest` on CPU: the probe times bf16 autocast against fp32 on this very
    CPU and the worker trains in whichever the rule picks (bf16 on AMX/AVX512-BF16 CPUs, fp32 on
    others); the probe leaves the model's weights as they were, and the first epoch reports it."""
    from visionray import defaults
    from visionray.models import create_model
    from visionray.train.epoch import bf16_speedup

    model = create_model("airbench", 10, 3, 16, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    speedup = bf16_speedup(model, (3, 16, 16), torch.device("cpu"), channels_last=True)
    assert speedup > 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    small = ["data.source=digits", "data.path=null", "data.channels=3", "data.mean=null", "data.std=null",
             "data.limit=400", "model.width=8", "optim.epochs=1", "optim.batch_size=128"]
    spec = load_spec("jobs/cifar10-cpu.yaml", small)
    assert spec.scaling.precision == "fastest"  # the CPU recipe measures rather than guesses
    worker = Worker(spec, 0, 1, torch.device("cpu"))
    chose_bf16 = worker.rt.autocast_dtype == torch.bfloat16
    assert chose_bf16 == (worker.bf16_speedup >= defaults.BF16_MIN_SPEEDUP), worker.bf16_speedup
    metrics = worker.run_epoch(0)
    assert metrics["bf16_speedup"] == worker.bf16_speedup and metrics["train_loss"] == metrics["train_loss"]  # not NaN
    explicit = Worker(load_spec("jobs/cifar10-cpu.yaml", [*small, "scaling.precision=fp32"]), 0, 1, torch.device("cpu"))
    assert explicit.bf16_speedup is None and explicit.rt.autocast_dtype is None


BUDGET_SMALL = ["data.source=digits", "data.path=null", "data.channels=3", "data.mean=null", "data.std=null",
                "data.limit=400", "model.width=8", "optim.batch_size=128", "scaling.precision=fp32"]


def test_a_time_budget_plans_the_epochs_that_fit_and_a_resumed_run_keeps_them(tmp_path):
    """`optim.time_budget_s`: the epoch count is decided before the first step, capped by
    `optim.epochs`, at least 1; the run's spec, schedule and checkpoints carry it, and a run
    restored from that checkpoint keeps it whatever its own budget would now say."""
    import time

    roomy = Worker(load_spec("jobs/cifar10-cpu.yaml", [*BUDGET_SMALL, "optim.epochs=3", "optim.time_budget_s=3600"]),
                   0, 1, torch.device("cpu"))
    assert roomy.spec.optim.epochs == 3 and roomy.lookahead.total == 3 * roomy.data.steps_per_epoch
    spent = load_spec("jobs/cifar10-cpu.yaml", [*BUDGET_SMALL, "optim.epochs=40", "optim.time_budget_s=60"])
    late = Worker(spent, 0, 1, torch.device("cpu"), started_at=time.time() - 59.9)  # nothing left: one epoch
    assert late.spec.optim.epochs == 1 and spent.optim.epochs == 40  # the caller's spec is not changed
    metrics = late.run_epoch(0)
    assert metrics["planned_epochs"] == 1 and late.checkpoint_due(0)
    late.save(tmp_path, metrics, 1)
    assert json.loads((tmp_path / "metadata.json").read_text())["spec"]["optim"]["epochs"] == 1
    resumed = Worker(load_spec("jobs/cifar10-cpu.yaml", [*BUDGET_SMALL, "optim.epochs=40", "optim.time_budget_s=3600"]),
                     0, 1, torch.device("cpu"), restore_dir=tmp_path)
    assert resumed.spec.optim.epochs == 1 and resumed.start_epoch == 1  # planned once, kept on resume


def test_epochs_within_grows_with_the_budget_and_stays_in_bounds():
    from visionray.models import create_model
    from visionray.train.epoch import Runtime, epochs_within

    model = create_model("airbench", 10, 3, 16, width=8)
    rt = Runtime(device=torch.device("cpu"), autocast_dtype=None, channels_last=False, world_size=1)
    plans = [epochs_within(budget, 0.0, model, rt, 64, (3, 16, 16), train_steps=50, val_steps=5, views=2, most=10**6)
             for budget in (1.0, 20.0, 400.0)]
    assert plans[0] >= 1 and plans[0] <= plans[1] < plans[2]
    assert epochs_within(1e6, 0.0, model, rt, 64, (3, 16, 16), 50, 5, 2, most=7) == 7
    assert epochs_within(10.0, 50.0, model, rt, 64, (3, 16, 16), 50, 5, 2, most=7) == 1  # over budget already
