"""The search's picture: the metric against depth and width, and every trial's learning curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionray.tune.spec import SearchSpec

if TYPE_CHECKING:
    from visionray.tune.results import TrialSummary


def plot_search(spec: SearchSpec, trials: list[TrialSummary], path: Path) -> Path:
    """Three panels: the metric against depth and against width (one point per trial, its best
    epoch), and every trial's learning curve; early-stopped trials dashed and marked where they stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    scored = [t for t in trials if t.best_value is not None]
    for ax, key, colour_key in ((axes[0], "model.depth", "model.width"), (axes[1], "model.width", "model.depth")):
        xs = [_param(spec, t, key) for t in scored]
        cs = [_param(spec, t, colour_key) for t in scored]
        ys = [t.best_value for t in scored]
        stopped = [t.status == "early-stopped" for t in scored]
        known = [c for c in cs if isinstance(c, (int, float))]
        norm = {"vmin": min(known), "vmax": max(known)} if known else {}
        for flag, marker, label in ((False, "o", "ran to the end"), (True, "x", "early-stopped")):
            pts = [(x, y, c) for x, y, c, s in zip(xs, ys, cs, stopped) if s == flag and x is not None]
            if pts:
                sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] or 0 for p in pts],
                                cmap="viridis", marker=marker, label=label, **norm)
        if scored and any(x is not None for x in xs):
            fig.colorbar(sc, ax=ax, label=colour_key)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {spec.metric}")
        ax.set_title(f"{spec.metric} vs {key.split('.')[-1]}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    ax = axes[2]
    for t in trials:
        if not t.curve:
            continue
        e = [p["epoch"] for p in t.curve]
        v = [p.get(spec.metric) for p in t.curve]
        style = {"completed": "-", "early-stopped": "--", "error": ":"}.get(t.status, "-.")
        (line,) = ax.plot(e, v, style, linewidth=1.2, label=f"{t.trial_id} ({t.status})")
        if t.status == "early-stopped":
            ax.plot(e[-1], v[-1], "x", color=line.get_color(), markersize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"learning curves ({spec.scheduler.name}: dashed = stopped early)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"search {spec.output.name}: {len(trials)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _param(spec: SearchSpec, t: TrialSummary, key: str) -> Any:
    """A trial's value of ``key``: sampled, or the base job's own."""
    if key in t.params:
        return t.params[key]
    node: Any = spec.base
    for part in key.split("."):
        node = getattr(node, part, None)
    if node is None and key.startswith("model."):  # the model's own default
        import inspect

        from visionray.models import _builder

        node = inspect.signature(_builder(spec.base.model.name)).parameters.get(key.split(".")[-1])
        node = None if node is None else node.default
    return node
