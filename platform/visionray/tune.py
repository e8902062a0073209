"""Hyperparameter search with Ray Tune over the training job of ``visionray train``.

A search spec (``tune/*.yaml``, model ``SearchSpec``) names a base training job and a search
space over its fields: model depth, width and family, the augmentation policy (named policies
plus the parameters of their ops, such as randaugment's n and m), learning rate, weight decay,
batch size, optimiser. Every trial is a Tune function trainable that derives its own
``TrainSpec`` (validated, never a dict inward), builds the same ``TorchTrainer`` as ``visionray
train`` (``visionray.train.build_trainer``) inside the trial's directory and reports every epoch
to Tune through ``TuneReportCallback``; under population-based training (``pbt``) a trial runs the
same ``Worker`` and epoch loop in its own process instead and reports a Tune checkpoint every epoch,
which PBT copies between trials. Schedulers stop trials on the ``epoch`` metric, so a trial
that Tune restarts (a retry, a resume, a HyperBand pause) continues its inner run from its latest
checkpoint and keeps counting epochs where it left off.

Best-trial selection (``select_best``) is deterministic: each trial scores its best epoch by the
metric (ties: the earlier epoch), trials rank by that score, ties go to the model with fewer
parameters, then to the trial that finished first, then to the lower trial id.

Ray's own module is always imported as ``from ray import tune``; this module is
``visionray.tune``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator
from ray.tune import Callback

from visionray import checkpoint as ckpt
from visionray import seal
from visionray.specs import (
    AUGMENT_OPS,
    AugmentOp,
    OutputSpec,
    RegisterSpec,
    SpecError,
    Strict,
    TrainSpec,
    _ops_from_shorthand,
    apply_overrides,
    format_errors,
    read_yaml,
    validate_model,
    with_absolute_paths,
)

log = logging.getLogger(__name__)
_AUGMENT_OP: TypeAdapter = TypeAdapter(AugmentOp)

# Files written into the experiment directory, next to Ray Tune's own state.
TRIALS_CSV = "trials.csv"
TRIALS_JSON = "trials.json"
BEST_JSON = "best.json"
BEST_DIR = "best"  # a copy of the best trial's best checkpoint (model.safetensors + metadata.json)
PLOT_PNG = "search.png"
TRIAL_RUN_NAME = "train"  # the inner Ray Train run inside each trial's directory
TRIAL_DRIVER_MEMORY = 64 * 2**20  # bytes reserved by each trial's driver function (it holds no CPU)
PBT_KEEP = 4  # latest checkpoints Tune keeps per PBT trial (Ray warns that 2 or fewer break exploits)

SELECTION_RULE = (
    "each trial's best epoch by the metric (ties: earlier epoch); trials ranked by that value, "
    "ties broken by fewer model parameters, then earlier finish, then lower trial id"
)

# Fields of the base job that a search space may not vary: they belong to the search itself.
_FIXED_SECTIONS = ("output", "registration", "register", "checkpoint", "scaling")


# --------------------------------------------------------------------------- the spec


class Dist(Strict):
    """One dimension of the space: exactly one of the keys below."""

    choice: list[Any] | None = Field(None, min_length=1, description="pick one value uniformly (scalars)")
    grid: list[Any] | None = Field(None, min_length=1, description="try every value (a grid axis)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high): a float drawn uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high): a float drawn log-uniformly; low > 0")
    randint: tuple[int, int] | None = Field(None, description="[low, high], both inclusive: an integer drawn uniformly")

    @model_validator(mode="after")
    def _one(self) -> "Dist":
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of choice, grid, uniform, loguniform, randint (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind in ("choice", "grid"):
            for v in getattr(self, kind):
                if not (v is None or isinstance(v, (str, int, float, bool))):
                    raise ValueError(f"{kind} values must be scalars (got {v!r}); name augmentation policies under search.policies")
        else:
            lo, hi = getattr(self, kind)
            if kind == "randint" and lo > hi:
                raise ValueError(f"randint [{lo}, {hi}]: low must not exceed high")
            if kind != "randint" and not lo < hi:
                raise ValueError(f"{kind} [{lo}, {hi}]: low must be below high")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform [{lo}, {hi}]: low must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def edge_values(self) -> list[Any]:
        """Values that must each make a valid job: every listed value, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(getattr(self, self.kind))
        lo, hi = getattr(self, self.kind)
        return [lo, hi] if self.kind == "randint" else [lo, math.nextafter(hi, lo)]


class AshaSpec(Strict):
    """Asynchronous successive halving: stop the worse trials at rungs grace * factor^k epochs."""

    name: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep the top 1/factor of trials at each rung")
    max_epochs: int | None = Field(
        None, ge=1, le=10_000, description="epochs of a trial that is never stopped (its schedule spans them); default: base optim.epochs"
    )


class HyperBandSpec(Strict):
    """Synchronous HyperBand: pauses trials at rung boundaries (they resume from their checkpoint)."""

    name: Literal["hyperband"] = "hyperband"
    reduction_factor: float = Field(3.0, gt=1.0)
    max_epochs: int | None = Field(None, ge=1, le=10_000, description="epochs of the longest trial; default: base optim.epochs")


