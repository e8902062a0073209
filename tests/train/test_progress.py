"""The callback Ray Train's controller runs: importing it must load Ray and nothing of ours that
pulls in torch or torchvision (the controller's start-up is a step every training run waits for)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO

HEAVY = ("torch", "torchvision", "visionray.specs", "visionray.train.worker")


def test_the_controllers_callback_loads_no_torch_and_none_of_the_package_above_it():
    probe = ("import sys, pickle; from visionray.train.progress import ReportToQueue; "
             "pickle.loads(pickle.dumps(ReportToQueue(None))); "
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
