"""Several arms and seeds of one task, side by side.

:func:`compare` trains every ``(arm, seed)`` into ``<output_dir>/<arm>/seed<k>``
(a run
already finished there with the same configuration is read back instead of
retrained, so an interrupted comparison continues; see :func:`finished`), then
summarises: test metric mean and standard deviation over seeds, final
training loss, the step at which each run first logs a training loss at or
below the reference arm's final loss (mean over the seeds that reach it),
and the wall-clock of training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kfac_jax_peft.finetune.config import ARMS, TrainConfig
from kfac_jax_peft.finetune.logs import read_log
from kfac_jax_peft.finetune.plots import plot_runs
from kfac_jax_peft.finetune.trainer import Data, load_data, steps_to_reach, train


@dataclasses.dataclass
class ArmSummary:
    arm: str
    seeds: list[int]
    test: list[float]
    validation: list[float]
    final_loss: list[float]
    wall_clock: list[float]
    steps_to_reference: list[int | None]

    def row(self) -> dict[str, Any]:
        reached = [s for s in self.steps_to_reference if s is not None]
        return {
            "arm": self.arm,
            "test_mean": float(np.mean(self.test)),
            "test_std": float(np.std(self.test)),
            "validation_mean": float(np.mean(self.validation)),
            "final_loss": float(np.mean(self.final_loss)),
            "steps_to_reference": float(np.mean(reached)) if reached else None,
            "reached": f"{len(reached)}/{len(self.steps_to_reference)}",
            "wall_clock": float(np.mean(self.wall_clock)),
        }


def finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The results of a finished run of ``cfg`` in ``cfg.output_dir``, or None
    if there is none. A finished run of a *different* configuration there is
    an error naming the keys that differ (it is never silently reused)."""
    done = os.path.join(cfg.output_dir, "results.json")
    if not os.path.exists(done):
        return None
    with open(os.path.join(cfg.output_dir, "config.json")) as f:
        stored = json.load(f)
    want = cfg.to_dict()
    # a key missing from the stored config (a field added since) had its default
    defaults = TrainConfig().to_dict()
    stored = {**{k: defaults[k] for k in want if k not in stored}, **stored}
    differ = sorted(k for k in set(stored) | set(want)
                    if k not in ("output_dir", "progress") and stored.get(k) != want.get(k))
    if differ:
        raise ValueError(f"{cfg.output_dir!r} holds a finished run of another configuration "
                         f"(differs in {differ}); remove it or use another output_dir")
    with open(done) as f:
        return json.load(f)


def arm_config(base: TrainConfig, arm: str, overrides: Mapping[str, Mapping] | None = None
               ) -> TrainConfig:
    """``base`` with an arm's settings (:data:`ARMS`) and per-arm overrides
    (e.g. the tuned learning rate of that arm)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {sorted(ARMS)}")
    return base.replace(**ARMS[arm], **dict((overrides or {}).get(arm, {})))


def compare(base: TrainConfig, arms: Sequence[str], seeds: Sequence[int], *,
            overrides: Mapping[str, Mapping] | None = None, reference: str | None = None,
            data: Data | None = None, plot: bool = True,
            name: str = "summary") -> list[dict[str, Any]]:
    """Train and summarise; returns one row per arm (see the module doc) and
    writes ``<name>.json`` and (with ``plot``) ``comparison.png``, or
    ``<name>.png`` for another ``name``, into ``base.output_dir``."""
    reference = reference or arms[0]
    if reference not in arms:
        raise ValueError(f"reference arm {reference!r} is not among the arms {list(arms)}")
    data = data or load_data(base)
    results: dict[str, list[tuple[int, dict, str]]] = {}
    for arm in arms:
        for seed in seeds:
            run_dir = os.path.join(base.output_dir, arm, f"seed{seed}")
            cfg = arm_config(base, arm, overrides).replace(seed=seed, output_dir=run_dir)
            res = finished(cfg)
            if res is None:
                res = train(cfg, data=data).to_dict()
            results.setdefault(arm, []).append((seed, res, run_dir))
    ref_loss = {seed: res["final_loss"] for seed, res, _ in results[reference]}
    rows = []
    for arm in arms:
        s = ArmSummary(arm, [], [], [], [], [], [])
        for seed, res, run_dir in results[arm]:
            s.seeds.append(seed)
            s.test.append(res["test"]["main"])
            s.validation.append(res["validation"]["main"])
            s.final_loss.append(res["final_loss"])
            s.wall_clock.append(res["wall_clock"])
            s.steps_to_reference.append(steps_to_reach(read_log(run_dir), ref_loss[seed]))
        rows.append(s.row())
    with open(os.path.join(base.output_dir, f"{name}.json"), "w") as f:
        json.dump({"task": base.task, "seeds": list(seeds), "reference": reference,
                   "rows": rows}, f, indent=1)
    if plot:
        dirs = [os.path.join(base.output_dir, arm, f"seed{seeds[0]}") for arm in arms]
        png = "comparison.png" if name == "summary" else f"{name}.png"
        plot_runs(dirs, os.path.join(base.output_dir, png), labels=list(arms),
                  title=f"{base.task} (seed {seeds[0]})")
    return rows


def format_rows(rows: Sequence[Mapping[str, Any]], metric: str = "test") -> str:
    """A Markdown table of :func:`compare`'s rows."""
    lines = [f"| arm | {metric} (mean ± std) | validation | final train loss | "
             "steps to reference loss | wall-clock (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        steps = "never" if r["steps_to_reference"] is None else (
            f"{r['steps_to_reference']:.0f} ({r['reached']})")
        lines.append(f"| {r['arm']} | {r['test_mean']:.4f} ± {r['test_std']:.4f} | "
                     f"{r['validation_mean']:.4f} | {r['final_loss']:.4f} | {steps} | "
                     f"{r['wall_clock']:.1f} |")
    return "\n".join(lines)