class MedianSpec(Strict):
    """Median stopping: stop a trial whose best result is below the median of the others' running averages."""

    name: Literal["median"] = "median"
    grace_period: int = Field(1, ge=1, description="epochs before a trial may be stopped")
    min_samples_required: int = Field(3, ge=1, description="trials needed before the median is trusted")


class PbtSpec(Strict):
    """Population-based training: every ``perturbation_interval`` epochs a trial in the bottom
    quantile continues from a top trial's checkpoint with perturbed hyperparameters, so the
    population learns a schedule for the learning rate, regularisation and augmentation. Each trial
    runs the training loop in its own process (one worker) and hands Tune a checkpoint every epoch."""

    name: Literal["pbt"] = "pbt"
    perturbation_interval: int = Field(2, ge=1, description="epochs between exploit/explore steps of a trial")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="bottom fraction that copies the top fraction")
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="chance a value is redrawn from its distribution instead of scaled by 0.8 or 1.2"
    )
    max_epochs: int | None = Field(None, ge=1, le=10_000, description="epochs of every trial; default: base optim.epochs")


# What population-based training may change while a trial continues another trial's weights.
PBT_MUTABLE = ("optim.lr", "optim.weight_decay", "optim.momentum", "optim.label_smoothing", "augment", "augment.<op>.<param>")


def _pbt_mutable(key: str) -> bool:
    return key in PBT_MUTABLE or key.startswith("augment.")


class FifoSpec(Strict):
    """No early stopping: every trial runs all its epochs."""

    name: Literal["fifo"] = "fifo"


SchedulerSpec = AshaSpec | HyperBandSpec | MedianSpec | PbtSpec | FifoSpec


class TrialResources(Strict):
    """Per-trial resources; unset fields keep the base job's ``scaling``."""

    workers: int | None = Field(None, ge=1, le=4096, description="data-parallel workers per trial (a TorchTrainer each)")
    cpus_per_worker: float | None = Field(None, gt=0, le=256)
    gpus_per_worker: float | None = Field(
        None, ge=0, le=8, description="0: CPU; a fraction (0.25) packs trials on one GPU; 1: a GPU each"
    )

    @model_validator(mode="after")
    def _check(self) -> "TrialResources":
        g = self.gpus_per_worker
        if g is not None and g > 1 and g != int(g):
            raise ValueError(f"gpus_per_worker={g}: above 1 it must be a whole number")
        return self


class SearchSection(Strict):
    space: dict[str, Dist] = Field(
        description="dotted field of the base job -> distribution; 'augment' picks a named policy, "
        "'augment.<op>.<param>' sets that parameter on every such op of the chosen policy",
    )
    policies: dict[str, list[AugmentOp]] = Field(
        default_factory=dict, description="named augmentation policies that 'augment' chooses between"
    )
    algorithm: Literal["random", "grid", "optuna"] = Field("random", description="optuna: TPE")
    num_samples: int = Field(8, ge=1, le=100_000, description="trials (random, optuna); grid: repeats of the grid")
    max_concurrent_trials: int = Field(2, ge=1, le=10_000, description="trials running at once")
    time_budget_s: float | None = Field(None, gt=0, description="stop the search after this many seconds")
    seed: int = Field(0, ge=0, description="seeds the sampler (random, optuna)")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("policies"), dict):
            data = {**data, "policies": {k: _ops_from_shorthand(v) for k, v in data["policies"].items()}}
        if isinstance(data, dict) and isinstance(data.get("space"), dict):
            data = {**data, "space": _flatten_space(data["space"])}
        return data


_DIST_KEYS = ("choice", "grid", "uniform", "loguniform", "randint")


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{model: {depth: {choice: ..}}}`` (what ``--set search.space.model.depth.choice=[2,3]``
    builds) reads as ``{"model.depth": {choice: ..}}``; a later entry replaces an earlier one."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not any(k in _DIST_KEYS for k in value):
            flat.update(_flatten_space(value, f"{name}."))
        else:
            flat.pop(name, None)
            flat[name] = value
    return flat


class FailureSpec(Strict):
    max_retries: int = Field(2, ge=0, le=100, description="times a failed trial is retried (from its checkpoint)")


