"""`visionray models` and `visionray keys`: the signed model registry.

Verification failures of `models verify` exit 1; bad input (unknown model, bad reference, missing
key file) exits 2; both print what failed and how to fix it, never a traceback.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.table import Table

from visionray.cli.common import console, fail, fmt, user_errors

models_app = typer.Typer(no_args_is_help=True, help="The signed model registry: list, show, register, promote, "
                                                    "verify and export model versions.")
keys_app = typer.Typer(no_args_is_help=True, help="Signing keys for the model registry.")

RegistryOption = typer.Option(None, "--registry", "-r", help="registry root: a path or s3://, gs://, file:// URI "
                                                              "(default $VISIONRAY_REGISTRY, else ./registry)")
PublicKeyOption = typer.Option([], "--public-key", "-k", help="trusted PEM public key (repeatable; default "
                                                              "$VISIONRAY_VERIFY_KEYS, os.pathsep-separated)")
JsonOption = typer.Option(False, "--json", help="print JSON for machines")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``visionray`` app."""
    app.add_typer(models_app, name="models")
    app.add_typer(keys_app, name="keys")


@contextmanager
def registry_errors() -> Iterator[None]:
    """``user_errors`` (RegistryError is a CheckpointError): clean message, exit 2."""
    with user_errors():
        yield


def _keys(public_key: list[Path]) -> list[str] | None:
    return [str(p) for p in public_key] or None  # None: $VISIONRAY_VERIFY_KEYS


def _registry(root: Optional[str]):
    from visionray.registry.registry import Registry

    return Registry(root)


def _row(mv: Any) -> dict[str, Any]:
    """The JSON summary of a version."""
    from visionray.registry.registry import iter_metrics

    meta = mv.metadata  # None: unreadable (``models verify`` says why)
    return {
        "name": mv.name, "version": mv.version, "aliases": list(mv.aliases), "uri": mv.uri,
        "metrics": dict(iter_metrics(meta)), "architecture": meta.model.model_dump(mode="json") if meta else {},
        "classes": meta.classes if meta else None, "input_shape": meta.input_shape if meta else None,
        "registered": meta.registry.registered if meta else None, "signer": meta.registry.signer if meta else None,
        "lineage": meta.lineage if meta else {},
    }


def _source(lineage: dict[str, Any]) -> str:
    if lineage.get("experiment"):
        trial = lineage.get("trial_id") or lineage.get("trial")
        return f"tune {lineage['experiment']}" + (f" / {trial}" if trial else "")
    if lineage.get("job"):
        return f"train {lineage['job']}"
    return Path(str(lineage.get("source_checkpoint", "-"))).name


# --------------------------------------------------------------------------- models


