"""Planning a Ray job from a VisionRay spec: ``prepare`` validates the spec where the user is
(the same models ``visionray train|tune|serve`` use), refuses paths that would not exist on the
cluster, and measures the upload against Ray's limit. The plan runs ``visionray <kind> SPEC`` on
the cluster (``visionray.cluster.client`` submits it) and ships:

* ``py_modules``: ``platform/visionray`` (first on the job's ``PYTHONPATH``, so the code that runs
  is the code shipped, even where an older VisionRay is installed on the nodes);
* ``working_dir``: the project without ``.git``, ``.venv``, data, runs, results, the registry and
  the package itself (specs under ``jobs/``, ``tune/``, ``serve/`` resolve as they do locally).
"""

from __future__ import annotations

import logging
import re
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from visionray.spec_io import read_yaml
from visionray.cluster.client import JobsError
from visionray.cluster.upload import EXCLUDES, PACKAGE, Upload, measure_upload, private_key_files, zipped_size

logger = logging.getLogger(__name__)

Kind = Literal["train", "tune", "serve"]

ENV_REGISTRY = "VISIONRAY_REGISTRY"


# --------------------------------------------------------------------------- what to run


def detect_kind(raw: dict[str, Any]) -> Kind:
    """``applications:`` is a Serve config, a top-level ``search:`` a search spec, else training."""
    from visionray.tune.spec import is_search_spec

    if "applications" in raw:
        return "serve"
    if is_search_spec(raw):
        return "tune"
    return "train"


def _is_shared(location: str) -> bool:
    """A URI or an absolute path: the same place on every node (S3, GCS, an NFS mount)."""
    return "://" in location or Path(location).expanduser().is_absolute()


def _relative_to(path: Path, root: Path) -> Path | None:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def preflight_upload(project: Path, excludes: list[str] = EXCLUDES) -> Upload:
    """Refuse an upload Ray would reject (over its size limit), naming the largest paths."""
    upload = measure_upload(project, excludes)
    if upload.total < upload.limit:
        return upload
    zipped = max(zipped_size(project, excludes), zipped_size(project / PACKAGE, excludes))
    if zipped < upload.limit:
        return upload
    lines = [f"the code to ship from {project} is {_mib(zipped)} zipped ({_mib(upload.total)} of files); "
             f"Ray accepts packages under {_mib(upload.limit)}"]
    lines += [f"{path}: {_mib(size)}" for path, size in upload.largest()]
    lines.append("move data and checkpoints to shared storage (s3://, gs://, an NFS path), or add the paths to "
                 ".rayignore (gitignore syntax) in the project root")
    raise JobsError(lines, "upload too large")


@dataclass
class Plan:
    """A validated submission: what runs on the cluster and what travels with it."""

    kind: Kind
    spec: str  # the spec's path relative to the project (posix)
    name: str  # the job's output name (train/tune) or the Serve application name
    entrypoint: str
    runtime_env: dict[str, Any]
    upload: Upload
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _check_shared(problems: list[str], what: str, location: str | None, fix: str) -> None:
    if location is not None and not _is_shared(location):
        problems.append(f"{what} {location!r} is a relative path: on the cluster it would land in the job's "
                        f"temporary working directory and be lost when the job ends; {fix}")


def _check_registry(problems: list[str], warnings: list[str], what: str, section, registry: str | None, fix: str) -> None:
    """A registry named in the spec must be shared; an unnamed one is ``--registry`` or the cluster's
    own ``$VISIONRAY_REGISTRY`` (cluster.yaml sets it), which only the cluster knows."""
    if section is None:
        return
    key = getattr(section, "signing_key", None)  # registration signs on the cluster: the key must be there
    if key is not None and not Path(key).expanduser().is_absolute():
        problems.append(f"register.signing_key {key!r} is a relative path; give the absolute path of the key on "
                        "every node (a mounted secret), or leave it unset and set $VISIONRAY_SIGNING_KEY there")
    if section.registry is not None:
        _check_shared(problems, what, section.registry, fix)
    elif registry is None:
        warnings.append(f"{what} is unset and no --registry was given: the cluster's $VISIONRAY_REGISTRY decides; "
                        "without it the model would land in the job's temporary directory")


def _check_data(problems: list[str], spec, project: Path, upload: Upload, prefix: str = "data") -> None:
    for name in ("path", "val_path", "root"):
        value = getattr(spec.data, name)
        if value is None or _is_shared(value) or (name == "root" and spec.data.download):
            continue  # a torchvision source with download: true fetches into root on each node
        rel = _relative_to(project / value, project)
        shipped = rel is not None and (str(rel) in upload.files or any(f.startswith(f"{rel}/") for f in upload.files))
        if not shipped:
            problems.append(f"{prefix}.{name} {value!r} is not part of the code shipped from {project}; "
                            "give an absolute path that every node mounts (NFS) or copy the data there")


def _checked_upload(project: Path, spec_file: str | Path) -> tuple[Path, Upload]:
    """The spec's path inside the project and what would ship; refused when the project is not one,
    the spec is outside it or excluded, or the upload is too large or holds a private key."""
    if not (project / PACKAGE / "__init__.py").is_file():
        raise JobsError(f"{project} is not a VisionRay project (no {PACKAGE}/__init__.py); pass --project-dir")
    if not (project / ".rayignore").is_file():
        raise JobsError(f"{project}: no .rayignore; it keeps data, runs, the registry and a second copy of the package "
                        "out of the upload (restore it from the repository)")
    rel = _relative_to(Path(spec_file), project)
    if rel is None:
        raise JobsError(f"{spec_file}: the spec must be inside the project shipped to the cluster ({project}); "
                        "copy it under jobs/, tune/ or serve/")
    upload = preflight_upload(project)
    leaked = private_key_files(project, upload)
    if leaked:
        raise JobsError([f"{p}: holds a PEM private key and would be uploaded to the cluster" for p in leaked]
                        + ["move it out of the project, or exclude it in .rayignore; signing keys belong on the "
                           "machine that registers, verification needs only the .pub"], "refusing to upload secrets")
    if str(rel) not in upload.files:
        raise JobsError(f"{rel}: excluded from the upload ({', '.join(EXCLUDES)}, .gitignore, .rayignore); "
                        "put the spec under jobs/, tune/ or serve/")
    return rel, upload