class SearchSpec(Strict):
    """A hyperparameter search: what ``visionray tune`` runs."""

    base: TrainSpec = Field(description="the training job every trial starts from: a jobs/ path or an inline job")
    search: SearchSection
    metric: str = Field("val_acc", pattern=r"^[a-z0-9_]+$", description="reported metric to optimise")
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = Field(default_factory=AshaSpec, discriminator="name")
    resources: TrialResources = Field(default_factory=TrialResources)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    output: OutputSpec = Field(default_factory=OutputSpec, description="experiment name and storage")
    registration: RegisterSpec | None = Field(None, alias="register", description="register the best trial's checkpoint")

    @model_validator(mode="before")
    @classmethod
    def _default_scheduler(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("scheduler"), dict) and "name" not in data["scheduler"]:
            data = {**data, "scheduler": {"name": "asha", **data["scheduler"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> "SearchSpec":
        s = self.search
        kinds = {k: d.kind for k, d in s.space.items()}
        if s.algorithm == "grid":
            bad = [k for k, kind in kinds.items() if kind not in ("choice", "grid")]
            if bad:
                raise ValueError(f"algorithm 'grid' needs choice or grid values; {', '.join(bad)} are continuous")
        if s.algorithm == "optuna":
            bad = [k for k, kind in kinds.items() if kind == "grid"]
            if bad:
                raise ValueError(f"algorithm 'optuna' cannot take grid axes ({', '.join(bad)}); use choice")
        sched = self.scheduler
        max_epochs = getattr(sched, "max_epochs", None)
        if isinstance(sched, AshaSpec) and sched.grace_period > self.max_epochs:
            raise ValueError(f"scheduler.grace_period={sched.grace_period} exceeds max_epochs={self.max_epochs}")
        if isinstance(sched, PbtSpec):
            self._check_pbt(sched)
        try:
            trial_spec(self, {}, storage="/tmp", name="validate")
        except SpecError as exc:
            raise ValueError(f"the base job as a trial is invalid: {'; '.join(exc.errors)}") from None
        problems = []
        for key, dist in s.space.items():
            try:
                _check_space_key(self, key, dist)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _check_pbt(self, sched: PbtSpec) -> None:
        fixed = [k for k in self.search.space if not _pbt_mutable(k)]
        if fixed:
            raise ValueError(
                f"scheduler pbt: search.space {', '.join(fixed)} cannot change while a trial continues another "
                f"trial's weights; PBT varies {', '.join(PBT_MUTABLE)} (search the others with asha, hyperband or median)"
            )
        if not self.search.space:
            raise ValueError("scheduler pbt: search.space is empty; give it at least one of " + ", ".join(PBT_MUTABLE))
        workers = self.resources.workers or self.base.scaling.workers
        if workers != 1:
            raise ValueError(f"scheduler pbt runs each trial in one process: workers={workers}; set resources.workers: 1")
        if self.search.algorithm == "optuna":
            raise ValueError("scheduler pbt proposes its own values: use search.algorithm random or grid, not optuna")
        if self.expected_trials() < 2:
            raise ValueError(f"scheduler pbt needs a population: num_samples={self.search.num_samples}; use 2 or more")
        if sched.perturbation_interval >= self.max_epochs:
            raise ValueError(
                f"scheduler.perturbation_interval={sched.perturbation_interval} must be below max_epochs={self.max_epochs}"
            )

    @property
    def max_epochs(self) -> int:
        given = getattr(self.scheduler, "max_epochs", None)
        if given is not None:
            return given
        if "optim.epochs" in self.search.space:
            return max(int(v) for v in self.search.space["optim.epochs"].edge_values())
        return self.base.optim.epochs

    def expected_trials(self) -> int:
        """Trials the search generates when it runs to completion."""
        grid = 1
        for d in self.search.space.values():
            if d.kind == "grid" or (self.search.algorithm == "grid" and d.kind == "choice"):
                grid *= len(getattr(d, d.kind))
        return self.search.num_samples * (grid if self.search.algorithm != "optuna" else 1)


def _check_space_key(spec: SearchSpec, key: str, dist: Dist) -> None:
    """The key must name a field the base job has, and every value it can take must make a valid job."""
    parts = key.split(".")
    if parts[0] in _FIXED_SECTIONS:
        raise ValueError(
            f"search.space.{key}: {parts[0]} is fixed for a search (set resources/output/register of the search instead)"
        )
    if parts[0] == "augment":
        if len(parts) == 1:
            if not spec.search.policies:
                raise ValueError("search.space.augment chooses a named policy: define them under search.policies")
            for v in dist.edge_values():
                if v not in spec.search.policies:
                    raise ValueError(
                        f"search.space.augment: policy {v!r} is not defined; search.policies has "
                        f"{', '.join(spec.search.policies)}"
                    )
            return
        if len(parts) != 3 or parts[1] not in AUGMENT_OPS:
            raise ValueError(f"search.space.{key}: expected augment.<op>.<param> with op one of {', '.join(AUGMENT_OPS)}")
        policies = list(spec.search.policies.values()) + [spec.base.augment]
        if not any(op.op == parts[1] for pol in policies for op in pol):
            raise ValueError(f"search.space.{key}: no policy (nor the base job's augment) has a {parts[1]!r} op")
        for value in dist.edge_values():
            try:
                _AUGMENT_OP.validate_python({"op": parts[1], parts[2]: value})
            except ValidationError as exc:
                raise ValueError(f"search.space.{key}: value {value!r}: {'; '.join(format_errors(exc))}") from None
        return
    model: Any = TrainSpec
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:i]) or "the job"
            allowed = ", ".join(sorted(fields)) if fields else "nothing (it is a value)"
            raise ValueError(f"search.space.{key}: {where} has no field {part!r}; it has {allowed}")
        model = fields[part].annotation
        model = next((a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model)
    for value in dist.edge_values():
        try:
            trial_spec(spec, {key: value}, storage="/tmp", name="validate")
        except SpecError as exc:
            raise ValueError(f"search.space.{key}: value {value!r} makes an invalid job: {'; '.join(exc.errors)}") from None


def trial_spec(spec: SearchSpec, params: dict[str, Any], storage: str, name: str = TRIAL_RUN_NAME) -> TrainSpec:
    """The training job of one trial: the base job with the trial's values, its resources, a
    checkpoint every epoch (so early-stopped trials keep theirs), no inner retries (the search
    retries whole trials) and its own run directory ``<storage>/<name>``."""
    raw = spec.base.model_dump(mode="json", by_alias=True)
    params = {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}  # numpy scalars from samplers
    if "augment" in params:
        raw["augment"] = [op.model_dump(mode="json") for op in spec.search.policies[params["augment"]]]
    for key in sorted(params):
        value = params[key]
        if key == "augment":
            continue
        if key.startswith("augment."):
            _, op_name, param = key.split(".")
            for op in raw["augment"]:
                if op["op"] == op_name:
                    op[param] = value
        else:
            node = raw
            *head, last = key.split(".")
            for part in head:
                node = node[part]
            node[last] = value
    if "optim.epochs" not in params:  # every trial's schedule spans the scheduler's max epochs
        raw["optim"]["epochs"] = spec.max_epochs
    raw["checkpoint"] = {**raw["checkpoint"], "every_epochs": 1, "max_failures": 0}
    r = spec.resources
    scaling = raw["scaling"]
    if r.workers is not None:
        scaling["workers"] = r.workers
    if r.cpus_per_worker is not None:
        scaling["cpus_per_worker"] = r.cpus_per_worker
    if r.gpus_per_worker is not None:
        scaling["gpu"] = r.gpus_per_worker > 0
        extra = {k: v for k, v in scaling["resources_per_worker"].items() if k != "GPU"}
        if 0 < r.gpus_per_worker != 1:
            extra["GPU"] = r.gpus_per_worker
        scaling["resources_per_worker"] = extra
    raw["output"] = {"name": name, "storage": storage}
    raw["register"] = None
    return validate_model(TrainSpec, raw, "trial")


def load_search_spec(path: str | Path, overrides: list[str] | None = None) -> SearchSpec:
    """Read a search spec, resolve its base job (a path relative to the spec file, or inline),
    apply ``--set`` overrides (``base.optim.epochs=2`` reaches into the base job) and validate."""
    path = Path(path)
    raw = read_yaml(path)
    if not is_search_spec(raw) and "base" not in raw:
        raise SpecError(str(path), [
            "search: missing; a search spec has top-level 'base:' and 'search:' sections "
            "(a training job runs with `visionray train`)"
        ])
    base = raw.get("base")
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.exists() and Path(base).exists():
            base_path = Path(base)  # relative to the working directory
        try:
            raw["base"] = read_yaml(base_path)
        except SpecError as exc:
            raise SpecError(str(path), [f"base: {e} ({base_path})" for e in exc.errors]) from None
    out = raw.setdefault("output", {}) if isinstance(raw.get("output", {}), dict) else raw["output"]
    if isinstance(out, dict):
        out.setdefault("name", re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem) or "search")
    apply_overrides(raw, list(overrides or []))
    try:
        return SearchSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(str(path), _format_errors(exc)) from None


def _format_errors(exc: ValidationError) -> list[str]:
    """``specs.format_errors``, with the scheduler's tag named as such (not as an augment op)."""
    lines = []
    for err, line in zip(exc.errors(), format_errors(exc)):
        if err["type"] == "union_tag_invalid" and err["loc"][:1] == ("scheduler",):
            line = f"scheduler.name: unknown scheduler {err['ctx']['tag']!r}; allowed: {err['ctx']['expected_tags']}"
        elif err["type"] == "union_tag_not_found" and err["loc"][:1] == ("scheduler",):
            line = "scheduler.name: missing; allowed: 'asha', 'hyperband', 'median', 'pbt', 'fifo'"
        if err["loc"][:1] == ("scheduler",) and len(err["loc"]) > 1:  # drop the union's tag from the path
            line = line.replace(f"scheduler.{err['loc'][1]}.", "scheduler.", 1)
        lines.append(line.removeprefix("(top level): "))
    return lines


def is_search_spec(raw: dict[str, Any]) -> bool:
    """A YAML mapping is a search spec when it has a top-level ``search:`` key."""
    return "search" in raw


# --------------------------------------------------------------------------- Tune objects


def _sampler(d: Dist):
    from ray import tune

    if d.kind in ("choice", "grid"):
        return tune.choice(list(getattr(d, d.kind)))
    if d.kind == "uniform":
        return tune.uniform(*d.uniform)
    if d.kind == "loguniform":
        return tune.loguniform(*d.loguniform)
    return tune.randint(d.randint[0], d.randint[1] + 1)  # Ray's upper bound is exclusive


def param_space(spec: SearchSpec) -> dict[str, Any]:
    from ray import tune

    return {
        key: tune.grid_search(list(getattr(d, d.kind)))
        if d.kind == "grid" or (spec.search.algorithm == "grid" and d.kind == "choice") else _sampler(d)
        for key, d in spec.search.space.items()
    }


def build_search_alg(spec: SearchSpec):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.search.seed)
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.search.max_concurrent_trials)


