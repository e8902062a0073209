"""The registry's storage, one class per kind: ``LocalStore`` (POSIX operations on a local path)
and ``ObjectStore`` (pyarrow.fs: S3, GCS, or any fsspec filesystem). ``open_store`` picks one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from visionray import storage
from visionray.registry.layout import (METADATA_FILE, MODEL_FILE, PICKLE_SUFFIXES, SIGNATURE_FILE, VERSION_FILES,
                                       RegistryError, VerificationError)

VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")  # always fullmatch


class Store:
    """What every store kind shares: paths below its base, the claims listing and the checks of a
    version's listing before it is fetched."""

    root_uri: str
    base: str

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts]) if parts else self.base

    def uri(self, *parts: str) -> str:
        return "/".join([self.root_uri.rstrip("/"), *parts]) if parts else self.root_uri

    def listdir(self, *parts: str) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def claimed_versions(self, name: str) -> list[int]:
        return [int(m.group(1)) for n, _ in self.listdir(name, ".claims") if (m := VERSION_DIR.fullmatch(n))]

    def is_link(self, *parts: str) -> bool:
        """A symbolic link (only local stores have them)."""
        return False

    def fetch(self, name: str, version: int, dest: Path) -> None:
        """Copy exactly the version's files, by their expected names, into the new local directory
        ``dest``. Anything else under the version (another object, a directory, a link, a key with
        ``..`` or that escapes it) refuses the version before a byte is written."""
        label = f"{name}@v{version}"
        found = self._version_entries(name, version, label)
        for rel, is_file in found:
            if rel not in VERSION_FILES and Path(rel).suffix.lower() in PICKLE_SUFFIXES:
                raise VerificationError(f"{label}: pickle file {rel[:200]} rejected: VisionRay never unpickles; remove it "
                                        "(weights belong in model.safetensors, written by safetensors)")
            if rel not in VERSION_FILES or not is_file:
                raise VerificationError(f"{label}: unexpected {'object' if is_file else 'entry'} {rel[:200]!r} under the "
                                        f"version (a version holds only {', '.join(VERSION_FILES)}); refused, nothing "
                                        "was copied")
        dest.mkdir(parents=True)
        for rel, _ in found:
            with self._open_version_file(name, version, rel) as src, (dest / rel).open("xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)

    def _version_entries(self, name: str, version: int, label: str) -> list[tuple[str, bool]]:
        """(path relative to the version, is a plain file) of everything stored under it."""
        raise NotImplementedError

    def _open_version_file(self, name: str, version: int, rel: str):
        raise NotImplementedError


class LocalStore(Store):
    """A registry on a local (or mounted) filesystem: claims by ``mkdir``, versions staged inside
    the store and renamed into place, so a version appears in one step."""

    def __init__(self, base: str, root_uri: str | None = None):
        self.base = str(Path(base).expanduser().resolve())
        self.root_uri = root_uri or self.base  # as the user named it (a file:// URI stays one)

    def uri(self, *parts: str) -> str:
        return self.path(*parts)

    def listdir(self, *parts: str) -> list[tuple[str, bool]]:
        """(name, is_dir) of the entries below a directory; empty when it does not exist."""
        try:
            return [(e.name, e.is_dir()) for e in os.scandir(self.path(*parts))]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, *parts: str) -> bool:
        return os.path.exists(self.path(*parts))

    def is_link(self, *parts: str) -> bool:
        return os.path.islink(self.path(*parts))

    def read_text(self, *parts: str) -> str | None:
        try:
            return Path(self.path(*parts)).read_text()
        except FileNotFoundError:
            return None

    def write_text_atomic(self, text: str, *parts: str) -> None:
        """Readers see the old content or the new, never a part (temp + rename)."""
        import pyarrow.fs as pafs

        storage.write_atomic(pafs.LocalFileSystem(), self.path(*parts), text.encode())

    def claim(self, name: str, version: int) -> bool:
        """Reserve ``v<version>`` for one registration; False when another one has it."""
        claims = Path(self.path(name, ".claims"))
        claims.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(claims / f"v{version}")
        except FileExistsError:
            return False
        return not self.exists(name, f"v{version}")

    def release(self, name: str, version: int) -> None:
        """Give back the claim of a registration that failed before publishing."""
        with contextlib.suppress(OSError):
            os.rmdir(self.path(name, ".claims", f"v{version}"))

    def staging_dir(self, name: str) -> Path:
        """Inside the store (same filesystem), so the final rename is atomic."""
        staging = Path(self.path(name, ".staging"))
        staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="v", dir=staging))

    def publish(self, staged: Path, name: str, version: int) -> None:
        os.rename(staged, self.path(name, f"v{version}"))  # fails if v<N> exists and is not empty

    def _version_entries(self, name: str, version: int, label: str) -> list[tuple[str, bool]]:
        for parts in ((name,), (name, f"v{version}")):
            if self.is_link(*parts):
                raise VerificationError(f"{label}: {'/'.join(parts)} is a symbolic link; a registry holds real "
                                        "directories, so a link is someone pointing it elsewhere")
        return [(e.name, e.is_file(follow_symlinks=False)) for e in os.scandir(self.path(name, f"v{version}"))]

    def _open_version_file(self, name: str, version: int, rel: str):
        return os.fdopen(os.open(self.path(name, f"v{version}", rel), os.O_RDONLY | os.O_NOFOLLOW), "rb")


