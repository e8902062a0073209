"""``python -m visionray.cli``: what Ray jobs run on the cluster."""

from visionray.cli.app import main

main()
