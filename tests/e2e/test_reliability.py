"""Reliability and security: full or unwritable storage, secrets kept out of output,
a loopback-only token-protected local Ray cluster, and models that vanish or rot under a reader.

Everything is real: size-limited tmpfs mounts that really fill up, read-only remounts and
immutable inodes that stop root too, real ECDSA keys, a real Ray cluster in its own process whose
sockets are read from /proc, real HTTP, and a real second process deleting files while we load.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from visionray.registry.keys import generate_keys, key_fingerprint, public_key_of
from visionray.registry.layout import ENV_ALLOW_UNSIGNED, ENV_REGISTRY, ENV_SIGNING_KEY, ENV_VERIFY_KEYS, SIGNATURE_FILE, VERSION_FILES
from visionray.registry.signing import load_dir
from visionray.checkpoint import METADATA_FILE, MODEL_FILE
from visionray.cli import app
from visionray.registry.registry import Registry
from visionray.registry.layout import RegistryError
from tests.helpers import make_checkpoint

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in (ENV_REGISTRY, ENV_SIGNING_KEY, ENV_VERIFY_KEYS, ENV_ALLOW_UNSIGNED,
                "VISIONRAY_DEBUG"):
        monkeypatch.delenv(var, raising=False)


def checkpoint_of_width(directory: Path, width: int = 8, seed: int = 0) -> Path:
    """A real checkpoint; ``width`` sets the size of model.safetensors (8: ~20 KB, 96: ~1.3 MB)."""
    return make_checkpoint(directory, kwargs={"depth": 2, "width": width}, seed=seed)[0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("keys") / "signer")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return checkpoint_of_width(tmp_path_factory.mktemp("small") / "ckpt", width=8)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return checkpoint_of_width(tmp_path_factory.mktemp("big") / "ckpt", width=96)


def cli(*args: str, env: dict[str, str] | None = None):
    """The real CLI in-process; an exception escaping it is a test failure (never a traceback)."""
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def no_traceback(res) -> None:
    assert "Traceback" not in res.output, res.output


# =========================================================================== 1. unwritable storage


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path):
    """A size-limited tmpfs (really fills up, also for root); unmounted in teardown. Call it with a
    size like "256k"; skips where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        res = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if shutil.which("chattr"):
            _run("chattr", "-R", "-i", str(where))
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _snapshot(reg: Registry) -> list[tuple[str, int, tuple[str, ...]]]:
    return [(v.name, v.version, v.aliases) for v in reg.list()]


def assert_registry_intact(reg: Registry, before, public_key: Path) -> None:
    """No new version, every listed version verifies, aliases unmoved, no staging leftovers."""
    assert _snapshot(reg) == before
    for v in reg.list():
        reg.verify(v.ref, [public_key])
    assert reg.aliases("digits") == {"best": 1}
    model_dir = Path(reg.uri) / "digits"
    staging = model_dir / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == [], list(staging.iterdir())
    aliases = model_dir / "aliases"
    assert sorted(p.name for p in aliases.iterdir()) == ["best"]  # no half-written alias temp files
    versions = sorted(p.name for p in model_dir.iterdir() if p.name.startswith("v"))
    assert versions == [f"v{v}" for _, v, _ in before]
    for v in versions:  # each published version holds exactly its three files
        assert sorted(p.name for p in (model_dir / v).iterdir()) == sorted(VERSION_FILES)


