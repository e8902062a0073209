"""The model registry: signed, pickle-free model versions in a local directory or object store.

Layout under the registry root (a local path, ``file://``, ``s3://``, ``gs://`` or any fsspec URI)::

    <name>/v<N>/model.safetensors     the weights, byte for byte as trained
    <name>/v<N>/metadata.json         architecture, classes, eval preset, metrics, spec, lineage
    <name>/v<N>/model.sig             OpenSSF model-signing bundle (ECDSA key) over the two files
    <name>/aliases/<alias>            the version number an alias points at (one file per alias)
    <name>/.claims/v<N>               the claim that reserves version N for one registration
    <name>/.staging/<token>/          (local stores) a version being written, renamed to v<N>

A version becomes visible in one step: on a local store its staging directory is renamed onto
``v<N>``; on an object store ``metadata.json`` is written last and versions without it are not
listed. Version numbers are reserved by a claim before anything is written (``mkdir`` on a local
store; on an object store a claim object that wins only when it is alone), so concurrent
registrations never collide. Moving an alias rewrites one small file atomically (temp + rename
locally, a single PUT on object stores): readers see the old or the new version, nothing between.

Loading verifies the signature against the given public keys first, on a private copy of the
files, then reads the weights with safetensors and the metadata as JSON from that same copy.
Nothing is ever unpickled, and a pickle file inside a version refuses the whole version.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from visionray import checkpoint as ckpt
from visionray.specs import ALIAS_PATTERN, NAME_PATTERN

log = logging.getLogger(__name__)

FORMAT = "visionray-model/1"
ALIAS_FORMAT = "visionray-alias/1"
MODEL_FILE = ckpt.MODEL_FILE  # model.safetensors
METADATA_FILE = ckpt.METADATA_FILE  # metadata.json
SIGNATURE_FILE = "model.sig"
VERSION_FILES = (MODEL_FILE, METADATA_FILE, SIGNATURE_FILE)

ENV_REGISTRY = "VISIONRAY_REGISTRY"
ENV_SIGNING_KEY = "VISIONRAY_SIGNING_KEY"
ENV_VERIFY_KEYS = "VISIONRAY_VERIFY_KEYS"
ENV_ALLOW_UNSIGNED = "VISIONRAY_ALLOW_UNSIGNED"

NAME_RE = re.compile(NAME_PATTERN)  # always fullmatch
ALIAS_RE = re.compile(ALIAS_PATTERN)
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".dill")

MAX_CLAIM_ATTEMPTS = 100  # version numbers tried before giving up
CLAIM_BACKOFF_MAX_S = 1.0  # s; randomised exponential backoff between contested claims


class RegistryError(ckpt.CheckpointError):
    """A registry operation that cannot proceed; the message says what failed and how to fix it.

    A ``CheckpointError`` (hence a ``ValueError``), so the CLI's ``user_errors`` reports it cleanly."""


class VerificationError(RegistryError):
    """A model that must not be loaded: no or bad signature, a changed or extra file, a pickle file,
    a signature by a key that is not trusted, or files moved between versions."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    uri: str
    metadata: dict
    aliases: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def signed(self) -> bool:
        return bool(self.metadata.get("registry", {}).get("signer"))


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


def _storage_error(exc: OSError, doing: str) -> RegistryError:
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


_allow_unsigned_from_env = allow_unsigned  # for functions whose ``allow_unsigned`` argument shadows it


def unsigned_reason(allow_unsigned: bool | None) -> str:
    """Who turned verification off, for the warning: the environment, the caller, or both."""
    env = f"{ENV_ALLOW_UNSIGNED}=1 in the environment"
    if allow_unsigned is None:
        return env
    return "allow_unsigned=True from the caller" + (f" and {env}" if _allow_unsigned_from_env() else "")


# --------------------------------------------------------------------------- keys


def generate_keys(prefix: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write an EC P-256 key pair: ``<prefix>.key`` (PKCS#8 PEM, mode 0600) and ``<prefix>.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    prefix = Path(prefix)
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    if not overwrite:
        for path in (private, public):
            if path.exists():
                raise RegistryError(f"{path} exists; choose another prefix or pass --force to replace the pair")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    written = False
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and private.exists():
            private.unlink()
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        written = True
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.chmod(private, 0o600)  # in case a umask or an odd filesystem widened it
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        if written:  # never leave half a pair (or a truncated private key) behind
            private.unlink(missing_ok=True)
        raise _storage_error(exc, f"cannot write the key pair {private} / {public}") from None
    return private, public


def public_key_of(private_key: Path):
    """The public half of a PEM private key file, checked to be an EC key that model-signing accepts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise RegistryError(f"signing key {private_key} does not exist; create one with `visionray keys generate`") from None
    except (OSError, ValueError, TypeError) as exc:
        raise RegistryError(f"signing key {private_key}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RegistryError(f"signing key {private_key}: a {type(key).__name__}; model signing needs an EC key "
                            "(P-256, from `visionray keys generate`)")
    return key.public_key()


