"""A registry's on-disk contract and its settings: the formats and file names of a version, the
environment variables that configure trust, and the errors every registry operation raises."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from visionray import checkpoint as ckpt
from visionray.spec_io import Strict

FORMAT = "visionray-model/1"
ALIAS_FORMAT = "visionray-alias/1"
MODEL_FILE = ckpt.MODEL_FILE  # model.safetensors
METADATA_FILE = ckpt.METADATA_FILE  # metadata.json
SIGNATURE_FILE = "model.sig"
VERSION_FILES = (MODEL_FILE, METADATA_FILE, SIGNATURE_FILE)



class RegistryRecord(Strict):
    """Which version this is, who signed it, when and with what it was registered."""

    name: str
    version: int = Field(ge=1)
    signer: str | None = Field(None, description="sha256 fingerprint of the signing key; None: unsigned")
    registered: str = Field(description="UTC, ISO 8601")
    versions: dict[str, str] = Field(default_factory=dict)


class VersionMeta(ckpt.CheckpointMeta):
    """``metadata.json`` of a registry version (or an export of one): the checkpoint's metadata,
    signed together with the weights, plus its input shape, lineage and registry record."""

    format: Literal["visionray-model/1"] = FORMAT
    input_shape: list[int] = Field(min_length=3, max_length=3, description="C, H, W of one input image")
    lineage: dict[str, Any] = Field(default_factory=dict, description="the run, trial or checkpoint it came from")
    registry: RegistryRecord


ENV_REGISTRY = "VISIONRAY_REGISTRY"
ENV_SIGNING_KEY = "VISIONRAY_SIGNING_KEY"
ENV_VERIFY_KEYS = "VISIONRAY_VERIFY_KEYS"
ENV_ALLOW_UNSIGNED = "VISIONRAY_ALLOW_UNSIGNED"

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".dill")  # refused in a version




class RegistryError(ckpt.CheckpointError):
    """A registry operation that cannot proceed; the message says what failed and how to fix it.

    A ``CheckpointError`` (hence a ``ValueError``), so the CLI's ``user_errors`` reports it cleanly."""


class VerificationError(RegistryError):
    """A model that must not be loaded: no or bad signature, a changed or extra file, a pickle file,
    a signature by a key that is not trusted, or files moved between versions."""



_STORAGE_REASONS = {  # errno -> what it means for a registry write
    errno.ENOSPC: "the storage is full (no space left on device)",
    errno.EDQUOT: "the storage quota is exhausted",
    errno.EROFS: "the storage is read-only",
    errno.EACCES: "the storage is not writable (permission denied)",
    errno.EPERM: "the storage is not writable (operation not permitted: an immutable or protected path?)",
    errno.ENOTDIR: "the storage is not writable (a path in it is a file where a directory is expected)",
    errno.EEXIST: "the storage is not writable (a file is in the way of a directory)",
    errno.EISDIR: "the storage is not writable (a directory is in the way of a file)",
    errno.EIO: "the storage reported an I/O error",
}


def storage_error(exc: OSError, doing: str) -> RegistryError:
    """A clean ``RegistryError`` for an ``OSError`` of a registry write: what failed, why, where."""
    reason = _STORAGE_REASONS.get(exc.errno, "the storage is not writable")
    path = exc.filename2 or exc.filename  # a copy's destination, else the one path
    where = f" at {path}" if path else ""
    detail = exc.strerror or str(exc) or type(exc).__name__
    return RegistryError(f"{doing}: {reason}{where} ({detail}); free space or fix the storage's permissions, "
                         "then try again")


# --------------------------------------------------------------------------- environment


def default_registry_root() -> str:
    """``$VISIONRAY_REGISTRY``, else ``registry`` under the current directory (absolute)."""
    root = os.environ.get(ENV_REGISTRY)
    if root:
        return root if "://" in root else str(Path(root).expanduser().resolve())
    return str(Path("registry").resolve())


def signing_key_path() -> str | None:
    """``$VISIONRAY_SIGNING_KEY``: the PEM private key that signs new versions."""
    return os.environ.get(ENV_SIGNING_KEY) or None


def verify_key_paths() -> list[str]:
    """``$VISIONRAY_VERIFY_KEYS``: PEM public keys (``os.pathsep``-separated) trusted when loading."""
    return [p for p in os.environ.get(ENV_VERIFY_KEYS, "").split(os.pathsep) if p.strip()]


def allow_unsigned() -> bool:
    """``$VISIONRAY_ALLOW_UNSIGNED == "1"``: development only; every such load logs a WARNING."""
    return os.environ.get(ENV_ALLOW_UNSIGNED) == "1"


allow_unsigned_from_env = allow_unsigned  # for functions whose ``allow_unsigned`` argument shadows it


def unsigned_reason(allow_unsigned: bool | None) -> str:
    """Who turned verification off, for the warning: the environment, the caller, or both."""
    env = f"{ENV_ALLOW_UNSIGNED}=1 in the environment"
    if allow_unsigned is None:
        return env
    return "allow_unsigned=True from the caller" + (f" and {env}" if allow_unsigned_from_env() else "")


# --------------------------------------------------------------------------- keys