def _check_spec(kind: Kind, spec_path: Path, rel: Path, overrides: list[str], registry: str | None, project: Path,
                upload: Upload, problems: list[str], warnings: list[str]) -> str:
    """Validate the spec with the model its command uses; add what would not work on a cluster to
    ``problems`` (``warnings``: what works but may surprise). Returns the job's name."""
    storage_fix = "give --storage s3://BUCKET/PATH, gs://BUCKET/PATH or an absolute path on shared disk (NFS)"
    registry_fix = "give --registry URI, or set register.registry to a URI or an absolute shared path"
    if kind in ("train", "tune"):
        from visionray.specs import load_spec
        from visionray.tune.spec import load_search_spec

        spec = load_spec(spec_path, overrides) if kind == "train" else load_search_spec(spec_path, overrides)
        _check_shared(problems, "output.storage", spec.output.storage, storage_fix)
        if kind == "train":
            _check_data(problems, spec, project, upload)
        else:
            _check_data(problems, spec.base, project, upload, prefix="base.data")
        _check_registry(problems, warnings, "register.registry", spec.registration, registry, registry_fix)
        return spec.output.name
    from visionray.serve.config import IMPORT_PATH, load_serve_spec, read_serve_config

    config = read_serve_config(spec_path)
    apps = [a for a in config["applications"] if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise JobsError(f"{rel}: no application with import_path {IMPORT_PATH}; deploy other Serve apps "
                        "with `serve deploy`")
    args = load_serve_spec(dict(apps[0].get("args") or {}), f"{rel}: args")
    if args.checkpoint is not None:
        _check_shared(problems, "args.checkpoint", args.checkpoint, "give a URI or an absolute shared path")
    else:
        _check_registry(problems, warnings, "args.registry", args, registry,
                        "set args.registry in the config to a URI (s3://, gs://) or an absolute shared path, "
                        "or remove it and give --registry")
    return apps[0].get("name", "default")


def prepare(
    spec_file: str | Path,
    *,
    project: str | Path,
    overrides: list[str] | None = None,
    storage: str | None = None,
    registry: str | None = None,
    extra_args: list[str] | None = None,
) -> Plan:
    """Validate ``spec_file`` for running on a cluster and build its entrypoint and runtime_env.

    ``storage`` replaces ``output.storage`` (train, tune); ``registry`` becomes
    ``$VISIONRAY_REGISTRY`` on the cluster. Both must be a URI or an absolute path every node reaches."""
    project = Path(project).resolve()
    rel, upload = _checked_upload(project, spec_file)
    kind = detect_kind(read_yaml(Path(spec_file)))
    overrides = list(overrides or [])
    if storage is not None:
        if kind == "serve":
            raise JobsError("--storage applies to training and search specs; a Serve config reads models from "
                            "its registry (args.registry or --registry)")
        overrides.append(f"output.storage={storage}")
    if overrides and kind == "serve":
        raise JobsError("--set applies to training and search specs; edit the Serve config instead")
    if registry is not None and not _is_shared(registry):
        raise JobsError(f"--registry {registry!r} is a relative path; give a URI (s3://, gs://) or an absolute "
                        "path that every node reaches")
    problems: list[str] = []
    warnings: list[str] = []
    name = _check_spec(kind, Path(spec_file), rel, overrides, registry, project, upload, problems, warnings)
    if problems:
        raise JobsError(problems, f"{rel}: not runnable on a cluster")

    argv = ["python", "-m", "visionray.cli", kind, rel.as_posix(), *(a for item in overrides for a in ("--set", item))]
    if kind == "serve":
        argv.append("--detach")  # deploy and return: the application outlives the job
    argv += list(extra_args or [])
    runtime_env: dict[str, Any] = {"working_dir": str(project), "py_modules": [str(project / PACKAGE)], "excludes": list(EXCLUDES)}
    if registry is not None:
        runtime_env["env_vars"] = {ENV_REGISTRY: registry}
    metadata = {"visionray_kind": kind, "visionray_spec": rel.as_posix(), "visionray_name": name}
    return Plan(kind=kind, spec=rel.as_posix(), name=name, entrypoint=shlex.join(argv), runtime_env=runtime_env,
                upload=upload, metadata=metadata, warnings=warnings)


def submission_id(plan: Plan) -> str:
    """Readable and unique: ``visionray-train-quickstart-3f9a1c``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", plan.name)[:40]
    return f"visionray-{plan.kind}-{name}-{secrets.token_hex(3)}"


def submit(client, plan: Plan, submission_id_: str | None = None) -> str:
    """Upload the code and start the job; returns its submission id."""
    try:
        return client.submit_job(
            entrypoint=plan.entrypoint, runtime_env=plan.runtime_env, metadata=plan.metadata,
            submission_id=submission_id_ or submission_id(plan),
        )
    except (RuntimeError, ValueError) as exc:
        raise JobsError(str(exc).strip().splitlines()[:3], "the cluster refused the job") from None