def key_fingerprint(public_key: Any) -> str:
    """``sha256:<hex>`` of the DER SubjectPublicKeyInfo: names a key in metadata and messages."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _check_public_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise VerificationError(f"public key {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise VerificationError(f"public key {path}: not a PEM public key ({exc}); pass the .pub file, "
                                "not the private key") from None


# --------------------------------------------------------------------------- signing


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
    if path.suffix.lower() in _PICKLE_SUFFIXES:
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


def _read_version_metadata(directory: Path, label: str) -> dict[str, Any]:
    try:
        meta = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(f"{label}: {METADATA_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise VerificationError(f"{label}: {METADATA_FILE} has format {got!r}, expected {FORMAT!r}")
    return meta


def verify_dir(
    directory: str | Path, public_keys: list[str | Path] | None = None, *, allow_unsigned: bool | None = None,
    expect: tuple[str, int] | None = None, label: str | None = None,
) -> dict[str, Any]:
    """Verify a model version directory (in a registry or exported) and return its metadata.

    Always refused: pickle files, unexpected files, links, unreadable metadata. Refused unless
    ``allow_unsigned`` (default: ``$VISIONRAY_ALLOW_UNSIGNED``), which logs a WARNING instead: no
    trusted keys, a missing or bad signature, changed files, and metadata naming another version
    than ``expect`` (files moved between versions).
    """
    directory = Path(directory)
    label = label or str(directory)
    unsigned_ok = _allow_unsigned_from_env() if allow_unsigned is None else allow_unsigned
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
            _check_public_key(key)
        signer = _check_signature(directory, keys, label)
        meta = _read_version_metadata(directory, label)
        if expect is not None:
            reg = meta.get("registry", {})
            if (reg.get("name"), reg.get("version")) != expect:
                raise VerificationError(
                    f"{label}: its signed metadata says {reg.get('name')}@v{reg.get('version')}, but it is stored as "
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
) -> tuple[torch.nn.Module, dict[str, Any]]:
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
        return _build(copy, meta, label, device), meta


def _build(directory: Path, meta: dict[str, Any], label: str, device: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    try:
        model = ckpt.build_model(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{label}: metadata does not describe a model this VisionRay can build ({exc})") from None
    try:
        state = load_file(str(directory / MODEL_FILE), device=str(device))
    except Exception as exc:  # safetensors' own error types for corrupt headers
        raise VerificationError(f"{label}: {MODEL_FILE} is not readable safetensors ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RegistryError(f"{label}: weights do not fit {meta['model']['name']} ({exc})") from None
    return model.to(device).eval()


def is_model_dir(path: str | Path) -> bool:
    """A registry version or an exported model (as opposed to a training checkpoint)."""
    path = Path(path)
    if (path / SIGNATURE_FILE).exists():
        return True
    try:
        return json.loads((path / METADATA_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- signed aliases


class AliasRecord(BaseModel):
    """What ``<name>/aliases/<alias>`` holds: where the alias points, signed by the key that moved
    it. Aliases move after a version is signed, so the version's own signature cannot name them;
    signing the move itself means whoever can write the storage (whom signatures must stop) cannot
    repoint ``production`` at another version. Loading by alias verifies this record first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["visionray-alias/1"] = ALIAS_FORMAT
    name: str
    alias: str
    version: int = Field(ge=1)
    promoted: str
    signer: str | None = None
    signature: str | None = None  # base64 ECDSA-P256-SHA256 over ``payload()``

    def payload(self) -> bytes:
        return json.dumps(self.model_dump(exclude={"signature"}), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, text: str, name: str, alias: str) -> "AliasRecord | None":
        """The record, or None when the text is none; a bare version number (aliases before they
        were signed) reads as an unsigned record."""
        if text.strip().isdigit():
            return cls(name=name, alias=alias, version=int(text.strip()), promoted="")
        try:
            return cls.model_validate_json(text)
        except ValueError:
            return None


