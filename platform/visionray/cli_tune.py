"""`visionray tune` (issue 3)."""

from __future__ import annotations

from typing import Any

import typer

from visionray.cli_common import err


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``visionray`` app."""
