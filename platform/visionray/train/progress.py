"""What runs in Ray Train's controller process: the callback that forwards reports to the driver.

Apart from the driver module on purpose: the controller unpickles this callback, and importing it
loads only Ray. Importing the driver module would load the worker, torchvision and the rest of the
package into the controller, about four seconds of CPU on 2 cores before every run starts (the controller's
start-up is a step every run waits for)."""

from __future__ import annotations

from ray.train import UserCallback


class ReportToQueue(UserCallback):
    """Runs in the Ray Train controller and forwards every report to a ``ray.util.queue.Queue``
    that the driver reads: rank 0's metrics, every worker's, and the persisted checkpoint."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": metrics[0], "workers": metrics, "checkpoint": checkpoint.path if checkpoint else None})

    def after_exception(self, run_context, worker_exceptions):
        self.queue.put({"error": {rank: f"{type(e).__name__}: {e}" for rank, e in worker_exceptions.items()}})
