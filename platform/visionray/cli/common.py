"""What every ``visionray`` sub-command shares: consoles, option types and user-error handling.

User errors print what is wrong (field, value, what is allowed) and exit 2; nothing prints a
traceback unless VISIONRAY_DEBUG=1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

PROJECT_DIR = Path(__file__).resolve().parents[3]  # cli/ -> visionray/ -> platform/ -> the project
QUICKSTART = PROJECT_DIR / "jobs" / "quickstart.yaml"

SetOption = typer.Option([], "--set", help="override a spec field: --set optim.lr=0.05 (value parsed as YAML)")
AddressOption = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")


def fail(lines: str | list[str], title: str = "error", code: int = 2) -> NoReturn:
    """Print a titled list of problems to stderr and exit (2: the user's input was wrong)."""
    lines = [lines] if isinstance(lines, str) else lines
    err.print(f"[bold red]{title}[/]")
    for line in lines:
        err.print(f"  {line}", markup=False, highlight=False)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the platform's user-facing exceptions into clean messages and exit 2."""
    from visionray.checkpoint import CheckpointError
    from visionray.data.splits import DataError
    from visionray.spec_io import SpecError
    from visionray.storage import StorageError

    try:
        yield
    except SpecError as exc:
        fail(exc.errors, f"{exc.source}: invalid spec")
    except (DataError, CheckpointError, StorageError, FileNotFoundError) as exc:
        if os.environ.get("VISIONRAY_DEBUG") == "1":
            raise
        fail(str(exc))


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
