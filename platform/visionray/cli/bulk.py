"""`visionray predict --batch SRC --output OUT.parquet`: bulk scoring with Ray Data (``visionray.serve.bulk``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from visionray.cli.common import console, fail, user_errors


def predict_batch(src: str, output: Optional[str], model: Optional[str], registry: Optional[str],
                  public_key: list[Path], job_options: dict[str, Any], address: Optional[str], as_json: bool) -> None:
    """Score every image of SRC with a verified registry model into OUT (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from visionray.cluster.local import init_ray
    from visionray.serve.bulk import BulkJob, folder_accuracy, list_inputs, read_done, score
    from visionray.serve.predictor import resolve_registry_model
    from visionray.registry.layout import verify_key_paths
    from visionray.spec_io import validate_model

    if output is None:
        fail("--batch needs --output OUT.parquet (where the rows go; an existing OUT is resumed)")
    if model is None:
        fail("--batch needs --model NAME@ALIAS or NAME@VERSION (a registered, signed model)")
    with user_errors():
        job = validate_model(BulkJob, job_options, "predict --batch options")
        keys = tuple(str(Path(k).expanduser().resolve()) for k in ([str(p) for p in public_key] or verify_key_paths()))
        source = resolve_registry_model(model, registry, keys)  # the signed record verified here, the weights in each actor
        inputs = list_inputs(src)
    init_ray(address)
    _quiet_ray_data()
    with user_errors(), Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"scoring with {source.ref}", total=inputs.total)
        result = score(inputs, source, job, output, on_progress=lambda done, total: bar.update(task, completed=done, total=total))
        accuracy = folder_accuracy(read_done(output), source.classes)
    summary = {"output": output, "model": source.ref, "inputs": inputs.total, "scored": result.scored,
               "skipped": result.skipped, "rejected": result.rejected, "ignored": result.ignored,
               "actors": result.actors, "seconds": round(result.seconds, 2), "images_per_s": round(result.scored / result.seconds, 1) if result.seconds else None,
               "folder_accuracy": accuracy}
    if as_json:
        print(json.dumps(summary))
        return
    console.print(f"{result.scored} images scored with {source.ref} into {output} in {result.seconds:.1f} s by "
                  f"{result.actors} actors ({result.skipped} already there, {result.rejected} rejected)", highlight=False)
    if result.ignored:
        console.print(f"  {result.ignored} files without an image suffix were not scored", highlight=False)
    if accuracy is not None:
        console.print(f"  top-1 {accuracy['top1']:.4f} against the class folders of {accuracy['count']} scored images",
                      highlight=False)


def _quiet_ray_data() -> None:
    """Our progress bar instead of Ray Data's (which logs a status block every few seconds when
    the terminal is not a TTY); Ray Data's warnings still show."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": ours show
