"""Hyperparameter search with Ray Tune over the training job of ``visionray train``.

A search spec (``tune/*.yaml``, model ``SearchSpec``) names a base training job and a search
space over its fields: model depth, width and family, the augmentation policy (named policies
plus the parameters of their ops, such as randaugment's n and m), learning rate, weight decay,
batch size, optimiser. Every trial is a Tune function trainable that derives its own
``TrainSpec`` (validated, never a dict inward), builds the same ``TorchTrainer`` as ``visionray
train`` (``visionray.train.driver.build_trainer``) inside the trial's directory and reports every epoch
to Tune through ``TuneReportCallback``; under population-based training (``pbt``) a trial runs the
same ``Worker`` and epoch loop in its own process instead and reports a Tune checkpoint every epoch,
which PBT copies between trials. Schedulers stop trials on the ``epoch`` metric, so a trial
that Tune restarts (a retry, a resume, a HyperBand pause) continues its inner run from its latest
checkpoint and keeps counting epochs where it left off.

Best-trial selection (``select_best``) is deterministic: each trial scores its best epoch by the
metric (ties: the earlier epoch), trials rank by that score, ties go to the model with fewer
parameters, then to the trial that finished first, then to the lower trial id.

Ray's own module is always imported as ``from ray import tune``; this module is
``visionray.tune.run`` (its package also holds ``spec``, ``results``, ``plots`` and ``seal``).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from visionray import checkpoint as ckpt
from visionray.tune import seal
from visionray.specs import with_absolute_paths

log = logging.getLogger(__name__)
from visionray.tune.results import SearchOutcome, collect, short_params
from visionray.tune.spec import (PBT_KEEP, TRIAL_DRIVER_MEMORY, AshaSpec, Dist, HyperBandSpec, MedianSpec, PbtSpec, SearchSpec,
                                 experiment_dir, trial_spec)

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


def run_trial(config: dict[str, Any], search: SearchSpec) -> None:
    """One trial (a Tune function trainable): the trial's ``TrainSpec``, then the same
    ``TorchTrainer`` as ``visionray train`` in ``<trial dir>/train``, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from visionray.train.driver import build_trainer

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

    from visionray.train.worker import Worker, run_epochs

    trial_dir = Path(tune.get_context().get_trial_dir()).name
    spec = trial_spec(search, config, storage=f"{experiment_dir(search)}/{trial_dir}")
    device = torch.device("cuda" if spec.scaling.gpu else "cpu")
    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else contextlib.nullcontext() as restore_dir:
        meta = ckpt.read_metadata(Path(restore_dir)) if restore_dir else None
        if meta is not None and meta.epoch >= spec.optim.epochs:
            # PBT handed this trial a finished trial's checkpoint: it ends as that copy, at the last epoch
            tune.report(dict(meta.metrics), checkpoint=tune.Checkpoint.from_directory(restore_dir))
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


class ProgressCallback(Callback):
    """Driver-side Tune callback: one ``TrialRow`` per trial, handed to the listener on every change."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.rows: dict[str, TrialRow] = {}

    def _row(self, trial) -> TrialRow:
        row = self.rows.get(trial.trial_id)
        if row is None:
            row = self.rows[trial.trial_id] = TrialRow(trial.trial_id, short_params(dict(trial.config)), trial.status)
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
