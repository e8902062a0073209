"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds
- ``model.safetensors``: the model's state dict;
- ``metadata.json``: ``CheckpointMeta`` (format, architecture, class names, eval preset and its
  test-time augmentation, metrics, epoch, the resolved spec, versions of torch, torchvision, ray,
  visionray);
- ``train_state.safetensors`` + ``train_state.json``: optimiser, schedule, grad scaler and epoch, to
  resume (not needed to predict).
"""

from __future__ import annotations

import json
import platform as _platform
import time
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

import visionray
from visionray.models import TTA_MODES, create_model
from visionray.spec_io import Strict
from visionray.spec_io import format_errors
from visionray.specs import DataSpec, EvalPreset, TrainSpec

FORMAT = "visionray-checkpoint/1"
MODEL_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what is wrong."""


M = TypeVar("M", bound="CheckpointMeta")


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


class Architecture(Strict):
    """What ``create_model`` needs to rebuild the network."""

    name: str = Field(description="a name from visionray.models.list_models()")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the model's own arguments (depth, width...)")
    num_classes: int = Field(ge=2)
    in_channels: Literal[1, 3]
    image_size: int = Field(ge=8, le=1024, description="square input side (px)")


class CheckpointMeta(Strict):
    """``metadata.json`` of a training checkpoint: everything needed to rebuild, evaluate and serve
    the model, and where it came from. Frozen; written and read only through this model."""

    format: Literal["visionray-checkpoint/1"] = FORMAT
    model: Architecture
    classes: list[str] = Field(min_length=2)
    eval_preset: EvalPreset = Field(description="the one path from a decoded image to a model input")
    tta: str = Field("none", description="test-time augmentation the model is evaluated and served with")
    metrics: dict[str, float | int | None] = Field(default_factory=dict, description="the epoch's reported metrics")
    epoch: int = Field(ge=0, description="epochs completed")
    spec: dict[str, Any] = Field(description="the resolved TrainSpec, as JSON")
    skipped_images: list[str] = Field(default_factory=list, description="images that did not decode and were left "
                                      "out of training and validation (data.on_bad_file: skip)")
    versions: dict[str, str] = Field(default_factory=dict, description="visionray, torch, torchvision, ray, python")
    created: str = Field(description="UTC, ISO 8601")

    @model_validator(mode="before")
    @classmethod
    def _tta_from_spec(cls, data: Any) -> Any:
        """Checkpoints written before ``tta`` was recorded here kept it only in the spec."""
        if isinstance(data, dict) and "tta" not in data and isinstance(data.get("spec"), dict):
            tta = (data["spec"].get("evaluation") or {}).get("tta")
            if tta is not None:
                data = {**data, "tta": tta}
        return data

    @field_validator("tta")
    @classmethod
    def _known_tta(cls, mode: str) -> str:
        if mode not in TTA_MODES:
            raise ValueError(f"test-time augmentation {mode!r}; this VisionRay knows {', '.join(TTA_MODES)} "
                             "(a newer VisionRay wrote it?)")
        return mode

    @property
    def job_name(self) -> str | None:
        return (self.spec.get("output") or {}).get("name")

    @property
    def channels_last(self) -> bool:
        """The model trained in channels_last (``scaling.channels_last``): inference runs so too
        (on this project's CPU 1.8x the contiguous forward pass of the CIFAR recipe's net)."""
        return bool((self.spec.get("scaling") or {}).get("channels_last"))

    def data_spec(self) -> DataSpec:
        """The data section of the resolved spec, validated again (the held-out split's definition)."""
        return DataSpec.model_validate(self.spec["data"])


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    directory: Path, model: nn.Module, *, spec: TrainSpec, classes: list[str], preset: EvalPreset,
    metrics: dict[str, Any], epoch: int, train_state: dict[str, Any] | None = None, skipped: Sequence[str] = (),
) -> CheckpointMeta:
    """Write the weights (safetensors), the metadata (JSON) and, to resume, the training state."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": FORMAT})
    meta = CheckpointMeta(
        model=Architecture(name=spec.model.name, kwargs=spec.model.kwargs(), num_classes=len(classes),
                           in_channels=preset.channels, image_size=preset.image_size),
        classes=classes, eval_preset=preset, tta=spec.evaluation.tta, metrics=metrics, epoch=epoch,
        spec=spec.model_dump(mode="json", by_alias=True), skipped_images=list(skipped), versions=versions(),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    (directory / METADATA_FILE).write_text(meta.model_dump_json(indent=2))
    if train_state is not None:
        save_train_state(directory, train_state)
    return meta


def parse_metadata(raw: Any, model: type[M], label: str, error: type[Exception] = CheckpointError) -> M:
    """Validate metadata read from JSON against ``model``; ``error`` names the file and each bad field."""
    expected = model.model_fields["format"].default
    got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
    if got != expected:
        raise error(f"{label}: format {got!r}, expected {expected!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{label}: metadata does not describe a model this VisionRay can build: "
                    + "; ".join(format_errors(exc))) from None


def read_metadata(directory: Path) -> CheckpointMeta:
    path = Path(directory) / METADATA_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {METADATA_FILE}; not a VisionRay checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    return parse_metadata(raw, CheckpointMeta, str(path))


def build_model(meta: CheckpointMeta) -> nn.Module:
    """The architecture a checkpoint's (or a registry version's) metadata names, untrained."""
    m = meta.model
    return create_model(m.name, m.num_classes, m.in_channels, m.image_size, **m.kwargs)


def model_from(directory: Path, meta: CheckpointMeta, device: torch.device | str = "cpu", label: str | None = None,
               unreadable: type[Exception] = CheckpointError) -> nn.Module:
    """The one way a model is made from files: ``build_model(meta)`` with the weights of
    ``directory/model.safetensors`` (a training checkpoint, or a registry copy already verified),
    in eval mode. Only safetensors is read; ``unreadable`` is raised for weights that are not."""
    label = label or str(directory)
    try:
        model = build_model(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{label}: metadata does not describe a model this VisionRay can build ({exc})") from None
    try:
        state = load_file(str(Path(directory) / MODEL_FILE), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{label}: no {MODEL_FILE}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise unreadable(f"{label}: unreadable weights in {MODEL_FILE}, not valid safetensors ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{label}: weights do not fit {meta.model.name} ({exc})") from None
    return model.to(device).eval()


def load_model(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """A training checkpoint's model in eval mode and its metadata. Reads only safetensors and JSON."""
    meta = read_metadata(Path(directory))
    return model_from(Path(directory), meta, device), meta