def build_scheduler(spec: SearchSpec):
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        HyperBandScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )

    s = spec.scheduler
    if isinstance(s, AshaSpec):
        return ASHAScheduler(
            time_attr="epoch", max_t=spec.max_epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor
        )
    if isinstance(s, HyperBandSpec):
        return HyperBandScheduler(time_attr="epoch", max_t=spec.max_epochs, reduction_factor=s.reduction_factor)
    if isinstance(s, MedianSpec):
        return MedianStoppingRule(
            time_attr="epoch", grace_period=s.grace_period, min_samples_required=s.min_samples_required
        )
    if isinstance(s, PbtSpec):
        return PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=s.perturbation_interval, quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            hyperparam_mutations={k: (list(getattr(d, d.kind)) if d.kind in ("choice", "grid") else _sampler(d))
                                  for k, d in spec.search.space.items()},
        )
    return FIFOScheduler()


def experiment_dir(spec: SearchSpec) -> str:
    from visionray.train import storage_path

    return f"{storage_path(spec).rstrip('/')}/{spec.output.name}"  # type: ignore[arg-type]


def run_trial(config: dict[str, Any], search: SearchSpec) -> None:
    """One trial (a Tune function trainable): the trial's ``TrainSpec``, then the same
    ``TorchTrainer`` as ``visionray train`` in ``<trial dir>/train``, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from visionray.train import build_trainer

    trial_dir = Path(tune.get_context().get_trial_dir()).name
    spec = trial_spec(search, config, storage=f"{experiment_dir(search)}/{trial_dir}")
    build_trainer(spec, callbacks=[TuneReportCallback()]).fit()


def run_trial_in_process(config: dict[str, Any], search: SearchSpec) -> None:
    """One population-based-training trial: the same ``Worker`` and epoch loop as ``visionray
    train``, run in the trial's process, reporting every epoch with a Tune checkpoint that PBT can
    hand to another trial. A trial started from a checkpoint (its own, or a better trial's after an
    exploit step) continues from that epoch with this trial's current hyperparameters."""
    import contextlib

    import torch
    from ray import tune

    from visionray.train import Worker, run_epochs

    trial_dir = Path(tune.get_context().get_trial_dir()).name
    spec = trial_spec(search, config, storage=f"{experiment_dir(search)}/{trial_dir}")
    device = torch.device("cuda" if spec.scaling.gpu else "cpu")
    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else contextlib.nullcontext() as restore_dir:
        meta = ckpt.read_metadata(Path(restore_dir)) if restore_dir else None
        if meta is not None and meta["epoch"] >= spec.optim.epochs:
            # PBT handed this trial a finished trial's checkpoint: it ends as that copy, at the last epoch
            tune.report(meta["metrics"], checkpoint=tune.Checkpoint.from_directory(restore_dir))
            return
        worker = Worker(spec, 0, 1, device, restore_dir=Path(restore_dir) if restore_dir else None)
    run_epochs(worker, lambda metrics, directory, epoch: tune.report(
        metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None,
    ))


