"""The signed model registry: round trip, tamper matrix, refs, keys, concurrency, shared stores, CLI.

Everything is real: real files, real ECDSA keys and model-signing bundles, real processes racing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from visionray.registry.aliases import sign_alias
from visionray.registry.keys import generate_keys, key_fingerprint, public_key_of
from visionray.registry.layout import ENV_ALLOW_UNSIGNED, ENV_REGISTRY, ENV_SIGNING_KEY, ENV_VERIFY_KEYS, SIGNATURE_FILE, VERSION_FILES
from visionray.registry.registry import check_alias, parse_ref
from visionray.registry.signing import load_dir, sign_dir
from visionray.checkpoint import CheckpointError, MODEL_FILE
from visionray.cli import app
from visionray.registry.registry import ModelVersion, Registry
from visionray.registry.store import LocalStore, ObjectStore
from visionray.registry.layout import RegistryError, VerificationError
from tests.helpers import CLASSES, FIXTURES, REPO, make_checkpoint



@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in (ENV_REGISTRY, ENV_SIGNING_KEY, ENV_VERIFY_KEYS, ENV_ALLOW_UNSIGNED):
        monkeypatch.delenv(var, raising=False)


def checkpoint(directory: Path, seed: int = 0, val_acc: float = 0.5) -> tuple[Path, torch.nn.Module]:
    return make_checkpoint(directory, seed=seed, metrics={"val_acc": val_acc, "val_loss": 1.0}, epoch=3)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("keys")
    return {k: generate_keys(d / k) for k in ("a", "b")}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[tuple[Path, torch.nn.Module]]:
    d = tmp_path_factory.mktemp("ckpt")
    return [checkpoint(d / f"c{i}", seed=i, val_acc=0.5 + i / 10) for i in range(2)]


@pytest.fixture
def reg(tmp_path, keys, ckpts) -> Registry:
    """A registry with digits v1 (alias best) and v2 (alias production), signed by key a."""
    r = Registry(str(tmp_path / "registry"))
    r.register(ckpts[0][0], "digits", alias="best", private_key=keys["a"][0], lineage={"job": "j0"})
    r.register(ckpts[1][0], "digits", alias="production", private_key=keys["a"][0], lineage={"job": "j1"})
    return r


def logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.inference_mode():
        return model(torch.randn(4, 1, 16, 16))


# --------------------------------------------------------------------------- keys


def test_generate_keys_writes_private_key_0600_and_refuses_to_overwrite(tmp_path):
    private, public = generate_keys(tmp_path / "k" / "signer")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(RegistryError, match="--force"):
        generate_keys(tmp_path / "k" / "signer")
    again, _ = generate_keys(tmp_path / "k" / "signer", overwrite=True)
    assert again.read_bytes() != b"" and stat.S_IMODE(again.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- round trip and refs


def test_round_trip_gives_the_same_logits_and_full_metadata(reg, keys, ckpts):
    model, meta = reg.load("digits@best", [keys["a"][1]])
    assert torch.equal(logits(model), logits(ckpts[0][1]))
    assert not model.training
    assert meta.classes == CLASSES
    assert meta.eval_preset.image_size == 16 and meta.input_shape == [1, 16, 16]
    assert meta.model.model_dump() == {"name": "convnet", "kwargs": {"depth": 2, "width": 8}, "num_classes": 10,
                             "in_channels": 1, "image_size": 16}
    assert meta.metrics["val_acc"] == 0.5 and meta.spec["model"]["depth"] == 2
    assert meta.lineage["job"] == "j0"
    assert meta.lineage["source_checkpoint"] == str(ckpts[0][0].resolve())
    assert set(meta.registry.versions) >= {"torch", "ray", "visionray"}
    assert meta.registry.name == "digits" and meta.registry.version == 1
    assert meta.registry.signer == key_fingerprint(public_key_of(keys["a"][0]))
    # the weights are the checkpoint's bytes, untouched
    assert (Path(reg.resolve("digits@1").uri) / MODEL_FILE).read_bytes() == (ckpts[0][0] / MODEL_FILE).read_bytes()
    assert sorted(p.name for p in Path(reg.resolve("digits@1").uri).iterdir()) == sorted(VERSION_FILES)


@pytest.mark.parametrize("ref, version", [
    ("digits", 2), ("digits@latest", 2), ("digits@1", 1), ("digits@v2", 2), ("digits@best", 1),
    ("digits@production", 2),
])
def test_resolve_references(reg, ref, version):
    mv = reg.resolve(ref)
    assert isinstance(mv, ModelVersion) and (mv.name, mv.version) == ("digits", version)


@pytest.mark.parametrize("ref, message", [
    ("nope", "no model 'nope'.*models: digits"),
    ("digits@7", "no version 7 .*versions: 1, 2"),
    ("digits@staging", "no alias 'staging' .*aliases: best, production"),
    ("Digits", "expected NAME, NAME@ALIAS"),
    ("digits@", "expected NAME, NAME@ALIAS"),
    ("../etc", "expected NAME, NAME@ALIAS"),
])
def test_bad_references_say_what_exists(reg, ref, message):
    with pytest.raises(RegistryError, match=message):
        reg.resolve(ref)


def test_list_shows_versions_aliases_and_metrics(reg, keys):
    rows = [(v.name, v.version, v.aliases, v.metadata.metrics["val_acc"]) for v in reg.list()]
    assert rows == [("digits", 1, ("best",), 0.5), ("digits", 2, ("production",), 0.6)]
    reg.promote("digits", 2, "best", private_key=keys["a"][0])
    assert [v.aliases for v in reg.list("digits")] == [(), ("best", "production")]


@pytest.mark.parametrize("version, alias, message", [
    (9, "best", "no version 9"), (1, "Best", "alias 'Best'"), (1, "latest", "reserved"), (1, "v3", "reserved"),
])
def test_promote_rejects_bad_input(reg, version, alias, message):
    with pytest.raises(RegistryError, match=message):
        reg.promote("digits", version, alias)


@pytest.mark.parametrize("name, alias, message", [
    ("Digits", None, "model name 'Digits'"), ("a/b", None, "model name 'a/b'"), ("ok", "Prod", "alias 'Prod'"),
])
def test_register_rejects_bad_names(tmp_path, keys, ckpts, name, alias, message):
    with pytest.raises(RegistryError, match=message):
        Registry(str(tmp_path)).register(ckpts[0][0], name, alias=alias, private_key=keys["a"][0])


def test_register_needs_a_signing_key_or_the_dev_flag(tmp_path, ckpts, monkeypatch):
    r = Registry(str(tmp_path))
    with pytest.raises(RegistryError, match="visionray keys generate"):
        r.register(ckpts[0][0], "digits")
    with pytest.raises(RegistryError, match="not an unencrypted PEM private key"):
        r.register(ckpts[0][0], "digits", private_key=ckpts[0][0] / "metadata.json")
    assert r.list() == []
    monkeypatch.setenv(ENV_ALLOW_UNSIGNED, "1")
    mv = r.register(ckpts[0][0], "digits")
    assert not mv.signed
    with pytest.raises(VerificationError, match="unsigned"):
        r.verify("digits", [])


def test_signing_and_verify_keys_come_from_the_environment(tmp_path, keys, ckpts, monkeypatch):
    monkeypatch.setenv(ENV_REGISTRY, str(tmp_path / "envreg"))
    monkeypatch.setenv(ENV_SIGNING_KEY, str(keys["a"][0]))
    mv = Registry().register(ckpts[0][0], "digits")
    assert mv.uri == str(tmp_path / "envreg" / "digits" / "v1") and mv.signed
    with pytest.raises(VerificationError, match="--public-key or set VISIONRAY_VERIFY_KEYS"):
        Registry().load("digits")
    monkeypatch.setenv(ENV_VERIFY_KEYS, os.pathsep.join([str(keys["b"][1]), str(keys["a"][1])]))
    model, meta = Registry().load("digits")
    assert meta.registry.version == 1


def test_register_accepts_a_run_directory_and_rejects_non_checkpoints(tmp_path, keys, ckpts):
    r = Registry(str(tmp_path / "r"))
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a run directory"):
        r.register(tmp_path, "digits", private_key=keys["a"][0])
    run = tmp_path / "run"
    shutil.copytree(ckpts[0][0], run / "checkpoint_000000")
    shutil.copytree(ckpts[1][0], run / "checkpoint_000001")
    mv = r.register(run, "digits", private_key=keys["a"][0])
    assert mv.metadata.metrics["val_acc"] == 0.6  # the best by val_acc


# --------------------------------------------------------------------------- tamper matrix


def _flip_weight_byte(v: Path, reg: Registry) -> None:
    data = bytearray((v / MODEL_FILE).read_bytes())
    data[len(data) - 10] ^= 0x01  # a tensor byte, the header stays valid
    (v / MODEL_FILE).write_bytes(bytes(data))


def _edit_classes(v: Path, reg: Registry) -> None:
    meta = json.loads((v / "metadata.json").read_text())
    meta["classes"][0], meta["classes"][1] = meta["classes"][1], meta["classes"][0]
    (v / "metadata.json").write_text(json.dumps(meta, indent=2))


def _delete_signature(v: Path, reg: Registry) -> None:
    (v / SIGNATURE_FILE).unlink()


def _sign_with_other_key(v: Path, reg: Registry, keys=None) -> None:
    (v / SIGNATURE_FILE).unlink()
    sign_dir(v, reg._other_key)


def _add_pickle(v: Path, reg: Registry) -> None:
    (v / "extra.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def _add_disguised_pickle(v: Path, reg: Registry) -> None:
    (v / "notes.txt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def _add_text_file(v: Path, reg: Registry) -> None:
    (v / "README.md").write_text("harmless?")


def _swap_weights_from_v1(v: Path, reg: Registry) -> None:
    shutil.copyfile(Path(reg.resolve("digits@1").uri) / MODEL_FILE, v / MODEL_FILE)


def _swap_whole_version_from_v1(v: Path, reg: Registry) -> None:
    for f in VERSION_FILES:
        shutil.copyfile(Path(reg.resolve("digits@1").uri) / f, v / f)


def _corrupt_signature(v: Path, reg: Registry) -> None:
    (v / SIGNATURE_FILE).write_text("{not json")


TAMPER = [
    ("weights_byte", _flip_weight_byte, "model.safetensors changed since signing"),
    ("metadata_classes", _edit_classes, "metadata.json changed since signing"),
    ("signature_deleted", _delete_signature, r"unsigned \(model.sig is missing\)"),
    ("other_key", _sign_with_other_key, "signature rejected by every trusted public key"),
    ("pickle_added", _add_pickle, "pickle file extra.pkl rejected"),
    ("pickle_disguised", _add_disguised_pickle, "unexpected object 'notes.txt' under the version"),
    ("extra_file", _add_text_file, "unexpected object 'README.md' under the version"),
    ("weights_swapped", _swap_weights_from_v1, "model.safetensors changed since signing"),
    ("version_swapped", _swap_whole_version_from_v1, "says digits@v1, but it is stored as digits@v2"),
    ("signature_corrupt", _corrupt_signature, "model.sig is corrupt"),
]


@pytest.mark.parametrize("tamper, message", [(fn, msg) for _, fn, msg in TAMPER], ids=[t[0] for t in TAMPER])
def test_tampered_versions_are_refused_with_a_reason(reg, keys, tamper, message):
    reg._other_key = keys["b"][0]
    good = [keys["a"][1]]
    assert reg.verify("digits@2", good).version == 2
    tamper(Path(reg.resolve("digits@2").uri), reg)
    with pytest.raises(VerificationError, match=message):
        reg.verify("digits@production", good)
    with pytest.raises(VerificationError, match=message):
        reg.load("digits@production", good)
    with pytest.raises(VerificationError, match=message):
        reg.export("digits@2", reg.root + "-export", public_keys=good)
    assert reg.verify("digits@1", good).version == 1  # the other version is untouched


def test_dev_flag_loads_a_changed_model_loudly_but_never_a_pickle(reg, keys, caplog):
    _flip_weight_byte(Path(reg.resolve("digits@2").uri), reg)
    with caplog.at_level("WARNING", logger="visionray.registry"):
        model, meta = reg.load("digits@2", [keys["a"][1]], allow_unsigned=True)
    assert meta.registry.version == 2
    assert any("DESPITE FAILED VERIFICATION" in r.message and "changed since signing" in r.message
               for r in caplog.records)
    _add_pickle(Path(reg.resolve("digits@2").uri), reg)
    with pytest.raises(VerificationError, match="pickle file"):
        reg.load("digits@2", [keys["a"][1]], allow_unsigned=True)


def test_a_private_key_is_not_a_verifying_key(reg, keys):
    with pytest.raises(VerificationError, match="not a PEM public key"):
        reg.verify("digits@1", [keys["a"][0]])


def test_export_copies_a_verifiable_signed_model(reg, keys, tmp_path):
    out = reg.export("digits@best", tmp_path / "exported", public_keys=[keys["a"][1]])
    assert sorted(p.name for p in out.iterdir()) == sorted(VERSION_FILES)
    model, meta = load_dir(out, [keys["a"][1]])
    assert meta.registry.version == 1
    with pytest.raises(RegistryError, match="not empty"):
        reg.export("digits@best", out, public_keys=[keys["a"][1]])
    _edit_classes(out, reg)
    with pytest.raises(VerificationError, match="metadata.json changed since signing"):
        load_dir(out, [keys["a"][1]])


# --------------------------------------------------------------------------- stores


def test_a_file_uri_on_a_second_path_is_the_same_registry(tmp_path, keys, ckpts):
    shared = tmp_path / "shared-storage" / "registry"
    writer = Registry(f"file://{shared}")
    mv = writer.register(ckpts[0][0], "digits", alias="best", private_key=keys["a"][0])
    assert mv.uri == str(shared / "digits" / "v1")
    reader = Registry(str(shared))  # another machine mounting the same store
    model, meta = reader.load("digits@best", [keys["a"][1]])
    assert torch.equal(logits(model), logits(ckpts[0][1]))
    reader.promote("digits", 1, "production", private_key=keys["a"][0])
    assert writer.resolve("digits@production").version == 1


def object_store(root: Path):
    """A pyarrow filesystem that is not LocalFileSystem, so the registry uses its object-store
    protocol (claim objects, metadata written last, single-PUT aliases) over real files."""
    import pyarrow.fs as pafs

    root.mkdir(parents=True, exist_ok=True)
    return pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())


def test_object_store_protocol_round_trip_and_tamper(tmp_path, keys, ckpts):
    r = Registry("models", filesystem=object_store(tmp_path / "bucket"))
    assert isinstance(r._store, ObjectStore)
    r.register(ckpts[0][0], "digits", alias="best", private_key=keys["a"][0])
    r.register(ckpts[1][0], "digits", private_key=keys["a"][0])
    assert [(v.version, v.aliases) for v in r.list()] == [(1, ("best",)), (2, ())]
    model, meta = r.load("digits@best", [keys["a"][1]])
    assert torch.equal(logits(model), logits(ckpts[0][1]))
    # the same files seen as a plain local registry
    local = Registry(str(tmp_path / "bucket" / "models"))
    assert local.verify("digits@2", [keys["a"][1]]).version == 2
    _flip_weight_byte(tmp_path / "bucket" / "models" / "digits" / "v2", r)
    with pytest.raises(VerificationError, match="model.safetensors changed since signing"):
        r.load("digits@2", [keys["a"][1]])


def test_unknown_uri_scheme_is_a_clear_error():
    with pytest.raises(RegistryError, match="no filesystem for this URI"):
        Registry("nosuchscheme://bucket/registry")


# --------------------------------------------------------------------------- concurrency

WRITER = textwrap.dedent("""
    import json, sys
    import pyarrow.fs as pafs
    from visionray.registry.registry import Registry
    root, kind, ckpt, key, writer, n = sys.argv[1:7]
    fs = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem()) if kind == "object" else None
    reg = Registry("models" if fs else root, filesystem=fs)
    from pathlib import Path
    import time
    Path(root, f".ready-{writer}").touch()
    while not Path(root, ".go").exists():  # start together, after the imports
        time.sleep(0.005)
    for i in range(int(n)):
        mv = reg.register(ckpt, "digits", alias="best", private_key=key, lineage={"writer": writer, "i": i})
        reg.promote("digits", mv.version, "production", private_key=key)