def sign_alias(name: str, alias: str, version: int, private_key: Path | None) -> AliasRecord:
    """A new record for ``alias`` -> ``version``, signed with ``private_key`` (None: unsigned)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    promoted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if private_key is None:
        return AliasRecord(name=name, alias=alias, version=version, promoted=promoted)
    signer = key_fingerprint(public_key_of(private_key))
    unsigned = AliasRecord(name=name, alias=alias, version=version, promoted=promoted, signer=signer)
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    signature = key.sign(unsigned.payload(), ec.ECDSA(hashes.SHA256()))
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify_alias(record: AliasRecord, name: str, alias: str, public_keys: list[Path]) -> str:
    """The fingerprint of the trusted key that signed ``record``; ``VerificationError`` otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    label = f"{name}@{alias}"
    if (record.name, record.alias) != (name, alias):
        raise VerificationError(f"{label}: its alias file says {record.name}@{record.alias}: copied from elsewhere; "
                                f"move it with `visionray models promote {name}@N {alias} --key KEY`")
    if not record.signature:
        raise VerificationError(f"{label} is not signed (moved without a signing key, by hand, or before aliases were "
                                f"signed); re-point it with `visionray models promote {name}@{record.version} {alias} "
                                f"--key KEY`, or load {name}@{record.version} by its version")
    if not public_keys:
        raise VerificationError(f"{label}: no public key to verify the alias with; pass the signer's .pub with "
                                f"--public-key or set {ENV_VERIFY_KEYS}")
    try:
        signature = base64.b64decode(record.signature, validate=True)
    except ValueError:
        raise VerificationError(f"{label}: the alias signature is not base64") from None
    for path in public_keys:
        _check_public_key(path)
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            continue
        try:
            key.verify(signature, record.payload(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return key_fingerprint(key)
    raise VerificationError(f"{label}: the alias record (-> v{record.version}) is not signed by a trusted key: moved "
                            "by someone else, or edited; do not load it by this alias")


# --------------------------------------------------------------------------- storage


class _Store:
    """The registry's storage: POSIX operations on a local path, pyarrow.fs on anything else."""

    def __init__(self, root: str, filesystem: Any = None):
        import pyarrow.fs as pafs

        self.root_uri = root
        if filesystem is None and "://" not in root:
            self.fs, self.base = None, str(Path(root).expanduser().resolve())
            self.root_uri = self.base
            return
        if filesystem is None:
            try:
                filesystem, path = pafs.FileSystem.from_uri(root)
            except (ValueError, OSError) as exc:  # pyarrow.lib.ArrowInvalid is a ValueError
                filesystem, path = self._fsspec(root, exc)
        else:
            path = root
            if "://" not in root:
                self.root_uri = f"{filesystem.type_name}://{root.lstrip('/')}"
        if isinstance(filesystem, pafs.LocalFileSystem):
            self.fs, self.base = None, str(Path(path).resolve())
        else:
            self.fs, self.base = filesystem, path.rstrip("/")

    @staticmethod
    def _fsspec(root: str, first_error: Exception):
        import pyarrow.fs as pafs

        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(root)
        except Exception as exc:
            raise RegistryError(f"registry {root!r}: no filesystem for this URI (pyarrow: {first_error}; "
                                f"fsspec: {exc}); use a local path, file://, s3:// or gs://") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

    @property
    def local(self) -> bool:
        return self.fs is None

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts]) if parts else self.base

    def uri(self, *parts: str) -> str:
        if self.local:
            return self.path(*parts)
        return "/".join([self.root_uri.rstrip("/"), *parts])

    # -- listing and reading
    def listdir(self, *parts: str) -> list[tuple[str, bool]]:
        """(name, is_dir) of the entries below a directory; empty when it does not exist."""
        if self.local:
            try:
                return [(e.name, e.is_dir()) for e in os.scandir(self.path(*parts))]
            except (FileNotFoundError, NotADirectoryError):
                return []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return [(i.base_name, i.type == pafs.FileType.Directory) for i in infos]

    def exists(self, *parts: str) -> bool:
        if self.local:
            return os.path.exists(self.path(*parts))
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str | None:
        if self.local:
            try:
                return Path(self.path(*parts)).read_text()
            except FileNotFoundError:
                return None
        try:
            with self.fs.open_input_stream(self.path(*parts)) as fh:
                return fh.read().decode()
        except FileNotFoundError:
            return None

    def write_text_atomic(self, text: str, *parts: str) -> None:
        """Readers see the old content or the new, never a part (temp + rename; one PUT remotely)."""
        if self.local:
            target = Path(self.path(*parts))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, target)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            return
        self.fs.create_dir(self.path(*parts[:-1]), recursive=True)
        with self.fs.open_output_stream(self.path(*parts)) as fh:
            fh.write(text.encode())

    # -- version numbers
    def claim(self, name: str, version: int) -> bool:
        """Reserve ``v<version>`` for one registration; False when another one has it."""
        if self.local:
            claims = Path(self.path(name, ".claims"))
            claims.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(claims / f"v{version}")
            except FileExistsError:
                return False
            return not self.exists(name, f"v{version}")
        # Object stores offer no create-if-absent through pyarrow. A claim wins only when it is the
        # only one listed after it was written: with read-after-write consistent listing (S3, GCS)
        # two claims can both lose (then both try the next number) but never both win.
        token = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        claim_dir = self.path(name, ".claims", f"v{version}")
        self.fs.create_dir(claim_dir, recursive=True)
        with self.fs.open_output_stream(f"{claim_dir}/{token}") as fh:
            fh.write(b"")
        others = [n for n, _ in self.listdir(name, ".claims", f"v{version}") if n != token]
        if others or self.exists(name, f"v{version}", METADATA_FILE):
            self.fs.delete_file(f"{claim_dir}/{token}")
            return False
        return True

    def release(self, name: str, version: int) -> None:
        """Give back the claim of a registration that failed before publishing (local stores; an
        object store keeps the claim, so that version number is skipped)."""
        if self.local:
            with contextlib.suppress(OSError):
                os.rmdir(self.path(name, ".claims", f"v{version}"))

    def claimed_versions(self, name: str) -> list[int]:
        return [int(m.group(1)) for n, _ in self.listdir(name, ".claims") if (m := _VERSION_DIR.fullmatch(n))]

    # -- staging and publishing
    def staging_dir(self, name: str) -> Path:
        """Where a new version is written before it appears: inside the store when local (same
        filesystem, so the final rename is atomic), else a local temporary directory."""
        if self.local:
            staging = Path(self.path(name, ".staging"))
            staging.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="v", dir=staging))
        return Path(tempfile.mkdtemp(prefix="visionray-register-"))

    def publish(self, staged: Path, name: str, version: int) -> None:
        if self.local:
            os.rename(staged, self.path(name, f"v{version}"))  # fails if v<N> exists and is not empty
            return
        target = self.path(name, f"v{version}")
        self.fs.create_dir(target, recursive=True)
        order = [MODEL_FILE, SIGNATURE_FILE, METADATA_FILE]  # metadata last: it makes the version visible
        for file in sorted(staged.iterdir(), key=lambda p: order.index(p.name) if p.name in order else -1):
            with file.open("rb") as src, self.fs.open_output_stream(f"{target}/{file.name}") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        shutil.rmtree(staged, ignore_errors=True)

    def is_link(self, *parts: str) -> bool:
        """A symbolic link (local stores; object stores have none)."""
        return self.local and os.path.islink(self.path(*parts))

    def fetch(self, name: str, version: int, dest: Path) -> None:
        """Copy exactly the version's files, by their expected names, into the new local directory
        ``dest``. Anything else under the version (another object, a directory, a link, a key with
        ``..`` or that escapes it) refuses the version before a byte is written."""
        label, src = f"{name}@v{version}", self.path(name, f"v{version}")
        if self.local:
            for parts in ((name,), (name, f"v{version}")):
                if self.is_link(*parts):
                    raise VerificationError(f"{label}: {'/'.join(parts)} is a symbolic link; a registry holds real "
                                            "directories, so a link is someone pointing it elsewhere")
            found = [(e.name, e.is_file(follow_symlinks=False)) for e in os.scandir(src)]
        else:
            import pyarrow.fs as pafs

            found = []
            for info in self.fs.get_file_info(pafs.FileSelector(src, recursive=True)):
                inside = info.path.startswith(src + "/")
                found.append((info.path[len(src) + 1:] if inside else info.path, info.type == pafs.FileType.File))
        for rel, is_file in found:
            if rel not in VERSION_FILES and Path(rel).suffix.lower() in _PICKLE_SUFFIXES:
                raise VerificationError(f"{label}: pickle file {rel[:200]} rejected: VisionRay never unpickles; remove it "
                                        "(weights belong in model.safetensors, written by safetensors)")
            if rel not in VERSION_FILES or not is_file:
                raise VerificationError(f"{label}: unexpected {'object' if is_file else 'entry'} {rel[:200]!r} under the "
                                        f"version (a version holds only {', '.join(VERSION_FILES)}); refused, nothing "
                                        "was copied")
        dest.mkdir(parents=True)
        for rel, _ in found:
            if self.local:
                fd = os.open(os.path.join(src, rel), os.O_RDONLY | os.O_NOFOLLOW)
                src_fh = os.fdopen(fd, "rb")
            else:
                src_fh = self.fs.open_input_stream(f"{src}/{rel}")
            with src_fh, (dest / rel).open("xb") as out:
                shutil.copyfileobj(src_fh, out, 1 << 20)