def trial_dirname(trial) -> str:
    """``trial_<id>``: short, stable directory names (the config is in trials.csv, not in paths)."""
    return f"trial_{trial.trial_id}"


def _trainable(spec: SearchSpec):
    from ray import tune

    if isinstance(spec.scheduler, PbtSpec):  # the loop runs in the trial: it holds the worker's resources
        scaling = trial_spec(spec, {}, storage="/tmp", name="resources").scaling
        gpus = scaling.resources_per_worker.get("GPU", 1.0) if scaling.gpu else 0.0
        return tune.with_resources(tune.with_parameters(run_trial_in_process, search=spec),
                                   {"cpu": scaling.cpus_per_worker, "gpu": gpus})

    # The trial function only drives its TorchTrainer: no CPU of its own (Ray needs some resource in
    # a bundle, so a little memory), the inner workers get the cores, max_concurrent_trials bounds
    # how many trials run at once.
    return tune.with_resources(tune.with_parameters(run_trial, search=spec), {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})


# --------------------------------------------------------------------------- progress


@dataclass
class TrialRow:
    """What the live and closing tables show for one trial."""

    trial_id: str
    params: dict[str, Any]
    status: str  # PENDING, RUNNING, TERMINATED, ERROR, PAUSED
    epoch: int = 0
    value: float | None = None  # the metric at the last epoch
    best: float | None = None  # the best value so far
    retries: int = 0
    error: str | None = None


# The listener of the search running in this process (one at a time). It is kept out of the
# callback because Tune pickles its callbacks with the experiment and restores them on --resume.
_LISTENER: list[Callable[[list[TrialRow]], None]] = []


def _short(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in params.items()}


class ProgressCallback(Callback):
    """Driver-side Tune callback: one ``TrialRow`` per trial, handed to the listener on every change."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.rows: dict[str, TrialRow] = {}

    def _row(self, trial) -> TrialRow:
        row = self.rows.get(trial.trial_id)
        if row is None:
            row = self.rows[trial.trial_id] = TrialRow(trial.trial_id, _short(dict(trial.config)), trial.status)
        row.status = trial.status
        row.retries = trial.num_failures
        return row

    def _emit(self) -> None:
        for listener in _LISTENER:
            listener(sorted(self.rows.values(), key=lambda r: r.trial_id))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)
        self._emit()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row.status = "RUNNING"
        row.epoch = int(result.get("epoch", row.epoch))
        if self.metric in result:
            row.value = float(result[self.metric])
            better = max if self.mode == "max" else min
            row.best = row.value if row.best is None else better(row.best, row.value)
        self._emit()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._row(trial).status = "TERMINATED"
        self._emit()

    def on_trial_recover(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.error = _error_line(trial)
        self._emit()

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.status = "ERROR"
        row.error = _error_line(trial)
        self._emit()

    def on_step_end(self, iteration, trials, **info):
        changed = False
        for t in trials:
            row = self.rows.get(t.trial_id)
            if row is None or row.status != t.status:
                self._row(t)
                changed = True
        if changed:
            self._emit()


def _error_line(trial) -> str | None:
    """The last line of the trial's error file (the exception), kept short for a table."""
    path = getattr(trial, "local_path", None)
    candidates = [Path(path) / "error.txt"] if path else []
    for p in candidates:
        if p.exists():
            lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
            for ln in reversed(lines):
                if "Error" in ln or "Exception" in ln:
                    return ln.strip()[:200]
            return lines[-1][:200] if lines else None
    return "failed (see the trial's error.txt)"


