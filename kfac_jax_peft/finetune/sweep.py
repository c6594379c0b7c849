"""Hyperparameter grids that compile once.

:func:`sweep` trains every point of a grid over the traced hyperparameters
(:data:`~kfac_jax_peft.finetune.config.TRACED`: ``learning_rate``,
``max_norm``, ``weight_decay``, ``damping``, ``decay``, ``fisher_damping``)
and every seed, into ``<output_dir>/<point>/seed<k>`` (``<point>`` such as
``learning_rate=0.01,damping=0.001``). These values are arrays in the
optimizer state, so all runs share the compiled steps of the first: one
compilation per step kind and padded length for the whole grid.

As with :func:`~kfac_jax_peft.finetune.compare.compare`, whose run
handling it uses, a finished run is read back and an interrupted one
resumed when the sweep is run again. The summary: per point, the mean and
standard deviation over seeds of the validation and test metrics, the
final training loss and the wall-clock; the best point is the one with the
highest mean validation metric (the test metric is reported, never used to
choose). A run whose parameters turn non-finite (a learning rate too
large) stops as it would alone (:func:`~kfac_jax_peft.finetune.train`
raises ``FloatingPointError``); the sweep records it as diverged and goes
on: a point's means are over its seeds that finished (``None`` when none
did) and ``diverged`` counts the others. Written: ``sweep.json`` and
``sweep.png`` (the validation metric against each swept value).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kfac_jax_peft.finetune.compare import _check_same_config, _run, finished
from kfac_jax_peft.finetune.config import TRACED, ConfigError, TrainConfig, check_inputs
from kfac_jax_peft.finetune.trainer import Data, enable_compilation_cache, load_data


def grid_points(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of the grid's values, in the order given (the
    first key varies slowest). Keys must be traced hyperparameters, each
    with at least one value and no repeats."""
    if not grid:
        raise ConfigError("grid", f"must vary at least one of {', '.join(TRACED)}")
    for key, values in grid.items():
        if key not in TRACED:
            raise ConfigError(key, f"cannot be swept: a sweep varies only the traced "
                              f"hyperparameters ({', '.join(TRACED)}), which share one "
                              "compilation; sweep other keys with separate runs")
        if not values:
            raise ConfigError(key, "must list at least one value for the sweep")
        if len(set(values)) < len(values):
            raise ConfigError(key, f"must not repeat a value in the sweep, got {list(values)}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]


def point_name(point: Mapping[str, float]) -> str:
    """The folder name of a grid point: ``key=value`` pairs joined by commas."""
    return ",".join(f"{k}={v:g}" for k, v in point.items())


def sweep(base: TrainConfig, grid: Mapping[str, Sequence[float]], seeds: Sequence[int], *,
          data: Data | None = None, plot: bool = True,
          compilation_cache: str | None = None) -> dict[str, Any]:
    """Train the grid (see the module docstring); returns ``{"rows": [one
    per point], "best": the best row}`` and writes ``sweep.json`` and (with
    ``plot``) ``sweep.png`` into ``base.output_dir``. Every run's config is
    made (and so checked) before anything is trained; ``compilation_cache``
    (a folder for JAX's persistent cache) is enabled after the checks."""
    points = grid_points(grid)
    if not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError("seeds", "must name at least one seed, without repeats")
    configs = {}
    for point in points:
        for seed in seeds:
            out = os.path.join(base.output_dir, point_name(point), f"seed{seed}")
            configs[point_name(point), seed] = base.replace(**point, seed=seed, output_dir=out)
    check_inputs(base, resume=None)
    for cfg in configs.values():  # a run of another configuration there: before training
        _check_same_config(cfg)
        finished(cfg)
    if compilation_cache:
        enable_compilation_cache(compilation_cache)
    data = data or load_data(base)
    results = {key: _run_or_diverged(cfg, data) for key, cfg in configs.items()}
    rows = [_row(point, [results[point_name(point), s] for s in seeds]) for point in points]
    finite = [r for r in rows if r["validation_mean"] is not None]
    best = max(finite, key=lambda r: r["validation_mean"]) if finite else None  # first of equals
    summary = {"task": base.task, "grid": {k: list(v) for k, v in grid.items()},
               "seeds": list(seeds), "rows": rows, "best": best}
    with open(os.path.join(base.output_dir, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if plot:
        plot_sweep(rows, list(grid), os.path.join(base.output_dir, "sweep.png"),
                   title=f"{base.task}: validation metric over {len(seeds)} seed(s)")
    return {"rows": rows, "best": best}


def _run_or_diverged(cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """The run's results, or ``{"diverged": message}`` when it stopped on a
    non-finite state."""
    try:
        return _run(cfg, data)
    except FloatingPointError as e:
        return {"diverged": str(e)}


def _row(point: Mapping[str, float], results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    done = [r for r in results if "diverged" not in r]

    def mean(values):
        return float(np.mean(values)) if done else None

    def std(values):
        return float(np.std(values)) if done else None

    val = [r["validation"]["main"] for r in done]
    test = [r["test"]["main"] for r in done]
    return {"point": point_name(point), **point, "validation_mean": mean(val),
            "validation_std": std(val), "test_mean": mean(test), "test_std": std(test),
            "final_loss": mean([r["final_loss"] for r in done]),
            "wall_clock": mean([r["wall_clock"] for r in done]),
            "diverged": len(results) - len(done)}


def format_sweep(rows: Sequence[Mapping[str, Any]], best: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`sweep`'s rows, the best point marked."""
    lines = ["| point | validation (mean ± std) | test (mean ± std) | final train loss | "
             "wall-clock (s) | diverged |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (best)" if best is not None and r["point"] == best["point"] else ""
        if r["validation_mean"] is None:
            lines.append(f"| {r['point']} | - | - | - | - | {r['diverged']} |")
            continue
        lines.append(f"| {r['point']}{mark} | {r['validation_mean']:.4f} ± "
                     f"{r['validation_std']:.4f} | {r['test_mean']:.4f} ± {r['test_std']:.4f} "
                     f"| {r['final_loss']:.4f} | {r['wall_clock']:.1f} | {r['diverged']} |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], out: str, *,
               title: str | None = None) -> str:
    """One panel per swept key: the mean validation metric of every grid
    point against that key's value (log axis when all values are
    positive), the best point starred. Returns ``out``."""
    from kfac_jax_peft.finetune.plots import _pyplot

    plt = _pyplot()
    rows = [r for r in rows if r["validation_mean"] is not None]
    best = max(rows, key=lambda r: r["validation_mean"]) if rows else None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r[key] for r in rows]
        ax.errorbar(xs, [r["validation_mean"] for r in rows],
                    yerr=[r["validation_std"] for r in rows], fmt="o", markersize=4, alpha=0.8)
        if best is not None:
            ax.plot([best[key]], [best["validation_mean"]], "*", markersize=14, label="best")
        if all(x > 0 and math.isfinite(x) for x in xs):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("validation metric")
        ax.grid(alpha=0.3)
    if best is not None:
        axes[0][0].legend(fontsize=8)
    from kfac_jax_peft.finetune.plots import save_figure

    return save_figure(fig, out, title)
