"""Several arms and seeds of one task, side by side.

:func:`compare` trains every ``(arm, seed)`` into ``<output_dir>/<arm>/seed<k>``,
then summarises. Run again with the same configuration, it continues: a run
finished there is read back instead of retrained (:func:`finished`), and a
run interrupted after a checkpoint resumes from it (``train(cfg,
resume=True)``, which ends with the same parameters as an uninterrupted
run). A folder holding a run of another configuration is an error naming
the keys that differ. The summary: test metric mean and standard deviation over seeds, final
training loss, the step at which each run first logs a training loss at or
below the reference arm's final loss (mean over the seeds that reach it),
and the wall-clock of training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kfac_jax_peft.finetune.config import (
    ARMS,
    FIELDS,
    ConfigError,
    TrainConfig,
    check_inputs,
    from_mapping,
    has_checkpoint,
    rename_deprecated,
)
from kfac_jax_peft.finetune.logs import read_log
from kfac_jax_peft.finetune.plots import plot_runs
from kfac_jax_peft.finetune.trainer import (
    Data,
    enable_compilation_cache,
    load_data,
    steps_to_reach,
    train,
)


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


def _check_same_config(cfg: TrainConfig) -> None:
    """A :class:`ConfigError` if ``cfg.output_dir`` holds a run (its
    ``config.json``) of another configuration, naming the keys that differ."""
    path = os.path.join(cfg.output_dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            stored = json.load(f)
        with warnings.catch_warnings():  # a run stored before a key was renamed
            warnings.simplefilter("ignore", DeprecationWarning)
            stored = rename_deprecated(stored)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError("output_dir", f"{cfg.output_dir!r} holds an unreadable config.json "
                          f"({e}); remove the folder or use another output_dir") from None
    # read back as a config: a key missing (a field added since) has its default,
    # names are normalised; a key since removed is kept, and differs
    known = {k: v for k, v in stored.items() if k in FIELDS}
    try:
        stored = {**stored, **from_mapping(known).to_dict()}
    except ConfigError:
        stored = {**TrainConfig().to_dict(), **stored}
    want = cfg.to_dict()
    differ = sorted(k for k in set(stored) | set(want)
                    if k not in ("output_dir", "progress") and stored.get(k) != want.get(k))
    if differ:
        raise ConfigError("output_dir", f"{cfg.output_dir!r} holds a run of another "
                          f"configuration (differs in {differ}); remove it or use another "
                          "output_dir")


def finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The results of a finished run of ``cfg`` in ``cfg.output_dir``, or None
    if there is none. A finished run of a *different* configuration there is
    an error naming the keys that differ (it is never silently reused)."""
    done = os.path.join(cfg.output_dir, "results.json")
    if not os.path.exists(done):
        return None
    _check_same_config(cfg)
    with open(done) as f:
        return json.load(f)


def arm_config(base: TrainConfig, arm: str, overrides: Mapping[str, Mapping] | None = None
               ) -> TrainConfig:
    """``base`` with an arm's settings (:data:`ARMS`) and per-arm overrides
    (e.g. the tuned learning rate of that arm); a bad override is a
    :class:`ConfigError` naming the key and the arm."""
    if arm not in ARMS:
        raise ConfigError("arms", f"must be among {', '.join(ARMS)}, got {arm!r}")
    changes = dict((overrides or {}).get(arm, {}))
    try:
        return base.replace(**{**ARMS[arm], **changes})
    except ConfigError as e:
        if e.key not in changes:
            raise
        raise type(e)("arm_overrides", f"of arm {arm!r}: {e}") from None


def _run_configs(base: TrainConfig, arms: Sequence[str], seeds: Sequence[int],
                 overrides: Mapping[str, Mapping] | None) -> dict[tuple[str, int], TrainConfig]:
    """Every run's config, made (and so checked) before anything is trained."""
    if not arms or not seeds:
        raise ConfigError("arms" if not arms else "seeds", "must name at least one")
    unknown = sorted(set(overrides or {}) - set(ARMS))
    if unknown:  # a misspelt arm would silently lose its tuned settings
        raise ConfigError("arm_overrides", f"must name known arms ({', '.join(ARMS)}), got "
                          f"{unknown}")
    if len(set(arms)) < len(arms) or len(set(seeds)) < len(seeds):
        raise ConfigError("arms" if len(set(arms)) < len(arms) else "seeds",
                          "must not repeat (each run has its own folder)")
    return {(arm, seed): arm_config(base, arm, overrides).replace(
                seed=seed, output_dir=os.path.join(base.output_dir, arm, f"seed{seed}"))
            for arm in arms for seed in seeds}


def _run(cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """The results of one run: read back if finished, resumed if interrupted
    after a checkpoint, trained otherwise."""
    res = finished(cfg)
    if res is None:
        res = train(cfg, data=data, resume=has_checkpoint(cfg.output_dir)).to_dict()
    return res


def compare(base: TrainConfig, arms: Sequence[str], seeds: Sequence[int], *,
            overrides: Mapping[str, Mapping] | None = None, reference: str | None = None,
            data: Data | None = None, plot: bool = True,
            name: str = "summary", compilation_cache: str | None = None
            ) -> list[dict[str, Any]]:
    """Train and summarise; returns one row per arm (see the module doc) and
    writes ``<name>.json`` and (with ``plot``) ``comparison.png``, or
    ``<name>.png`` for another ``name``, into ``base.output_dir``.
    ``compilation_cache``: a folder for JAX's persistent compilation cache,
    enabled once the configurations and files are checked."""
    configs = _run_configs(base, arms, seeds, overrides)
    reference = reference or arms[0]
    if reference not in arms:
        raise ConfigError("reference", f"must be one of the arms {list(arms)}, got "
                          f"{reference!r}")
    check_inputs(base, resume=None)
    for cfg in configs.values():  # a run to reuse, of another configuration: before training
        if has_checkpoint(cfg.output_dir):
            _check_same_config(cfg)
        finished(cfg)
    if compilation_cache:
        enable_compilation_cache(compilation_cache)
    data = data or load_data(base)
    results: dict[str, list[tuple[int, dict, str]]] = {}
    for (arm, seed), cfg in configs.items():
        results.setdefault(arm, []).append((seed, _run(cfg, data), cfg.output_dir))
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