# --------------------------------------------------------------------------- results


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # completed, early-stopped, error, unfinished
    epochs: int
    best_epoch: int | None
    best_value: float | None
    last_value: float | None
    num_params: int | None
    finished_at: float | None  # unix time of the trial's last report
    checkpoint: str | None  # the checkpoint of the best epoch
    trial_dir: str
    error: str | None
    curve: list[dict[str, float]] = field(default_factory=list)  # epoch, metric, val_loss, train_loss


@dataclass
class SearchOutcome:
    spec: SearchSpec
    experiment_dir: str
    trials: list[TrialSummary]  # ranked: best first (trials without a value last)
    best: TrialSummary | None
    best_dir: str | None
    interrupted: bool
    files: dict[str, str]
    wall_s: float


def _better_key(spec: SearchSpec):
    sign = -1.0 if spec.mode == "max" else 1.0

    def key(t: TrialSummary):
        if t.best_value is None:
            return (1, 0.0, 0, 0.0, t.trial_id)
        return (0, sign * t.best_value, t.num_params if t.num_params is not None else 1 << 62,
                t.finished_at or 0.0, t.trial_id)

    return key


def select_best(spec: SearchSpec, trials: list[TrialSummary]) -> TrialSummary | None:
    """The best trial by ``SELECTION_RULE`` (deterministic), or None when no trial reported."""
    ranked = sorted(trials, key=_better_key(spec))
    return ranked[0] if ranked and ranked[0].best_value is not None and ranked[0].checkpoint else None


def _summarise(spec: SearchSpec, result, trial, max_epochs: int) -> TrialSummary:
    import pandas as pd

    df = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
    trial_id = _trial_id(result)
    tune_status = trial.status if trial is not None else "PENDING"
    params = _short(dict(result.config or (trial.config if trial is not None else {})))
    curve: list[dict[str, float]] = []
    best_epoch = best_value = last_value = finished = ckpt_path = None
    if spec.metric in df.columns and len(df):
        df = df.dropna(subset=[spec.metric]).drop_duplicates(subset=["epoch"], keep="last").sort_values("epoch")
        for _, r in df.iterrows():
            curve.append({k: float(r[k]) for k in ("epoch", spec.metric, "val_loss", "train_loss") if k in r and pd.notna(r[k])})
        ascending = spec.mode == "min"
        ranked = df.sort_values([spec.metric, "epoch"], ascending=[ascending, True], kind="mergesort")
        top = ranked.iloc[0]
        best_epoch, best_value = int(top["epoch"]), float(top[spec.metric])
        last_value = float(df.iloc[-1][spec.metric])
        finished = float(df["timestamp"].max()) if "timestamp" in df.columns else None
        ckpt_path = _checkpoint_for(ranked, result)
    epochs = int(df["epoch"].max()) if "epoch" in df.columns and len(df) else 0
    error = None
    if result.error is not None or tune_status == "ERROR":
        status = "error"
        text = str(result.error).strip() if result.error is not None else ""
        error = f"{type(result.error).__name__}: {text.splitlines()[-1][:200] if text else ''}"
    elif tune_status == "TERMINATED":
        status = "completed" if epochs >= max_epochs else "early-stopped"
    else:  # PENDING, RUNNING or PAUSED when the search was interrupted
        status = "unfinished"
    num_params = None
    if ckpt_path:
        from visionray.models import count_parameters

        num_params = count_parameters(ckpt.load_model(ckpt_path)[0])
    return TrialSummary(
        trial_id=trial_id, params=params, status=status, epochs=epochs, best_epoch=best_epoch, best_value=best_value,
        last_value=last_value, num_params=num_params, finished_at=finished, checkpoint=ckpt_path,
        trial_dir=str(result.path), error=error, curve=curve,
    )


def _checkpoint_for(ranked, result) -> str | None:
    """The checkpoint of the best-ranked epoch that still exists (the inner run keeps the best few;
    in-process PBT trials report theirs to Tune, which keeps the latest few)."""
    if "checkpoint_path" in ranked.columns:
        paths = list(ranked["checkpoint_path"])
    else:
        by_epoch = {m.get("epoch"): c.path for c, m in (result.best_checkpoints or [])}
        paths = [by_epoch.get(e) for e in ranked["epoch"]]
    for p in paths:
        if isinstance(p, str) and "://" not in p and (Path(p) / ckpt.METADATA_FILE).exists():
            return p
    return None


def _trial_id(result) -> str:
    return Path(result.path).name.removeprefix("trial_")  # see trial_dirname


