"""Defaults that are not fields of a user-facing spec, in one place, with units."""

from __future__ import annotations

import os
from pathlib import Path

# Where extracted archives and decoded image arrays are cached (bytes on disk, reused across runs).
CACHE_DIR = Path(os.environ.get("VISIONRAY_CACHE", Path.home() / ".cache" / "visionray"))

# Where runs go when a spec names no storage: relative to the current directory.
RUNS_DIR = "runs"

# The eval preset normalises with these per-channel statistics unless the spec gives its own
# (pixel values in [0, 1] after scaling uint8 by 1/255).
NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25

# Learning rates in specs are per 256 images of global batch (linear scaling rule).
LR_REFERENCE_BATCH = 256  # images

# Ray's dashboard and Jobs API bind here in local mode.
LOCAL_HOST = "127.0.0.1"

# The secret that seals a search's state for `visionray tune --resume` (32 random bytes, mode 0600,
# created on first use). It must live outside the storage the state is on: whoever can write the
# storage must not be able to re-seal it. $VISIONRAY_STATE_KEY_FILE names another file.
STATE_KEY_FILE = Path.home() / ".config" / "visionray" / "state.key"

# `scaling.precision: fastest` on CPU trains under bf16 autocast only when a timed probe step
# (forward and backward on a copy of the model, PROBE_IMAGES synthetic images) runs at least this
# much faster than fp32: CPUs with AMX or AVX512-BF16 run bf16 2-3x faster, others 10x slower.
BF16_MIN_SPEEDUP = 1.1  # x the fp32 step rate
PROBE_IMAGES = 32  # images per probe step

# `optim.time_budget_s`: an epoch's wall time is estimated from a timed training step at the real
# batch size divided by this (real epochs of the CPU recipe, with the data pipeline, lookahead and
# the optimiser step, ran at 0.79-0.88 of the timed forward+backward's rate on a 2-vCPU AMX Xeon),
# plus the evaluation at a third of a step per batch and test-time view.
BUDGET_STEP_EFFICIENCY = 0.82  # real epoch rate / timed step rate