# --------------------------------------------------------------------------- the registry


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name``, ``name@alias``, ``name@3`` or ``name@v3`` -> (name, selector or None)."""
    name, sep, selector = ref.partition("@")
    bad_selector = sep and not (ALIAS_RE.fullmatch(selector) or re.fullmatch(r"v?[1-9][0-9]{0,8}", selector))
    if not NAME_RE.fullmatch(name) or bad_selector:
        raise RegistryError(f"model reference {ref!r}: expected NAME, NAME@ALIAS, NAME@3 or NAME@v3 "
                            f"(names: lowercase letters, digits, '_', '.', '-')")
    return name, selector or None


def check_alias(alias: str) -> None:
    if not ALIAS_RE.fullmatch(alias):
        raise RegistryError(f"alias {alias!r}: a lowercase letter, then letters, digits, '_' or '-' (at most 32)")
    if alias == "latest" or re.fullmatch(r"v[0-9]+", alias):
        raise RegistryError(f"alias {alias!r} is reserved (it names versions); choose another, e.g. production")


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class Registry:
    """Versions and aliases of signed models under one root (local path or URI)."""

    def __init__(self, root: str | None = None, *, filesystem: Any = None):
        """``filesystem``: a configured ``pyarrow.fs.FileSystem`` (endpoint, credentials) for ``root``,
        a path inside it; by default the filesystem is inferred from ``root``'s scheme."""
        self.root = root or default_registry_root()
        self._store = _Store(self.root, filesystem)

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    @property
    def uri(self) -> str:
        """The root as a path (local stores) or URI."""
        return self._store.root_uri

    # -- reading
    def names(self) -> list[str]:
        """Models with at least one version."""
        return sorted(n for n, is_dir in self._store.listdir() if is_dir and NAME_RE.fullmatch(n) and self._versions(n))

    def _versions(self, name: str) -> list[int]:
        found = []
        for entry, is_dir in self._store.listdir(name):
            m = _VERSION_DIR.fullmatch(entry)
            if m and is_dir and self._store.exists(name, entry, METADATA_FILE):
                found.append(int(m.group(1)))
        return sorted(found)

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version for one model, as stored (``resolve`` with keys verifies)."""
        return {alias: rec.version for alias, rec in self._alias_records(name).items()}

    def _alias_records(self, name: str) -> dict[str, AliasRecord]:
        out = {}
        for alias, is_dir in self._store.listdir(name, "aliases"):
            if is_dir or not ALIAS_RE.fullmatch(alias) or self._store.is_link(name, "aliases", alias):
                continue  # temp files of a move in progress; a link is not an alias
            try:
                text = self._store.read_text(name, "aliases", alias)
            except (OSError, UnicodeDecodeError):
                continue  # unreadable: not an alias (promote rewrites it)
            record = AliasRecord.parse(text, name, alias) if text is not None else None
            if record is not None:
                out[alias] = record
        return dict(sorted(out.items()))

    def _version(self, name: str, version: int, aliases: dict[str, int]) -> ModelVersion:
        try:
            text = self._store.read_text(name, f"v{version}", METADATA_FILE)
            meta = json.loads(text) if text is not None else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = {}  # listed as is; `verify` and `load` say what is wrong
        if not isinstance(meta, dict):
            meta = {}
        return ModelVersion(
            name=name, version=version, uri=self._store.uri(name, f"v{version}"), metadata=meta,
            aliases=tuple(a for a, v in aliases.items() if v == version),
        )

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (oldest first per model), or one model's. Metadata here is as stored:
        ``verify`` checks it."""
        if name is not None and not NAME_RE.fullmatch(name):
            raise RegistryError(f"model name {name!r}: lowercase letters, digits, '_', '.', '-' (at most 64)")
        out = []
        for n in [name] if name else self.names():
            aliases = self.aliases(n)
            out.extend(self._version(n, v, aliases) for v in self._versions(n))
        return out

    def resolve(self, ref: str, public_keys: list[str | Path] | None = None, *,
                allow_unsigned: bool | None = None) -> ModelVersion:
        """``name`` (latest version), ``name@alias``, ``name@3`` or ``name@v3``. With
        ``public_keys`` (what loading passes) an alias must be signed by one of them
        (``verify_alias``); ``allow_unsigned`` (default ``$VISIONRAY_ALLOW_UNSIGNED``) warns instead."""
        name, selector = parse_ref(ref)
        # Aliases before versions: an alias only ever moves to a published version, so a version
        # an alias read here points at is in the listing that follows.
        records = self._alias_records(name)
        aliases = {alias: rec.version for alias, rec in records.items()}
        versions = self._versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"no model {name!r} in registry {self.uri} (models: {known}); "
                                f"register one with `visionray models register CHECKPOINT --name {name}`")
        if selector is None or selector == "latest":
            version = versions[-1]
        elif re.fullmatch(r"v?[0-9]+", selector):
            version = int(selector.lstrip("v"))
            if version not in versions:
                raise RegistryError(f"{name} has no version {version} (versions: {', '.join(map(str, versions))})")
        elif selector in aliases:
            version = aliases[selector]
            if public_keys is not None:
                self._verify_alias(records[selector], name, selector, public_keys, allow_unsigned)
            if version not in versions:
                raise RegistryError(f"{name}@{selector} points at version {version}, which does not exist; "
                                    f"move it with `visionray models promote {name}@N {selector}`")
        else:
            have = ", ".join(aliases) or "none"
            raise RegistryError(f"{name} has no alias {selector!r} (aliases: {have}; versions: "
                                f"{', '.join(map(str, versions))})")
        return self._version(name, version, aliases)

    def _verify_alias(self, record: AliasRecord, name: str, alias: str, public_keys: list[str | Path],
                      allow_unsigned: bool | None) -> None:
        try:
            verify_alias(record, name, alias, [Path(k) for k in public_keys])
        except VerificationError as exc:
            if not (_allow_unsigned_from_env() if allow_unsigned is None else allow_unsigned):
                raise
            log.warning("!!! %s: following %s@%s DESPITE: %s !!!", unsigned_reason(allow_unsigned), name, alias, exc)

    # -- writing
    def register(
        self, checkpoint_dir: str | Path, name: str, *, alias: str | None = None,
        private_key: str | Path | None = None, lineage: dict | None = None,
    ) -> ModelVersion:
        """Add a training checkpoint as the next version of ``name``, signed, and move ``alias``."""
        if not NAME_RE.fullmatch(name):
            raise RegistryError(f"model name {name!r}: lowercase letters, digits, '_', '.', '-' "
                                "(first a letter or digit, at most 64)")
        if alias is not None:
            check_alias(alias)
        key = private_key or signing_key_path()
        signer = None
        if key is not None:
            key = Path(key).expanduser()
            signer = key_fingerprint(public_key_of(key))
        elif not allow_unsigned():
            raise RegistryError(
                f"no signing key for {name!r}: pass --key, set {ENV_SIGNING_KEY}, or register.signing_key in the "
                "spec (create a pair with `visionray keys generate`)")
        else:
            log.warning("!!! %s=1: registering %s UNSIGNED; it will not load where verification is on !!!",
                        ENV_ALLOW_UNSIGNED, name)
        with _local_checkpoint(checkpoint_dir) as source:
            meta = ckpt.read_metadata(source)
            if not (source / MODEL_FILE).is_file():
                raise RegistryError(f"{source}: no {MODEL_FILE}; not a complete VisionRay checkpoint")
            staged, version = None, None
            try:
                staged = self._store.staging_dir(name)
                shutil.copyfile(source / MODEL_FILE, staged / MODEL_FILE)
                _build(staged, meta, str(source), "cpu")  # the weights fit the architecture the metadata names
                version = self._claim_next(name)
                record = self._metadata(meta, name, version, checkpoint_dir, lineage, signer)
                (staged / METADATA_FILE).write_text(json.dumps(record, indent=2))
                if key is not None:
                    sign_dir(staged, key)
                self._store.publish(staged, name, version)
            except BaseException as exc:
                if version is not None:
                    self._store.release(name, version)  # the number goes to the next registration
                if isinstance(exc, OSError):
                    raise _storage_error(exc, f"cannot register {name} in {self.uri}; nothing was published") from None
                raise
            finally:
                if staged is not None:
                    shutil.rmtree(staged, ignore_errors=True)
        log.info("registered %s@v%d at %s", name, version, self._store.uri(name, f"v{version}"))
        if alias is not None:
            try:
                self.promote(name, version, alias, private_key=key)
            except RegistryError as exc:
                raise RegistryError(f"registered {name}@v{version}, but {exc}; run `visionray models promote "
                                    f"{name}@{version} {alias}` when the storage is writable") from None
        return self._version(name, version, self.aliases(name))

    def _claim_next(self, name: str) -> int:
        """Reserve the next version number of ``name`` for this registration alone."""
        for attempt in range(MAX_CLAIM_ATTEMPTS):
            version = max([0, *self._versions(name), *self._store.claimed_versions(name)]) + 1
            if self._store.claim(name, version):
                return version
            log.debug("%s v%d is taken or contested; retrying", name, version)
            time.sleep(random.uniform(0, min(CLAIM_BACKOFF_MAX_S, 0.01 * 2 ** attempt)))
        raise RegistryError(f"could not reserve a version of {name!r} after {MAX_CLAIM_ATTEMPTS} tries; "
                            "is the registry writable and its listing consistent?")

    @staticmethod
    def _metadata(meta: dict[str, Any], name: str, version: int, given: str | Path,
                  lineage: dict | None, signer: str | None) -> dict[str, Any]:
        record = dict(meta)
        record["format"] = FORMAT
        record["input_shape"] = [meta["model"]["in_channels"], meta["model"]["image_size"], meta["model"]["image_size"]]
        record["lineage"] = _json_ready({
            **(lineage or {}),
            "source_checkpoint": str(given) if "://" in str(given) else str(Path(given).resolve()),
            "source_format": meta.get("format"),
        })
        record["registry"] = {
            "name": name, "version": version, "signer": signer,
            "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": ckpt.versions(),
        }
        return record

    def promote(self, name: str, version: int, alias: str, *, private_key: str | Path | None = None) -> None:
        """Point ``alias`` at ``version`` in one atomic write of a record signed with ``private_key``
        (default ``$VISIONRAY_SIGNING_KEY``; unsigned only with ``$VISIONRAY_ALLOW_UNSIGNED=1``)."""
        check_alias(alias)
        versions = self._versions(name)
        if version not in versions:
            raise RegistryError(f"{name} has no version {version} (versions: {', '.join(map(str, versions)) or 'none'})")
        key = private_key or signing_key_path()
        if key is None and not allow_unsigned():
            raise RegistryError(f"moving {name}@{alias} needs the signing key (aliases are signed, so that whoever can "
                                f"write the storage cannot repoint them): pass --key or set {ENV_SIGNING_KEY}")
        if key is None:
            log.warning("!!! %s=1: %s@%s moved UNSIGNED; it will not load where verification is on !!!",
                        ENV_ALLOW_UNSIGNED, name, alias)
        record = sign_alias(name, alias, version, Path(key).expanduser() if key is not None else None)
        try:
            self._store.write_text_atomic(record.model_dump_json(indent=2) + "\n", name, "aliases", alias)
        except OSError as exc:
            raise _storage_error(exc, f"cannot move {name}@{alias} to v{version}; the alias is unchanged") from None
        log.info("%s@%s -> v%d", name, alias, version)

    # -- verifying, loading, exporting
    def _fetched(self, mv: ModelVersion) -> "_Fetched":
        return _Fetched(self._store, mv)

    def verify(self, ref: str, public_keys: list[str | Path] | None = None) -> ModelVersion:
        """Check a version's files against its signature and the trusted keys; raises
        ``VerificationError`` saying what failed. Returns the version with verified metadata."""
        mv = self.resolve(ref, _trusted(public_keys), allow_unsigned=False)
        with self._fetched(mv) as copy:
            meta = verify_dir(copy, public_keys, allow_unsigned=False, expect=(mv.name, mv.version), label=mv.ref)
        return ModelVersion(mv.name, mv.version, mv.uri, meta, mv.aliases)

    def load(
        self, ref: str, public_keys: list[str | Path] | None = None, *, allow_unsigned: bool | None = None,
        device: str = "cpu",
    ) -> tuple[torch.nn.Module, dict]:
        """Verify, then build the model (eval mode) from safetensors and JSON only."""
        mv = self.resolve(ref, _trusted(public_keys), allow_unsigned=allow_unsigned)
        with self._fetched(mv) as copy:
            meta = verify_dir(copy, public_keys, allow_unsigned=allow_unsigned, expect=(mv.name, mv.version),
                              label=mv.ref)
            return _build(copy, meta, mv.ref, device), meta

    def export(self, ref: str, dest: str | Path, *, public_keys: list[str | Path] | None = None) -> Path:
        """Copy a verified version (signature included) to a new local directory ``dest``."""
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise RegistryError(f"{dest} exists and is not empty; export into a new directory")
        mv = self.resolve(ref, _trusted(public_keys), allow_unsigned=False)
        with self._fetched(mv) as copy:
            verify_dir(copy, public_keys, expect=(mv.name, mv.version), label=mv.ref)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest.rmdir()
            shutil.copytree(copy, dest)
        return dest


