"""Checkpoints: pickle-free round trip with the same logits, and the state codec."""

from __future__ import annotations

import json

import pytest
import torch

from visionray import checkpoint as ckpt
from visionray.models import create_model
from visionray.specs import TrainSpec
from tests.helpers import FIXTURES, make_checkpoint


def test_state_codec_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "epoch": 4, "nested": {1: [1.5, None, True]}}
    ckpt.save_train_state(tmp_path, state)
    back = ckpt.load_train_state(tmp_path)
    assert back["epoch"] == 4 and back["nested"] == {1: [1.5, None, True]}
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.1 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.9)
    assert torch.equal(opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_checkpoint_round_trip_same_logits(tmp_path):
    spec = TrainSpec.model_validate({"model": {"name": "convnet", "depth": 2, "width": 8}, "data": {"image_size": 16}})
    model = create_model("convnet", 10, 1, 16, depth=2, width=8).eval()
    preset = spec.eval_preset(1)
    ckpt.save_checkpoint(tmp_path, model, spec=spec, classes=[str(i) for i in range(10)], preset=preset,
                         metrics={"val_acc": 0.5}, epoch=3)
    loaded, meta = ckpt.load_model(tmp_path)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta.epoch == 3 and meta.spec["model"]["depth"] == 2 and meta.model.kwargs == {"depth": 2, "width": 8}
    assert meta.eval_preset == preset and meta.tta == "none"
    assert set(meta.versions) >= {"torch", "ray", "visionray", "torchvision"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", "model.safetensors"]


@pytest.mark.parametrize("damage,word", [
    (lambda d: (d / "metadata.json").unlink(), "not a VisionRay checkpoint"),
    (lambda d: (d / "metadata.json").write_text("{"), "unreadable"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 16), "unreadable weights"),
    (lambda d: (d / "metadata.json").write_text(json.dumps({"format": "pickle"})), "format"),
])
def test_damaged_checkpoints_fail_clearly(tmp_path, damage, word):
    make_checkpoint(tmp_path, kwargs={"depth": 1, "width": 4}, size=32, metrics={})
    damage(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=word):
        ckpt.load_model(tmp_path)


def test_a_checkpoint_written_by_visionray_0_1_still_loads():
    """``tests/fixtures/checkpoint_v0.1`` was written by the code before the typed contract (no
    top-level ``tta``: it lived only in the spec). It loads, typed, with the same TTA."""
    model, meta = ckpt.load_model(FIXTURES / "checkpoint_v0.1")
    assert "tta" not in json.loads((FIXTURES / "checkpoint_v0.1" / "metadata.json").read_text())
    assert isinstance(meta, ckpt.CheckpointMeta) and meta.tta == "flip"
    assert meta.model.name == "convnet" and meta.model.kwargs == {"depth": 1, "width": 4, "hidden": 8}
    assert meta.classes == [str(i) for i in range(10)] and meta.epoch == 2 and meta.metrics["val_acc"] == 0.25
    assert meta.eval_preset.image_size == 8 and meta.job_name == "legacy"
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_metadata_is_frozen_and_refuses_unknown_fields(tmp_path):
    _, _ = make_checkpoint(tmp_path)
    meta = ckpt.read_metadata(tmp_path)
    with pytest.raises(ValueError):
        meta.epoch = 9
    raw = json.loads((tmp_path / "metadata.json").read_text())
    (tmp_path / "metadata.json").write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(ckpt.CheckpointError, match="surprise"):
        ckpt.read_metadata(tmp_path)