def collect(spec: SearchSpec, grid, wall_s: float, register: bool = True) -> SearchOutcome:
    """Summaries, ranking, exports (CSV, JSON, PNG), the best checkpoint's copy and registration."""
    from ray.tune import ExperimentAnalysis

    exp = experiment_dir(spec)
    known = {t.trial_id: t for t in ExperimentAnalysis(exp).trials}  # Tune's own record of each trial
    trials = [_summarise(spec, r, known.get(_trial_id(r)), spec.max_epochs) for r in grid]
    # interrupted: a trial left unfinished, or trials never started (unless the time budget ended the search)
    interrupted = any(t.status == "unfinished" for t in trials) or (
        spec.search.time_budget_s is None and len(trials) < spec.expected_trials()
    )
    trials.sort(key=_better_key(spec))
    best = select_best(spec, trials)
    files: dict[str, str] = {}
    best_dir = None
    if "://" not in exp:
        exp_path = Path(exp)
        files["csv"] = str(write_csv(spec, trials, exp_path / TRIALS_CSV))
        files["json"] = str(exp_path / TRIALS_JSON)
        (exp_path / TRIALS_JSON).write_text(json.dumps(
            {"experiment": spec.output.name, "metric": spec.metric, "mode": spec.mode, "selection": SELECTION_RULE,
             "interrupted": interrupted, "best": best.trial_id if best else None,
             "trials": [asdict(t) for t in trials]}, indent=2, default=str))
        files["plot"] = str(plot_search(spec, trials, exp_path / PLOT_PNG))
        if best is not None and not interrupted:
            best_dir = str(record_best(spec, best, exp_path))
            files["best"] = str(exp_path / BEST_JSON)
            log.info("best trial %s: %s=%s at epoch %s -> %s", best.trial_id, spec.metric, best.best_value,
                     best.best_epoch, best_dir)
    if register and best_dir and spec.registration is not None:
        from visionray import cli_registry

        cli_registry.register_after_run(spec.registration, best_dir, lineage=lineage(spec, best))
    return SearchOutcome(spec, exp, trials, best, best_dir, interrupted, files, wall_s)


def lineage(spec: SearchSpec, best: TrialSummary) -> dict[str, Any]:
    return {
        "experiment": spec.output.name, "experiment_dir": experiment_dir(spec), "trial_id": best.trial_id,
        "trial_dir": best.trial_dir, "checkpoint": best.checkpoint, "epoch": best.best_epoch,
        "params": best.params, "metric": spec.metric, "value": best.best_value,
    }


def record_best(spec: SearchSpec, best: TrialSummary, exp_path: Path) -> Path:
    """Copy the best checkpoint to ``<experiment>/best`` (weights and metadata, no optimiser state)
    and write ``best.json``: where registry and serving take the search's model from."""
    assert best.checkpoint is not None
    target = exp_path / BEST_DIR
    tmp = exp_path / f".{BEST_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (ckpt.MODEL_FILE, ckpt.METADATA_FILE):
        shutil.copy2(Path(best.checkpoint) / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    meta = ckpt.read_metadata(target)
    (exp_path / BEST_JSON).write_text(json.dumps({
        "experiment": spec.output.name, "trial_id": best.trial_id, "checkpoint": str(target),
        "source_checkpoint": best.checkpoint, "metric": spec.metric, "mode": spec.mode, "value": best.best_value,
        "epoch": best.best_epoch, "num_params": best.num_params, "params": best.params, "selection": SELECTION_RULE,
        "spec": meta.get("spec"),
        **({"pbt_schedule": pbt_schedule(exp_path, best.trial_id)} if isinstance(spec.scheduler, PbtSpec) else {}),
    }, indent=2, default=str))
    return target


def pbt_schedule(exp_path: Path, trial_id: str) -> dict[str, Any]:
    """The lineage of a trial's weights under PBT, oldest first: each time a trial (this one or one
    it copied) continued another's checkpoint, with Tune's report counts (one report per epoch)
    and the configs before and after, read from Tune's ``pbt_policy_<trial>.txt``. That file
    replays the schedule in a new run: ``ray.tune.schedulers.PopulationBasedTrainingReplay``."""
    policy = exp_path / f"pbt_policy_{trial_id}.txt"
    steps = []
    if policy.exists():
        for line in policy.read_text().splitlines():
            trial, donor, trial_reports, donor_reports, donor_config, new_config = json.loads(line)
            steps.append({"trial": trial, "copied": donor, "trial_reports": trial_reports,
                          "donor_reports": donor_reports, "donor_config": donor_config, "new_config": new_config})
    return {"policy_file": str(policy) if policy.exists() else None, "exploits": steps}


def write_csv(spec: SearchSpec, trials: list[TrialSummary], path: Path) -> Path:
    import csv

    keys = sorted(spec.search.space)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial_id", "status", *keys, "epochs", "best_epoch", f"best_{spec.metric}",
                    f"last_{spec.metric}", "num_params", "finished_at", "checkpoint", "error"])
        for i, t in enumerate(trials, 1):
            w.writerow([i, t.trial_id, t.status, *[t.params.get(k) for k in keys], t.epochs, t.best_epoch,
                        t.best_value, t.last_value, t.num_params, t.finished_at, t.checkpoint, t.error])
    return path


