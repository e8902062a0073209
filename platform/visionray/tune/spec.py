"""The search spec (``tune/*.yaml``): ``SearchSpec`` and its sections, validated once, and the
``TrainSpec`` each trial derives from it (``trial_spec``)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from visionray.ops import AUGMENT_OPS, AugmentOp
from visionray.spec_io import format_errors, validate_model
from visionray.specs import OutputSpec, RegisterSpec, TrainSpec, _ops_from_shorthand
from visionray.spec_io import SpecError, Strict, apply_overrides, read_yaml

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


def experiment_dir(spec: SearchSpec) -> str:
    from visionray.runs import storage_path

    return f"{storage_path(spec).rstrip('/')}/{spec.output.name}"  # type: ignore[arg-type]
