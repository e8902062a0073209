"""``visionray data``: prepare data once for training anywhere (``data pack``)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from visionray.cli.common import console, user_errors

data_app = typer.Typer(no_args_is_help=True, help="Prepare data: pack image folders into shards.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``visionray`` app."""
    app.add_typer(data_app, name="data")


@data_app.command("pack")
def pack_(
    src: str = typer.Argument(..., help="an image folder (root/<class>/<image>), a .tar/.tar.gz of one, or a "
                                        "source name: digits, cifar10, cifar100, mnist, fashion_mnist (their arrays, stored as PNG)"),
    dest: str = typer.Argument(..., help="the pack directory: a local path, s3://bucket/prefix or gs://bucket/prefix"),
    shard_mib: float = typer.Option(128.0, "--shard-mib", min=0.001, help="target size of a shard (MiB of encoded images)"),
    shard_rows: int = typer.Option(8192, "--shard-rows", min=1, help="images per shard at most (small images: "
                                   "more shards, read in parallel)"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", min=0.0, max=0.9, help="share held out for validation"),
    split_seed: int = typer.Option(0, "--split-seed", min=0, help="seed of the train/val split and the shard order"),
    root: Optional[str] = typer.Option(None, "--root", help="torchvision sources: the directory holding the files"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest's summary as JSON"),
) -> None:
    """Pack images into Parquet shards plus manifest.json; train with data.source: shards.

    Resumable: shards already written and verified are kept; the same command again changes nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from visionray.data.pack import pack

    with user_errors(), Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("packing", total=None)
        result = pack(src, dest, shard_mib=shard_mib, shard_rows=shard_rows, val_fraction=val_fraction, seed=split_seed, root=root,
                      progress=lambda done, total: bar.update(task, completed=done, total=total))
    m = result.manifest
    summary = {
        "manifest": f"{dest.rstrip('/')}/manifest.json", "classes": len(m.classes), "train": m.train.count,
        "val": m.val.count, "shards": len(m.train.shards) + len(m.val.shards), "written": result.written,
        "kept": result.kept, "bad_files": len(m.bad_files), "manifest_changed": result.manifest_changed,
    }
    if as_json:
        print(json.dumps(summary))
        return
    console.print(f"packed {m.train.count} train + {m.val.count} val images of {len(m.classes)} classes into "
                  f"{summary['shards']} shards ({len(result.written)} written, {len(result.kept)} kept)")
    for bad in m.bad_files[:5]:
        console.print(f"  [yellow]not packed[/] {bad.name}: {bad.error}", highlight=False)
    if len(m.bad_files) > 5:
        console.print(f"  ... {len(m.bad_files) - 5} more (listed in the manifest)")
    console.print(f"train on it: --set data.source=shards --set data.path={summary['manifest']}", highlight=False)