def test_register_bigger_than_free_space_fails_cleanly_and_publishes_nothing(tmpfs, keys, small, big):
    root = tmpfs("256k")
    reg = Registry(str(root / "registry"))
    reg.register(small, "digits", alias="best", private_key=keys[0])
    before = _snapshot(reg)
    assert (big / MODEL_FILE).stat().st_size > _free_bytes(root)  # the mechanism under test is real
    free_before = _free_bytes(root)

    with pytest.raises(RegistryError, match=r"storage is full .*nothing was published|nothing was published.*"
                                            r"storage is full") as exc:
        reg.register(big, "digits", alias="best", private_key=keys[0])
    assert "digits" in str(exc.value) and str(root) in str(exc.value)
    assert_registry_intact(reg, before, keys[1])
    assert _free_bytes(root) == free_before  # the partial copy was removed: nothing leaks

    # through the CLI: exit 2, one clean message, same state
    res = cli("models", "register", str(big), "--name", "digits", "--alias", "best", "--key", str(keys[0]),
              "--registry", reg.root)
    assert res.exit_code == 2, res.output
    assert "storage is full" in " ".join(res.output.split())
    no_traceback(res)
    assert_registry_intact(reg, before, keys[1])

    # with room again, the registry takes the model as the next version
    assert _run("mount", "-o", "remount,size=8m", str(root)).returncode == 0
    mv = reg.register(big, "digits", alias="best", private_key=keys[0])
    assert mv.version == 2 and reg.aliases("digits") == {"best": 2}
    model, _ = reg.load("digits@best", [keys[1]])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_storage_full_after_the_weights_fit_still_publishes_nothing(tmpfs, keys, small):
    """The weights fit, the metadata and signature do not: the failure comes after the version
    number was claimed, the half-built version must still never appear."""
    root = tmpfs("512k")
    reg = Registry(str(root / "registry"))
    reg.register(small, "digits", alias="best", private_key=keys[0])
    before = _snapshot(reg)
    page = os.statvfs(root).f_frsize
    weights_pages = -(-(small / MODEL_FILE).stat().st_size // page)
    filler = root / "filler"
    with filler.open("wb") as fh:  # leave room for the weights' pages and nothing else
        fh.write(b"\0" * (_free_bytes(root) - weights_pages * page))
    assert _free_bytes(root) == weights_pages * page

    with pytest.raises(RegistryError, match="storage is full"):
        reg.register(small, "digits", alias="best", private_key=keys[0])
    assert_registry_intact(reg, before, keys[1])
    filler.unlink()
    mv = reg.register(small, "digits", private_key=keys[0])
    assert mv.version == 2 and reg.verify(mv.ref, [keys[1]]).version == 2  # the failed claim was given back


@pytest.mark.parametrize("mechanism, message", [
    ("read-only remount", "storage is read-only"),
    ("immutable model directory", "not writable (operation not permitted"),
    ("file where the model directory belongs", "not writable"),
])
def test_unwritable_storage_gives_a_clear_error_and_keeps_readers_working(tmpfs, keys, small, mechanism, message):
    root = tmpfs("1m")
    reg = Registry(str(root / "registry"))
    name = "other" if mechanism.startswith("file") else "digits"
    reg.register(small, "digits", alias="best", private_key=keys[0])
    before = _snapshot(reg)
    if mechanism == "read-only remount":
        res = _run("mount", "-o", "remount,ro", str(root))
        assert res.returncode == 0, res.stderr
    elif mechanism == "immutable model directory":
        if shutil.which("chattr") is None:
            pytest.skip("chattr (e2fsprogs) is not installed")
        res = _run("chattr", "+i", str(root / "registry" / "digits"), str(root / "registry" / "digits" / "aliases"))
        if res.returncode != 0:
            pytest.skip(f"chattr +i unsupported here: {res.stderr.strip()}")
    else:
        (root / "registry" / name).write_text("not a directory\n")
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        reg.register(small, name, alias="best", private_key=keys[0])
    res = cli("models", "register", str(small), "--name", name, "--key", str(keys[0]), "--registry", reg.root)
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    no_traceback(res)
    if name == "digits":  # moving an alias on unwritable storage: clear error, alias unchanged
        with pytest.raises(RegistryError, match="the alias is unchanged"):
            reg.promote("digits", 1, "production", private_key=keys[0])
        res = cli("models", "promote", "digits@1", "production", "--registry", reg.root, "-k", str(keys[1]),
                  "--key", str(keys[0]))
        assert res.exit_code == 2 and "alias is unchanged" in " ".join(res.output.split()), res.output
        no_traceback(res)
    assert _snapshot(reg) == before
    assert_registry_intact(reg, before, keys[1])
    model, meta = reg.load("digits@best", [keys[1]])  # readers are unaffected
    assert meta.registry.version == 1


def test_keys_generate_on_unwritable_storage_is_clean_and_leaves_no_half_pair(tmpfs):
    root = tmpfs("64k")
    assert _run("mount", "-o", "remount,ro", str(root)).returncode == 0
    res = cli("keys", "generate", str(root / "k" / "signer"))
    assert res.exit_code == 2 and "storage is read-only" in " ".join(res.output.split()), res.output
    no_traceback(res)
    assert _run("mount", "-o", "remount,rw", str(root)).returncode == 0
    (root / "signer.pub").mkdir()  # the public half cannot be written: the private half must go too
    res = cli("keys", "generate", str(root / "signer"), "--force")
    assert res.exit_code == 2 and "cannot write the key pair" in " ".join(res.output.split()), res.output
    no_traceback(res)
    assert not (root / "signer.key").exists()


# =========================================================================== 2. no secrets in output


def _secret_forms(private_key: Path) -> dict[str, str]:
    """Every printable form of the private key: PEM, its base64 lines, the scalar in dec/hex/b64."""
    from cryptography.hazmat.primitives import serialization

    pem = private_key.read_text()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    scalar = key.private_numbers().private_value
    raw = scalar.to_bytes(32, "big")
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    forms = {"pem": pem.strip(), "pem body": "".join(body), "scalar dec": str(scalar), "scalar hex": f"{scalar:x}",
             "scalar hex64": raw.hex(), "scalar b64": base64.b64encode(raw).decode().rstrip("="),
             "scalar b64url": base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    forms.update({f"pem line {i}": line for i, line in enumerate(body) if len(line) >= 16})
    return forms


def _assert_no_secret(text: str, forms: dict[str, str], where: str) -> None:
    flat = "".join(text.split())  # rich may wrap long strings: compare without whitespace
    for what, secret in forms.items():
        assert secret not in text and "".join(secret.split()) not in flat, f"{what} of the private key in {where}"


def test_the_secret_check_catches_a_key_in_wrapped_console_output(keys):
    """The check the tests above rely on can fail: a key printed by rich, wrapped at 40 columns."""
    import io

    from rich.console import Console

    forms = _secret_forms(keys[0])
    out = io.StringIO()
    Console(file=out, width=40).print(f"key {forms['pem body']}")
    with pytest.raises(AssertionError, match="pem body"):
        _assert_no_secret(out.getvalue(), forms, "a deliberate leak")
    with pytest.raises(AssertionError, match="scalar"):
        _assert_no_secret(f"d={forms['scalar dec']}", forms, "a deliberate leak")


def test_no_command_prints_or_logs_the_private_key(tmp_path, small, caplog):
    caplog.set_level("DEBUG")  # every logger of every library, at every level
    reg = str(tmp_path / "registry")
    outputs: list[tuple[str, str]] = []

    def run(*args: str, env: dict | None = None, code: int = 0):
        res = runner.invoke(app, list(args), env=env, catch_exceptions=False)
        assert res.exit_code == code, (args, res.output)
        no_traceback(res)
        outputs.append((" ".join(args), res.output))
        return res

    res = run("keys", "generate", str(tmp_path / "k" / "ci"))
    private, public = tmp_path / "k" / "ci.key", tmp_path / "k" / "ci.pub"
    forms = _secret_forms(private)
    fingerprint = key_fingerprint(public_key_of(private))
    assert fingerprint in " ".join(res.stdout.split())  # the public fingerprint may (and does) appear
    run("keys", "generate", str(tmp_path / "k" / "ci2"), "--json")
    env = {ENV_SIGNING_KEY: str(private)}
    run("models", "register", str(small), "--name", "digits", "--alias", "best", "--registry", reg, env=env)
    run("models", "register", str(small), "--name", "digits", "--registry", reg, "--json", env=env)
    for fmt in ([], ["--json"]):
        run("models", "list", "--registry", reg, *fmt)
        run("models", "show", "digits@best", "--registry", reg, *fmt)
        run("models", "verify", "digits@best", "--registry", reg, "-k", str(public), *fmt)
    run("models", "promote", "digits@2", "production", "--registry", reg, "-k", str(public), env=env)
    run("models", "export", "digits@best", str(tmp_path / "exported"), "--registry", reg, "-k", str(public))
    # the mistakes a user makes with keys: the private key as the verifying key, and the other way round
    run("models", "verify", "digits@best", "--registry", reg, "-k", str(private), code=1)
    run("models", "register", str(small), "--name", "digits", "--registry", reg, "--key", str(public), code=2)
    # a failed verification
    weights = tmp_path / "registry" / "digits" / "v2" / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    res = run("models", "verify", "digits@2", "--registry", reg, "-k", str(public), code=1)
    assert "changed since signing" in " ".join(res.output.split())
    run("models", "verify", "digits@2", "--registry", reg, "-k", str(public), "--json", code=1)

    for cmd, text in outputs:
        _assert_no_secret(text, forms, f"the output of `visionray {cmd}`")
    _assert_no_secret("\n".join(r.getMessage() for r in caplog.records), forms, "the log records")
    for path in [*(tmp_path / "registry").rglob("*"), *(tmp_path / "exported").rglob("*")]:
        if path.is_file():  # nor is it stored next to the model it signed
            _assert_no_secret(path.read_bytes().decode("latin-1"), forms, str(path))


@pytest.mark.slow
def test_a_real_process_with_debug_logging_never_prints_the_key(tmp_path, keys, small):
    """A real process with Python logging at DEBUG on stderr (model-signing, cryptography and
    VisionRay loggers all enabled) and VISIONRAY_DEBUG=1: register, then a failed verification."""
    forms = _secret_forms(keys[0])
    reg = tmp_path / "registry"
    script = textwrap.dedent("""
        import json, logging, sys
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        from visionray.cli import app
        registry, checkpoint, tamper = sys.argv[1:]
        codes = []
        for args in (["models", "register", checkpoint, "--name", "digits", "--alias", "best", "-r", registry],
                     ["models", "verify", "digits@best", "-r", registry]):
            try:
                codes.append(app(args, standalone_mode=False) or 0)
            except SystemExit as exc:
                codes.append(exc.code)
            open(tamper, "w").write("{}")  # after registering: the signed metadata changes
        print("CODES" + json.dumps(codes))
    """)
    env = {**os.environ, ENV_SIGNING_KEY: str(keys[0]), ENV_VERIFY_KEYS: str(keys[1]),
           "VISIONRAY_DEBUG": "1", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-c", script, str(reg), str(small), str(reg / "digits" / "v1" / METADATA_FILE)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert "CODES[0, 1]" in res.stdout, res.stdout + res.stderr
    assert "registered digits v1" in res.stdout
    assert "changed since signing" in " ".join(res.stderr.split()), res.stderr
    assert "INFO:visionray.registry:registered digits@v1" in res.stderr  # logging really was on
    _assert_no_secret(res.stdout + res.stderr, forms, "a real process's stdout/stderr")


# =========================================================================== 3. local Ray: loopback + token


_PROBE = textwrap.dedent("""
    import json, os, socket
    import httpx, ray
    from ray._private.authentication import authentication_utils
    from visionray.cluster.local import init_ray

    def ip(hexip):
        b = bytes.fromhex(hexip)
        if len(b) == 4:
            return socket.inet_ntop(socket.AF_INET, b[::-1])
        return socket.inet_ntop(socket.AF_INET6, b"".join(b[i:i + 4][::-1] for i in range(0, 16, 4)))

    def listening():  # socket inode -> (ip, port) of every TCP socket in LISTEN state
        out = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(table).read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A":
                    host, port = f[1].split(":")
                    out[int(f[9])] = (ip(host), int(port, 16))
        return out

    def descendants(root):
        children = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                children.setdefault(ppid, []).append(int(d))
        out, todo = [], list(children.get(root, []))
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    init_ray()
    try:
        webui = ray._private.worker._global_node.address_info["webui_url"]
        socks, found = listening(), []
        for pid in descendants(os.getpid()):
            try:
                name = open(f"/proc/{pid}/comm").read().strip()
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:
                continue  # a short-lived helper process
            for link in links:
                if link.startswith("socket:[") and int(link[8:-1]) in socks:
                    found.append([pid, name, *socks[int(link[8:-1])]])
        url = webui if "://" in webui else f"http://{webui}"
        token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
        status = {}
        for label, headers in (("none", {}), ("wrong", {"Authorization": "Bearer not-the-token"}),
                               ("token", {"Authorization": f"Bearer {token}"})):
            status[label] = httpx.get(f"{url}/api/jobs/", headers=headers, timeout=30).status_code
        print("PROBE" + json.dumps({"webui": webui, "listening": found, "status": status,
                                    "token_auth": authentication_utils.is_token_auth_enabled()}))
    finally:
        ray.shutdown()
""")

_WILDCARD = {"0.0.0.0", "::", "::ffff:0.0.0.0"}
_LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def local_cluster_probe() -> dict:
    """``init_ray()`` in a fresh process (its own cluster, not the shared test one), its listening
    sockets read from /proc, and three GETs of the Jobs API; the cluster is shut down before the
    process exits. RAY_AUTH_MODE is removed so that Ray's default is what is tested."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=400)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PROBE")), None)
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(line[len("PROBE"):])


@pytest.mark.slow
def test_local_dashboard_and_jobs_api_listen_on_loopback_only(local_cluster_probe):
    probe = local_cluster_probe
    host, _, port = probe["webui"].rpartition("://")[2].rpartition(":")
    assert host == "127.0.0.1", probe["webui"]
    binds = {(ip, p) for _, _, ip, p in probe["listening"] if p == int(port)}
    assert binds and all(ip in _LOOPBACK for ip, _ in binds), binds
    assert not any(ip in _WILDCARD for ip, _ in binds)


@pytest.mark.slow
def test_local_jobs_api_requires_rays_token(local_cluster_probe):
    assert local_cluster_probe["token_auth"] is True
    assert local_cluster_probe["status"] == {"none": 401, "wrong": 403, "token": 200}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "init_ray's _node_ip_address='127.0.0.1' is replaced by the host's routable IP in Ray 2.60 "
    "(services.resolve_ip_for_localhost), so the GCS, raylet and workers listen on '::', the metrics "
    "exporter on 0.0.0.0 and the runtime-env agent on the external IP. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
    "would resolve to loopback, but Ray reads it when `ray` is imported, so setting it in init_ray "
    "changes nothing (tried); remove this mark when Ray keeps _node_ip_address as given."))
def test_every_listener_of_a_local_cluster_is_on_loopback(local_cluster_probe):
    exposed = [entry for entry in local_cluster_probe["listening"] if entry[2] not in _LOOPBACK]
    assert local_cluster_probe["listening"] and not exposed, exposed


# =========================================================================== 4. vanishing / rotting models


@pytest.fixture
def reg(tmp_path, keys, small) -> Registry:
    r = Registry(str(tmp_path / "registry"))
    r.register(small, "digits", alias="best", private_key=keys[0])
    r.register(checkpoint_of_width(tmp_path / "c2", seed=1), "digits", alias="production", private_key=keys[0])
    return r


CORRUPTIONS = {
    "version deleted": lambda v: shutil.rmtree(v),
    "version replaced by a file": lambda v: (shutil.rmtree(v), v.write_text("x")),
    "weights truncated": lambda v: (v / MODEL_FILE).write_bytes((v / MODEL_FILE).read_bytes()[:100]),
    "weights deleted": lambda v: (v / MODEL_FILE).unlink(),
    "weights replaced by a directory": lambda v: ((v / MODEL_FILE).unlink(), (v / MODEL_FILE).mkdir()),
    "metadata not JSON": lambda v: (v / METADATA_FILE).write_text("{not json"),
    "metadata a JSON list": lambda v: (v / METADATA_FILE).write_text("[1, 2]"),
    "metadata not UTF-8": lambda v: (v / METADATA_FILE).write_bytes(b"\xff\xfe\x00garbage"),
    "metadata replaced by a directory": lambda v: ((v / METADATA_FILE).unlink(), (v / METADATA_FILE).mkdir()),
    "signature deleted": lambda v: (v / SIGNATURE_FILE).unlink(),
    "signature emptied": lambda v: (v / SIGNATURE_FILE).write_text(""),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_version_deleted_or_corrupted_after_listing_gives_a_clean_error(reg, keys, corruption):
    env = {ENV_VERIFY_KEYS: str(keys[1])}
    listed = cli("models", "list", "--registry", reg.root, "--json")
    assert [v["version"] for v in json.loads(listed.stdout)["versions"]] == [1, 2]
    CORRUPTIONS[corruption](Path(reg.uri) / "digits" / "v2")

    for args in (["models", "list"], ["models", "list", "--json"], ["models", "show", "digits@production"],
                 ["models", "show", "digits@production", "--json"]):
        res = cli(*args, "--registry", reg.root, env=env)
        assert res.exit_code in (0, 2), res.output
        no_traceback(res)
    for args in (["models", "verify", "digits@production"], ["models", "verify", "digits@2", "--json"],
                 ["evaluate", "digits@production"], ["models", "export", "digits@production", str(Path(reg.uri).parent / "out")],
                 ["models", "promote", "digits@2", "best"]):
        res = cli(*args, "--registry", reg.root, env=env)
        assert res.exit_code in (1, 2), (args, res.output)  # refused, with a message
        no_traceback(res)
        assert "digits" in res.output
    with pytest.raises(RegistryError):
        reg.load("digits@production", [keys[1]])
    with pytest.raises(RegistryError):
        reg.verify("digits@2", [keys[1]])
    # the other version and its alias are untouched
    assert reg.aliases("digits")["best"] == 1
    model, meta = reg.load("digits@best", [keys[1]])
    assert meta.registry.version == 1
    res = cli("evaluate", "digits@best", "--registry", reg.root, "--json", env=env)
    assert res.exit_code == 0 and json.loads(res.stdout)["count"] > 0, res.output


def test_a_model_directory_deleted_before_loading_by_path_is_a_clean_error(reg, keys, tmp_path):
    out = reg.export("digits@best", tmp_path / "exported", public_keys=[keys[1]])
    model, _ = load_dir(out, [keys[1]])
    shutil.rmtree(out)
    with pytest.raises(RegistryError, match="not a model directory"):
        load_dir(out, [keys[1]])
    res = cli("evaluate", str(out), "--registry", reg.root, env={ENV_VERIFY_KEYS: str(keys[1])})
    assert res.exit_code == 2, res.output
    no_traceback(res)


_CHURN = textwrap.dedent("""
    import os, shutil, sys, time
    version_dir, backup, stop, count = sys.argv[1:]
    rounds = 0
    while not os.path.exists(stop):  # delete the version and put it back, file by file, flat out
        shutil.rmtree(version_dir, ignore_errors=True)
        time.sleep(0.0005)
        shutil.copytree(backup, version_dir)
        rounds += 1
        if rounds == 1 or rounds % 10 == 0:
            open(count, "w").write(str(rounds))
    open(count, "w").write(str(rounds))
""")


def test_loading_while_another_process_deletes_the_version_never_crashes(reg, keys, tmp_path):
    v2 = Path(reg.uri) / "digits" / "v2"
    backup, stop, count = tmp_path / "v2-backup", tmp_path / "stop", tmp_path / "rounds"
    shutil.copytree(v2, backup)
    deleter = subprocess.Popen([sys.executable, "-c", _CHURN, str(v2), str(backup), str(stop), str(count)])
    outcomes: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 60
        while not count.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(150):
            try:
                if i % 3 == 0:
                    reg.load("digits@production", [keys[1]])
                elif i % 3 == 1:
                    reg.verify("digits@2", [keys[1]])
                else:
                    res = cli("models", "verify", "digits@production", "--registry", reg.root, "-k", str(keys[1]))
                    no_traceback(res)
                    if res.exit_code != 0:
                        raise RegistryError(res.output)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except RegistryError as exc:  # the only acceptable failure: a clean, explained one
                assert "digits" in str(exc)
                outcomes["clean error"] = outcomes.get("clean error", 0) + 1
    finally:
        stop.touch()
        try:
            deleter.wait(30)
        except subprocess.TimeoutExpired:
            deleter.kill()
            deleter.wait()
    rounds = int(count.read_text())
    assert rounds > 10, rounds  # the other process really was deleting meanwhile
    assert outcomes.get("clean error", 0) > 0, outcomes  # and we really did lose races
    # once the churn stops, the restored version loads and verifies again
    assert (v2 / METADATA_FILE).exists()
    reg.verify("digits@2", [keys[1]])