def _trusted(public_keys: list[str | Path] | None) -> list[str | Path]:
    return verify_key_paths() if public_keys is None else public_keys


class _Fetched:
    """A private local copy of one version, removed on exit."""

    def __init__(self, store: _Store, mv: ModelVersion):
        self.store, self.mv = store, mv

    def __enter__(self) -> Path:
        self.tmp = tempfile.TemporaryDirectory(prefix="visionray-verify-")
        copy = Path(self.tmp.name) / f"v{self.mv.version}"
        try:
            self.store.fetch(self.mv.name, self.mv.version, copy)
        except BaseException as exc:  # __exit__ does not run when __enter__ raises
            self.tmp.cleanup()
            if not isinstance(exc, OSError):  # VerificationError: the listing itself was refused
                raise
            raise RegistryError(f"{self.mv.ref}: cannot read its files ({exc}); it was deleted or moved while "
                                f"being read: list the registry again (`visionray models list {self.mv.name}`)"
                                ) from None
        return copy

    def __exit__(self, *exc: Any) -> None:
        self.tmp.cleanup()


class _local_checkpoint:
    """A checkpoint directory on local disk: as given, or downloaded from a URI (pyarrow.fs)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.given = str(checkpoint_dir)
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        if "://" not in self.given or self.given.startswith("file://"):
            path = Path(self.given.removeprefix("file://")).expanduser()
            if (path / METADATA_FILE).exists():
                return path.resolve()
            from visionray.train import best_checkpoint  # a run directory: its best checkpoint

            return best_checkpoint(path).resolve()
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.given)
        self.tmp = tempfile.TemporaryDirectory(prefix="visionray-ckpt-")
        local = Path(self.tmp.name)
        for name in (MODEL_FILE, METADATA_FILE):
            try:
                with fs.open_input_stream(f"{path.rstrip('/')}/{name}") as src, (local / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except FileNotFoundError:
                raise RegistryError(f"{self.given}: no {name}; not a VisionRay checkpoint") from None
        return local

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def iter_metrics(meta: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The headline metrics of a version's metadata, in display order."""
    metrics = meta.get("metrics") or {}
    for key in ("val_acc", "val_top5", "val_loss", "train_loss"):
        if key in metrics:
            yield key, metrics[key]
