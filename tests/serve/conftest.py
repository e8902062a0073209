"""Fixtures the serve tests share: the session's signing keys and the quickstart model, registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionray.registry.keys import generate_keys
from visionray.registry.registry import Registry


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    prefix = tmp_path_factory.mktemp("keys") / "signer"
    return generate_keys(prefix)


@pytest.fixture(scope="session")
def digits_registry(quickstart_run, tmp_path_factory, keys) -> Path:
    """The session's quickstart run (the README's main job), registered (signed) as digits@best."""
    from visionray.runs import best_checkpoint, run_dir

    spec = quickstart_run[0]
    root = tmp_path_factory.mktemp("registry")
    Registry(str(root)).register(best_checkpoint(run_dir(spec)), "digits", alias="best", private_key=keys[0])
    return root


@pytest.fixture(scope="session")
def serve_url(ray_cluster, digits_registry, keys):
    """Serve on 127.0.0.1:<free port>, the digits app at '/'; other modules add their apps under
    other route prefixes on the same Serve."""
    from ray import serve

    from tests.helpers import app_args, free_port
    from visionray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(digits_registry, keys)), name="vr", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
