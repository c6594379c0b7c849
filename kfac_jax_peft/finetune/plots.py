"""Plots of one or several runs from their metrics logs (matplotlib, no display).

:func:`plot_runs` draws, for every run, the training loss against step and
against wall-clock seconds, the validation metric against step, and the
clip rate (fraction of steps whose update was clipped, per logging window)
against step: the panels of the paper's Fig. 4, 5 and 10; for Sophia runs,
also the fraction of coordinates its per-coordinate clip cut; for HiZOO
runs, the spread of ``Sigma`` (its median, between its minimum and maximum)
against step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from kfac_jax_peft.finetune.logs import read_log, select


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: Mapping[str, Mapping[str, Sequence]], out: str, *,
                title: str | None = None) -> str:
    """Plot curves given in memory: ``{label: {"step": [...], "loss": [...],
    optional "wall_clock", "clip_rate", "clip_fraction", "eval_step",
    "eval_metric", "sigma_min", "sigma_median", "sigma_max"}}``. Panels
    without data are omitted. Returns ``out``."""
    plt = _pyplot()
    panels = [("loss", "step", "training loss", "step")]
    if any("wall_clock" in c for c in curves.values()):
        panels.append(("loss", "wall_clock", "training loss", "wall-clock (s)"))
    if any("eval_metric" in c for c in curves.values()):
        panels.append(("eval_metric", "eval_step", "validation metric", "step"))
    if any(v is not None for c in curves.values() for v in c.get("clip_rate", ())):
        panels.append(("clip_rate", "step", "clip rate", "step"))
    if any(v is not None for c in curves.values() for v in c.get("clip_fraction", ())):
        panels.append(("clip_fraction", "step", "coordinates clipped (Sophia)", "step"))
    if any(v is not None for c in curves.values() for v in c.get("sigma_median", ())):
        panels.append(("sigma_median", "step", "HiZOO Sigma (min, median, max)", "step"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (ykey, xkey, ylabel, xlabel) in zip(axes[0], panels):
        for label, c in curves.items():
            points = [(x, y) for x, y in zip(c.get(xkey, ()), c.get(ykey, ())) if y is not None]
            if points:
                xs, ys = zip(*points)
                line, = ax.plot(xs, ys, label=label, markersize=3,
                                marker="o" if ykey == "eval_metric" else None)
                if ykey == "sigma_median":
                    _sigma_band(ax, c, line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ykey in ("loss", "sigma_median"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out, title)


def save_figure(fig, out: str, title: str | None = None) -> str:
    """Title, lay out, write (the folder made) and close ``fig``; returns ``out``."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _sigma_band(ax, c: Mapping[str, Sequence], color) -> None:
    """Shade between HiZOO's smallest and largest ``Sigma`` entries."""
    band = [(x, lo, hi) for x, lo, hi in zip(c["step"], c.get("sigma_min", ()),
                                              c.get("sigma_max", ())) if lo is not None]
    if band:
        xs, los, his = zip(*band)
        ax.fill_between(xs, los, his, color=color, alpha=0.2)


def run_curves(run_dir: str) -> dict[str, list]:
    """The curves of one run folder, from its ``metrics.jsonl``."""
    records = read_log(run_dir)
    train = select(records, "train")
    evals = select(records, "eval", "validation")
    return {
        "step": [r["step"] for r in train],
        "loss": [r["loss"] for r in train],
        "wall_clock": [r["wall_clock"] for r in train],
        "clip_rate": [r.get("clip_rate") for r in train],
        "clip_fraction": [r.get("clip_fraction") for r in train],
        **{k: [r.get(k) for r in train] for k in ("sigma_min", "sigma_median", "sigma_max")},
        "eval_step": [r["step"] for r in evals],
        "eval_metric": [r["main"] for r in evals],
    }


def plot_runs(run_dirs: Sequence[str], out: str, *, labels: Sequence[str] | None = None,
              title: str | None = None) -> str:
    """Plot several run folders on shared axes (labels default to the folder names)."""
    labels = list(labels) if labels is not None else [
        os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    curves = {lab: run_curves(d) for lab, d in zip(labels, run_dirs)}
    return plot_curves(curves, out, title=title)
