"""The command line: ``app`` is the ``visionray`` console script (``visionray.cli.app``)."""

from visionray.cli.app import app, main  # noqa: F401 - the console entry point
