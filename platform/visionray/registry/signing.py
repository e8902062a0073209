"""Model verification without a registry: the OpenSSF model-signing bundle over a
version's files, the checks on a version directory (no pickles, links or extra files), and
building the model from safetensors and JSON (``verify_dir``, ``load_dir``). The registry
(``visionray.registry``) and exported model directories both go through these."""


from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import zipfile
from pathlib import Path


import torch

from visionray import checkpoint as ckpt
from visionray.registry.keys import check_public_key
from visionray.registry.layout import (ENV_VERIFY_KEYS, FORMAT, METADATA_FILE, MODEL_FILE, PICKLE_SUFFIXES, SIGNATURE_FILE,
                                       VERSION_FILES, RegistryError, VerificationError, VersionMeta, allow_unsigned_from_env,
                                       unsigned_reason, verify_key_paths)

log = logging.getLogger("visionray.registry")


def _hashing_config():
    from model_signing import hashing

    # Every file but the signature is signed, git paths included: nothing in a version is unsigned.
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def sign_dir(directory: Path, private_key: Path) -> None:
    """Sign every file in ``directory`` with an EC private key; the bundle goes to ``model.sig``."""
    from model_signing import signing

    signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(
        _hashing_config()).sign(directory, directory / SIGNATURE_FILE)


_MISMATCH_PARTS = (  # model-signing's diff lines, as they appear inside the repr of a list (quotes may be escaped)
    (re.compile(r"Hash mismatch for \\?'([^'\\]+)\\?'"), "{} changed since signing (its sha256 differs from the signed one)"),
    (re.compile(r"Extra files found in model \\?'[^'\\]*\\?': ([^\"'\]\\]+)"), "file(s) added after signing: {}"),
    (re.compile(r"Missing files in model \\?'[^'\\]*\\?': ([^\"'\]\\]+)"), "signed file(s) missing: {}"),
)


def _describe_mismatch(message: str) -> str:
    found = [tmpl.format(m.group(1).strip()) for rx, tmpl in _MISMATCH_PARTS for m in rx.finditer(message)]
    return "; ".join(found) or message


def _check_signature(directory: Path, public_keys: list[Path], label: str) -> str:
    """Verify ``directory`` against the first key that signed it; returns that key's path."""
    from model_signing import verifying

    sig = directory / SIGNATURE_FILE
    if not sig.exists():
        raise VerificationError(f"{label}: unsigned ({SIGNATURE_FILE} is missing); re-register it with a signing key")
    from cryptography.exceptions import InvalidSignature

    rejected = []
    for key in public_keys:
        config = verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing_config())
        try:
            config.verify(directory, sig)
            return str(key)
        except InvalidSignature:
            rejected.append(f"{key} (signature does not verify)")
        except ValueError as exc:
            msg = str(exc)
            if msg.startswith("Signature mismatch"):
                raise VerificationError(f"{label}: {_describe_mismatch(msg)}; the model was changed after it was "
                                        "signed: do not load it, re-register it from its checkpoint") from None
            if msg.startswith("Key mismatch"):
                rejected.append(f"{key} (not the signer's key)")
                continue
            raise VerificationError(f"{label}: {SIGNATURE_FILE} is corrupt or not a model-signing bundle ({msg})") from None
        except Exception as exc:  # JSON / protobuf errors of a damaged bundle
            raise VerificationError(f"{label}: {SIGNATURE_FILE} is corrupt or not a model-signing bundle "
                                    f"({type(exc).__name__}: {exc})") from None
    raise VerificationError(f"{label}: signature rejected by every trusted public key ({'; '.join(rejected)}): "
                            "signed with another key, or the signature was forged; pass the signer's .pub with "
                            f"--public-key or {ENV_VERIFY_KEYS}")


def _is_pickle(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
        if len(head) == 2 and head[0] == 0x80 and head[1] <= 5:  # pickle protocol 2..5 opcode
            return True
        if zipfile.is_zipfile(path):  # torch.save's zip archive holds data.pkl
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith(".pkl") for n in zf.namelist())
    except OSError:
        return False
    return False


def _check_files(directory: Path, label: str) -> None:
    """Only the version's own files: no pickles, no links, no subdirectories, nothing extra."""
    entries = sorted(directory.rglob("*"))
    for entry in entries:
        rel = entry.relative_to(directory).as_posix()
        if entry.is_symlink():
            raise VerificationError(f"{label}: {rel} is a symbolic link; a model version holds only plain files")
        if not entry.is_file():
            continue
        if rel == MODEL_FILE:
            with entry.open("rb") as fh:
                pickled = fh.read(4) == b"PK\x03\x04"  # torch.save's zip archive, not safetensors
        else:
            pickled = rel not in VERSION_FILES and _is_pickle(entry)
        if pickled:
            raise VerificationError(f"{label}: pickle file {rel} rejected: VisionRay never unpickles; remove it "
                                    "(weights belong in model.safetensors, written by safetensors)")
    for entry in entries:
        rel = entry.relative_to(directory).as_posix()
        if rel not in VERSION_FILES or not entry.is_file():
            raise VerificationError(f"{label}: unexpected {'directory' if entry.is_dir() else 'file'} {rel}; "
                                    f"a model version holds only {', '.join(VERSION_FILES)}")
    for name in (MODEL_FILE, METADATA_FILE):
        if not (directory / name).is_file():
            raise VerificationError(f"{label}: {name} is missing")


