"""Where runs live: the run directory layout of a spec and the checkpoints in it, and which of
them counts as best (``best_checkpoint``)."""

from __future__ import annotations

from pathlib import Path



from visionray import checkpoint as ckpt
from visionray.specs import TrainSpec


def storage_path(spec: TrainSpec) -> str:
    """Ray's storage path: a URI as given, a local path made absolute (Ray requires that)."""
    storage = spec.output.storage
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def run_dir(spec: TrainSpec) -> str:
    """Where Ray keeps this job's checkpoints: ``<storage>/<name>``."""
    return f"{storage_path(spec).rstrip('/')}/{spec.output.name}"


def local_log_dir(spec: TrainSpec) -> Path:
    """Where the driver writes metrics.csv and TensorBoard events: the run directory when it is
    local, else ``runs/<name>`` under the current directory."""
    if "://" in spec.output.storage:
        return Path("runs") / spec.output.name
    return Path(run_dir(spec))


def list_checkpoints(directory: str | Path) -> list[tuple[Path, ckpt.CheckpointMeta]]:
    """A run directory's checkpoints with their metadata, oldest epoch first."""
    found = []
    for d in sorted(Path(directory).glob("checkpoint_*")):
        try:
            found.append((d, ckpt.read_metadata(d)))
        except ckpt.CheckpointError:
            continue  # a checkpoint Ray is still writing, or one of another format
    return sorted(found, key=lambda item: item[1].epoch)


def completed_epochs(spec: TrainSpec) -> int:
    """Epochs the job's latest checkpoint holds (0 for a new job or a remote store)."""
    if "://" in spec.output.storage:
        return 0
    found = list_checkpoints(run_dir(spec))
    return found[-1][1].epoch if found else 0


def best_checkpoint(directory: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's best by val_acc (ties: later epoch)."""
    directory = Path(directory)
    if (directory / ckpt.METADATA_FILE).exists():
        return directory
    found = list_checkpoints(directory)
    if not found:
        raise ckpt.CheckpointError(f"{directory}: neither a checkpoint nor a run directory with checkpoints")
    return max(found, key=lambda item: (item[1].metrics.get("val_acc") or 0.0, item[1].epoch))[0]
