"""The fine-tuning loop: data, model, optimizer, evaluation, checkpoints, logs.

One step (see ``DESIGN.md``): the host picks the step kind, K-FAC's
*statistics step* (statistics captured in the backward pass and folded into
the factors; the transformation re-inverts when ``invert_every`` calls have
passed) every ``stats_interval`` steps, the *plain step* otherwise (the
stored inverse only). Both are compiled once. With ``devices > 1`` the steps
are ``pmap``-ped over local devices: each device takes ``batch_size /
devices`` examples, gradients are averaged (``pmean``) and K-FAC's raw
statistics summed (``psum``) over the axis, so the update equals the
one-device update on the global batch.

Determinism: the batch of step ``s`` depends only on ``(seed, s)``, the
dropout key is ``fold_in(PRNGKey(seed), s)``, and a checkpoint holds the
trainable parameters, the optimizer state and the best-so-far record, so a
run resumed from its checkpoint ends with the same parameters as an
uninterrupted one.

Run folder::

    config.json        the TrainConfig
    metrics.jsonl      the log (:mod:`kfac_jax_peft.finetune.logs`)
    checkpoints/       orbax checkpoints (written atomically; latest kept)
    best.safetensors   the trainable weights of the best validation step
    results.json       the summary (also the last log record)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from kfac_jax_peft import data as D
from kfac_jax_peft import metrics as M
from kfac_jax_peft.capture import kfac_value_and_grad
from kfac_jax_peft.clipping import clip_stats
from kfac_jax_peft.finetune.config import PER_SAMPLE, TrainConfig
from kfac_jax_peft.finetune.logs import MetricsLog
from kfac_jax_peft.finetune.model import TaskModel, build_task_model
from kfac_jax_peft.finetune.optim import build_optimizer, learning_rate_schedule
from kfac_jax_peft.models.loading import load_tokenizer
from kfac_jax_peft.peft import count_trainable, merge_trainable, save_peft, split_trainable

AXIS = "devices"


@dataclasses.dataclass
class Data:
    """Encoded splits of a task: ``train``, ``validation``, ``test``."""

    spec: D.TaskSpec
    train: D.Encoded
    validation: D.Encoded
    test: D.Encoded


def load_data(cfg: TrainConfig, tokenizer=None) -> Data:
    """The task's data in the paper's split protocol (split seed 0, so every
    training seed sees the same validation and test sets), tokenized with
    the model's tokenizer."""
    spec = D.get_task(cfg.task)
    splits = D.paper_splits(D.load_raw(spec, cfg.data_dir), seed=0)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    enc = {k: D.encode(v, tokenizer, spec, max_length=cfg.max_length) for k, v in splits.items()}
    return Data(spec, enc["train"], enc["validation"], enc["test"])


# --------------------------------------------------------------------------- steps


class Steps(NamedTuple):
    """The un-jitted step functions of a run (see :func:`make_steps`)."""

    stats: Callable
    plain: Callable
    predict: Callable
    sample: Callable | None
    diagnose: Callable


