"""What a finished or interrupted search leaves: trial summaries, the deterministic best trial
(``select_best``), best.json, the best checkpoint's copy, trials.csv and the plot (``collect``)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from visionray import checkpoint as ckpt

log = logging.getLogger(__name__)


from visionray.tune.plots import plot_search
from visionray.tune.spec import BEST_DIR, BEST_JSON, PLOT_PNG, PbtSpec, SELECTION_RULE, SearchSpec, TRIALS_CSV, TRIALS_JSON, experiment_dir

def short_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in params.items()}


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
    params = short_params(dict(result.config or (trial.config if trial is not None else {})))
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
    elif tune_status == "PAUSED" and epochs >= max_epochs:
        # Synchronous HyperBand can leave a trial paused at max_t for good: when the last other trial
        # of its bracket ends by itself, Ray's on_trial_remove skips a finished bracket and nobody
        # stops the paused one. It has trained every epoch there is: it is complete, not unfinished.
        status = "completed"
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


def collect(spec: SearchSpec, grid, wall_s: float) -> SearchOutcome:
    """Summaries, ranking, exports (CSV, JSON, PNG) and the best checkpoint's copy. Registering it
    (``register:``) is the caller's registry call, with ``lineage(spec, outcome.best)``."""
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
        "spec": meta.spec,
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
