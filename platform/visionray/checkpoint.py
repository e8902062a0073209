"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds
- ``model.safetensors``: the model's state dict;
- ``metadata.json``: format, resolved spec, model name and arguments, class names, eval preset,
  metrics, epoch and the versions of torch, torchvision, ray and visionray;
- ``train_state.safetensors`` + ``train_state.json``: optimiser, schedule, grad scaler and epoch, to
  resume (not needed to predict).
"""

from __future__ import annotations

import json
import platform as _platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import visionray
from visionray.models import TTA_MODES, create_model
from visionray.specs import EvalPreset

FORMAT = "visionray-checkpoint/1"
MODEL_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what is wrong."""


def versions() -> dict[str, str]:
    import ray
    import torchvision

    return {
        "visionray": visionray.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "ray": ray.__version__, "python": _platform.python_version(),
    }


# --------------------------------------------------------------------------- state codec


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Turn nested state (dicts with any keys, lists, tuples, tensors, numbers) into JSON, moving
    tensors into ``tensors``. The inverse is ``decode_state``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_state(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[k, encode_state(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [encode_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: decode_state(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


def save_train_state(directory: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(encoded))


def load_train_state(directory: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    tensors = load_file(str(directory / STATE_TENSORS), device=str(device))
    return decode_state(json.loads((directory / STATE_JSON).read_text()), tensors)


# --------------------------------------------------------------------------- model + metadata


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    directory: Path, model: nn.Module, *, spec: Any, model_name: str, model_kwargs: dict[str, Any],
    classes: list[str], preset: EvalPreset, metrics: dict[str, Any], epoch: int,
    train_state: dict[str, Any] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "model": {
            "name": model_name, "kwargs": model_kwargs, "num_classes": len(classes),
            "in_channels": preset.channels, "image_size": preset.image_size,
        },
        "classes": classes,
        "eval_preset": preset.model_dump(mode="json"),
        "metrics": metrics,
        "epoch": epoch,
        "spec": spec.model_dump(mode="json", by_alias=True),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    if train_state is not None:
        save_train_state(directory, train_state)


def read_metadata(directory: Path) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {METADATA_FILE}; not a VisionRay checkpoint") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def build_model(meta: dict[str, Any]) -> nn.Module:
    m = meta["model"]
    return create_model(m["name"], m["num_classes"], m["in_channels"], m["image_size"], **m["kwargs"])


def load_model(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode and its metadata. Reads only safetensors and JSON."""
    directory = Path(directory)
    meta = read_metadata(directory)
    model = build_model(meta)
    try:
        state = load_file(str(directory / MODEL_FILE), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {MODEL_FILE}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{directory / MODEL_FILE}: unreadable weights ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory / MODEL_FILE}: weights do not fit {meta['model']['name']} ({exc})") from None
    return model.to(device).eval(), meta


def eval_preset(meta: dict[str, Any]) -> EvalPreset:
    return EvalPreset.model_validate(meta["eval_preset"])


def tta_mode(meta: dict[str, Any]) -> str:
    """The test-time augmentation the checkpoint was evaluated with (``models.tta_logits``)."""
    mode = meta["spec"].get("evaluation", {}).get("tta", "none")
    if mode not in TTA_MODES:
        raise CheckpointError(f"checkpoint asks for test-time augmentation {mode!r}; this VisionRay knows "
                              f"{', '.join(TTA_MODES)} (a newer VisionRay wrote it?)")
    return mode
