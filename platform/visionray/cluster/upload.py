"""What ``visionray submit`` ships: the files Ray's packager would upload, measured with Ray's own
traversal (its private packaging module, used only here: Ray has no public API that says what a
working_dir upload will hold), and the private keys refused among them."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("visionray.jobs")

# Never shipped, from the working_dir nor from the package (Ray applies runtime_env ``excludes``,
# gitignore syntax, to both roots, so nothing here may be anchored: ``/data/`` would drop the
# package's own ``data/``). Paths of the project root alone (data, runs, the registry, the
# package's copy in the working_dir) are in the project's ``.rayignore``, which Ray reads only
# while packaging the working_dir, and always (``RAY_RUNTIME_ENV_IGNORE_GITIGNORE`` or not).
EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis",
    # secrets: applied even when Ray is told to ignore .gitignore (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)
    "keys/", "*.key", "*.pem", ".env", ".env.*", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*", "id_ed25519*",
]
# A PEM private key (PKCS#1, PKCS#8, EC, OpenSSH, encrypted): refused wherever it sits in an upload.
PRIVATE_KEY_MARKER = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
PACKAGE = Path("platform") / "visionray"

@dataclass
class Upload:
    """What ``working_dir`` and ``py_modules`` ship: bytes per path relative to the project."""

    files: dict[str, int]
    limit: int

    @property
    def total(self) -> int:
        return sum(self.files.values())

    def largest(self, n: int = 5) -> list[tuple[str, int]]:
        """The biggest top-level entries (directories summed) and the biggest single files."""
        tops: dict[str, int] = {}
        for path, size in self.files.items():
            head, sep, _ = path.partition("/")
            key = head + "/" if sep else head
            tops[key] = tops.get(key, 0) + size
        files = sorted(self.files.items(), key=lambda kv: -kv[1])[:n]
        return sorted({**dict(files), **tops}.items(), key=lambda kv: -kv[1])[:n]


def _include_gitignore() -> bool:
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE

    return os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"


def _walk(root: Path, excludes: list[str]) -> dict[Path, int]:
    """Every file Ray's packager would put in the zip for ``root`` (its own traversal: excludes,
    .gitignore and .rayignore applied exactly as in the upload)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    found: dict[Path, int] = {}

    def handler(path: Path) -> None:
        if path.is_file():
            found[path] = path.stat().st_size

    _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=_include_gitignore(), logger=logger)
    return found


def measure_upload(project: Path, excludes: list[str] = EXCLUDES) -> Upload:
    """Bytes Ray would upload for this project, against Ray's package limit.

    The limit is Ray's ``GCS_STORAGE_MAX_SIZE`` (the gRPC message cap, 512 MiB unless
    ``RAY_max_grpc_message_size`` is set); Ray compares the zipped size, this sums file sizes (an
    upper bound for the zip): ``preflight`` zips for real only when the sum is over."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    project = project.resolve()
    files = {str(p.relative_to(project)): s for p, s in _walk(project, list(excludes)).items()}
    pkg = project / PACKAGE
    files |= {str(p.relative_to(project)): s for p, s in _walk(pkg, list(excludes)).items()}
    return Upload(files=files, limit=GCS_STORAGE_MAX_SIZE)


def zipped_size(root: Path, excludes: list[str]) -> int:
    import tempfile

    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "package.zip"
        create_package(str(root), target, include_gitignore=_include_gitignore(), excludes=list(excludes), logger=logger)
        return target.stat().st_size


def private_key_files(project: Path, upload: "Upload") -> list[str]:
    """The files of ``upload`` (paths relative to ``project``) that contain a PEM private key."""
    found = []
    for rel in sorted(upload.files):
        tail = b""
        try:
            with (project / rel).open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    if PRIVATE_KEY_MARKER.search(tail + chunk):
                        found.append(rel)
                        break
                    tail = chunk[-64:]
        except OSError:
            continue  # vanished or unreadable: Ray's packager reports it
    return found