def plot_search(spec: SearchSpec, trials: list[TrialSummary], path: Path) -> Path:
    """Three panels: the metric against depth and against width (one point per trial, its best
    epoch), and every trial's learning curve; early-stopped trials dashed and marked where they stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    scored = [t for t in trials if t.best_value is not None]
    for ax, key, colour_key in ((axes[0], "model.depth", "model.width"), (axes[1], "model.width", "model.depth")):
        xs = [_param(spec, t, key) for t in scored]
        cs = [_param(spec, t, colour_key) for t in scored]
        ys = [t.best_value for t in scored]
        stopped = [t.status == "early-stopped" for t in scored]
        known = [c for c in cs if isinstance(c, (int, float))]
        norm = {"vmin": min(known), "vmax": max(known)} if known else {}
        for flag, marker, label in ((False, "o", "ran to the end"), (True, "x", "early-stopped")):
            pts = [(x, y, c) for x, y, c, s in zip(xs, ys, cs, stopped) if s == flag and x is not None]
            if pts:
                sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] or 0 for p in pts],
                                cmap="viridis", marker=marker, label=label, **norm)
        if scored and any(x is not None for x in xs):
            fig.colorbar(sc, ax=ax, label=colour_key)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {spec.metric}")
        ax.set_title(f"{spec.metric} vs {key.split('.')[-1]}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    ax = axes[2]
    for t in trials:
        if not t.curve:
            continue
        e = [p["epoch"] for p in t.curve]
        v = [p.get(spec.metric) for p in t.curve]
        style = {"completed": "-", "early-stopped": "--", "error": ":"}.get(t.status, "-.")
        (line,) = ax.plot(e, v, style, linewidth=1.2, label=f"{t.trial_id} ({t.status})")
        if t.status == "early-stopped":
            ax.plot(e[-1], v[-1], "x", color=line.get_color(), markersize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"learning curves ({spec.scheduler.name}: dashed = stopped early)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"search {spec.output.name}: {len(trials)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _param(spec: SearchSpec, t: TrialSummary, key: str) -> Any:
    """A trial's value of ``key``: sampled, or the base job's own."""
    if key in t.params:
        return t.params[key]
    node: Any = spec.base
    for part in key.split("."):
        node = getattr(node, part, None)
    if node is None and key.startswith("model."):  # the model's own default
        import inspect

        from visionray.models import _builder

        node = inspect.signature(_builder(spec.base.model.name)).parameters.get(key.split(".")[-1])
        node = None if node is None else node.default
    return node


# --------------------------------------------------------------------------- the driver


class SearchError(ValueError):
    """A search that cannot start or resume; the message says what to do."""


def run_search(
    spec: SearchSpec, resume: bool = False, on_update: Callable[[list[TrialRow]], None] | None = None,
) -> SearchOutcome:
    """Run (or with ``resume`` continue) the search on the connected Ray cluster and collect it."""
    from ray import tune

    # Trials keep the driver's working directory; relative data paths are made absolute here, where
    # the user ran the search, because Train's workers (and trials on other nodes) run elsewhere.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    spec = spec.model_copy(update={"base": with_absolute_paths(spec.base)})
    # The caller shows progress (``on_update``); Tune's own reporter stays quiet.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    exp = experiment_dir(spec)
    _LISTENER[:] = [on_update] if on_update is not None else []
    start, fitted = time.time(), False
    try:
        if resume:
            if not tune.Tuner.can_restore(exp):
                raise SearchError(f"{exp}: no search to resume there (run it without --resume first)")
            try:  # Tuner.restore unpickles the experiment's state: only what this driver sealed
                seal.verify(exp)
            except seal.SealError as exc:
                raise SearchError(f"{exp}: not resuming: {exc}. Ray would unpickle these files, so VisionRay resumes "
                                  "only state it sealed itself; start a new search (--set output.name=...)") from None
            tuner = tune.Tuner.restore(exp, trainable=_trainable(spec), resume_unfinished=True, resume_errored=False)
        else:
            if "://" not in exp and (Path(exp) / "tuner.pkl").exists():
                raise SearchError(
                    f"{exp} already holds a search: continue it with --resume, or pick another output.name "
                    f"(--set output.name=...)"
                )
            tuner = tune.Tuner(
                _trainable(spec),
                param_space=param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=spec.metric, mode=spec.mode, search_alg=build_search_alg(spec),
                    scheduler=build_scheduler(spec), num_samples=spec.search.num_samples,
                    max_concurrent_trials=spec.search.max_concurrent_trials, time_budget_s=spec.search.time_budget_s,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=spec.output.name, storage_path=exp.rsplit("/", 1)[0],
                    failure_config=tune.FailureConfig(max_failures=spec.failure.max_retries),
                    # PBT trials hand Tune their checkpoints; PBT copies the latest ones between trials
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=max(PBT_KEEP, spec.base.checkpoint.keep)),
                    callbacks=[ProgressCallback(spec.metric, spec.mode)],
                    verbose=0,
                ),
            )
        with warnings.catch_warnings():  # Tune's hint to reuse actors does not apply to function trainables
            warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
            fitted = True  # from here on, the experiment's state is this driver's own
            grid = tuner.fit()
        return collect(spec, grid, time.time() - start)
    finally:
        _LISTENER.clear()
        if fitted:  # never a state this call refused to resume or start over
            seal.seal(exp)  # what --resume will check; after collect, which writes best.json here
