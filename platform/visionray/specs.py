"""The training-job spec: one pydantic model per user-facing YAML, validated once at the edge.

Everything a training job needs is here, with its default and unit. Code further in receives
these typed objects, never dicts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from visionray import defaults
from visionray.data.sources import list_sources
from visionray.models import check_model_args
from visionray.ops import AUGMENT_OPS, BATCHED_OPS, PREPROCESS_OPS, AugmentOp
from visionray.spec_io import ALIAS_PATTERN, NAME_PATTERN, Strict, apply_overrides, read_yaml, validate_model


def _ops_from_shorthand(value: Any) -> Any:
    """Accept ``flip_crop`` for ``{op: flip_crop}`` and a single op for a one-item list."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if isinstance(value, list):
        return [{"op": v} if isinstance(v, str) else v for v in value]
    return value


class EvalPreset(Strict):
    """Resize, deterministic preprocessing, scale and normalise: the one path from a decoded image
    to a model input, shared by training, evaluation and serving, and saved with every checkpoint."""

    image_size: int = Field(ge=8, le=1024, description="square model input side (px)")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]
    preprocess: list[AugmentOp] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stats_match_channels(self) -> "EvalPreset":
        for name in ("mean", "std"):
            got = getattr(self, name)
            if len(got) != self.channels:
                raise ValueError(f"{name} has {len(got)} values {got}; it needs one per channel ({self.channels})")
        return self


# --------------------------------------------------------------------------- sections

DataSource = Literal[tuple(list_sources())]  # the names registered in visionray.data.sources


class DataSpec(Strict):
    source: DataSource = Field("digits", description="a source registered in visionray.data.sources")
    path: str | None = Field(None, description="imagefolder: a directory of class folders, or a .tar/.tar.gz of one; "
                             "shards: the manifest.json of a pack (`visionray data pack`), a local path or URI")
    val_path: str | None = Field(None, description="imagefolder: a separate validation folder or archive")
    root: str | None = Field(None, description="torchvision sources: directory holding (or receiving) the files")
    download: bool = Field(False, description="torchvision sources: download into root when missing")
    image_size: int = Field(32, ge=8, le=1024, description="square model input side (px)")
    channels: Literal[1, 3] | None = Field(None, description="1 or 3; default: the source's own")
    num_classes: int = Field(10, ge=2, le=100_000, description="synthetic only: class count")
    num_samples: int = Field(2048, ge=16, le=10_000_000, description="synthetic only: images generated")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.9, description="share held out for validation when no val_path")
    split_seed: int = Field(0, ge=0, description="seed of the train/val split: same seed, same split")
    limit: int | None = Field(None, ge=16, description="train on a seeded random subset of this many training images "
                               "(quick runs; the held-out split is unchanged)")
    streaming: bool = Field(False, description="imagefolder, shards: stream through Ray Data instead of loading to "
                            "memory (default for shards; false decodes a pack into memory)")
    decode_cpus: int = Field(2, ge=1, le=4096, description="streaming: concurrent Ray Data decode tasks reading, "
                             "decoding and resizing images for the training workers")
    decode_task_cpus: float = Field(0.0, ge=0.0, le=64.0, description="streaming: CPUs each decode task reserves. 0 "
                                    "(default): decoding shares the CPUs the training workers reserved, as it must "
                                    "on one machine whose CPUs all train; on a cluster give 1 (with decode_on)")
    decode_on: dict[str, str] = Field(
        default_factory=dict, description="streaming: node labels the decode tasks must run on (a Ray label "
        "selector), e.g. {visionray.io/node-role: cpu} for cluster.yaml's CPU nodes while GPU nodes train")
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail", description="an image that does not decode: fail (stop, naming the first files) or skip (leave it "
        "out; the count is reported and recorded in the checkpoint)")
    loader_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per training worker")
    pipeline: Literal["per_sample", "batched"] = Field(
        "per_sample",
        description="per_sample: torchvision ops per image in a DataLoader (every op); batched: the whole "
        "split kept on the worker's device (GPU memory with a GPU) and flip/crop done on whole batches",
    )
    mean: list[float] | None = Field(None, description="per-channel normalisation mean in [0,1]; default 0.5")
    std: list[float] | None = Field(None, description="per-channel normalisation std; default 0.25")
    preprocess: list[AugmentOp] = Field(
        default_factory=list,
        description=f"deterministic ops kept in the eval preset (train, eval, serve): {', '.join(PREPROCESS_OPS)}",
    )

    _shorthand = field_validator("preprocess", mode="before")(_ops_from_shorthand)

    @model_validator(mode="before")
    @classmethod
    def _shards_stream(cls, data: Any) -> Any:
        """A pack exists to be streamed: ``source: shards`` streams unless ``streaming`` says otherwise."""
        if isinstance(data, dict) and data.get("source") == "shards" and "streaming" not in data:
            data = {**data, "streaming": True}
        return data

    @model_validator(mode="after")
    def _check(self) -> "DataSpec":
        if self.source == "imagefolder" and not self.path:
            raise ValueError("source 'imagefolder' needs data.path: a directory of class folders or a .tar/.tar.gz")
        if self.source == "shards" and not self.path:
            raise ValueError("source 'shards' needs data.path: the manifest.json written by `visionray data pack`")
        if self.source == "shards" and self.val_path:
            raise ValueError("data.val_path is not for source 'shards': a pack holds its own validation split")
        if self.source not in ("imagefolder", "shards"):
            for name in ("path", "val_path"):
                if getattr(self, name):
                    raise ValueError(f"data.{name} is only for sources 'imagefolder' and 'shards' (source is {self.source!r})")
        if self.streaming and self.source not in ("imagefolder", "shards"):
            raise ValueError(f"data.streaming is only for sources 'imagefolder' and 'shards' (source is {self.source!r})")
        for op in self.preprocess:
            if op.op not in PREPROCESS_OPS or getattr(op, "p", 1.0) != 1.0:
                raise ValueError(
                    f"preprocess op {op.op!r} with p={getattr(op, 'p', None)} is not deterministic; "
                    f"allowed: {', '.join(PREPROCESS_OPS)} with p=1 (put random ops in augment)"
                )
        return self


