"""The epoch loops every worker runs: ``train_one_epoch`` and ``evaluate`` (one screen each)."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from visionray import defaults
from visionray.models import tta_logits


from visionray.train.optim import Lookahead

# --------------------------------------------------------------------------- epoch loops


@dataclass
class Runtime:
    """What one worker's loops need besides the model: device, precision and its place in the world."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    world_size: int

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True, memory_format=fmt), labels.to(self.device, non_blocking=True)

    def from_rank0(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (decisions that must agree, made from local timings)."""
        if self.world_size == 1 or not dist.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, 0)
        return int(t.item())

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()


def train_one_epoch(
    model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, scheduler, scaler,
    criterion: nn.Module, rt: Runtime, grad_clip: float | None, lookahead: Lookahead | None = None,
) -> dict[str, float]:
    model.train()
    loss_sum, seen, start = torch.zeros((), device=rt.device), 0, time.perf_counter()
    for images, labels in batches:
        images, labels = rt.to_device(images, labels)
        with rt.autocast():
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if lookahead is not None:
            lookahead.step()
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    total_loss, total_seen, max_seconds = *rt.all_sum([loss_sum.item(), seen]), seconds
    if rt.world_size > 1:  # the slowest worker sets the pace
        t = torch.tensor([seconds], device=rt.device if rt.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        max_seconds = t.item()
    return {
        "train_loss": total_loss / max(total_seen, 1),
        "images_per_s": total_seen / max_seconds,
        "images_per_s_worker": seen / seconds,
        "epoch_s": max_seconds,
    }


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, rt: Runtime, num_classes: int, tta: str = "none") -> dict[str, float]:
    """Loss, top-1 and (with more than 5 classes) top-5 over every worker's part of the data.
    ``tta`` averages logits over test-time views (``models.tta_logits``)."""
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, top1, top5, count
    for images, labels in batches:
        images, labels = rt.to_device(images, labels)
        with rt.autocast():
            logits = tta_logits(model, images, tta)
        top = logits.topk(k, dim=1).indices
        sums += torch.stack([
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            (top[:, 0] == labels).sum().double(),
            (top == labels[:, None]).any(dim=1).sum().double(),
            torch.tensor(float(len(labels)), dtype=torch.float64, device=rt.device),
        ])
    loss, top1, top5, count = rt.all_sum(sums.tolist())
    out = {"val_loss": loss / max(count, 1), "val_acc": top1 / max(count, 1)}
    if num_classes > 5:
        out["val_top5"] = top5 / max(count, 1)
    return out


def _step_seconds(probe: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Seconds of one training step's forward and backward of ``probe`` on ``x`` (after an untimed
    first step, which allocates and picks kernels)."""
    for _ in range(2):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = probe(x).float().logsumexp(1).mean()
        loss.backward()
        probe.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def _probe_batch(model: nn.Module, n: int, shape: tuple[int, int, int], device: torch.device,
                 channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return copy.deepcopy(model).train(), torch.randn(n, *shape, device=device).contiguous(memory_format=fmt)


def bf16_speedup(model: nn.Module, shape: tuple[int, int, int], device: torch.device, channels_last: bool) -> float:
    """How many times faster a training step (forward and backward) of ``model`` runs under bf16
    autocast than in fp32 on ``device``, timed on a copy of the model (its weights and buffers stay
    as they are) with a synthetic batch of ``defaults.PROBE_IMAGES`` images of ``shape``."""
    probe, x = _probe_batch(model, defaults.PROBE_IMAGES, shape, device, channels_last)
    return _step_seconds(probe, x, None) / _step_seconds(probe, x, torch.bfloat16)


def bf16_pays(speedup: float) -> bool:
    """``precision: fastest``'s rule on CPU: bf16 autocast when the probe measured it at least
    ``defaults.BF16_MIN_SPEEDUP`` times as fast as fp32."""
    return speedup >= defaults.BF16_MIN_SPEEDUP


def epochs_within(budget_s: float, elapsed_s: float, model: nn.Module, rt: Runtime, batch_size: int,
                  shape: tuple[int, int, int], train_steps: int, val_steps: int, views: int, most: int) -> int:
    """The most epochs (1 to ``most``) whose estimated wall time fits in what is left of ``budget_s``
    after ``elapsed_s``: a timed step at the real batch size (on a copy of the model, under the run's
    precision) scaled by ``defaults.BUDGET_STEP_EFFICIENCY``, plus the evaluation's forward passes."""
    probe, x = _probe_batch(model, batch_size, shape, rt.device, rt.channels_last)
    step = _step_seconds(probe, x, rt.autocast_dtype) / defaults.BUDGET_STEP_EFFICIENCY
    epoch = train_steps * step + val_steps * views * step / 3
    return max(1, min(most, int((budget_s - elapsed_s) // epoch)))
