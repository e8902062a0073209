"""The registry's storage: POSIX operations on a local path, pyarrow.fs on anything else."""

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



from visionray.verification import (METADATA_FILE, MODEL_FILE, SIGNATURE_FILE, VERSION_FILES, _PICKLE_SUFFIXES,
                                    RegistryError, VerificationError)

_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")  # always fullmatch



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
