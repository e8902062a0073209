"""Training specs: good and bad inputs, overrides, and `visionray validate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from visionray.cli import app
from visionray.spec_io import SpecError, apply_overrides
from visionray.specs import TrainSpec, load_spec
from tests.helpers import REPO

runner = CliRunner()


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_jobs_validate(path: Path):
    spec = load_spec(path)
    assert spec.output.name


GOOD = [
    {},
    {"optim": {"name": "sgd", "lr": 0.1, "schedule": "cosine", "warmup_epochs": 1}},
    {"augment": ["flip_crop", {"op": "randaugment", "n": 3, "m": 12}, "trivialaugment"]},
    {"augment": [{"op": "brightness_contrast", "brightness": 0.3}, {"op": "binarize", "threshold": 100, "p": 0.2}]},
    {"data": {"source": "imagefolder", "path": "/data/x.tar.gz", "preprocess": ["grayscale", "equalize"]}},
    {"model": {"name": "resnet", "depth": 20, "width": 16}},
    {"model": {"name": "seed_cnn"}, "data": {"image_size": 224, "channels": 3}},
    {"register": {"name": "digits", "alias": "production"}},
    {"scaling": {"workers": 4, "gpu": True, "precision": "fp16"}},
    {"optim": {"onecycle": {"start": 0.2, "peak_at": 0.23, "end": 0.07}}},
    {"data": {"pipeline": "batched"}, "augment": [{"op": "flip_crop", "flip": "alternate"}],
     "model": {"name": "airbench", "whiten_bias_epochs": 3}},
]


@pytest.mark.parametrize("raw", GOOD)
def test_good_specs(raw):
    TrainSpec.model_validate(raw)


BAD = [  # (raw spec, words the one error line must contain)
    ({"optim": {"lr": -1}}, ["optim.lr", "greater than 0", "-1"]),
    ({"optim": {"name": "rmsprop"}}, ["optim.name", "'sgd', 'adam', 'adamw' or 'muon'", "rmsprop"]),
    ({"optim": {"name": "sgd", "muon": {}}}, ["muon configures the muon optimiser", "'sgd'"]),
    ({"optim": {"name": "muon", "muon": {"momentum": 1.0}}}, ["optim.muon.momentum", "1.0"]),
    ({"optim": {"epochs": 2, "warmup_epochs": 3}}, ["optim", "warmup_epochs=3", "epochs=2"]),
    ({"optim": {"lrr": 0.1}}, ["optim.lrr", "unknown field"]),
    ({"model": {"name": "vgg"}}, ["model", "unknown model 'vgg'", "convnet", "seed_cnn"]),
    ({"model": {"name": "seed_cnn", "depth": 3}}, ["model", "seed_cnn", "takes no depth"]),
    ({"data": {"source": "imagefolder"}}, ["data", "needs data.path"]),
    ({"data": {"source": "nope"}}, ["data.source", "'digits'", "nope"]),
    ({"data": {"source": "shards"}}, ["data", "needs data.path", "manifest.json"]),
    ({"data": {"source": "shards", "path": "p/manifest.json", "val_path": "v"}}, ["data", "val_path", "own validation"]),
    ({"data": {"on_bad_file": "ignore"}}, ["data.on_bad_file", "'fail' or 'skip'", "ignore"]),
    ({"data": {"decode_cpus": 0}}, ["data.decode_cpus", "greater than or equal to 1", "0"]),
    ({"data": {"streaming": True}}, ["data", "data.streaming", "'imagefolder' and 'shards'", "digits"]),
    ({"data": {"preprocess": [{"op": "randaugment"}]}}, ["data", "not deterministic", "randaugment"]),
    ({"data": {"image_size": 4}}, ["data.image_size", "greater than or equal to 8", "4"]),
    ({"augment": ["sharpen"]}, ["augment.0", "unknown op 'sharpen'", "flip_crop"]),
    ({"augment": [{"op": "randaugment", "n": 0}]}, ["augment.0.n", "greater than or equal to 1", "0"]),
    ({"scaling": {"precision": "fp16"}}, ["scaling", "fp16", "gpu"]),
    ({"scaling": {"workers": 0}}, ["scaling.workers", "greater than or equal to 1", "0"]),
    ({"output": {"name": "../evil"}}, ["output.name", "pattern", "../evil"]),
    ({"register": {"name": "Bad Name"}}, ["register.name", "pattern"]),
    ({"optim": {"schedule": "cosine", "onecycle": {"start": 0.2}}}, ["optim", "onecycle", "schedule is 'cosine'"]),
    ({"optim": {"warmup_epochs": 1, "onecycle": {}}}, ["optim", "warmup_epochs=1.0", "onecycle.start"]),
    ({"optim": {"onecycle": {"peak_at": 1.0}}}, ["optim.onecycle.peak_at", "less than 1", "1.0"]),
    ({"augment": [{"op": "flip_crop", "flip": "alternate"}]}, ["flip 'alternate'", "data.pipeline 'batched'", "per_sample"]),
    ({"model": {"name": "convnet", "whiten_bias_epochs": 3}}, ["model", "convnet", "whiten_bias_epochs"]),
]


@pytest.mark.parametrize("raw,words", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_specs_name_field_value_and_allowed(tmp_path: Path, raw, words):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert len(info.value.errors) == 1, info.value.errors
    for word in words:
        assert word in info.value.errors[0], (word, info.value.errors[0])


def test_every_error_is_reported(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0, "batch_size": 0}, "scaling": {"workers": -1}}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert {e.split(":")[0] for e in info.value.errors} == {"optim.lr", "optim.batch_size", "scaling.workers"}


def test_overrides_parse_yaml_values_and_nest():
    raw = apply_overrides({}, ["optim.lr=0.05", "augment=[flip_crop, trivialaugment]", "scaling.gpu=true"])
    spec = TrainSpec.model_validate(raw)
    assert spec.optim.lr == 0.05 and spec.scaling.gpu is True
    assert [op.op for op in spec.augment] == ["flip_crop", "trivialaugment"]


@pytest.mark.parametrize("item", ["optim.lr", "=3", "optim..lr=1", "optim.lr=[unclosed"])
def test_malformed_overrides(item):
    with pytest.raises(SpecError):
        apply_overrides({}, [item])


def test_job_name_defaults_to_file_stem(tmp_path: Path):
    path = tmp_path / "my-job.yaml"
    path.write_text("optim: {epochs: 2}\n")
    assert load_spec(path).output.name == "my-job"


@pytest.mark.parametrize("text,word", [
    ("optim: {lr: -3}\n", "optim.lr"),
    ("optim: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("model: {name: vgg}\n", "unknown model"),
])
def test_validate_cli_exits_2_and_names_the_problem(tmp_path: Path, text, word):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert word in result.output
    assert "Traceback" not in result.output


def test_validate_cli_ok_and_set(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(REPO / "jobs" / "quickstart.yaml"), "--set", "optim.lr=0.1"])
    assert result.exit_code == 0 and "OK" in result.output
    result = runner.invoke(app, ["validate", str(REPO / "jobs" / "quickstart.yaml"), "--set", "optim.lr=zero"])
    assert result.exit_code == 2 and "optim.lr" in result.output and "zero" in result.output


def test_validate_missing_file():
    result = runner.invoke(app, ["validate", "/nonexistent/job.yaml"])
    assert result.exit_code == 2 and "cannot read spec" in result.output


def test_relative_data_paths_become_absolute_from_the_current_directory(tmp_path, monkeypatch):
    from visionray.specs import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    spec = TrainSpec.model_validate({"data": {"source": "imagefolder", "path": "data/train.tar.gz", "val_path": "/abs/val",
                                              "root": "s3://bucket/x"}})
    fixed = with_absolute_paths(spec)
    assert (fixed.data.path, fixed.data.val_path, fixed.data.root) == (str(tmp_path / "data" / "train.tar.gz"), "/abs/val", "s3://bucket/x")
    assert spec.data.path == "data/train.tar.gz" and with_absolute_paths(fixed) is fixed  # a copy; idempotent
