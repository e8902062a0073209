"""`visionray models` and `visionray keys`: the signed model registry (issue 4)."""

from __future__ import annotations

from typing import Any

import typer

from visionray.cli_common import err


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``visionray`` app."""


def register_after_run(registration: Any, checkpoint_dir: Any, lineage: dict[str, Any]) -> None:
    """Register a finished run's best checkpoint when its spec asks (``register:``)."""
    err.print("[yellow]register:[/] the model registry is not built yet; nothing registered")
