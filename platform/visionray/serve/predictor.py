"""The served model: loaded (signature verified first) and run on batches of decoded images.

``Predictor`` is the inference path of a classifier replica and of in-process tests alike: the
checkpoint's own eval preset (``visionray.transforms.eval_transform``, the code training used) makes
the tensors; on a GPU the model runs in half precision and channels_last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionray.checkpoint import CheckpointMeta
from visionray.specs import EvalPreset
from visionray.models import tta_logits
from visionray.serve.config import ServeSpec
from visionray.transforms import eval_transform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where a replica loads its model from, resolved once when the app is built so every replica
    loads the same bytes: a pinned registry version (``name@N``), or a checkpoint directory."""

    ref: str | None
    registry: str | None
    checkpoint: str | None
    public_keys: tuple[str, ...]
    allow_unsigned: bool
    model_input: tuple[int, int] | None = None  # (channels, image size) as listed when the app was built
    classes: tuple[str, ...] = ()  # as listed when the app was built


UNSIGNED_BY = "allow_unsigned: true in the serve config and VISIONRAY_ALLOW_UNSIGNED=1 in the environment"


def resolve_source(spec: ServeSpec) -> Source:
    """Pin the alias to its current version (its signed record verified first) and make every path
    absolute (replicas run elsewhere). Keys fall back to $VISIONRAY_VERIFY_KEYS, read here, where
    the app is built. Verification is off only when the config's ``allow_unsigned`` and
    $VISIONRAY_ALLOW_UNSIGNED=1 are both set: one of them alone is refused (``UnsignedRefused``)."""
    from visionray.registry.layout import ENV_ALLOW_UNSIGNED, allow_unsigned, verify_key_paths

    keys = tuple(str(Path(k).expanduser().resolve()) for k in (spec.public_keys or verify_key_paths()))
    if spec.allow_unsigned and not allow_unsigned():
        raise UnsignedRefused(f"allow_unsigned: true in the serve config turns model verification off only together with "
                              f"{ENV_ALLOW_UNSIGNED}=1 in the environment where the app is built (development "
                              "only); set both, or serve a signed registry model")
    unsigned = spec.allow_unsigned
    if spec.checkpoint is not None:
        from visionray.checkpoint import read_metadata

        checkpoint = Path(spec.checkpoint).expanduser().resolve()
        return Source(None, None, str(checkpoint), keys, unsigned, _input_of(read_metadata(checkpoint).eval_preset))
    return resolve_registry_model(spec.model, spec.registry, keys, unsigned)


def resolve_registry_model(ref: str, registry: str | None, keys: tuple[str, ...], allow_unsigned: bool = False) -> Source:
    """``ref`` (NAME@ALIAS, NAME@N) pinned to its version in ``registry`` (default
    $VISIONRAY_REGISTRY or ./registry), its signed record verified first against ``keys``."""
    from visionray.registry.layout import default_registry_root
    from visionray.registry.registry import Registry

    root = registry or default_registry_root()
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    mv = Registry(root).resolve(ref, list(keys), allow_unsigned=allow_unsigned)
    listed = _input_of(mv.metadata.eval_preset) if mv.metadata is not None else None
    classes = tuple(mv.metadata.classes) if mv.metadata is not None else ()
    return Source(f"{mv.name}@{mv.version}", root, None, keys, allow_unsigned, listed, classes)


def _input_of(preset: EvalPreset) -> tuple[int, int]:
    return preset.channels, preset.image_size


def check_input(source: Source, preset: EvalPreset) -> None:
    """The verified model's input must be the one the app was built for (the ingress decodes for
    it): listing metadata is read before verification, so a replica trusts it only when they agree."""
    if source.model_input is not None and source.model_input != _input_of(preset):
        raise InputMismatch(f"the verified model takes {_input_of(preset)} (channels, px) but the app was built for "
                            f"{source.model_input} from the listed metadata; redeploy the app")


class InputMismatch(RuntimeError):
    """The verified model's input differs from what the app was built with."""


class UnsignedRefused(ValueError):
    """``allow_unsigned`` set in one place only (the serve config or the environment)."""


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda, but this replica has no GPU (set classifier.num_gpus: 1, or device: auto)")
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_source(source: Source, device: torch.device) -> tuple[torch.nn.Module, CheckpointMeta, str, int | None]:
    """(model, metadata, name, version). A registry model is verified against the keys before its
    weights are read; ``VerificationError`` when it is unsigned, tampered or signed by another key."""
    if source.checkpoint is not None:
        from visionray.checkpoint import load_model

        assert source.allow_unsigned, "ServeSpec requires allow_unsigned for checkpoint directories"
        logger.warning("serving UNSIGNED checkpoint %s (%s: development only)", source.checkpoint, UNSIGNED_BY)
        model, meta = load_model(source.checkpoint, device=device)
        return model, meta, meta.job_name or Path(source.checkpoint).name, None
    from visionray.registry.registry import Registry

    model, meta = Registry(source.registry).load(
        source.ref, public_keys=list(source.public_keys), allow_unsigned=source.allow_unsigned, device=str(device),
    )
    return model, meta, meta.registry.name, meta.registry.version


@dataclass(frozen=True)
class Label:
    label: str
    index: int
    probability: float


class Predictor:
    """A model, its eval preset and its device; ``predict`` classifies decoded uint8 (C, H, W) arrays."""

    def __init__(self, model: torch.nn.Module, meta: CheckpointMeta, name: str, version: int | None,
                 device: torch.device):
        self.meta = meta
        self.name = name
        self.version = version
        self.device = device
        self.preset = meta.eval_preset
        self.transform = eval_transform(self.preset)
        self.tta = meta.tta  # the same test-time views as the checkpoint's evaluation
        self.classes: list[str] = list(meta.classes)
        self.half = device.type == "cuda"
        self.memory_format = torch.channels_last if self.half or meta.channels_last else torch.contiguous_format
        model = model.to(device).eval()
        if self.half:
            model = model.half()
        self.model = model.to(memory_format=self.memory_format)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.meta.model.name,
            "classes": self.classes,
            "input": {"channels": self.preset.channels, "image_size": self.preset.image_size},
            "eval_preset": self.preset.model_dump(mode="json"),
            "metrics": dict(self.meta.metrics),
            "device": str(self.device),
            "precision": "fp16" if self.half else "fp32",
            "tta": self.tta,
        }

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], k: int) -> list[list[Label]]:
        """Top-``k`` labels per image, most probable first."""
        c = self.preset.channels
        for a in images:
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[0] == c, f"expected uint8 ({c}, H, W), got {a.dtype} {a.shape}"
        x = torch.stack([self.transform(torch.from_numpy(a)) for a in images]).to(self.device, non_blocking=True)
        if self.half:
            x = x.half()
        x = x.contiguous(memory_format=self.memory_format)
        probs = tta_logits(self.model, x, self.tta).softmax(1).cpu()
        top = probs.topk(min(k, len(self.classes)), dim=1)
        return [
            [Label(self.classes[i], i, p) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(top.values, top.indices)
        ]