class ModelSpec(Strict):
    name: str = Field("convnet", description="a name from visionray.models.list_models()")
    depth: int | None = Field(None, ge=1, le=200, description="convnet: conv blocks; resnet: layers (6n+2)")
    width: int | None = Field(None, ge=1, le=4096, description="channels of the first stage (doubling per stage)")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="dropout before the dense head")
    hidden: int | None = Field(None, ge=1, le=65536, description="convnet: units of the dense hidden layer")
    whiten_bias_epochs: float | None = Field(None, ge=0.0, le=10_000, description="airbench: epochs its whitening "
                                             "layer's bias trains for, then stays (airbench94: 3); default: all")

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        check_model_args(self.name, self.kwargs())
        return self


class LookaheadSpec(Strict):
    """airbench94's lookahead: every few steps the weights are pulled to their running average."""

    every_steps: int = Field(5, ge=1, le=100_000, description="optimiser steps between pulls to the average")
    decay: float = Field(0.95**5, ge=0.0, lt=1.0, description="the average's weight on its past at the last step")
    power: float = Field(3.0, ge=0.0, le=10.0, description="that weight ramps up as decay * (step / total steps) ** power")


class MuonSpec(Strict):
    """Muon for the convolution filters (airbench94_muon's): each filter bank's update, after
    momentum, is orthogonalised by Newton-Schulz iterations, and the bank is kept at unit RMS per
    filter (the BatchNorm after it makes its scale free). Every other parameter takes SGD with
    nesterov momentum at ``optim.lr``/``optim.momentum``."""

    lr: float = Field(0.24, gt=0.0, le=100.0, description="learning rate of the conv filters (not scaled by batch size)")
    momentum: float = Field(0.6, ge=0.0, lt=1.0, description="momentum of the conv filters' updates")
    nesterov: bool = Field(True, description="nesterov momentum for the conv filters")
    ns_steps: int = Field(5, ge=1, le=20, description="Newton-Schulz iterations per update")


class OneCycleSpec(Strict):
    """The shape of the ``onecycle`` schedule: lr factors 0 -> 1 -> 0 by default; airbench94's is
    0.2 -> 1 at 23% of training -> 0.07."""

    start: float = Field(0.0, ge=0.0, le=1.0, description="lr factor at the first step")
    peak_at: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of training at which the factor is 1")
    end: float = Field(0.0, ge=0.0, le=1.0, description="lr factor at the last step")