def make_steps(model: TaskModel, tx: optax.GradientTransformation, *,
               axis_name: str | None = None, per_sample: str | None = None,
               num_samples: int = 1) -> Steps:
    """The step functions of a run, un-jitted.

    * ``stats(trainable, opt_state, frozen, probes, batch, rng)`` and
      ``plain(trainable, opt_state, frozen, batch, rng)`` return
      ``(trainable, opt_state, loss)``: K-FAC's statistics step and the
      plain step (any optax chain). With ``axis_name`` they average the loss
      and gradients over that axis, and the K-FAC transformation sums its
      statistics over it.
    * ``predict(trainable, frozen, batch)``: predictions.
    * ``sample(trainable, opt_state, frozen, batch, rng)`` (with
      ``per_sample`` = ``"ef" | "ief" | "sf"``): the step of the exact
      Fisher-family updates, fed with per-sample gradients; deterministic.
    * ``diagnose(trainable, opt_state, frozen, batch, rng) -> (gamma, imbalance)``:
      the gamma indicator of the direction the chain would take on
      ``batch``, relative to SGD's (``kfac_jax_peft.fisher``; the curvature
      is the Gauss-Newton matrix of the training loss, i.e. the Fisher for
      cross-entropy), and the ratio of the largest to the smallest per-sample
      gradient norm. Nothing is updated.
    """
    from kfac_jax_peft import fisher

    def loss_fn(trainable, frozen, probes, batch, rng):
        logits = model.logits(merge_trainable(trainable, frozen), probes, batch, rng)
        return model.loss(logits, batch)

    def reduce(loss, grads):
        if axis_name is None:
            return loss, grads
        return jax.lax.pmean(loss, axis_name), jax.lax.pmean(grads, axis_name)

    def device_rng(rng):
        # different dropout masks on different devices
        return rng if axis_name is None else jax.random.fold_in(
            rng, jax.lax.axis_index(axis_name))

    grad_stats = kfac_value_and_grad(
        lambda tr, probes, frozen, batch, rng: loss_fn(tr, frozen, probes, batch, rng))

    def stats_step(trainable, opt_state, frozen, probes, batch, rng):
        rng = device_rng(rng)
        loss, grads, stats = grad_stats(trainable, probes, frozen, batch, rng)
        loss, grads = reduce(loss, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable, kfac_stats=stats)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def plain_step(trainable, opt_state, frozen, batch, rng):
        rng = device_rng(rng)
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, None, batch, rng)
        loss, grads = reduce(loss, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def predict(trainable, frozen, batch):
        logits = model.logits(merge_trainable(trainable, frozen), None, batch, None)
        return model.predictions(logits)

    # per-example forms for kfac_jax_peft.fisher (frozen weights broadcast)
    def model_fn(trainable, frozen, batch):
        return model.logits(merge_trainable(trainable, frozen), None, batch, None)

    def example_loss(outputs, frozen, batch):
        del frozen
        return model.per_example_loss(outputs, batch["labels"]) * batch["valid"]

    likelihood = "gaussian" if model.spec.kind == "regression" else "categorical"

    def per_sample_fn(kind):
        return fisher.per_sample_value_and_grad(model_fn, example_loss, kind=kind,
                                                num_samples=num_samples,
                                                likelihood=likelihood, in_axes=(None, 0))

    def sample_step(trainable, opt_state, frozen, batch, rng):
        loss, grads, extras = per_sample_fn(per_sample)(trainable, frozen, batch, rng=rng)
        updates, opt_state = tx.update(grads, opt_state, trainable, **extras)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def diagnose(trainable, opt_state, frozen, batch, rng):
        _, grads, extras = per_sample_fn("ief" if per_sample == "ief" else "ef")(
            trainable, frozen, batch)
        if per_sample == "sf":
            step_extras = per_sample_fn("sf")(trainable, frozen, batch, rng=rng)[2]
        else:
            step_extras = extras if per_sample else {}
        direction, _ = tx.update(grads, opt_state, trainable, **step_extras)
        fvp = fisher.fisher_vector_product(model_fn, trainable, frozen, batch,
                                           loss_fn=example_loss)
        return (fisher.gamma_relative_to_sgd(direction, grads, fvp),
                fisher.gradient_norm_imbalance(extras["per_sample_grads"]))

    return Steps(stats_step, plain_step, predict, sample_step if per_sample else None,
                 diagnose)


class _Executor:
    """Runs the steps with ``jit`` on one device or ``pmap`` over several;
    converts between host trees and (replicated) device trees."""

    def __init__(self, model, tx, num_devices: int, per_sample: str | None = None,
                 num_samples: int = 1):
        self.n = num_devices
        axis = AXIS if num_devices > 1 else None
        steps = make_steps(model, tx, axis_name=axis, per_sample=per_sample,
                           num_samples=num_samples)
        stats_step, plain_step, predict = steps.stats, steps.plain, steps.predict
        if num_devices == 1:
            self.stats_step = jax.jit(stats_step, donate_argnums=(0, 1))
            self.plain_step = jax.jit(plain_step, donate_argnums=(0, 1))
            self.predict = jax.jit(predict)
            self.diagnose = jax.jit(steps.diagnose)
            if steps.sample is not None:
                self.sample_step = jax.jit(steps.sample, donate_argnums=(0, 1))
        else:
            devices = jax.local_devices()[:num_devices]
            self.devices = devices
            self.stats_step = jax.pmap(stats_step, AXIS, devices=devices,
                                       in_axes=(0, 0, 0, 0, 0, None), donate_argnums=(0, 1))
            self.plain_step = jax.pmap(plain_step, AXIS, devices=devices,
                                       in_axes=(0, 0, 0, 0, None), donate_argnums=(0, 1))
            self.predict = jax.pmap(predict, AXIS, devices=devices)
            self._replicate = jax.pmap(lambda x: x, devices=devices)

    def put(self, tree):
        if self.n == 1:
            return jax.device_put(tree)
        stacked = jax.tree_util.tree_map(
            lambda x: np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)), tree)
        return self._replicate(stacked)

    def get(self, tree):
        if self.n == 1:
            return jax.device_get(tree)
        return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))

    def shard(self, batch: dict) -> dict:
        if self.n == 1:
            return batch
        return {k: v.reshape((self.n, v.shape[0] // self.n) + v.shape[1:])
                for k, v in batch.items()}

    def unshard(self, x) -> np.ndarray:
        x = np.asarray(x)
        return x if self.n == 1 else x.reshape((-1,) + x.shape[2:])

    def scalar(self, x) -> float:
        x = np.asarray(x)
        return float(x if self.n == 1 else x[0])


def evaluate(ex: _Executor, trainable, frozen, encoded: D.Encoded, spec: D.TaskSpec,
             batch_size: int, pad_to_multiple_of: int = 16) -> dict[str, float]:
    """The task's metrics on one split (all examples, in order)."""
    preds, labels = [], []
    for batch in D.eval_batches(encoded, batch_size, pad_to_multiple_of=pad_to_multiple_of):
        p = ex.unshard(ex.predict(trainable, frozen, ex.shard(batch)))
        keep = batch["valid"] > 0
        preds.append(p[keep])
        labels.append(batch["labels"][keep])
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    out = M.compute_metrics(spec, preds, labels)
    out["main"] = M.main_metric(spec, out)
    return out


# --------------------------------------------------------------------------- checkpoints


def _manager(run_dir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_names=("state", "meta"))


def _save(manager, step: int, state: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def _restore(manager, template: dict) -> tuple[int, dict, dict] | None:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return step, out["state"], out["meta"]


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunResult:
    """What :func:`train` returns (and writes to ``results.json``)."""

    output_dir: str
    steps: int
    final_loss: float
    best_step: int
    validation: dict[str, float]
    test: dict[str, float]
    wall_clock: float
    trainable_params: str
    trainable: Any = dataclasses.field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("trainable")
        return d


def enable_compilation_cache(path: str) -> None:
    """Keep compiled steps in ``path`` (JAX's persistent compilation cache),
    so that runs differing only in seed, data or run folder skip XLA
    compilation. A process-wide JAX setting."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _num_devices(cfg: TrainConfig) -> int:
    available = jax.local_device_count()
    n = available if cfg.devices == 0 else cfg.devices
    if n > 1 and (cfg.optimizer in PER_SAMPLE or cfg.log_gamma):
        raise ValueError(f"optimizer={cfg.optimizer!r}, log_gamma={cfg.log_gamma}: the "
                         "per-sample-gradient steps and diagnostics run on one device "
                         "(devices=1)")
    if n > available:
        raise ValueError(f"devices={n} but only {available} local devices are available")
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(cfg, name) or cfg.batch_size
        if value % n:
            raise ValueError(f"{name}={value} is not divisible by the {n} devices")
    return n


def train(cfg: TrainConfig, *, resume: bool = False, data: Data | None = None,
          stop_after: int | None = None) -> RunResult:
    """Fine-tune ``cfg.model`` on ``cfg.task``; see the module docstring.

    ``resume``: continue from the latest checkpoint in ``cfg.output_dir``
    (an error if there is none). ``data``: pre-loaded data (otherwise
    loaded from ``cfg``). ``stop_after``: stop (after checkpointing) once
    this step is reached, without the final test evaluation; used to test
    resumption.
    """
    n = _num_devices(cfg)
    data = data or load_data(cfg)
    spec = data.spec
    model, variables = build_task_model(cfg, spec)
    trainable, frozen = split_trainable(variables["params"])
    probes = variables.get("kfac")
    tx = build_optimizer(cfg, axis_name=AXIS if n > 1 else None,
                         input_groups=model.input_groups)
    opt_state = tx.init(trainable)
    per_sample = cfg.optimizer if cfg.optimizer in PER_SAMPLE else None
    ex = _Executor(model, tx, n, per_sample, cfg.num_samples)
    uses_stats = cfg.optimizer == "kfac" and probes is not None
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    schedule = learning_rate_schedule(cfg)

    os.makedirs(cfg.output_dir, exist_ok=True)
    manager = _manager(cfg.output_dir)
    if not resume and manager.latest_step() is not None:
        raise FileExistsError(
            f"{cfg.output_dir!r} already holds checkpoints (latest step "
            f"{manager.latest_step()}): pass resume=True (--resume) to continue that run, "
            "or choose another output_dir")
    meta = {"step": 0, "best_step": -1, "best_metric": None, "wall_clock": 0.0,
            "last_loss": math.nan}
    best_trainable = jax.tree_util.tree_map(np.asarray, trainable)
    if resume:
        restored = _restore(manager, {"trainable": trainable, "opt_state": opt_state,
                                      "best": best_trainable})
        if restored is None:
            raise FileNotFoundError(f"resume: no checkpoint in {cfg.output_dir!r}")
        _, state, meta = restored
        trainable, opt_state = state["trainable"], state["opt_state"]
        best_trainable = jax.tree_util.tree_map(np.asarray, state["best"])
    else:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    start = int(meta["step"])
    log = MetricsLog(cfg.output_dir, resume_step=start if resume else None)
    if not resume:
        log.write("start", step=0, task=spec.name, trainable_params=count_trainable(
            variables["params"]), num_train=len(data.train.labels),
            num_validation=len(data.validation.labels), num_test=len(data.test.labels),
            devices=n)

    trainable, opt_state = ex.put(trainable), ex.put(opt_state)
    frozen_d = ex.put(frozen)
    probes_d = ex.put(probes) if uses_stats else None
    key = jax.random.PRNGKey(cfg.seed)
    stream = D.train_batches(data.train, cfg.batch_size, seed=cfg.seed, start_step=start,
                             pad_to_multiple_of=cfg.pad_to_multiple_of)
    if cfg.precompile:
        seconds = _precompile(ex, cfg, data, trainable, opt_state, frozen_d, probes_d,
                              uses_stats)
        log.write("compile", step=start, seconds=seconds)

    wall = float(meta["wall_clock"])
    window: list[jax.Array] = []
    last_clip = _clip_counts(ex, opt_state)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = _progress(cfg, start, end)
    t0 = time.perf_counter()
    for step in range(start, end):
        batch = ex.shard(next(stream))
        rng = jax.random.fold_in(key, step)
        diag = {}
        if cfg.log_gamma and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
            # the direction this step is about to take; kept outside the clock
            td = time.perf_counter()
            gamma, imbalance = jax.device_get(ex.diagnose(trainable, opt_state, frozen_d,
                                                          batch, rng))
            diag = {"gamma": float(gamma), "imbalance": float(imbalance)}
            t0 += time.perf_counter() - td
        if per_sample:
            trainable, opt_state, loss = ex.sample_step(trainable, opt_state, frozen_d,
                                                        batch, rng)
        elif uses_stats and step % cfg.stats_interval == 0:
            trainable, opt_state, loss = ex.stats_step(trainable, opt_state, frozen_d,
                                                       probes_d, batch, rng)
        else:
            trainable, opt_state, loss = ex.plain_step(trainable, opt_state, frozen_d,
                                                       batch, rng)
        window.append(loss)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            losses = [ex.scalar(x) for x in window]  # blocks: the wall clock is honest
            wall += time.perf_counter() - t0
            window = []
            mean_loss = float(np.mean(losses))
            if not math.isfinite(mean_loss):
                log.write("error", step=done, message="non-finite training loss")
                log.close()
                raise FloatingPointError(
                    f"training loss became {mean_loss} at step {done}; lower the learning "
                    "rate or raise the damping (the last checkpoint is intact)")
            clip = _clip_counts(ex, opt_state)
            rate = _rate(clip, last_clip)
            last_clip = clip
            lr = float(schedule(step))
            meta["last_loss"] = mean_loss
            log.write("train", step=done, loss=mean_loss, lr=lr, clip_rate=rate,
                      update_norm=clip[2], wall_clock=wall, **diag)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                                clip="-" if rate is None else f"{rate:.2f}")
            t0 = time.perf_counter()
        if done % cfg.eval_every == 0 or done == cfg.steps:
            host_tr = ex.get(trainable)
            val = evaluate(ex, trainable, frozen_d, data.validation, spec, eval_bs,
                           cfg.pad_to_multiple_of)
            log.write("eval", step=done, split="validation", wall_clock=wall, **val)
            if meta["best_metric"] is None or val["main"] > meta["best_metric"]:
                meta.update(best_metric=val["main"], best_step=done)
                best_trainable = jax.tree_util.tree_map(np.asarray, host_tr)
                save_peft(os.path.join(cfg.output_dir, "best.safetensors"), best_trainable,
                          {"step": done, "task": spec.name, **cfg.to_dict()})
            t0 = time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == end:
            meta.update(step=done, wall_clock=wall)
            _save(manager, done, {"trainable": ex.get(trainable),
                                  "opt_state": ex.get(opt_state), "best": best_trainable},
                  meta)
            t0 = time.perf_counter()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    final = ex.get(trainable)
    if end < cfg.steps:
        log.close()
        return RunResult(cfg.output_dir, end, float(meta["last_loss"]),
                         int(meta["best_step"]), {}, {}, wall, count_trainable(
                             variables["params"]), final)
    best_d = ex.put(best_trainable)
    val = evaluate(ex, best_d, frozen_d, data.validation, spec, eval_bs, cfg.pad_to_multiple_of)
    test = evaluate(ex, best_d, frozen_d, data.test, spec, eval_bs, cfg.pad_to_multiple_of)
    log.write("eval", step=cfg.steps, split="test", wall_clock=wall, best_step=meta[
        "best_step"], **test)
    result = RunResult(cfg.output_dir, cfg.steps, float(meta["last_loss"]),
                       int(meta["best_step"]), val, test, wall,
                       count_trainable(variables["params"]), final)
    log.write("summary", step=cfg.steps, **result.to_dict())
    log.close()
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=1)
    return result


def _padded_lengths(cfg: TrainConfig, data: Data) -> list[int]:
    """Every length a training batch can be padded to."""
    m = cfg.pad_to_multiple_of
    longest = max(int(np.max(data.train.lengths)), 1)
    top = -(-longest // m) * m
    return list(range(m, top + 1, m))


def _resize(batch: dict, length: int, pad_id: int) -> dict:
    """A batch cut or padded (with padding tokens) to ``length`` tokens."""
    out = {}
    for k, v in batch.items():
        if k in ("input_ids", "attention_mask", "token_type_ids"):
            cur = v.shape[-1]
            if cur >= length:
                v = v[..., :length]
            else:
                fill = pad_id if k == "input_ids" else 0
                pad = np.full(v.shape[:-1] + (length - cur,), fill, v.dtype)
                v = np.concatenate([v, pad], axis=-1)
        out[k] = v
    return out


def _precompile(ex: _Executor, cfg: TrainConfig, data: Data, trainable, opt_state, frozen,
                probes, uses_stats: bool) -> float:
    """Run every step kind once on every padded length, on copies of the
    state (the steps donate their inputs); returns the seconds spent."""
    t0 = time.perf_counter()
    first = next(D.train_batches(data.train, cfg.batch_size, seed=cfg.seed,
                                 pad_to_multiple_of=cfg.pad_to_multiple_of))
    rng = jax.random.PRNGKey(0)
    copy = lambda tree: jax.tree_util.tree_map(lambda x: x.copy(), tree)
    for length in _padded_lengths(cfg, data):
        batch = ex.shard(_resize(first, length, data.train.pad_id))
        if cfg.optimizer in PER_SAMPLE:
            outs = [ex.sample_step(copy(trainable), copy(opt_state), frozen, batch, rng)]
        else:
            outs = [ex.plain_step(copy(trainable), copy(opt_state), frozen, batch, rng)]
        if uses_stats:
            outs.append(ex.stats_step(copy(trainable), copy(opt_state), frozen, probes,
                                      batch, rng))
        jax.block_until_ready(outs)
    return time.perf_counter() - t0


def _clip_counts(ex: _Executor, opt_state) -> tuple[int, int, float | None]:
    """``(calls, clipped calls, last norm)`` of the chain's first clip."""
    s = clip_stats(opt_state)
    if s is None:
        return (0, 0, None)
    count, num_clipped, norm = (ex.scalar(x) for x in jax.device_get(
        (s.count, s.num_clipped, s.norm)))  # one transfer
    return (int(count), int(num_clipped), norm)


def _rate(now, before) -> float | None:
    calls = now[0] - before[0]
    return None if calls <= 0 else (now[1] - before[1]) / calls


def _progress(cfg: TrainConfig, start: int, end: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc=f"{cfg.task} {cfg.optimizer}/{cfg.clip}",
                unit="step", dynamic_ncols=True)


def steps_to_reach(records: list[dict], target: float) -> int | None:
    """The first logged step whose training loss is at most ``target``."""
    for r in records:
        if r.get("kind") == "train" and r["loss"] <= target:
            return int(r["step"])
    return None


__all__ = ["Data", "RunResult", "enable_compilation_cache", "evaluate", "load_data",
           "make_steps", "steps_to_reach", "train"]
