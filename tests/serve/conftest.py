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
