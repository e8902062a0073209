"""The ``visionray`` command line (typer + rich): one module per command group, each adding its
commands with ``register(app)``.

User errors print what is wrong (field, value, what is allowed) and exit 2; nothing prints a
traceback unless VISIONRAY_DEBUG=1.
"""

from __future__ import annotations

import typer

from visionray.cli import cluster, data, monitor, registry, serve, train, tune

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, tune and serve image CNNs on Ray.")
for _group in (train, data, registry, serve, monitor, tune, cluster):
    _group.register(app)


def main() -> None:  # pragma: no cover - console entry for `python -m visionray.cli`
    app()
