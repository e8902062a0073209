"""Score a checkpoint on images it never trained on: top-1/top-5, per-class table, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionray.checkpoint import CheckpointMeta
from visionray.data.folders import decode_files, list_folder, resolve_folder
from visionray.data.sources import TORCHVISION_SOURCES, load_splits, resize_all, to_channels, torchvision_arrays
from visionray.data.splits import DataError, ImageArrays
from visionray.models import tta_logits
from visionray.transforms import eval_transform


@dataclass
class Evaluation:
    classes: list[str]
    confusion: np.ndarray  # [true, predicted] counts
    top1: float
    top5: float | None
    count: int
    data: str

    def per_class(self) -> list[dict[str, Any]]:
        rows = []
        for i, name in enumerate(self.classes):
            support = int(self.confusion[i].sum())
            predicted = int(self.confusion[:, i].sum())
            hit = int(self.confusion[i, i])
            rows.append({
                "class": name, "support": support,
                "recall": hit / support if support else None,
                "precision": hit / predicted if predicted else None,
            })
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data, "count": self.count, "top1": self.top1, "top5": self.top5,
            "classes": self.classes, "per_class": self.per_class(), "confusion": self.confusion.tolist(),
        }


def eval_arrays(meta: CheckpointMeta, data: str) -> ImageArrays:
    """The images to score. ``val``: the checkpoint's own held-out split (same source, seed and
    fraction as training). ``test``: a torchvision source's test split. Anything else: a path to
    an image folder or archive, every image scored; its class folders must be the model's classes."""
    preset = meta.eval_preset
    spec = meta.data_spec()
    if data == "val":
        return load_splits(spec, preset).val
    if data == "test":
        if spec.source not in TORCHVISION_SOURCES:
            raise DataError(f"--data test needs a torchvision source; this model trained on {spec.source!r}")
        images, labels, _ = torchvision_arrays(spec, train=False)
        return ImageArrays(
            resize_all(to_channels(images, preset.channels), preset.image_size),
            torch.as_tensor(labels, dtype=torch.long),
        )
    root = resolve_folder(data)
    files, labels, classes = list_folder(root)  # the structure is checked before any image is decoded
    unknown = sorted(set(classes) - set(meta.classes))
    if unknown:
        raise DataError(f"{data}: class folders {unknown} are not classes of this model ({meta.classes})")
    arrays, _ = decode_files(files, labels, preset.channels, preset.image_size)  # bad files raise, named
    remap = torch.tensor([meta.classes.index(c) for c in classes])
    return ImageArrays(arrays.images, remap[arrays.labels])


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, meta: CheckpointMeta, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for uint8 images through the checkpoint's eval preset, with its test-time augmentation."""
    tf = eval_transform(meta.eval_preset)
    tta = meta.tta
    fmt = torch.channels_last if meta.channels_last else torch.contiguous_format  # as serving runs it
    model = model.to(memory_format=fmt)
    out = []
    for chunk in images.split(batch_size):
        out.append(tta_logits(model, torch.stack([tf(im) for im in chunk]).contiguous(memory_format=fmt), tta))
    return torch.cat(out) if out else torch.empty(0, len(meta.classes))


def evaluate_checkpoint(model: torch.nn.Module, meta: CheckpointMeta, data: str = "val") -> Evaluation:
    arrays = eval_arrays(meta, data)
    logits = predict_logits(model, meta, arrays.images)
    n_cls = len(meta.classes)
    pred = logits.argmax(1)
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(confusion, (arrays.labels.numpy(), pred.numpy()), 1)
    top5 = None
    if n_cls > 5:
        top5 = (logits.topk(5, 1).indices == arrays.labels[:, None]).any(1).float().mean().item()
    return Evaluation(
        classes=list(meta.classes), confusion=confusion, top1=(pred == arrays.labels).float().mean().item(),
        top5=top5, count=len(arrays), data=data,
    )


def plot_confusion(ev: Evaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ev.classes)
    fig, ax = plt.subplots(figsize=(max(5, n * 0.6), max(4, n * 0.5)))
    norm = ev.confusion / np.maximum(ev.confusion.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), ev.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), ev.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {ev.top1:.3f} on {ev.count} images ({ev.data})")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(ev.confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- learning curves


def read_curve(run: str | Path) -> list[tuple[float, float]]:
    """(training wall time so far in s, val_acc) after each epoch, from a run directory's
    metrics.csv (the driver writes one row per epoch; wall time is the sum of ``epoch_s``, start-up
    left out)."""
    import csv

    path = Path(run) / "metrics.csv"
    if not path.is_file():
        raise DataError(f"{run}: no metrics.csv (give a run directory written by `visionray train`)")
    points, elapsed = [], 0.0
    with path.open() as fh:
        for row in csv.DictReader(fh):
            if row.get("val_acc") and row.get("epoch_s"):
                elapsed += float(row["epoch_s"])
                points.append((elapsed, float(row["val_acc"])))
    if not points:
        raise DataError(f"{path}: no epoch with val_acc and epoch_s yet")
    return points


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, title: str = "") -> None:
    """Held-out accuracy against training wall time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        t, acc = zip(*points)
        ax.plot([x / 60 for x in t], acc, marker="o", label=f"{label} (best {max(acc):.4f})")
    ax.set_xlabel("training wall time (min, start-up excluded)")
    ax.set_ylabel("held-out accuracy (val_acc)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
