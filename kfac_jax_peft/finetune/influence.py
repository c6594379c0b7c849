"""``kfac-peft influence``: which training examples of a finished run moved
its predictions on held-out examples.

For a run folder (``config.json``, ``best.safetensors``, ``checkpoints/``)
the model is rebuilt as trained, with the best validation weights, and
every training example is scored against the first ``num_test`` examples
of a held-out split by :func:`kfac_jax_peft.fisher.influence` (dropout off;
the loss of one example is the training loss's per-example term). ``kfac``
and ``ekfac`` take their Kronecker factors from the optimizer state of the
run's latest checkpoint (a K-FAC run: ``optimizer`` ``kfac``); ``datainf``
needs no optimizer state and works on any run.

The result is a tab-separated table, one row per (test example, helpful or
harmful, rank): the test sentence and label, then the training sentence,
its label and its score (positive: helpful, up-weighting it lowers the test
loss; negative: harmful).
"""

from __future__ import annotations

import csv
import math
import os

import jax
import numpy as np

from kfac_jax_peft import data as D
from kfac_jax_peft.finetune import checkpoint as C
from kfac_jax_peft.finetune.config import ConfigError, from_mapping
from kfac_jax_peft.finetune.model import build_task_model
from kfac_jax_peft.finetune.optim import build_optimizer
from kfac_jax_peft.finetune.steps import init_state
from kfac_jax_peft.finetune.tasks import load_data
from kfac_jax_peft.fisher.influence import METHODS, influence, top_k
from kfac_jax_peft.kfac.layers import path_str
from kfac_jax_peft.peft import load_peft, merge_trainable, split_trainable

SPLITS = ("validation", "test")


def _text(ex: D.Example) -> str:
    parts = [ex.text_a] + ([ex.text_b] if ex.text_b is not None else [])
    if ex.choices:
        parts += [" | ".join(ex.choices)]
    return " || ".join(" ".join(p.split()) for p in parts)


def _label(spec: D.TaskSpec, label) -> str:
    if spec.label_names and isinstance(label, int | np.integer):
        return spec.label_names[int(label)]
    return f"{float(label):g}"


def _check(run_dir: str, task: str | None, cfg_task: str, method: str, optimizer: str,
           split: str, top: int, num_test: int, damping: float, batch_size: int | None
           ) -> None:
    if task is not None and D.get_task(task).name != cfg_task:
        raise ConfigError("task", f"must be the run's task {cfg_task!r} (its head was trained "
                          f"on it), got {task!r}")
    if method not in METHODS:
        raise ConfigError("--method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if method in ("kfac", "ekfac") and optimizer != "kfac":
        raise ConfigError("--method", f"{method!r} needs the K-FAC factors of a run trained with "
                          f"optimizer 'kfac'; {run_dir!r} used {optimizer!r} (use datainf)")
    if split not in SPLITS:
        raise ConfigError("--split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    for key, value in (("--top-k", top), ("--num-test", num_test)):
        if value < 1:
            raise ConfigError(key, f"must be an integer >= 1, got {value}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError("batch_size", f"must be an integer >= 1, got {batch_size}")
    if not (math.isfinite(damping) and damping > 0):
        raise ConfigError("damping", f"must be a finite number > 0, got {damping}")


def run_influence(run_dir: str, *, task: str | None = None, method: str = "ekfac",
                  damping: float = 1e-3, top: int = 10, split: str = "validation",
                  num_test: int = 16, batch_size: int | None = None,
                  out: str | None = None) -> str:
    """Score the run's training examples against the first ``num_test``
    examples of ``split``; write the table (default
    ``<run_dir>/influence_<method>.tsv``) and return its path."""
    stored = C.stored_config(run_dir)
    if stored is None or not os.path.isfile(os.path.join(run_dir, "best.safetensors")):
        raise FileNotFoundError(f"{run_dir!r} is not a finished run folder (config.json and "
                                "best.safetensors)")
    cfg = from_mapping({**stored, "output_dir": run_dir, "progress": False})
    _check(run_dir, task, cfg.task, method, cfg.optimizer, split, top, num_test, damping,
           batch_size)
    spec = D.get_task(cfg.task)
    model, variables = build_task_model(cfg, spec)
    trainable, frozen = split_trainable(variables["params"])
    best, _ = load_peft(os.path.join(run_dir, "best.safetensors"))
    best = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(best)[0]}

    def weight(p, t):
        if path_str(p) not in best:
            raise FileNotFoundError(f"best.safetensors of {run_dir!r} lacks {path_str(p)!r}")
        return np.asarray(best[path_str(p)], t.dtype)

    trainable = jax.tree_util.tree_map_with_path(weight, trainable)
    groups = model.input_groups if cfg.share_input_factors else None
    opt_state = None
    if method in ("kfac", "ekfac"):
        tx = build_optimizer(cfg, input_groups=model.input_groups)
        template = init_state(trainable, tx, cfg.seed)
        checkpoints = C.Checkpoints(run_dir)
        restored = checkpoints.restore({"trainable": template.trainable,
                                        "opt_state": template.opt_state,
                                        "best": template.trainable})
        checkpoints.close()
        if restored is None:
            raise FileNotFoundError(f"{run_dir!r} has no checkpoint with the K-FAC factors")
        opt_state = restored[1]["opt_state"]

    data = load_data(cfg)
    raw = D.paper_splits(D.load_raw(spec, cfg.data_dir), seed=0)
    held = getattr(data, split)
    n_test = min(num_test, len(held))
    bs = batch_size or cfg.eval_batch_size or cfg.batch_size
    test_batch = D.collate(held, range(n_test), pad_to_multiple_of=cfg.pad_to_multiple_of)
    train_batches = list(D.eval_batches(data.train, bs,
                                        pad_to_multiple_of=cfg.pad_to_multiple_of))

    def example_loss(tr, example, frozen):
        batch = jax.tree_util.tree_map(lambda x: x[None], example)
        logits = model.logits(merge_trainable(tr, frozen), None, batch, None)
        return model.per_example_loss(logits, batch["labels"])[0]

    inf = influence(example_loss, trainable, train_batches, test_batch, method=method,
                    damping=damping, opt_state=opt_state, input_groups=groups,
                    valid=lambda b: b["valid"], loss_args=(frozen,))
    keep = np.concatenate([b["valid"] > 0 for b in train_batches])
    scores = inf.scores[:, keep]
    helpful, harmful = top_k(scores, top)
    path = out or os.path.join(run_dir, f"influence_{method}.tsv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["test_index", "test_label", "test_text", "kind", "rank", "score",
                    "train_index", "train_label", "train_text"])
        for t in range(n_test):
            ex = raw[split][t]
            for kind, idx in (("helpful", helpful[t]), ("harmful", harmful[t])):
                for rank, i in enumerate(idx, 1):
                    tr_ex = raw["train"][int(i)]
                    w.writerow([t, _label(spec, ex.label), _text(ex), kind, rank,
                                f"{scores[t, i]:.6g}", int(i), _label(spec, tr_ex.label),
                                _text(tr_ex)])
    if inf.left_out:
        print(f"not scored (outside the K-FAC layers): {', '.join(inf.left_out)}")
    return path