class OptimSpec(Strict):
    name: Literal["sgd", "adam", "adamw", "muon"] = Field("adamw", description="sgd uses nesterov momentum; muon: Muon "
                                                           "for conv filters (`muon`), sgd for the rest")
    muon: MuonSpec | None = Field(None, description="Muon's own parameters (name: muon; default {} )")
    epochs: int = Field(10, ge=1, le=10_000, description="epochs; with time_budget_s: at most this many")
    time_budget_s: float | None = Field(
        None, ge=60, le=30 * 86400, description="wall seconds from the start of the run to the end of its last epoch "
        "(data loading included): the epoch count is the most that fit, at most `epochs`, decided once before the "
        "first step from a timed step (kept on resume), so the schedule spans the run it will be")
    batch_size: int = Field(64, ge=1, le=65536, description="images per worker per step")
    lr: float = Field(4e-3, gt=0.0, le=100.0, description="learning rate per 256 images of global batch")
    scale_lr: bool = Field(True, description="scale lr linearly by global batch / 256; off: lr is used as given")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd momentum (nesterov)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam/adamw betas")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="on weights, not on biases or norm scales")
    norm_bias_lr_scale: float = Field(1.0, gt=0.0, le=1000.0, description="lr multiplier for normalisation "
                                      "layers' biases (airbench94 trains its BatchNorm biases at 64x)")
    lookahead: LookaheadSpec | None = Field(None, description="pull weights to their running average every few "
                                            "steps; they end as that average ({} for airbench94's values)")
    schedule: Literal["constant", "onecycle", "cosine", "step"] = "onecycle"
    onecycle: OneCycleSpec | None = Field(None, description="onecycle's shape {start, peak_at, end}; default 0 -> 1 at 25% -> 0")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warmup (epochs) before the schedule")
    step_epochs: int = Field(30, ge=1, description="step schedule: epochs between decays")
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: lr factor per decay")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient's global L2 norm to this")

    @model_validator(mode="after")
    def _check(self) -> "OptimSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")
        if self.onecycle is not None and self.schedule != "onecycle":
            raise ValueError(f"onecycle shapes the onecycle schedule, but schedule is {self.schedule!r}; drop onecycle "
                             "or set schedule: onecycle")
        if self.onecycle is not None and self.warmup_epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} and onecycle both shape the rise of the lr; "
                             "use onecycle.start and onecycle.peak_at alone")
        if self.muon is not None and self.name != "muon":
            raise ValueError(f"muon configures the muon optimiser, but name is {self.name!r}; drop muon or set name: muon")
        if self.name == "muon" and self.muon is None:
            self.muon = MuonSpec()
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas={list(self.betas)}: each must be in [0, 1)")
        return self


class ScalingSpec(Strict):
    workers: int = Field(2, ge=1, le=4096, description="data-parallel training workers")
    gpu: bool = Field(False, description="one GPU per worker (nccl); off: CPU (gloo)")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra Ray resources")
    precision: Literal["auto", "fastest", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU; fastest: bf16 on GPU, and on CPU bf16 autocast when a "
        "timed probe step runs it faster than fp32 (CPUs with AMX or AVX512-BF16), else fp32")
    channels_last: bool | None = Field(None, description="channels_last memory format; default: on with GPU")
    compile: bool = Field(False, description="torch.compile the model (first epoch includes compile time)")

    @model_validator(mode="after")
    def _check(self) -> "ScalingSpec":
        if self.precision == "fp16" and not self.gpu:
            raise ValueError("precision 'fp16' needs scaling.gpu: true (fp16 autocast is GPU-only); use fp32 or bf16")
        return self


class CheckpointSpec(Strict):
    every_epochs: int = Field(1, ge=1, description="save a checkpoint every this many epochs (and at the end)")
    keep: int = Field(2, ge=1, le=1000, description="keep the best N checkpoints by val_acc")
    max_failures: int = Field(3, ge=-1, description="worker failures to recover from (-1: unlimited)")