def _read_version_metadata(directory: Path, label: str) -> VersionMeta:
    try:
        raw = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(f"{label}: {METADATA_FILE} is not valid JSON ({exc})") from None
    return ckpt.parse_metadata(raw, VersionMeta, f"{label}: {METADATA_FILE}", VerificationError)


def verify_dir(
    directory: str | Path, public_keys: list[str | Path] | None = None, *, allow_unsigned: bool | None = None,
    expect: tuple[str, int] | None = None, label: str | None = None,
) -> VersionMeta:
    """Verify a model version directory (in a registry or exported) and return its metadata.

    Always refused: pickle files, unexpected files, links, unreadable metadata. Refused unless
    ``allow_unsigned`` (default: ``$VISIONRAY_ALLOW_UNSIGNED``), which logs a WARNING instead: no
    trusted keys, a missing or bad signature, changed files, and metadata naming another version
    than ``expect`` (files moved between versions).
    """
    directory = Path(directory)
    label = label or str(directory)
    unsigned_ok = allow_unsigned_from_env() if allow_unsigned is None else allow_unsigned
    why = unsigned_reason(allow_unsigned)
    keys = [Path(k) for k in (verify_key_paths() if public_keys is None else public_keys)]
    _check_files(directory, label)
    try:
        if not (directory / SIGNATURE_FILE).exists():
            raise VerificationError(f"{label}: unsigned ({SIGNATURE_FILE} is missing); re-register it with a "
                                    "signing key")
        if not keys:
            raise VerificationError(
                f"{label}: no public key to verify the signature with; pass the signer's .pub with --public-key "
                f"or set {ENV_VERIFY_KEYS} (keys from `visionray keys generate`)")
        for key in keys:
            check_public_key(key)
        signer = _check_signature(directory, keys, label)
        meta = _read_version_metadata(directory, label)
        if expect is not None:
            if (meta.registry.name, meta.registry.version) != expect:
                raise VerificationError(
                    f"{label}: its signed metadata says {meta.registry.name}@v{meta.registry.version}, but it is stored as "
                    f"{expect[0]}@v{expect[1]}: files were moved between versions; do not load it")
        if unsigned_ok:
            log.warning("!!! %s: unsigned or changed models load without verification; %s happened to verify. "
                        "Never set it in production. !!!", why, label)
        log.debug("%s: signature verified with %s", label, signer)
        return meta
    except VerificationError as exc:
        if not unsigned_ok:
            raise
        log.warning("!!! %s: loading %s DESPITE FAILED VERIFICATION: %s. Never do this in production. !!!",
                    why, label, exc)
        return _read_version_metadata(directory, label)


def load_dir(
    directory: str | Path, public_keys: list[str | Path] | None = None, *, allow_unsigned: bool | None = None,
    device: str = "cpu", expect: tuple[str, int] | None = None, label: str | None = None,
) -> tuple[torch.nn.Module, VersionMeta]:
    """Verify, then build the model from safetensors + JSON of a version directory.

    The files are copied to a private temporary directory first, so the bytes verified are the
    bytes loaded even if someone writes to the registry meanwhile."""
    directory = Path(directory)
    label = label or str(directory)
    if not directory.is_dir():
        raise RegistryError(f"{directory}: not a model directory")
    with tempfile.TemporaryDirectory(prefix="visionray-verify-") as tmp:
        copy = Path(tmp) / "model"
        try:
            shutil.copytree(directory, copy, symlinks=True)
        except OSError as exc:  # shutil.Error (files vanishing mid-copy) included
            raise RegistryError(f"{label}: cannot read the model directory ({exc}); was it deleted or moved "
                                "while loading?") from None
        meta = verify_dir(copy, public_keys, allow_unsigned=allow_unsigned, expect=expect, label=label)
        return build(copy, meta, label, device), meta


def build(directory: Path, meta: ckpt.CheckpointMeta, label: str, device: str) -> torch.nn.Module:
    """The model of a verified private copy (or of a checkpoint being registered)."""
    return ckpt.model_from(directory, meta, device, label, unreadable=VerificationError)


def is_model_dir(path: str | Path) -> bool:
    """A registry version or an exported model (as opposed to a training checkpoint)."""
    path = Path(path)
    if (path / SIGNATURE_FILE).exists():
        return True
    try:
        return json.loads((path / METADATA_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
