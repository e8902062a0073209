"""Optimisation for the training step: the optimiser and its parameter groups, learning-rate
schedules (per step), and lookahead, all from the spec's ``OptimSpec``."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from visionray.defaults import LR_REFERENCE_BATCH
from visionray.specs import LookaheadSpec, OneCycleSpec, OptimSpec


# --------------------------------------------------------------------------- optimisation


def effective_lr(optim: OptimSpec, global_batch: int) -> float:
    return optim.lr * global_batch / LR_REFERENCE_BATCH if optim.scale_lr else optim.lr


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build_optimizer(optim: OptimSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Parameter groups: weights (decayed), biases and norm scales (not), norm biases at
    ``norm_bias_lr_scale`` x lr if that is not 1, and one group per parameter the model trains for
    a limited number of epochs (``param_epochs``; ``lr_factors`` zeroes its lr after them)."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, NORM_LAYERS) and m.bias is not None}
    limited = model.param_epochs() if hasattr(model, "param_epochs") else {}
    scale_norm_biases = optim.norm_bias_lr_scale != 1.0
    decay, no_decay, scaled, stopping = [], [], [], []
    for p in model.parameters():  # no weight decay on biases and norm scales; frozen parameters left out
        if not p.requires_grad:
            continue
        if id(p) in limited:
            stopping.append({"params": [p], "weight_decay": optim.weight_decay if p.ndim > 1 else 0.0,
                             "train_epochs": limited[id(p)]})
        else:
            (scaled if scale_norm_biases and id(p) in norm_biases else decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scale_norm_biases:
        groups.append({"params": scaled, "weight_decay": 0.0, "lr": lr * optim.norm_bias_lr_scale})
    groups += stopping
    if optim.name == "muon":
        return Muon(muon_groups(groups, optim, lr), lr=lr, momentum=optim.momentum, spec=optim.muon)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.momentum > 0)
    cls = torch.optim.Adam if optim.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=optim.betas)


def muon_groups(groups: list[dict[str, Any]], optim: OptimSpec, lr: float) -> list[dict[str, Any]]:
    """The conv filters (4-D weights) of every group move into a Muon group of their own, at
    ``muon.lr``, with the decay of the group they came from; the rest keep theirs (SGD)."""
    out = []
    for group in groups:
        filters = [p for p in group["params"] if p.ndim == 4]
        rest = [p for p in group["params"] if p.ndim != 4]
        extra = {k: v for k, v in group.items() if k != "params"}
        if filters:
            out.append({**extra, "params": filters, "muon": True, "lr": optim.muon.lr})
        if rest:
            out.append({**extra, "params": rest, "muon": False})
    return out


def orthogonalise(g: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to ``g`` (2-D), by Muon's quintic Newton-Schulz iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + eps)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """airbench94_muon's optimiser in one ``torch.optim.Optimizer`` (one state dict, one schedule
    per group): groups marked ``muon`` (conv filters) take momentum, then the orthogonalised
    update, the filter bank kept at unit RMS per filter; the others SGD with nesterov momentum."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float, spec: Any):
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "muon": False,
                                  "muon_momentum": spec.momentum, "nesterov": spec.nesterov, "ns_steps": spec.ns_steps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            momentum = group["muon_momentum"] if group["muon"] else group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if not group["weight_decay"] or group["muon"] else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(g)
                buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum) if group["nesterov"] or not group["muon"] else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))  # unit RMS per filter: BatchNorm follows
                    g = orthogonalise(g.reshape(len(g), -1), group["ns_steps"]).view(g.shape)
                p.add_(g, alpha=-group["lr"])
        return loss


def lr_factor(optim: OptimSpec, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a given optimiser step: linear warmup, then the schedule."""
    total = optim.epochs * steps_per_epoch
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    shape = optim.onecycle or OneCycleSpec()
    peak = 0.0 if warmup else shape.peak_at

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)  # progress through the schedule, 0..1
        match optim.schedule:
            case "constant":
                return 1.0
            case "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
            case "onecycle":  # linear start -> 1 (unless warmup did that), then linear 1 -> end
                if t < peak:
                    return shape.start + (1 - shape.start) * t / peak
                return 1 + (shape.end - 1) * min(1.0, (t - peak) / (1 - peak))
            case "step":
                return optim.step_gamma ** ((step // steps_per_epoch) // optim.step_epochs)
        raise AssertionError(optim.schedule)

    return factor


def lr_factors(optim: OptimSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> list[Callable[[int], float]]:
    """One lr multiplier per parameter group: the schedule, and 0 once a group's ``train_epochs`` are over."""
    factor = lr_factor(optim, steps_per_epoch)

    def until(epochs: float) -> Callable[[int], float]:
        last = round(epochs * steps_per_epoch)
        return lambda step: factor(step) if step < last else 0.0

    return [until(g["train_epochs"]) if "train_epochs" in g else factor for g in optimizer.param_groups]


class Lookahead:
    """airbench94's lookahead over a model's weights and float buffers: every ``every_steps``
    optimiser steps the running average moves towards the weights (keeping ``decay * (step /
    total) ** power`` of itself) and the weights are replaced by it; after the last step the
    weights are the average."""

    def __init__(self, model: nn.Module, spec: LookaheadSpec, total_steps: int):
        self.spec, self.total, self.steps = spec, total_steps, 0
        # the model's own tensors (loading a state dict copies into them, so they stay the model's)
        weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.weights = list(weights.values())
        self.average = {k: v.clone() for k, v in weights.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        last = self.steps >= self.total
        if self.steps % self.spec.every_steps and not last:
            return
        keep = 1.0 if last else self.spec.decay * (self.steps / self.total) ** self.spec.power
        average = list(self.average.values())
        torch._foreach_lerp_(average, self.weights, 1.0 - keep)  # one kernel per list, not per tensor
        torch._foreach_copy_(self.weights, average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for name, average in self.average.items():
            average.copy_(state["average"][name])