@models_app.command("list")
def list_(
    name: Optional[str] = typer.Argument(None, help="only this model"),
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Every model version with its aliases and metrics (metadata as stored; `verify` checks it)."""
    with registry_errors():
        reg = _registry(registry)
        versions = reg.list(name)
    if as_json:
        print(json.dumps({"registry": reg.uri, "versions": [_row(v) for v in versions]}))
        return
    if not versions:
        console.print(f"no models in {reg.uri}" + (f" named {name!r}" if name else "")
                      + "; add one with `visionray models register CHECKPOINT --name NAME`")
        return
    table = Table(title=f"models in {reg.uri}")
    for col, just in (("model", "left"), ("ver", "right"), ("aliases", "left"), ("val acc", "right"),
                      ("val loss", "right"), ("architecture", "left"), ("source", "left"),
                      ("registered (UTC)", "left"), ("signed", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for mv in versions:
        meta = mv.metadata
        if meta is None:
            table.add_row(mv.name, f"v{mv.version}", ", ".join(mv.aliases) or "-", "-", "-",
                          "[red]unreadable metadata[/]", "-", "-", "[red]NO[/]")
            continue
        args = ",".join(f"{k}={v}" for k, v in meta.model.kwargs.items())
        table.add_row(
            mv.name, f"v{mv.version}", ", ".join(mv.aliases) or "-", fmt(meta.metrics.get("val_acc")),
            fmt(meta.metrics.get("val_loss")), f"{meta.model.name}({args})", _source(meta.lineage),
            meta.registry.registered.replace("T", " ").rstrip("Z")[:16], "yes" if mv.signed else "[red]NO[/]",
        )
    console.print(table)


@models_app.command()
def show(
    ref: str = typer.Argument(..., help="NAME (latest), NAME@ALIAS, NAME@3 or NAME@v3"),
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """One version's metadata: architecture, classes, eval preset, metrics, lineage, versions."""
    with registry_errors():
        mv = _registry(registry).resolve(ref)
    meta = mv.metadata
    if as_json:
        print(json.dumps({**_row(mv), "metadata": meta.model_dump(mode="json") if meta else None}))
        return
    if meta is None:
        fail([f"{mv.ref}: its {'metadata.json'} is unreadable or not a version's; `visionray models verify "
              f"{mv.ref}` says what is wrong"], f"{mv.ref}: no metadata")
    table = Table(show_header=False, title=f"{mv.name} v{mv.version}")
    rows = [
        ("uri", mv.uri),
        ("aliases", ", ".join(mv.aliases) or "-"),
        ("architecture", f"{meta.model.name} {json.dumps(meta.model.kwargs)}"),
        ("input shape", "x".join(map(str, meta.input_shape))),
        ("classes", f"{len(meta.classes)}: {', '.join(meta.classes[:20])}" + (" ..." if len(meta.classes) > 20 else "")),
        ("eval preset", meta.eval_preset.model_dump_json()),
        ("test-time augmentation", meta.tta),
        ("metrics", ", ".join(f"{k}={fmt(v)}" for k, v in meta.metrics.items()) or "-"),
        ("epoch", str(meta.epoch)),
        *((f"lineage.{k}", str(v)) for k, v in meta.lineage.items() if not isinstance(v, dict)),
        ("trained with", ", ".join(f"{k} {v}" for k, v in meta.versions.items())),
        ("created", meta.created),
        ("registered", meta.registry.registered),
        ("signer", meta.registry.signer or "UNSIGNED"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


@models_app.command("register")
def register_(
    checkpoint: str = typer.Argument(..., help="a checkpoint directory, a run directory (its best checkpoint), "
                                                "or a checkpoint URI"),
    name: str = typer.Option(..., "--name", "-n", help="model name (lowercase letters, digits, _ . -)"),
    alias: Optional[str] = typer.Option(None, "--alias", "-a", help="alias to move to the new version, e.g. best"),
    key: Optional[Path] = typer.Option(None, "--key", help="PEM private signing key (default $VISIONRAY_SIGNING_KEY)"),
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Register a training checkpoint as the next version of NAME, signed."""
    with registry_errors():
        mv = _registry(registry).register(checkpoint, name, alias=alias, private_key=key, lineage={})
    if as_json:
        print(json.dumps(_row(mv)))
        return
    _registered_line(mv)


def _registered_line(mv: Any) -> None:
    acc = mv.metadata.metrics.get("val_acc") if mv.metadata else None
    console.print(f"[green]registered[/] {mv.name} v{mv.version}"
                  + (f" ({', '.join(mv.aliases)})" if mv.aliases else "")
                  + (f" val acc {acc:.4f}" if isinstance(acc, float) else "")
                  + ("" if mv.signed else " [red]UNSIGNED[/]") + f" -> {mv.uri}")


@models_app.command()
def promote(
    ref: str = typer.Argument(..., help="the version to point at: NAME@3, NAME@v3 or NAME@ALIAS"),
    alias: str = typer.Argument(..., help="alias to move, e.g. production"),
    registry: Optional[str] = RegistryOption,
    verify: bool = typer.Option(True, "--verify/--no-verify", help="verify the version before pointing at it"),
    public_key: list[Path] = PublicKeyOption,
    key: Optional[Path] = typer.Option(None, "--key", help="PEM private key that signs the move (default $VISIONRAY_SIGNING_KEY)"),
    as_json: bool = JsonOption,
) -> None:
    """Move ALIAS to a version (atomically: readers see the old or the new version), signed: loading
    by an alias verifies who moved it."""
    from visionray.registry.layout import VerificationError
    from visionray.registry.registry import check_alias

    with registry_errors():
        check_alias(alias)
        reg = _registry(registry)
        mv = reg.resolve(ref)
        if verify:
            try:
                reg.verify(mv.ref, _keys(public_key))
            except VerificationError as exc:
                fail([str(exc)], f"not promoting {mv.ref}: verification failed", code=1)
        reg.promote(mv.name, mv.version, alias, private_key=key)
    if as_json:
        print(json.dumps({"name": mv.name, "alias": alias, "version": mv.version}))
        return
    console.print(f"[green]{mv.name}@{alias}[/] -> v{mv.version}")


@models_app.command("verify")
def verify_(
    ref: str = typer.Argument(..., help="NAME, NAME@ALIAS, NAME@3, or an exported model directory"),
    public_key: list[Path] = PublicKeyOption,
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Check every file against the signature and the trusted keys (exit 1 when it fails)."""
    from visionray.registry.layout import VerificationError
    from visionray.registry.signing import is_model_dir, verify_dir

    with registry_errors():
        try:
            if Path(ref).is_dir() and is_model_dir(ref):
                meta = verify_dir(ref, _keys(public_key), allow_unsigned=False)
                label, signer = ref, meta.registry.signer
            else:
                mv = _registry(registry).verify(ref, _keys(public_key))
                label, signer = mv.ref, mv.metadata.registry.signer
        except VerificationError as exc:
            if as_json:
                print(json.dumps({"ref": ref, "verified": False, "error": str(exc)}))
                raise typer.Exit(1) from None
            fail([str(exc)], f"{ref}: verification FAILED", code=1)
    if as_json:
        print(json.dumps({"ref": label, "verified": True, "signer": signer}))
        return
    console.print(f"[green]verified[/] {label}: every file matches its signature (signer {signer})")


@models_app.command()
def export(
    ref: str = typer.Argument(..., help="NAME, NAME@ALIAS or NAME@3"),
    dest: Path = typer.Argument(..., help="new directory to write (weights, metadata, signature)"),
    public_key: list[Path] = PublicKeyOption,
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Copy a verified version, signature included, to a directory (verifiable with `models verify DIR`)."""
    with registry_errors():
        reg = _registry(registry)
        mv = reg.resolve(ref)
        out = reg.export(mv.ref, dest, public_keys=_keys(public_key))
    if as_json:
        print(json.dumps({"ref": mv.ref, "path": str(out)}))
        return
    console.print(f"[green]exported[/] {mv.ref} -> {out}")


# --------------------------------------------------------------------------- keys


@keys_app.command()
def generate(
    prefix: Path = typer.Argument(Path("visionray-signing"), help="writes PREFIX.key (private, 0600) and PREFIX.pub"),
    force: bool = typer.Option(False, "--force", help="replace an existing pair"),
    as_json: bool = JsonOption,
) -> None:
    """Create an EC P-256 signing key pair for the model registry."""
    from visionray.registry.keys import generate_keys, key_fingerprint, public_key_of

    with registry_errors():
        private, public = generate_keys(prefix, overwrite=force)
        fingerprint = key_fingerprint(public_key_of(private))
    if as_json:
        print(json.dumps({"private_key": str(private), "public_key": str(public), "fingerprint": fingerprint}))
        return
    console.print(f"[green]private key[/] {private} (mode 0600: keep it secret; sign with --key or "
                  f"VISIONRAY_SIGNING_KEY={private})")
    console.print(f"[green]public key[/]  {public} (give it to whatever loads models: --public-key or "
                  f"VISIONRAY_VERIFY_KEYS={public})")
    console.print(f"fingerprint {fingerprint}")


# --------------------------------------------------------------------------- used by train, tune, evaluate


def register_after_run(registration: Any, checkpoint_dir: Any, lineage: dict[str, Any]) -> None:
    """Register a finished run's best checkpoint when its spec asks (``register:``)."""
    from visionray.registry.registry import Registry

    with user_errors():
        try:
            mv = Registry(registration.registry).register(
                checkpoint_dir, registration.name, alias=registration.alias,
                private_key=registration.signing_key, lineage=lineage,
            )
        except ValueError as exc:
            fail([str(exc), f"the checkpoint is kept: register it later with `visionray models register "
                            f"{checkpoint_dir} --name {registration.name}`"], "registration failed")
    _registered_line(mv)


def check_registration(registration: Any) -> None:
    """Before a long run: fail now if its registration could not sign (no key, bad key)."""
    from visionray.registry.registry import Registry
    from visionray.registry.layout import allow_unsigned, signing_key_path
    from visionray.registry.keys import public_key_of

    with user_errors():
        key = registration.signing_key or signing_key_path()
        if key is None and not allow_unsigned():
            fail([f"register.name={registration.name!r} needs a signing key: set register.signing_key, or "
                  "VISIONRAY_SIGNING_KEY (create one with `visionray keys generate`)"], "registration would fail")
        if key is not None:
            public_key_of(Path(key).expanduser())
        Registry(registration.registry)  # the registry URI resolves


def load_for_cli(target: str | Path, registry: Optional[str] = None, public_key: list[Path] | None = None):
    """What ``visionray evaluate`` (and other commands) load: returns ``(model, meta, label)``.

    - NAME@ALIAS, NAME@3: a registry reference, verified then loaded;
    - an existing model directory (registry version or export): verified, then loaded;
    - another existing path: a training checkpoint or run directory (its best checkpoint);
    - anything else: a registry reference NAME (its latest version), verified then loaded.
    """
    from visionray.checkpoint import load_model
    from visionray.registry.registry import Registry
    from visionray.registry.signing import is_model_dir, load_dir
    from visionray.runs import best_checkpoint

    keys = _keys(list(public_key or []))
    path = Path(target)
    if "@" not in str(target) and path.exists():
        if path.is_dir() and is_model_dir(path):
            model, meta = load_dir(path, keys)
            return model, meta, str(path)
        best = best_checkpoint(path)
        model, meta = load_model(best)
        return model, meta, str(best)
    reg = Registry(registry)
    mv = reg.resolve(str(target))
    model, meta = reg.load(mv.ref, keys)
    return model, meta, mv.ref
