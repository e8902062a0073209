"""`visionray tune`: search specs, per-trial jobs, best-trial selection, and real Ray Tune searches
(ASHA early stopping, retried faults, interrupt and resume)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from visionray.tune.results import TrialSummary, pbt_schedule, select_best
from visionray.tune.run import SearchError, TrialRow, _trainable, build_scheduler, build_search_alg, param_space, run_search
from visionray.tune.seal import ENV_STATE_KEY_FILE, seal, state_key
from visionray.tune.spec import BEST_DIR, BEST_JSON, PLOT_PNG, SearchSpec, TRIALS_CSV, TRIALS_JSON, experiment_dir, load_search_spec, trial_spec
from visionray.spec_io import SpecError
from tests.helpers import REPO

QUICK = REPO / "tune" / "quickstart.yaml"
CIFAR = REPO / "tune" / "cifar10-depth-width-aug.yaml"


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _base_raw() -> dict:
    return {
        "base": str(REPO / "jobs" / "quickstart.yaml"),
        "search": {"space": {"model.depth": {"choice": [2, 3]}}},
    }


# --------------------------------------------------------------------------- specs


def test_shipped_specs_validate():
    quick = load_search_spec(QUICK)
    assert quick.scheduler.name == "asha" and quick.search.num_samples == 8
    assert {"model.depth", "model.width", "augment", "augment.randaugment.m"} <= set(quick.search.space)
    cifar = load_search_spec(CIFAR)
    assert cifar.resources.gpus_per_worker == 0.25
    assert cifar.base.data.source == "cifar10"
    pbt = load_search_spec(REPO / "tune" / "pbt-lr-augment.yaml")
    assert pbt.scheduler.name == "pbt" and {"optim.lr", "augment", "augment.randaugment.m"} <= set(pbt.search.space)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["search.space.model.depht.choice=[2]"], "search.space.model.depht"),
        (["search.space.model.depth.randint=[0,3]"], "search.space.model.depth"),
        (["search.space.optim.lr.loguniform=[0,0.1]"], "loguniform"),
        (["search.space.optim.lr.uniform=[0.1,0.01]"], "low must be below high"),
        (["search.space.augment.choice=[nope]"], "search.space.augment"),
        (["scheduler.name=pbs"], "scheduler.name"),
        (["scheduler.name=pbt"], "search.space model.depth cannot change"),
        (["scheduler.name=pbt", "search.space={optim.lr: {loguniform: [0.001, 0.1]}}", "resources.workers=2"],
         "set resources.workers: 1"),
        (["scheduler.name=pbt", "search.space={optim.lr: {loguniform: [0.001, 0.1]}}", "search.algorithm=optuna", "resources.workers=1"],
         "not optuna"),
        (["scheduler.name=pbt", "search.space={optim.lr: {loguniform: [0.001, 0.1]}}", "search.num_samples=1", "resources.workers=1"],
         "needs a population"),
        (["scheduler={name: pbt, perturbation_interval: 12}", "search.space={optim.lr: {loguniform: [0.001, 0.1]}}",
          "resources.workers=1"],
         "perturbation_interval=12"),
        (["scheduler.grace_period=0"], "scheduler.grace_period"),
        (["search.num_samples=0"], "search.num_samples"),
        (["search.algorithm=bayes"], "search.algorithm"),
        (["resources.gpus_per_worker=1.5"], "gpus_per_worker"),
        (["base.optim.lr=-1"], "base.optim.lr"),
        (["search.space.output.name.choice=[a]"], "search.space.output.name"),
        (["search.space.model.depth.choice=[2]", "search.space.model.depth.uniform=[1,2]"], "exactly one of"),
        (["metric=Val Acc"], "metric"),
    ],
)
def test_bad_search_specs_name_the_field(tmp_path, overrides, field):
    raw = _base_raw()
    raw["search"]["policies"] = {"plain": [], "ra": [{"op": "randaugment"}]}
    with pytest.raises(SpecError) as info:
        load_search_spec(_write(tmp_path, raw), overrides)
    assert any(field in e for e in info.value.errors), info.value.errors


def test_a_training_job_is_not_a_search_spec():
    with pytest.raises(SpecError, match="search: missing"):
        load_search_spec(REPO / "jobs" / "quickstart.yaml")


def test_grid_algorithm_rejects_continuous_axes(tmp_path):
    raw = _base_raw()
    raw["search"] |= {"algorithm": "grid", "space": {"optim.lr": {"uniform": [0.001, 0.01]}}}
    with pytest.raises(SpecError, match="algorithm 'grid'"):
        load_search_spec(_write(tmp_path, raw))


def test_broken_spec_exits_2_naming_the_field(tmp_path):
    from visionray.cli import app

    raw = _base_raw()
    raw["search"]["space"]["model.widht"] = {"choice": [8]}
    path = _write(tmp_path, raw)
    for args in (["tune", str(path)], ["validate", str(path)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "model.widht" in result.output and "width" in result.output


def test_validate_reports_a_search_spec():
    from visionray.cli import app

    result = CliRunner().invoke(app, ["validate", str(QUICK)])
    assert result.exit_code == 0 and "search quickstart-search" in result.output


# --------------------------------------------------------------------------- per-trial jobs


def test_trial_spec_applies_values_policies_and_resources():
    spec = load_search_spec(QUICK, ["resources.gpus_per_worker=0.25", "resources.workers=2"])
    t = trial_spec(
        spec,
        {"model.depth": np.int64(4), "model.width": 8, "optim.lr": 0.01, "augment": "randaugment",
         "augment.randaugment.m": 13},
        storage="/tmp/exp/trial_x",
    )
    assert (t.model.depth, t.model.width, t.optim.lr) == (4, 8, 0.01)
    assert [(op.op, op.n, op.m) for op in t.augment] == [("randaugment", 2, 13)]
    assert t.optim.epochs == spec.max_epochs == 6
    assert t.checkpoint.every_epochs == 1 and t.checkpoint.max_failures == 0
    assert t.scaling.workers == 2 and t.scaling.gpu and t.scaling.resources_per_worker == {"GPU": 0.25}
    assert (t.output.storage, t.output.name, t.registration) == ("/tmp/exp/trial_x", "train", None)
    plain = trial_spec(spec, {"augment": "none", "augment.randaugment.m": 13}, storage="/tmp/x")
    assert plain.augment == []


def test_param_space_and_grid_size(tmp_path):
    from ray import tune

    raw = _base_raw()
    raw["search"] |= {"num_samples": 2, "space": {
        "model.depth": {"grid": [2, 3, 4]}, "model.width": {"randint": [8, 9]}, "optim.lr": {"loguniform": [1e-3, 1e-1]}}}
    spec = load_search_spec(_write(tmp_path, raw))
    space = param_space(spec)
    assert space["model.depth"] == tune.grid_search([2, 3, 4])
    assert (space["model.width"].lower, space["model.width"].upper) == (8, 10)  # inclusive high
    assert spec.expected_trials() == 6


@pytest.mark.parametrize(
    "overrides, scheduler_cls, searcher_cls",
    [
        ([], "AsyncHyperBandScheduler", "BasicVariantGenerator"),
        (["scheduler={name: hyperband, reduction_factor: 3}"], "HyperBandScheduler", "BasicVariantGenerator"),
        (["scheduler={name: median, grace_period: 2}"], "MedianStoppingRule", "BasicVariantGenerator"),
        (["scheduler={name: fifo}", "search.algorithm=optuna"], "FIFOScheduler", "OptunaSearch"),
        (["scheduler={name: pbt}", "search.space={optim.lr: {loguniform: [0.001, 0.1]}, augment: {choice: [none, randaugment]}}",
          "resources.workers=1"], "PopulationBasedTraining", "BasicVariantGenerator"),
    ],
)
def test_schedulers_and_search_algorithms(overrides, scheduler_cls, searcher_cls):
    spec = load_search_spec(QUICK, overrides)
    scheduler = build_scheduler(spec)
    assert type(scheduler).__name__ == scheduler_cls
    assert getattr(scheduler, "_time_attr", "epoch") == "epoch"  # trials restarted mid-run keep counting epochs
    assert type(build_search_alg(spec)).__name__ == searcher_cls


def test_pbt_mutations_cover_the_space_and_trials_hold_their_worker_resources():
    spec = load_search_spec(QUICK, [
        "scheduler={name: pbt, perturbation_interval: 2}", "resources={workers: 1, cpus_per_worker: 1}",
        "search.space={optim.lr: {loguniform: [0.001, 0.1]}, augment: {choice: [none, randaugment]}, "
        "augment.randaugment.m: {randint: [5, 12]}}",
    ])
    mutations = build_scheduler(spec)._hyperparam_mutations
    assert set(mutations) == set(spec.search.space) and mutations["augment"] == ["none", "randaugment"]
    resources = _trainable(spec)._resources  # the trial process runs the loop itself
    assert resources.required_resources == {"CPU": 1.0}


def test_restored_worker_keeps_its_own_learning_rate(tmp_path):
    """PBT continues another trial's checkpoint with perturbed values: the optimiser and schedule
    state come from the checkpoint, the hyperparameters from the trial's own spec."""
    import torch

    from visionray.specs import load_spec
    from visionray.train.worker import Worker

    base = ["data.limit=200", "optim.epochs=3", "optim.lr=0.01", "optim.weight_decay=0.001", "scaling.workers=1"]
    donor = Worker(load_spec(REPO / "jobs" / "quickstart.yaml", base), 0, 1, torch.device("cpu"))
    metrics = donor.run_epoch(0)
    donor.save(tmp_path, metrics, 1)
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [*base, "optim.lr=0.03", "optim.weight_decay=0.002"])
    taker = Worker(spec, 0, 1, torch.device("cpu"), restore_dir=tmp_path)
    factor = taker.scheduler.lr_lambdas[0](taker.scheduler.last_epoch)
    assert taker.start_epoch == 1 and taker.scheduler.last_epoch == donor.scheduler.last_epoch > 0
    ratio = taker.optimizer.param_groups[0]["initial_lr"] / donor.optimizer.param_groups[0]["initial_lr"]
    assert ratio == pytest.approx(3.0)
    assert taker.optimizer.param_groups[0]["lr"] == pytest.approx(taker.optimizer.param_groups[0]["initial_lr"] * factor)
    assert taker.optimizer.param_groups[0]["weight_decay"] == 0.002 and taker.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert taker.optimizer.state and len(taker.optimizer.state) == len(donor.optimizer.state)  # moments carried over
    for a, b in zip(donor.model.state_dict().values(), taker.model.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- best-trial selection


def _summary(tid: str, value, params: int, finished: float, status: str = "completed") -> TrialSummary:
    return TrialSummary(
        trial_id=tid, params={}, status=status, epochs=3, best_epoch=2, best_value=value, last_value=value,
        num_params=params, finished_at=finished, checkpoint="/ckpt" if value is not None else None,
        trial_dir="/t", error=None,
    )


@pytest.mark.parametrize(
    "trials, expected",
    [
        ([_summary("a", 0.90, 10, 5.0), _summary("b", 0.95, 99, 9.0)], "b"),  # higher metric wins
        ([_summary("a", 0.95, 50, 1.0), _summary("b", 0.95, 10, 9.0)], "b"),  # tie: fewer parameters
        ([_summary("a", 0.95, 10, 8.0), _summary("b", 0.95, 10, 3.0)], "b"),  # tie: earlier finish
        ([_summary("b", 0.95, 10, 3.0), _summary("a", 0.95, 10, 3.0)], "a"),  # tie: lower id
        ([_summary("a", None, 10, 1.0, "error"), _summary("b", 0.5, 10, 2.0)], "b"),  # no value never wins
    ],
)
def test_select_best_is_deterministic(trials, expected):
    spec = load_search_spec(QUICK)
    assert select_best(spec, trials).trial_id == expected
    assert select_best(spec, list(reversed(trials))).trial_id == expected


# --------------------------------------------------------------------------- real searches


def _search(tmp_path: Path, name: str, overrides: list[str]) -> SearchSpec:
    return load_search_spec(QUICK, [f"output.storage={tmp_path}", f"output.name={name}", *overrides])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_search_early_stops_and_records_a_loadable_best(ray_cluster, tmp_path):
    from visionray.checkpoint import load_model
    from visionray.evaluate import evaluate_checkpoint

    # ASHA's decisions depend on the order results arrive in. One trial at a time, the good learning
    # rate first, makes them certain: each later trial (lr too small to learn in one epoch) reaches
    # the first rung below the recorded cutoff and is stopped there.
    spec = _search(tmp_path, "quick", [
        "search.algorithm=grid", "search.num_samples=1", "search.max_concurrent_trials=1", "search.space={}",
        "search.space.optim.lr.grid=[0.02, 0.00001, 0.00002]",
        "scheduler.max_epochs=2", "scheduler.grace_period=1", "scheduler.reduction_factor=2",
    ])
    updates: list[list[TrialRow]] = []
    out = run_search(spec, on_update=updates.append)

    assert not out.interrupted and len(out.trials) == 3
    assert updates and {r.status for r in updates[-1]} <= {"TERMINATED"}
    stopped = [t for t in out.trials if t.status == "early-stopped"]
    assert stopped and all(t.epochs < spec.max_epochs for t in stopped)  # ASHA stopped some before max epochs
    assert any(t.status == "completed" and t.epochs == spec.max_epochs for t in out.trials)
    assert [t.best_value for t in out.trials] == sorted((t.best_value for t in out.trials), reverse=True)
    assert out.best is out.trials[0] and out.best.best_value == max(t.best_value for t in out.trials)

    exp = Path(out.experiment_dir)
    for name in (TRIALS_CSV, TRIALS_JSON, PLOT_PNG, BEST_JSON):
        assert (exp / name).stat().st_size > 0, name
    best = json.loads((exp / BEST_JSON).read_text())
    assert best["trial_id"] == out.best.trial_id and best["value"] == out.best.best_value
    # the stopped trials keep checkpoints too (every epoch is checkpointed in trials)
    assert all(t.checkpoint and Path(t.checkpoint).exists() for t in stopped)

    model, meta = load_model(best["checkpoint"])
    assert meta.metrics["val_acc"] == pytest.approx(out.best.best_value)
    ev = evaluate_checkpoint(model, meta, "val")  # predicts the held-out split through the eval preset
    assert ev.top1 == pytest.approx(out.best.best_value, abs=0.02) and ev.top1 > 0.5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failing_trial_is_retried_and_does_not_stop_the_search(ray_cluster, tmp_path):
    # resnet needs depth 6n+2: the resnet trial raises in its workers every time it starts.
    spec = _search(tmp_path, "faults", [
        "search.algorithm=grid", "search.num_samples=1", "search.space={}",
        "search.space.model.name.grid=[convnet, resnet]", "scheduler={name: fifo}",
        "base.optim.epochs=1", "failure.max_retries=1",
    ])
    rows: list[list[TrialRow]] = []
    out = run_search(spec, on_update=rows.append)

    assert not out.interrupted and len(out.trials) == 2
    by_model = {t.params["model.name"]: t for t in out.trials}
    assert by_model["convnet"].status == "completed" and by_model["convnet"].best_value is not None
    failed = by_model["resnet"]
    assert failed.status == "error" and failed.error
    last = {r.params["model.name"]: r for r in rows[-1]}
    assert last["resnet"].status == "ERROR" and last["resnet"].retries == 2  # the first run and one retry
    assert "depth" in (last["resnet"].error or "")
    assert out.best.trial_id == by_model["convnet"].trial_id


def _finished_trials(exp: Path, epochs: int) -> dict[str, str]:
    done = {}
    for d in exp.glob("trial_*"):
        f = d / "result.json"
        if f.exists():
            lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            if any(r.get("epoch") == epochs for r in lines):
                done[d.name] = f.read_text()
    return done


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    spec = _search(tmp_path, "resume", [
        "search.num_samples=2", "search.max_concurrent_trials=1", "scheduler={name: fifo}", "base.optim.epochs=2",
    ])
    exp = Path(experiment_dir(spec))

    def interrupt_after_first_trial() -> None:  # Ctrl+C's path: Tune also stops on SIGUSR1
        while not _finished_trials(exp, 2):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGUSR1)

    watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
    watcher.start()
    first = run_search(spec)
    watcher.join(timeout=5)
    finished = _finished_trials(exp, 2)
    assert first.interrupted and first.best_dir is None  # nothing recorded from a partial search
    assert not (exp / BEST_JSON).exists()
    assert len(finished) == 1

    with pytest.raises(SearchError, match="--resume"):
        run_search(spec)  # a new run would mix with the old trials
    second = run_search(spec, resume=True)
    assert not second.interrupted and len(second.trials) == 2
    assert all(t.status == "completed" for t in second.trials)
    for name, text in finished.items():  # finished trials were not run again
        assert (exp / name / "result.json").read_text() == text
    assert second.best is not None and (exp / BEST_DIR / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trial_whose_worker_dies_is_retried_and_finishes(ray_cluster, tmp_path, kill_train_worker_after):
    """SIGKILL of a trial's training worker process: Tune retries the trial from its checkpoint."""
    spec = _search(tmp_path, "worker-dies", [
        "search.algorithm=grid", "search.num_samples=1", "search.space={}", "search.space.model.depth.grid=[2]",
        "scheduler={name: fifo}", "base.optim.epochs=3", "failure.max_retries=2",
        "base.data.source=synthetic", "base.data.num_samples=4000", "base.data.image_size=32", "base.data.channels=3",
        "base.augment=[]", "base.model.width=32",
    ])
    killed = kill_train_worker_after(Path(experiment_dir(spec)), "trial_*/train/checkpoint_epoch_0001")
    rows: list[list[TrialRow]] = []
    out = run_search(spec, on_update=rows.append)
    assert killed, "no trial worker was killed"
    assert len(out.trials) == 1 and out.trials[0].status == "completed"
    assert rows[-1][0].retries >= 1 and rows[-1][0].epoch == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pbt_search_exploits_and_records_a_loadable_best(ray_cluster, tmp_path):
    """Population-based training on digits: trials in the bottom quantile take a top trial's
    checkpoint and perturbed values; the best model loads and predicts. Six epochs and a
    perturbation every second give each trial two chances (asynchronous PBT compares a trial only
    with those that have reported, and short trials started seconds apart overlap for few of their
    reports), and no trial is judged at its first report after a restore: Ray logs a trial's report
    count before it records that report, so such an exploit would be logged at report 0."""
    from visionray.checkpoint import load_model
    from visionray.evaluate import evaluate_checkpoint

    spec = _search(tmp_path, "pbt", [
        "scheduler={name: pbt, perturbation_interval: 2, quantile_fraction: 0.5, max_epochs: 6}",
        "search.space={optim.lr: {loguniform: [0.0001, 0.05]}, augment: {choice: [none, randaugment]}}",
        "search.num_samples=4", "search.max_concurrent_trials=4", "resources={workers: 1, cpus_per_worker: 0.5}",
    ])
    out = run_search(spec)

    assert not out.interrupted and len(out.trials) == 4
    assert all(t.status == "completed" and t.epochs == 6 for t in out.trials)
    exp = Path(out.experiment_dir)
    exploits = (exp / "pbt_global.txt").read_text().splitlines() if (exp / "pbt_global.txt").exists() else []
    assert exploits, "no trial took another's checkpoint"
    best = json.loads((exp / BEST_JSON).read_text())
    assert set(best["pbt_schedule"]) == {"policy_file", "exploits"}
    # Every exploited trial's schedule is recorded and replayable by Ray's own replay scheduler.
    from ray.tune.schedulers import PopulationBasedTrainingReplay

    schedules = [pbt_schedule(exp, t.trial_id) for t in out.trials]
    exploited = [sch for sch in schedules if sch["exploits"]]
    assert exploited, "exploits were logged but no trial's schedule records one"
    for sch in exploited:
        for step in sch["exploits"]:
            assert set(step["new_config"]) == set(spec.search.space) and step["donor_reports"] >= 1
            assert step["trial_reports"] >= spec.scheduler.perturbation_interval
        replay = PopulationBasedTrainingReplay(sch["policy_file"])  # what a replay run would follow
        assert replay._policy and replay._policy[-1][1] == sch["exploits"][-1]["new_config"]
        assert set(replay.config) == set(spec.search.space)
    if best["pbt_schedule"]["exploits"]:
        assert best["pbt_schedule"] == pbt_schedule(exp, out.best.trial_id)
    model, meta = load_model(best["checkpoint"])
    assert meta.metrics["val_acc"] == pytest.approx(out.best.best_value)
    assert evaluate_checkpoint(model, meta, "val").top1 > 0.5


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("overrides, kind", [
    (["scheduler={name: hyperband, reduction_factor: 2, max_epochs: 2}"], "hyperband"),
    (["scheduler={name: median, grace_period: 1, min_samples_required: 1}", "base.optim.epochs=1"], "median"),
    (["scheduler={name: fifo}", "base.optim.epochs=1", "search.algorithm=optuna"], "optuna"),
])
def test_hyperband_median_and_optuna_each_run_a_real_search(ray_cluster, tmp_path, overrides, kind):
    """Not only built: a short search of two trials under each, to a loadable best."""
    from visionray.checkpoint import load_model

    spec = _search(tmp_path, kind, [
        "search.num_samples=2", "search.max_concurrent_trials=2", "search.space={optim.lr: {loguniform: [0.01, 0.05]}}",
        "base.data.limit=600", *overrides,
    ])
    out = run_search(spec)
    assert not out.interrupted and len(out.trials) == 2 and out.best is not None
    assert all(t.status in ("completed", "early-stopped") and 1 <= t.epochs <= 2 for t in out.trials)
    lrs = [t.params["optim.lr"] for t in out.trials]
    assert all(0.01 <= lr <= 0.05 for lr in lrs) and len(set(lrs)) == 2  # each algorithm drew its own values
    model, meta = load_model(out.best_dir)
    assert meta.metrics["val_acc"] == pytest.approx(out.best.best_value) and meta.epoch == out.best.best_epoch


class _Payload:
    """A pickle that runs a shell command when loaded: what a crafted tuner.pkl carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("attack", ["unsealed", "swapped_after_seal", "sealed_with_another_key"])
def test_resume_refuses_state_it_did_not_seal_and_never_unpickles_it(tmp_path, monkeypatch, attack):
    import pickle


    monkeypatch.setenv(ENV_STATE_KEY_FILE, str(tmp_path / "keys" / "state.key"))
    spec = _search(tmp_path, "crafted", [])
    exp = Path(experiment_dir(spec))
    exp.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    (exp / "experiment_state-2026.json").write_text("{}")
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"tuner": "harmless"}))
    if attack == "swapped_after_seal":
        seal(str(exp))
    elif attack == "sealed_with_another_key":
        monkeypatch.setenv(ENV_STATE_KEY_FILE, str(tmp_path / "keys" / "attacker.key"))
        seal(str(exp))
        monkeypatch.setenv(ENV_STATE_KEY_FILE, str(tmp_path / "keys" / "state.key"))
        state_key(create=True)
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    message = {"unsealed": "no .visionray-seal.json", "swapped_after_seal": "changed: tuner.pkl",
               "sealed_with_another_key": "not made with this machine's state key"}[attack]
    with pytest.raises(SearchError, match=message):
        run_search(spec, resume=True)
    with pytest.raises(SearchError, match=message):  # a refused resume does not seal what it refused
        run_search(spec, resume=True)
    assert not marker.exists()
