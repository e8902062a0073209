"""Authenticated directory state: an HMAC-SHA256 seal over every file of a directory.

``visionray tune --resume`` hands an experiment directory to Ray's ``Tuner.restore``, which
unpickles its state files (``tuner.pkl``, the experiment and searcher state). Whoever can write the
storage could put a crafted pickle there. So the driver seals the directory when a search stops
(``seal``: the sha256 of every file, authenticated with a key kept outside the storage) and a
resume first checks it (``verify``): a missing seal, a file added, changed or removed since, or a
seal made with another key refuses the resume before anything is read by Ray.

The key is ``defaults.STATE_KEY_FILE`` or ``$VISIONRAY_STATE_KEY_FILE`` (32 random bytes, 0600,
created on first use). A driver on another machine resumes only with the same key file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

from visionray import defaults

SEAL_FILE = ".visionray-seal.json"
ENV_STATE_KEY_FILE = "VISIONRAY_STATE_KEY_FILE"
KEY_BYTES = 32


class SealError(ValueError):
    """A directory whose state cannot be authenticated; the message says why."""


def key_path() -> Path:
    return Path(os.environ.get(ENV_STATE_KEY_FILE) or defaults.STATE_KEY_FILE).expanduser()


def state_key(create: bool) -> bytes:
    """The sealing key; with ``create``, made (0600) when it does not exist yet."""
    path = key_path()
    if not path.exists():
        if not create:
            raise SealError(f"no state key at {path} (${ENV_STATE_KEY_FILE}): the search was sealed on another "
                            "machine, or the key was removed; resume where it was started, with the same key")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return state_key(create=False)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SealError(f"state key {path} is readable by others (mode {stat.S_IMODE(path.stat().st_mode):o}); "
                        f"chmod 600 {path}")
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise SealError(f"state key {path} holds {len(key)} bytes; it needs {KEY_BYTES} (delete it to make a new one, "
                        "which unseals every search sealed with the old one)")
    return key


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def digests(uri: str) -> dict[str, str]:
    """relative path -> sha256 of every file below ``uri`` (the seal itself excluded)."""
    import pyarrow.fs as pafs

    fs, base = _filesystem(uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):].lstrip("/")
        if rel == SEAL_FILE:
            continue
        h = hashlib.sha256()
        with fs.open_input_stream(info.path) as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        out[rel] = h.hexdigest()
    return dict(sorted(out.items()))


def _mac(key: bytes, files: dict[str, str]) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def seal(uri: str) -> int:
    """Seal the directory as it is now; returns the number of files sealed."""
    files = digests(uri)
    fs, base = _filesystem(uri)
    body = json.dumps({"format": "visionray-seal/1", "files": files, "hmac": _mac(state_key(create=True), files)},
                      indent=1).encode()
    with fs.open_output_stream(f"{base}/{SEAL_FILE}") as fh:
        fh.write(body)
    return len(files)


def verify(uri: str) -> None:
    """``SealError`` unless every file below ``uri`` is exactly what this key sealed."""
    fs, base = _filesystem(uri)
    try:
        with fs.open_input_stream(f"{base}/{SEAL_FILE}") as fh:
            recorded = json.loads(fh.read())
        files, mac = dict(recorded["files"]), str(recorded["hmac"])
    except FileNotFoundError:
        raise SealError(f"it has no {SEAL_FILE}: it was not stopped by VisionRay (a killed driver, or written by "
                        "someone else)") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SealError(f"its {SEAL_FILE} is not a VisionRay seal") from None
    if not hmac.compare_digest(_mac(state_key(create=False), files), mac):
        raise SealError(f"its {SEAL_FILE} was not made with this machine's state key ({key_path()}): forged, or "
                        "sealed elsewhere")
    now = digests(uri)
    changed = sorted(k for k in files.keys() & now.keys() if files[k] != now[k])
    added, removed = sorted(now.keys() - files.keys()), sorted(files.keys() - now.keys())
    if changed or added or removed:
        parts = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("changed", changed), ("added", added), ("removed", removed)) if names]
        raise SealError("files differ from what was sealed when the search stopped (" + "; ".join(parts) + ")")
