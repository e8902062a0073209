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

import json
import logging
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from visionray import checkpoint as ckpt
from visionray.registry.aliases import AliasRecord, sign_alias, verify_alias
from visionray.registry.keys import key_fingerprint, public_key_of
from visionray.registry.layout import (ENV_ALLOW_UNSIGNED, ENV_SIGNING_KEY, METADATA_FILE, MODEL_FILE,
                                       RegistryError, RegistryRecord, VerificationError, VersionMeta, allow_unsigned, allow_unsigned_from_env,
                                       default_registry_root, signing_key_path, storage_error, unsigned_reason,
                                       verify_key_paths)
from visionray.registry.signing import build, sign_dir, verify_dir
from visionray.registry.store import VERSION_DIR, Store, open_store
from visionray.runs import best_checkpoint
from visionray.spec_io import ALIAS_PATTERN, NAME_PATTERN

log = logging.getLogger("visionray.registry")  # one logger for the registry package, as users configure it

NAME_RE = re.compile(NAME_PATTERN)  # always fullmatch
ALIAS_RE = re.compile(ALIAS_PATTERN)
MAX_CLAIM_ATTEMPTS = 100  # version numbers tried before giving up
CLAIM_BACKOFF_MAX_S = 1.0  # s; randomised exponential backoff between contested claims


@dataclass(frozen=True)
class ModelVersion:
    """One version as listed: its metadata as stored (None when unreadable or not a version's;
    ``verify`` and ``load`` say what is wrong), or verified when ``verify`` returned it."""

    name: str
    version: int
    uri: str
    metadata: VersionMeta | None
    aliases: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def signed(self) -> bool:
        return self.metadata is not None and self.metadata.registry.signer is not None


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
        self._store = open_store(self.root, filesystem)

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
            m = VERSION_DIR.fullmatch(entry)
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
            meta = VersionMeta.model_validate_json(text) if text is not None else None
        except (OSError, UnicodeDecodeError, ValueError):  # pydantic's ValidationError is a ValueError
            meta = None  # listed as is; `verify` and `load` say what is wrong
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
            if not (allow_unsigned_from_env() if allow_unsigned is None else allow_unsigned):
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
                build(staged, meta, str(source), "cpu")  # the weights fit the architecture the metadata names
                version = self._claim_next(name)
                record = self._metadata(meta, name, version, checkpoint_dir, lineage, signer)
                (staged / METADATA_FILE).write_text(record.model_dump_json(indent=2))
                if key is not None:
                    sign_dir(staged, key)
                self._store.publish(staged, name, version)
            except BaseException as exc:
                if version is not None:
                    self._store.release(name, version)  # the number goes to the next registration
                if isinstance(exc, OSError):
                    raise storage_error(exc, f"cannot register {name} in {self.uri}; nothing was published") from None
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
    def _metadata(meta: ckpt.CheckpointMeta, name: str, version: int, given: str | Path,
                  lineage: dict | None, signer: str | None) -> VersionMeta:
        return VersionMeta(
            **meta.model_dump(exclude={"format"}),
            input_shape=[meta.model.in_channels, meta.model.image_size, meta.model.image_size],
            lineage=_json_ready({
                **(lineage or {}),
                "source_checkpoint": str(given) if "://" in str(given) else str(Path(given).resolve()),
                "source_format": meta.format,
            }),
            registry=RegistryRecord(name=name, version=version, signer=signer, versions=ckpt.versions(),
                                    registered=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        )

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
            raise storage_error(exc, f"cannot move {name}@{alias} to v{version}; the alias is unchanged") from None
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
    ) -> tuple[torch.nn.Module, VersionMeta]:
        """Verify, then build the model (eval mode) from safetensors and JSON only."""
        mv = self.resolve(ref, _trusted(public_keys), allow_unsigned=allow_unsigned)
        with self._fetched(mv) as copy:
            meta = verify_dir(copy, public_keys, allow_unsigned=allow_unsigned, expect=(mv.name, mv.version),
                              label=mv.ref)
            return build(copy, meta, mv.ref, device), meta

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

    def __init__(self, store: Store, mv: ModelVersion):
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


def iter_metrics(meta: ckpt.CheckpointMeta | None) -> Iterator[tuple[str, Any]]:
    """The headline metrics of a version's metadata, in display order."""
    metrics = meta.metrics if meta is not None else {}
    for key in ("val_acc", "val_top5", "val_loss", "train_loss"):
        if key in metrics:
            yield key, metrics[key]