class OutputSpec(Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="job name; same name resumes")
    storage: str = Field(defaults.RUNS_DIR, description="local path or URI (s3://, gs://) every node can reach")


# Registry names and aliases, the one definition (registry, serve config and specs use these, always
# with ``re.fullmatch``: ``$`` would also accept a trailing newline).


class RegisterSpec(Strict):
    name: str = Field(pattern=rf"^{NAME_PATTERN}$", description="registry model name")
    alias: str | None = Field("best", pattern=rf"^{ALIAS_PATTERN}$", description="alias moved to the new version")
    registry: str | None = Field(None, description="registry root; default $VISIONRAY_REGISTRY or ./registry")
    signing_key: str | None = Field(None, description="PEM private key that signs the version; default $VISIONRAY_SIGNING_KEY")


class EvaluationSpec(Strict):
    tta: Literal["none", "flip", "flip_translate"] = Field(
        "none", description="test-time augmentation, also applied when serving: flip averages the image's and its "
        "mirror's logits; flip_translate (airbench94) adds both shifted one pixel up-left and down-right")




class TrainSpec(Strict):
    """A training job: what ``visionray train`` runs and what every checkpoint records."""

    seed: int = Field(0, ge=0, description="seeds model init, shuffling and augmentation")
    data: DataSpec = Field(default_factory=DataSpec)
    augment: list[AugmentOp] = Field(default_factory=list, description=f"training policy: ops from {', '.join(AUGMENT_OPS)}")
    model: ModelSpec = Field(default_factory=ModelSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    registration: RegisterSpec | None = Field(
        None, alias="register", description="register the best checkpoint in the model registry"
    )

    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    _shorthand = field_validator("augment", mode="before")(_ops_from_shorthand)

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.data.pipeline == "batched":
            if self.data.streaming:
                raise ValueError("data.pipeline 'batched' keeps the data in memory; it cannot stream (data.streaming)")
            for op in self.augment:
                if op.op not in BATCHED_OPS:
                    raise ValueError(
                        f"augment op {op.op!r} has no batched form; with data.pipeline 'batched' use "
                        f"{' or '.join(BATCHED_OPS)}, or set data.pipeline: per_sample"
                    )
        elif any(op.op == "flip_crop" and op.flip == "alternate" for op in self.augment):
            raise ValueError(f"augment flip_crop flip 'alternate' needs data.pipeline 'batched' (it is "
                             f"{self.data.pipeline!r}); or use flip: true")
        return self

    def eval_preset(self, channels: int) -> EvalPreset:
        """The preset for this job once the data's channel count is known."""
        c = self.data.channels or channels
        return EvalPreset(
            image_size=self.data.image_size,
            channels=c,
            mean=self.data.mean or [defaults.NORMALIZE_MEAN] * c,
            std=self.data.std or [defaults.NORMALIZE_STD] * c,
            preprocess=self.data.preprocess,
        )


# --------------------------------------------------------------------------- loading

def with_absolute_paths(spec: TrainSpec) -> TrainSpec:
    """``data.path``, ``data.val_path`` and ``data.root`` made absolute against the current
    directory, where the user ran the command: Ray's workers run in directories of their own, so a
    relative path read there would name another place. URIs and absolute paths are kept."""
    data, fixed = spec.data, {}
    for name in ("path", "val_path", "root"):
        value = getattr(data, name)
        if value and "://" not in value and (absolute := os.path.abspath(os.path.expanduser(value))) != value:
            fixed[name] = absolute
    return spec.model_copy(update={"data": data.model_copy(update=fixed)}) if fixed else spec


def load_spec(path: str | Path | None, overrides: list[str] | None = None) -> TrainSpec:
    """Read a training spec from YAML, apply ``--set`` overrides and validate it.

    The job name defaults to the file's stem, so ``jobs/quickstart.yaml`` runs as ``quickstart``.
    """
    raw: dict[str, Any] = {}
    source = "spec"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = read_yaml(path)
        out = raw.setdefault("output", {}) if isinstance(raw.get("output", {}), dict) else raw["output"]
        if isinstance(out, dict):
            out.setdefault("name", re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem) or "run")
    apply_overrides(raw, list(overrides or []))
    return validate_model(TrainSpec, raw, source)