class ObjectStore(Store):
    """A registry in an object store through a pyarrow filesystem: claims are objects that win
    only when alone, and ``metadata.json`` is written last (it makes a version visible)."""

    def __init__(self, filesystem: Any, base: str, root_uri: str):
        self.fs, self.base, self.root_uri = filesystem, base.rstrip("/"), root_uri

    def listdir(self, *parts: str) -> list[tuple[str, bool]]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return [(i.base_name, i.type == pafs.FileType.Directory) for i in infos]

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str | None:
        try:
            with self.fs.open_input_stream(self.path(*parts)) as fh:
                return fh.read().decode()
        except FileNotFoundError:
            return None

    def write_text_atomic(self, text: str, *parts: str) -> None:
        """One PUT: readers see the old object or the new one."""
        storage.write_atomic(self.fs, self.path(*parts), text.encode())

    def claim(self, name: str, version: int) -> bool:
        """Object stores offer no create-if-absent through pyarrow. A claim wins only when it is the
        only one listed after it was written: with read-after-write consistent listing (S3, GCS)
        two claims can both lose (then both try the next number) but never both win."""
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
        """An object store keeps the claim of a failed registration: that version number is skipped."""

    def staging_dir(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix="visionray-register-"))

    def publish(self, staged: Path, name: str, version: int) -> None:
        target = self.path(name, f"v{version}")
        self.fs.create_dir(target, recursive=True)
        order = [MODEL_FILE, SIGNATURE_FILE, METADATA_FILE]  # metadata last: it makes the version visible
        for file in sorted(staged.iterdir(), key=lambda p: order.index(p.name) if p.name in order else -1):
            with file.open("rb") as src, self.fs.open_output_stream(f"{target}/{file.name}") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        shutil.rmtree(staged, ignore_errors=True)

    def _version_entries(self, name: str, version: int, label: str) -> list[tuple[str, bool]]:
        import pyarrow.fs as pafs

        src, found = self.path(name, f"v{version}"), []
        for info in self.fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            inside = info.path.startswith(src + "/")
            found.append((info.path[len(src) + 1:] if inside else info.path, info.type == pafs.FileType.File))
        return found

    def _open_version_file(self, name: str, version: int, rel: str):
        return self.fs.open_input_stream(self.path(name, f"v{version}", rel))


def open_store(root: str, filesystem: Any = None) -> LocalStore | ObjectStore:
    """The store for a registry root: a local path or any URI ``visionray.storage`` resolves; or
    ``root`` as a path inside a given pyarrow ``filesystem``."""
    if filesystem is None and "://" not in root:
        return LocalStore(root)
    root_uri = root
    if filesystem is None:
        try:
            filesystem, path = storage.resolve(root)
        except storage.StorageError as exc:
            raise RegistryError(f"registry {exc}") from None
    else:
        path = root
        if "://" not in root:
            root_uri = f"{filesystem.type_name}://{root.lstrip('/')}"
    if storage.is_local(filesystem):
        return LocalStore(path, root_uri)
    return ObjectStore(filesystem, path, root_uri)
