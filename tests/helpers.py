"""What many test modules share: the repository's path, and a real checkpoint factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visionray.checkpoint import save_checkpoint
from visionray.models import create_model
from visionray.specs import EvalPreset, TrainSpec

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10" / "train.tar.gz"
FIXTURES = REPO / "tests" / "fixtures"  # a checkpoint and a registry written by VisionRay 0.1.0 (format 1)
CLASSES = [str(i) for i in range(10)]


def make_checkpoint(
    directory: Path, *, arch: str = "convnet", kwargs: dict[str, Any] | None = None, channels: int = 1,
    size: int = 16, classes: list[str] = CLASSES, preset: EvalPreset | None = None, tta: str = "none",
    metrics: dict[str, Any] | None = None, epoch: int = 1, seed: int = 0, train_state: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> tuple[Path, torch.nn.Module]:
    """A real (untrained, seeded) checkpoint of ``arch(**kwargs)`` at ``directory``, through
    ``save_checkpoint``: the architecture comes from the spec's model section, as in training.
    ``spec`` adds sections to the TrainSpec; ``preset`` replaces the spec's eval preset.
    Returns (directory, the model in eval mode). With ``width`` 8 the weights are ~20 KB."""
    kwargs = {"depth": 2, "width": 8} if kwargs is None else kwargs
    train = TrainSpec.model_validate({
        "data": {"image_size": size}, "model": {"name": arch, **kwargs}, "evaluation": {"tta": tta}, **(spec or {}),
    })
    preset = preset or train.eval_preset(channels)
    torch.manual_seed(seed)
    model = create_model(arch, len(classes), preset.channels, preset.image_size, **kwargs)
    save_checkpoint(directory, model, spec=train, classes=list(classes), preset=preset,
                    metrics=metrics if metrics is not None else {"val_acc": 0.5, "val_loss": 1.0}, epoch=epoch,
                    train_state=train_state)
    return directory, model.eval()


SMALL = {"num_cpus": 0.25}  # CPUs per Serve replica in tests


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(registry: Path, keys, **over):
    """Serve app args for the digits model in ``registry`` (one small replica per deployment);
    ``over`` merges into a section (a dict) or replaces a field."""
    args = {
        "model": "digits@best", "registry": str(registry), "public_keys": [str(keys[1])],
        "sanitizer": {"body_timeout_s": 3.0, "decode_workers": 2},  # 2 decoder processes per replica on 2 cores
        "classifier": {**SMALL, "min_replicas": 1, "max_replicas": 1},
        "ingress": {**SMALL, "min_replicas": 1, "max_replicas": 1},
    }
    for key, value in over.items():
        args[key] = {**args[key], **value} if isinstance(value, dict) and isinstance(args.get(key), dict) else value
    return args


def deploy_apps(apps: dict) -> None:
    """Deploy several Serve apps at once (``name -> built app``, each under ``/name``) and wait until
    every one runs: their replicas start side by side, one wait instead of one per app."""
    from ray import serve
    from ray.serve.api import RunTarget

    serve.run_many([RunTarget(app, name=name, route_prefix=f"/{name}") for name, app in apps.items()])


def delete_apps(*names: str, timeout_s: float = 120.0) -> None:
    """Delete Serve apps side by side (each replica's graceful shutdown overlaps the others') and
    wait until they are gone, so the next test finds their CPUs free."""
    import time

    from ray import serve

    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while set(names) & set(serve.status().applications) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = set(names) & set(serve.status().applications)
    assert not left, f"apps still deleting after {timeout_s:.0f} s: {sorted(left)}"
