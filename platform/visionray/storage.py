"""Where bytes live: one resolution of a local path or URI to a pyarrow filesystem, shared by the
model registry and the packed data shards (``s3://``, ``gs://``, ``file://``, anything pyarrow.fs
opens, else anything fsspec opens)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any


class StorageError(ValueError):
    """A location no filesystem opens; the message names it and what is accepted."""


def resolve(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for ``uri``; a plain path is a local one."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as first:  # pyarrow.lib.ArrowInvalid is a ValueError
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
        except Exception as exc:
            raise StorageError(f"{uri!r}: no filesystem for this URI (pyarrow: {first}; fsspec: {exc}); "
                               "use a local path, file://, s3:// or gs://") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_local(filesystem: Any) -> bool:
    import pyarrow.fs as pafs

    return isinstance(filesystem, pafs.LocalFileSystem)


def write_atomic(filesystem: Any, path: str, data: bytes) -> None:
    """Readers see the old content or the new, never a part: a temporary file renamed into place
    locally (parents created), one PUT in an object store."""
    if is_local(filesystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
    else:
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(path) as fh:
            fh.write(data)