""")

READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from visionray.registry.registry import Registry
    from visionray.registry.layout import VERSION_FILES
    root, stop = sys.argv[1:3]
    reg = Registry(root)
    seen, checks = set(), 0
    while not Path(stop).exists() or checks == 0:
        for mv in reg.list("digits") if "digits" in reg.names() else []:
            files = sorted(p.name for p in Path(mv.uri).iterdir())
            assert files == sorted(VERSION_FILES), (mv.version, files)   # never a half-written version
            assert mv.metadata.registry.version == mv.version
            seen.add(mv.version)
        for alias in ("best", "production"):
            if "digits" in reg.names() and alias in reg.aliases("digits"):
                assert reg.resolve("digits@" + alias).version >= 1
        checks += 1
        time.sleep(0.01)
    print(json.dumps({"checks": checks, "seen": sorted(seen)}))
""")


@pytest.mark.parametrize("kind", ["local", "object"])
def test_concurrent_registrations_from_processes_never_collide(tmp_path, keys, ckpts, kind):
    writers, per_writer = 3, 4
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    root = tmp_path / "registry"
    root.mkdir()
    stop = tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), kind, str(ckpts[0][0]), str(keys["a"][0]),
                               str(w), str(per_writer)], env=env, stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    deadline = time.time() + 240
    while len(list(root.glob(".ready-*"))) < writers and time.time() < deadline:
        time.sleep(0.05)
    (root / ".go").touch()
    reader = None
    if kind == "local":
        reader = subprocess.Popen([sys.executable, "-c", READER, str(root), str(stop)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
    stop.touch()
    reg = Registry(str(root / "models") if kind == "object" else str(root))
    versions = reg.list("digits")
    assert [v.version for v in versions] == list(range(1, writers * per_writer + 1))
    origins = {(v.metadata.lineage["writer"], v.metadata.lineage["i"]) for v in versions}
    assert len(origins) == writers * per_writer  # every registration got its own version
    for v in versions:
        assert reg.verify(f"digits@{v.version}", [keys["a"][1]]).metadata.registry.version == v.version
    aliases = reg.aliases("digits")
    assert set(aliases) == {"best", "production"} and all(1 <= a <= len(versions) for a in aliases.values())
    alias_dir = (root / "models" if kind == "object" else root) / "digits" / "aliases"
    assert sorted(p.name for p in alias_dir.iterdir()) == ["best", "production"]  # no temp files left
    if reader is not None:
        out, stderr = reader.communicate(timeout=120)
        assert reader.returncode == 0, stderr
        assert json.loads(out)["checks"] >= 1


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def test_cli_keys_models_round_trip(tmp_path, ckpts):
    r = str(tmp_path / "registry")
    res = cli("keys", "generate", str(tmp_path / "k" / "ci"), "--json")
    assert res.exit_code == 0, res.output
    k = json.loads(res.stdout)
    assert stat.S_IMODE(Path(k["private_key"]).stat().st_mode) == 0o600
    assert cli("keys", "generate", str(tmp_path / "k" / "ci")).exit_code == 2

    res = cli("models", "register", str(ckpts[0][0]), "--name", "digits", "--alias", "best", "--key",
              k["private_key"], "--registry", r, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["version"] == 1
    res = cli("models", "register", str(ckpts[1][0]), "-n", "digits", "--key", k["private_key"], "-r", r)
    assert res.exit_code == 0 and "registered digits v2" in res.stdout

    res = cli("models", "promote", "digits@2", "production", "-r", r, "-k", k["public_key"], "--key", k["private_key"])
    assert res.exit_code == 0 and "digits@production" in res.stdout
    res = cli("models", "list", "-r", r, "--json")
    rows = json.loads(res.stdout)["versions"]
    assert [(x["version"], x["aliases"], x["metrics"]["val_acc"]) for x in rows] == [
        (1, ["best"], 0.5), (2, ["production"], 0.6)]
    res = cli("models", "list", "-r", r)
    assert res.exit_code == 0 and "best" in res.stdout and "0.6000" in res.stdout and "v2" in res.stdout

    res = cli("models", "show", "digits@best", "-r", r, "--json")
    assert json.loads(res.stdout)["metadata"]["classes"] == CLASSES
    assert "convnet" in cli("models", "show", "digits", "-r", r).stdout

    res = cli("models", "verify", "digits@production", "-r", r, "-k", k["public_key"], "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["verified"] is True
    out = tmp_path / "exported"
    assert cli("models", "export", "digits@best", str(out), "-r", r, "-k", k["public_key"]).exit_code == 0
    assert cli("models", "verify", str(out), "-k", k["public_key"]).exit_code == 0

    _flip_weight_byte(Path(r) / "digits" / "v2", None)
    res = cli("models", "verify", "digits@production", "-r", r, "-k", k["public_key"])
    assert res.exit_code == 1 and "model.safetensors changed since signing" in res.output
    res = cli("models", "verify", "digits@2", "-r", r, "-k", k["public_key"], "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["verified"] is False
    res = cli("models", "promote", "digits@2", "best", "-r", r, "-k", k["public_key"])
    assert res.exit_code == 1 and "not promoting" in res.output
    assert cli("models", "show", "digits@best", "-r", r, "--json").stdout.count('"version": 1') >= 1


@pytest.mark.parametrize("args, message", [
    (["models", "show", "nope"], "no model 'nope'"),
    (["models", "show", "Bad Ref"], "expected NAME, NAME@ALIAS"),
    (["models", "verify", "digits@9"], "no version 9"),
    (["models", "promote", "digits@1", "Prod"], "alias 'Prod'"),
    (["models", "register", "/no/such/dir", "--name", "digits"], "no signing key"),
    (["models", "export", "digits", "{tmp}/x"], "no public key"),
])
def test_cli_bad_input_exits_2_with_a_message(reg, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--registry", reg.root]
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_cli_evaluate_verifies_registered_models(reg, keys):
    env = {ENV_VERIFY_KEYS: str(keys["a"][1])}
    res = cli("evaluate", "digits@best", "--registry", reg.root, "--json", env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["checkpoint"] == "digits@v1" and json.loads(res.stdout)["count"] > 0
    v2 = Path(reg.resolve("digits@2").uri)
    _flip_weight_byte(v2, reg)
    for target in ("digits@production", str(v2)):  # by reference and by path: both verified
        res = cli("evaluate", target, "--registry", reg.root, env=env)
        assert res.exit_code == 2 and "model.safetensors changed since signing" in " ".join(res.output.split())
        assert "Traceback" not in res.output


def test_register_after_run_uses_the_spec_and_fails_cleanly(tmp_path, keys, ckpts):
    import typer

    from visionray.cli.registry import register_after_run
    from visionray.specs import RegisterSpec

    spec = RegisterSpec(name="digits", alias="best", registry=str(tmp_path / "r"), signing_key=str(keys["a"][0]))
    register_after_run(spec, ckpts[0][0], lineage={"job": "quick", "run_dir": str(tmp_path)})
    mv = Registry(spec.registry).resolve("digits@best")
    assert mv.metadata.lineage["job"] == "quick" and mv.signed
    unsigned = spec.model_copy(update={"signing_key": None})
    with pytest.raises(typer.Exit) as exc:
        register_after_run(unsigned, ckpts[0][0], lineage={})
    assert exc.value.exit_code == 2
    assert len(Registry(spec.registry).list()) == 1


def test_check_registration_fails_before_a_run_without_a_usable_key(tmp_path, keys, monkeypatch):
    import typer

    from visionray.cli.registry import check_registration
    from visionray.specs import RegisterSpec

    check_registration(RegisterSpec(name="digits", registry=str(tmp_path), signing_key=str(keys["a"][0])))
    with pytest.raises(typer.Exit) as exc:
        check_registration(RegisterSpec(name="digits", registry=str(tmp_path)))
    assert exc.value.exit_code == 2
    with pytest.raises(typer.Exit):
        check_registration(RegisterSpec(name="digits", signing_key=str(keys["a"][1])))  # a public key
    monkeypatch.setenv(ENV_SIGNING_KEY, str(keys["a"][0]))
    check_registration(RegisterSpec(name="digits", registry=str(tmp_path)))


@pytest.mark.slow
def test_train_with_register_shows_in_models_list(ray_cluster, tmp_path, keys):
    reg_root = tmp_path / "registry"
    res = cli("train", str(REPO / "jobs" / "quickstart.yaml"), "--set", "optim.epochs=2",
              "--set", f"output.storage={tmp_path / 'runs'}", "--set", "output.name=regtest",
              "--set", "register.name=digits", "--set", "register.alias=best",
              "--set", f"register.registry={reg_root}", "--set", f"register.signing_key={keys['a'][0]}")
    assert res.exit_code == 0, res.output
    assert "registered digits v1 (best)" in res.output
    rows = json.loads(cli("models", "list", "--registry", str(reg_root), "--json").stdout)["versions"]
    assert len(rows) == 1 and rows[0]["aliases"] == ["best"] and rows[0]["metrics"]["val_acc"] > 0.5
    assert rows[0]["lineage"]["job"] == "regtest"
    model, meta = Registry(str(reg_root)).load("digits@best", [keys["a"][1]])
    assert meta.epoch >= 1


# --------------------------------------------------------------------------- what whoever can write the storage tries


def test_a_traversal_key_in_an_object_store_refuses_the_version_and_writes_nothing(keys, ckpts, tmp_path):
    """fsspec's memory store keeps a key with '..' as it is; a fetch that joined it under the
    private copy would write outside it."""
    import uuid

    import fsspec

    root = f"/vr-{uuid.uuid4().hex[:8]}"
    r = Registry(f"memory://{root}")
    r.register(ckpts[0][0], "digits", alias="best", private_key=keys["a"][0])
    assert r.load("digits@best", [keys["a"][1]])[1].registry.version == 1
    target = tmp_path / f"dropped-{uuid.uuid4().hex}"
    depth = len(Path(tempfile.gettempdir()).parts) + 4  # enough '..' to leave any temporary copy
    fsspec.filesystem("memory").pipe(f"{root}/digits/v1/{'../' * depth}{str(target).lstrip('/')}", b"import os\n")
    for attempt in (lambda: r.load("digits@best", [keys["a"][1]]), lambda: r.verify("digits@1", [keys["a"][1]]),
                    lambda: r.export("digits@1", tmp_path / "out", public_keys=[keys["a"][1]])):
        with pytest.raises(VerificationError, match=r"unexpected (object|entry) '\.\."):
            attempt()
    assert not target.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("link", ["version", "model", "alias"])
def test_symlinked_versions_models_and_aliases_are_refused(tmp_path, keys, ckpts, link):
    root = tmp_path / "registry"
    r = Registry(str(root))
    r.register(ckpts[0][0], "digits", alias="best", private_key=keys["a"][0])
    elsewhere = Registry(str(tmp_path / "elsewhere"))
    elsewhere.register(ckpts[1][0], "digits", alias="best", private_key=keys["a"][0])
    elsewhere.register(ckpts[1][0], "digits", private_key=keys["a"][0])
    if link == "version":  # v2 -> another registry's version
        (root / "digits" / "v2").symlink_to(tmp_path / "elsewhere" / "digits" / "v2")
        ref, message = "digits@2", "digits/v2 is a symbolic link"
    elif link == "model":
        (root / "other").symlink_to(tmp_path / "elsewhere" / "digits")
        ref, message = "other@1", "other is a symbolic link"
    else:
        (root / "digits" / "aliases" / "production").symlink_to(root / "digits" / "aliases" / "best")
        ref, message = "digits@production", "no alias 'production'"
    with pytest.raises(RegistryError, match=message):
        r.load(ref, [keys["a"][1]])


@pytest.mark.parametrize("attack, message", [
    ("legacy_number", "digits@production is not signed"),
    ("copied_record", "its alias file says digits@best"),
    ("edited_version", "not signed by a trusted key"),
    ("other_signer", "not signed by a trusted key"),
])
def test_a_repointed_alias_is_refused_when_loading_by_it(reg, keys, attack, message):
    aliases = Path(reg.uri) / "digits" / "aliases"
    if attack == "legacy_number":
        (aliases / "production").write_text("1\n")
    elif attack == "copied_record":
        (aliases / "production").write_text((aliases / "best").read_text())
    elif attack == "edited_version":
        record = json.loads((aliases / "production").read_text())
        (aliases / "production").write_text(json.dumps({**record, "version": 1}))
    else:
        (aliases / "production").write_text(sign_alias("digits", "production", 1, keys["b"][0]).model_dump_json())
    for attempt in (lambda: reg.load("digits@production", [keys["a"][1]]),
                    lambda: reg.verify("digits@production", [keys["a"][1]])):
        with pytest.raises(VerificationError, match=message):
            attempt()
    assert reg.load("digits@2", [keys["a"][1]])[1].registry.version == 2  # by version: still loads
    assert reg.load("digits@best", [keys["a"][1]])[1].registry.version == 1  # the other alias is intact


def test_promote_needs_the_signing_key(reg, keys):
    with pytest.raises(RegistryError, match="needs the signing key"):
        reg.promote("digits", 1, "production")
    assert reg.resolve("digits@production").version == 2


@pytest.mark.parametrize("attempt", [
    lambda: parse_ref("digits\n"),
    lambda: parse_ref("digits@best\n"),
    lambda: check_alias("best\n"),
    lambda: Registry("/nonexistent").list("digits\n"),
])
def test_names_and_aliases_with_a_trailing_newline_are_refused(attempt):
    with pytest.raises(RegistryError):
        attempt()


def test_serving_unsigned_needs_the_config_flag_and_the_environment(reg, keys, ckpts, monkeypatch, caplog):
    from visionray.serve.config import load_serve_spec
    from visionray.serve.predictor import UnsignedRefused, resolve_source

    unsigned = load_serve_spec({"checkpoint": str(ckpts[0][0]), "allow_unsigned": True})
    with pytest.raises(UnsignedRefused, match="together with VISIONRAY_ALLOW_UNSIGNED=1"):
        resolve_source(unsigned)  # the config alone
    (Path(reg.uri) / "digits" / "aliases" / "production").write_text("1\n")  # an unsigned alias
    signed_only = load_serve_spec({"model": "digits@production", "registry": reg.root, "public_keys": [str(keys["a"][1])]})
    monkeypatch.setenv(ENV_ALLOW_UNSIGNED, "1")
    with pytest.raises(VerificationError, match="is not signed"):
        resolve_source(signed_only)  # the environment alone
    assert resolve_source(unsigned).allow_unsigned is True  # both


def test_the_unsigned_warning_names_who_turned_verification_off(reg, keys, caplog):
    _flip_weight_byte(Path(reg.resolve("digits@2").uri), reg)
    with caplog.at_level("WARNING", logger="visionray.registry"):
        reg.load("digits@2", [keys["a"][1]], allow_unsigned=True)
    [warning] = [r.message for r in caplog.records if "DESPITE" in r.message]
    assert "allow_unsigned=True from the caller" in warning and "in the environment" not in warning


def test_a_registry_version_written_by_visionray_0_1_still_verifies_and_loads():
    """``tests/fixtures/registry_v0.1`` (signed alias, version 1) was written by the code before
    the typed contract: it verifies against its public key and loads with the checkpoint's weights."""
    from visionray.checkpoint import load_model

    reg = Registry(str(FIXTURES / "registry_v0.1"))
    model, meta = reg.load("legacy@best", public_keys=[FIXTURES / "registry_v0.1.pub"])
    assert meta.registry.name == "legacy" and meta.registry.version == 1 and meta.registry.signer.startswith("sha256:")
    assert meta.input_shape == [1, 8, 8] and meta.lineage["job"] == "legacy" and meta.tta == "flip"
    trained, _ = load_model(FIXTURES / "checkpoint_v0.1")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    with pytest.raises(VerificationError):
        reg.load("legacy@best", public_keys=[generate_keys(Path(tempfile.mkdtemp()) / "other")[1]])


def test_each_registry_root_gets_its_store_kind(tmp_path):
    assert isinstance(Registry(str(tmp_path / "a"))._store, LocalStore)
    file_uri = Registry(f"file://{tmp_path / 'b'}")
    assert isinstance(file_uri._store, LocalStore) and file_uri.uri == f"file://{tmp_path / 'b'}"
    assert isinstance(Registry(f"memory://{tmp_path.name}/c")._store, ObjectStore)
