"""The fine-tuning loop: restore or initialise, train, evaluate, checkpoint, log.

:func:`train` is a loop over the pure steps of
:mod:`kfac_jax_peft.finetune.steps` (``train_step(state, fixed, batch)``,
one compiled trace per step kind, the kind chosen on the host), compiled by
``jax.jit`` over a device mesh of one or more devices, data-parallel, by
:mod:`kfac_jax_peft.finetune.devices`; in a multi-process job
(:func:`~kfac_jax_peft.finetune.devices.initialize_distributed`) every
process runs this same loop. Around the steps, small helpers:
:func:`_restore_or_init`, :func:`_log_train`,
:func:`_evaluate_and_keep_best`, :func:`_checkpoint`, :func:`_finish`,
timed by one :class:`~kfac_jax_peft.finetune.logs.Stopwatch`.

What a run guarantees:

* **Determinism.** The batch of step ``s`` depends only on ``(seed, s)``
  and its dropout key only on the seed and ``s``; a checkpoint holds the
  trainable parameters, the optimizer state and the best-so-far record, so
  a run resumed from its checkpoint ends bit for bit with the parameters
  and optimizer state of an uninterrupted run, whenever it was killed.
* **Only finite states are kept.** Before every checkpoint and every
  evaluation the trainable parameters are checked on the device (one
  boolean comes back), and the training loss at every log step. A
  non-finite state stops the run (``FloatingPointError``, and an
  ``"error"`` record) before anything of it is saved, evaluated or
  logged; the message names the last checkpoint, which is intact.
* **A resumed run is the same run** (:func:`check_resume`): another
  configuration is refused before anything is restored, except a larger
  ``steps``, which extends the run (recorded in the log's ``"resume"``
  record and in ``config.json``; the learning-rate schedule of the
  remaining steps is the longer run's). Resuming a finished run returns
  its stored result and writes nothing.
* **One writer.** In a multi-process job the checkpoints are written by
  all processes together (orbax), and everything else (``config.json``,
  the log, ``best.safetensors``, ``results.json``, the progress bar) by
  process 0 only.
* **Honest wall-clock.** Every step kind is compiled for every padded
  length before the clock starts (``precompile``, with a "compiling N step
  variants" count-down on stderr); evaluation, checkpointing and
  diagnostics are outside it.
* **One compilation for a sweep.** The hyperparameters of
  :data:`~kfac_jax_peft.finetune.config.TRACED` are arrays in the optimizer
  state, not constants of the steps (:mod:`kfac_jax_peft.finetune.optim`),
  so the compiled steps of the last run built in this process are reused
  by the next run whose configuration differs only in them, the seed, the
  run folder or the loop's intervals (:func:`compile_signature`); across
  processes, JAX's persistent cache (:func:`enable_compilation_cache`)
  does the same.

Run folder::

    config.json        the TrainConfig
    metrics.jsonl      the log (:mod:`kfac_jax_peft.finetune.logs`)
    checkpoints/       orbax checkpoints (:mod:`kfac_jax_peft.finetune.checkpoint`)
    best.safetensors   the trainable weights of the best validation step
    results.json       the summary (also the last log record), once finished
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from kfac_jax_peft import curves
from kfac_jax_peft import data as D
from kfac_jax_peft.clipping import clip_stats
from kfac_jax_peft.finetune import checkpoint as C
from kfac_jax_peft.finetune import zeroth_order as ZO
from kfac_jax_peft.finetune.config import (
    PER_SAMPLE,
    TAKES_OBJECTIVE,
    TRACED,
    ZEROTH_ORDER,
    TrainConfig,
    check_inputs,
)
from kfac_jax_peft.finetune.devices import Placement, num_devices
from kfac_jax_peft.finetune.logs import MetricsLog, NullLog, Stopwatch
from kfac_jax_peft.finetune.model import build_task_model
from kfac_jax_peft.finetune.optim import build_optimizer, learning_rate_schedule
from kfac_jax_peft.finetune.steps import (
    Fixed,
    TrainState,
    init_state,
    make_steps,
    step_kind,
    step_kinds,
)
from kfac_jax_peft.finetune.tasks import Data, evaluate, load_data, padded_lengths, resize
from kfac_jax_peft.kfac.ekfac import ekfac_probes
from kfac_jax_peft.peft import count_trainable, save_peft, split_trainable


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
    so that runs differing only in seed, data, run folder or the traced
    hyperparameters skip XLA compilation. A process-wide JAX setting."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


#: Keys that do not enter the compiled steps when the hyperparameters are
#: traced: runs that differ only in them share one compilation.
PER_RUN = TRACED + ("seed", "output_dir", "progress", "precompile", "eval_every",
                    "checkpoint_every", "log_every")


def compile_signature(cfg: TrainConfig, devices: int = 1) -> str:
    """What the compiled steps of a run of ``cfg`` depend on: its
    configuration without :data:`PER_RUN`, and the number of devices. Two
    runs with the same signature run the same compiled programs."""
    import json

    d = {k: v for k, v in cfg.to_dict().items() if k not in PER_RUN}
    return json.dumps({**d, "devices": devices}, sort_keys=True)


@dataclasses.dataclass
class _Compiled:
    """The compiled steps of a run, and the ``(kind, padded length)``
    variants already run once (compiled)."""

    place: Placement
    shardings: Any
    train_steps: dict[str, Callable]
    eval_step: Callable
    diagnose: Callable
    uses_stats: bool
    warm: set = dataclasses.field(default_factory=set)


#: The compiled steps of the last run built in this process, by signature
#: (one entry: a process that trains one configuration after another keeps
#: only the last one's programs).
_COMPILED: dict[str, _Compiled] = {}


@dataclasses.dataclass
class _Run:
    """What the helpers of :func:`train` share: the configuration and data,
    the compiled steps on their placement, and the run folder's writers;
    ``meta`` is the checkpointed record of the run (step, best step and
    metric, wall-clock, last logged loss) and ``best`` the host copy of the
    best trainable parameters."""

    cfg: TrainConfig
    data: Data
    place: Placement
    train_steps: dict[str, Callable]
    eval_step: Callable
    diagnose: Callable
    fixed: Fixed
    uses_stats: bool
    trainable_params: str
    initial: TrainState
    shardings: TrainState
    checkpoints: C.Checkpoints
    compiled: _Compiled | None = None
    clock: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    log: MetricsLog | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    best: Any = None
    bar: Any = None


def train(cfg: TrainConfig, *, resume: bool = False, data: Data | None = None,
          stop_after: int | None = None, traced: bool = True) -> RunResult:
    """Fine-tune ``cfg.model`` on ``cfg.task``; see the module docstring.

    ``resume``: continue the run in ``cfg.output_dir`` from its latest
    checkpoint (an error if there is none, a ``ValueError`` if ``cfg``
    differs from the run's configuration other than by a larger ``steps``);
    a finished run's stored result is returned as it is (with the final
    trainable parameters read from its checkpoint). ``data``: pre-loaded
    data (otherwise loaded from ``cfg``). ``stop_after``: stop (after
    checkpointing) once this step is reached, without the final test
    evaluation; used to test resumption. ``traced=False`` compiles the
    hyperparameters in as constants and builds fresh steps (the behaviour
    before they were traced; ``benchmarks/compile.py`` compares both).
    """
    check_inputs(cfg, resume=resume)  # the files, before anything is loaded
    extension = C.check_resume(cfg) if resume else {}
    if resume and not extension and C.finished_result(cfg.output_dir) is not None:
        return _stored_result(cfg)
    run = _build(cfg, data or load_data(cfg), num_devices(cfg), traced)
    state = _restore_or_init(run, resume, extension)
    start = int(run.meta["step"])
    if cfg.precompile:
        seconds, variants = _precompile(run, state)
        run.log.write("compile", step=start, seconds=seconds, variants=variants)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    state = _train_until(run, state, start, end)
    return _finish(run, state, end)


def _stored_result(cfg: TrainConfig) -> RunResult:
    """A finished run's ``results.json``, and its final trainable parameters
    from its checkpoint (read without building the model)."""
    checkpoints = C.Checkpoints(cfg.output_dir)
    restored = checkpoints.restore()
    checkpoints.close()
    trainable = None if restored is None else jax.device_get(restored[1]["trainable"])
    return RunResult(**C.finished_result(cfg.output_dir), trainable=trainable)


def _build(cfg: TrainConfig, data: Data, n: int, traced: bool = True) -> _Run:
    """The model, the optimizer and the compiled steps of a run (those of the
    previous run when its :func:`compile_signature` is the same)."""
    model, variables = build_task_model(cfg, data.spec)
    trainable, frozen = split_trainable(variables["params"])
    traced = traced and cfg.optimizer not in ZEROTH_ORDER  # their chains keep constants
    key = compile_signature(cfg, n) if traced else None
    compiled = _COMPILED.get(key) if key is not None else None
    place = (compiled.place if compiled is not None
             else Placement(n, shard_factors=cfg.shard_factors))
    tx = build_optimizer(cfg, input_groups=model.input_groups, traced=traced)
    probes = variables.get("kfac")
    uses_stats = cfg.optimizer == "kfac" and probes is not None
    initial = init_state(trainable, tx, cfg.seed)
    if compiled is None:
        per_sample = cfg.optimizer if cfg.optimizer in PER_SAMPLE else None
        prepare = None
        if cfg.optimizer == "kfac" and cfg.damping_mode == "ekfac":
            groups = model.input_groups if cfg.share_input_factors else None
            prepare = functools.partial(ekfac_probes, input_groups=groups)
        zeroth_order = None if cfg.optimizer not in ZEROTH_ORDER else (
            lambda loss: ZO.zeroth_order_value_and_grad(cfg, loss))
        steps = make_steps(model, tx, per_sample=per_sample, num_samples=cfg.num_samples,
                           prepare_probes=prepare,
                           objective=cfg.optimizer in TAKES_OBJECTIVE,
                           adaptive=cfg.adaptive_damping or cfg.adaptive_step,
                           zeroth_order=zeroth_order)
        shardings = place.state_shardings(initial)
        compiled = _Compiled(
            place=place, shardings=shardings,
            # the state is donated: the step updates it in place, where it lives
            train_steps={k: place.compile(steps.train[k], donate_argnums=(0,),
                                          out_shardings=(shardings, place.replicated))
                         for k in step_kinds(cfg, uses_stats)},
            eval_step=place.compile(steps.eval, out_shardings=place.rows),
            diagnose=place.compile(steps.diagnose, out_shardings=place.replicated),
            uses_stats=uses_stats)
        _COMPILED.clear()
        if key is not None:
            _COMPILED[key] = compiled
    return _Run(
        cfg=cfg, data=data, place=place, train_steps=compiled.train_steps,
        eval_step=compiled.eval_step, diagnose=compiled.diagnose,
        fixed=place.put(Fixed(frozen, probes if uses_stats else None)),
        uses_stats=uses_stats, trainable_params=count_trainable(variables["params"]),
        initial=initial, shardings=compiled.shardings,
        checkpoints=C.Checkpoints(cfg.output_dir), compiled=compiled)


def _restore_or_init(run: _Run, resume: bool, extension: dict) -> TrainState:
    """The state to start from, placed, with ``run.meta``, ``run.best`` and
    ``run.log`` set: the latest checkpoint's (``resume``), or a fresh one
    (refused where checkpoints would be overwritten)."""
    cfg, state, place = run.cfg, run.initial, run.place
    run.meta = {"step": 0, "best_step": -1, "best_metric": None, "wall_clock": 0.0,
                "last_loss": math.nan}
    run.best = jax.tree_util.tree_map(np.asarray, state.trainable)
    latest = run.checkpoints.latest_step()
    if resume:
        where = run.shardings
        restored = run.checkpoints.restore(_abstract(
            {"trainable": state.trainable, "opt_state": state.opt_state, "best": run.best},
            {"trainable": where.trainable, "opt_state": where.opt_state,
             "best": where.trainable}))  # restored onto the devices where the run keeps it
        if restored is None:
            raise FileNotFoundError(f"resume: no checkpoint in {cfg.output_dir!r}")
        _, saved, run.meta = restored
        run.best = place.get(saved["best"])
        state = state._replace(step=np.int32(run.meta["step"]), trainable=saved["trainable"],
                               opt_state=saved["opt_state"])
        if extension and place.main:
            C.record_extension(cfg)
        run.log = (MetricsLog(cfg.output_dir, resume_step=int(run.meta["step"]))
                   if place.main else NullLog())
        run.log.write("resume", step=int(run.meta["step"]), **(
            {"extended": extension} if extension else {}))
    elif latest is not None:
        run.checkpoints.close()
        raise FileExistsError(
            f"{cfg.output_dir!r} already holds checkpoints (latest step {latest}): pass "
            "resume=True (--resume) to continue that run, or choose another output_dir")
    else:
        os.makedirs(cfg.output_dir, exist_ok=True)
        if place.main:
            C.write_json(os.path.join(cfg.output_dir, C.CONFIG_NAME), cfg.to_dict())
        run.log = MetricsLog(cfg.output_dir) if place.main else NullLog()
        data = run.data
        run.log.write("start", step=0, task=data.spec.name,
                      trainable_params=run.trainable_params, num_train=len(data.train.labels),
                      num_validation=len(data.validation.labels),
                      num_test=len(data.test.labels), devices=place.n,
                      processes=jax.process_count())
    run.clock = Stopwatch(float(run.meta["wall_clock"]))
    return place.put(state, run.shardings)


def _abstract(tree, shardings):
    """Shapes, dtypes and target shardings of ``tree`` (an orbax restore target)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _train_until(run: _Run, state: TrainState, start: int, end: int) -> TrainState:
    """Steps ``start .. end - 1``: train, and at their steps log, check
    finiteness, evaluate and checkpoint (the last step always checkpoints)."""
    cfg, place = run.cfg, run.place
    stream = D.train_batches(run.data.train, cfg.batch_size, seed=cfg.seed, start_step=start,
                             pad_to_multiple_of=cfg.pad_to_multiple_of)
    window: list[jax.Array] = []
    run.bar = _progress(cfg, start, end, run.clock) if place.main else None
    run.clock.start()
    for step in range(start, end):
        batch = place.shard(next(stream))
        done = step + 1
        log_due = done % cfg.log_every == 0 or done == end
        diag = _diagnose(run, state, batch) if cfg.log_gamma and log_due else {}
        state, loss = run.train_steps[step_kind(cfg, step, run.uses_stats)](
            state, run.fixed, batch)
        window.append(loss)
        if log_due:
            _log_train(run, state, window, diag, done)
            window = []
        evaluating = done % cfg.eval_every == 0 or done == cfg.steps
        saving = done % cfg.checkpoint_every == 0 or done == end
        if evaluating or saving:
            with run.clock.paused(state):
                if not place.finite(state.trainable):
                    _stop(run, done, "the trainable parameters are not finite")
                if evaluating:
                    _evaluate_and_keep_best(run, state, done)
                if saving:
                    _checkpoint(run, state, done)
                if run.bar is not None:
                    run.bar.sync(done)
    if run.bar is not None:
        run.bar.sync(end)
        run.bar.close()
    return state


def _diagnose(run: _Run, state: TrainState, batch: dict) -> dict[str, float]:
    """The indicators of the direction this step is about to take (one
    device only; :func:`~kfac_jax_peft.finetune.steps._make_diagnose`),
    outside the clock."""
    with run.clock.paused(state):
        values = run.place.get(run.diagnose(state, run.fixed, batch))
    return {k: float(v) for k, v in values.items()}


def _log_train(run: _Run, state: TrainState, window: list, diag: dict, done: int) -> None:
    """The training record of the last ``len(window)`` steps (mean loss,
    learning rate, clip rate and last update norm of the chain's first
    clip); a non-finite loss stops the run instead."""
    losses = [run.place.scalar(x) for x in window]  # blocks: the clock is honest
    wall = run.clock.read()
    mean_loss = float(np.mean(losses))
    if not math.isfinite(mean_loss):
        _stop(run, done, f"the training loss became {mean_loss}")
    calls, clipped, norm = _clip_counts(run.place, state.opt_state)
    before = run.meta.get("clip_counts", (0, 0))
    rate = None if calls <= before[0] else (clipped - before[1]) / (calls - before[0])
    rates = {"lr": float(learning_rate_schedule(run.cfg)(done - 1))}
    if run.cfg.optimizer in ZEROTH_ORDER:  # their learning rates, and HiZOO's Sigma
        rates = ZO.learning_rates(run.cfg, done - 1)
        with run.clock.paused(state):
            diag = {**ZO.sigma_spread(run.place.get(ZO.find_hizoo_state(state.opt_state))),
                    **diag}
    lr = rates["lr"]
    # checkpointed, so that a resumed run logs the clip rates of an uninterrupted one
    run.meta.update(last_loss=mean_loss, clip_counts=(calls, clipped))
    run.log.write("train", step=done, loss=mean_loss, **rates, clip_rate=rate,
                  update_norm=norm, wall_clock=wall, **_clip_fraction(run.place, state),
                  **_adaptive_record(run.place, state), **diag)
    if run.bar is not None:  # the losses are on the host: the steps are done
        run.bar.sync(done, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                     clip="-" if rate is None else f"{rate:.2f}")


def _stop(run: _Run, done: int, what: str) -> None:
    """Stop a run whose state is not finite, saying what is intact."""
    latest = run.checkpoints.latest_step()
    kept = ("No checkpoint was written." if latest is None
            else f"The last checkpoint, step {latest}, is intact.")
    # a resumed run repeats the same steps (and refuses another configuration)
    message = (f"{what} at step {done}; lower the learning rate or raise the damping, "
               f"in a new run. {kept}")
    run.log.write("error", step=done, message=message)
    run.log.close()
    run.checkpoints.close()
    if run.bar is not None:
        run.bar.close()
    raise FloatingPointError(message)


def _evaluate_and_keep_best(run: _Run, state: TrainState, done: int) -> None:
    """Evaluate on validation; a new best is kept (host copy and
    ``best.safetensors``)."""
    cfg = run.cfg
    val = _evaluate(run, state.trainable, run.data.validation)
    run.log.write("eval", step=done, split="validation", wall_clock=run.clock.total, **val)
    if run.meta["best_metric"] is None or val["main"] > run.meta["best_metric"]:
        run.meta.update(best_metric=val["main"], best_step=done)
        run.best = run.place.get(state.trainable)
        if run.place.main:
            save_peft(os.path.join(cfg.output_dir, "best.safetensors"), run.best,
                      {"step": done, "task": run.data.spec.name, **cfg.to_dict()})


def _evaluate(run: _Run, trainable, encoded: D.Encoded) -> dict[str, float]:
    place = run.place
    return evaluate(
        lambda batch: place.get(run.eval_step(trainable, run.fixed, place.shard(batch))),
        encoded, run.data.spec, run.cfg.eval_batch_size or run.cfg.batch_size,
        run.cfg.pad_to_multiple_of)


def _checkpoint(run: _Run, state: TrainState, done: int) -> None:
    run.meta.update(step=done, wall_clock=run.clock.total)
    # the placed arrays: orbax writes each process's part (split factors too)
    run.checkpoints.save(done, {"trainable": state.trainable, "opt_state": state.opt_state,
                                "best": run.place.put(run.best)}, run.meta)


def _finish(run: _Run, state: TrainState, end: int) -> RunResult:
    """The result; at the run's last step, after the best validation
    weights are evaluated on validation and test (logged, and written to
    ``results.json``)."""
    cfg, meta = run.cfg, run.meta
    result = RunResult(cfg.output_dir, end, float(meta["last_loss"]), int(meta["best_step"]),
                       {}, {}, run.clock.total, run.trainable_params,
                       run.place.get(state.trainable))
    if end == cfg.steps:
        best = run.place.put(run.best)
        result.validation = _evaluate(run, best, run.data.validation)
        result.test = _evaluate(run, best, run.data.test)
        run.log.write("eval", step=end, split="test", wall_clock=result.wall_clock,
                      best_step=result.best_step, **result.test)
        run.log.write("summary", step=end, **result.to_dict())
    run.log.close()
    run.checkpoints.close()
    if end == cfg.steps and run.place.main:
        C.write_json(os.path.join(cfg.output_dir, C.RESULTS_NAME), result.to_dict())
    return result


def _precompile(run: _Run, state: TrainState) -> tuple[float, int]:
    """Run every step kind once on every padded length not yet run in this
    process, on copies of the state (the steps donate it), with a count-down
    on stderr; returns the seconds spent and the number of variants."""
    cfg, data = run.cfg, run.data
    t0 = time.perf_counter()
    todo = [(kind, length) for length in padded_lengths(cfg, data)
            for kind in run.train_steps if (kind, length) not in run.compiled.warm]
    if not todo:
        return 0.0, 0
    first = next(D.train_batches(data.train, cfg.batch_size, seed=cfg.seed,
                                 pad_to_multiple_of=cfg.pad_to_multiple_of))
    say = _countdown(len(todo)) if cfg.progress else (lambda left, seconds=None: None)
    for i, (kind, length) in enumerate(todo):
        say(len(todo) - i)
        batch = run.place.shard(resize(first, length, data.train.pad_id))
        out = run.train_steps[kind](jax.tree_util.tree_map(lambda x: x.copy(), state),
                                    run.fixed, batch)
        jax.block_until_ready(out)
        run.compiled.warm.add((kind, length))
    seconds = time.perf_counter() - t0
    say(0, seconds)
    return seconds, len(todo)


def _countdown(total: int) -> Callable:
    """``say(left, seconds=None)``: one stderr line "compiling N step
    variants: k left", rewritten in place on a terminal (a line each
    otherwise), ended with the seconds spent."""
    import sys

    tty = sys.stderr.isatty()
    t0 = time.perf_counter()

    def say(left: int, seconds: float | None = None) -> None:
        head = f"compiling {total} step variant{'s' if total > 1 else ''}"
        if seconds is not None:
            text = f"{head}: done in {seconds:.1f} s"
        else:
            text = f"{head}: {left} left ({time.perf_counter() - t0:.0f} s)"
        end = "\n" if seconds is not None or not tty else ""
        print(("\r\033[K" if tty else "") + text, end=end, file=sys.stderr, flush=True)

    return say


def _clip_fraction(place: Placement, state: TrainState) -> dict[str, float]:
    """``{"clip_fraction": f}``: the fraction of coordinates Sophia clipped at
    the last step (:mod:`kfac_jax_peft.finetune.sophia`); empty for other
    optimizers."""
    from kfac_jax_peft.finetune.sophia import clip_fraction

    f = clip_fraction(state.opt_state)
    return {} if f is None else {"clip_fraction": place.scalar(jax.device_get(f))}


def _adaptive_record(place: Placement, state: TrainState) -> dict[str, float]:
    """``damping`` and ``rho`` of adaptive damping, ``alpha`` and ``mu`` of the
    quadratic-model step, where the chain has them (the last values set)."""
    from kfac_jax_peft import adaptive

    out = {}
    lm = adaptive.adaptive_state(state.opt_state)
    if lm is not None:
        out.update(damping=lm.damping, rho=lm.rho)
    qm = adaptive.adaptive_state(state.opt_state, adaptive.QuadraticModelState)
    if qm is not None:
        out.update(alpha=qm.alpha, mu=qm.mu)
    return {k: float(place.scalar(v)) for k, v in jax.device_get(out).items()}


def _clip_counts(place: Placement, opt_state) -> tuple[int, int, float | None]:
    """``(calls, clipped calls, last norm)`` of the chain's first clip."""
    s = clip_stats(opt_state)
    if s is None:
        return (0, 0, None)
    count, num_clipped, norm = (float(x) for x in place.get(
        (s.count, s.num_clipped, s.norm)))
    return (int(count), int(num_clipped), norm)


def _progress(cfg: TrainConfig, start: int, end: int, clock: Stopwatch):
    return ProgressBar(f"{cfg.task} {cfg.optimizer}/{cfg.clip}", start, end, clock) \
        if cfg.progress else None


class ProgressBar:
    """The progress bar of a run (tqdm, on stderr).

    It moves only where the loop has waited for the device (log steps,
    evaluations, checkpoints: :meth:`sync`), so it counts finished steps,
    not dispatched ones; its rate and ETA are steps per second of the run's
    :class:`~kfac_jax_peft.finetune.logs.Stopwatch` from the first such
    point on, so neither the burst of asynchronous dispatch of the first
    steps nor evaluation and checkpointing enter them (the rate reads "?"
    until the second point). While it is shown, log records (absl's,
    orbax's) and warnings are written on their own lines above it instead
    of into its line.
    """

    def __init__(self, desc: str, start: int, end: int, clock: Stopwatch, file=None):
        import sys

        from tqdm.auto import tqdm

        self.bar = tqdm(total=end, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                        smoothing=0, file=file or sys.stderr)
        self.clock, self.origin = clock, None
        self._above = _log_above(self.bar)
        self._above.__enter__()

    def sync(self, done: int, **postfix) -> None:
        """``done`` steps are finished (the caller has waited for them)."""
        seconds = self.clock.read()
        if self.origin is None:
            self.origin = seconds
            self.bar.initial = done  # the rate counts from here
        self.bar.n = done
        self.bar.start_t = self.bar._time() - (seconds - self.origin)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self._above.__exit__(None, None, None)
        self.bar.close()


@contextlib.contextmanager
def _log_above(bar):
    """Log records and warnings go above ``bar`` (``tqdm.write``) while
    inside: console handlers of the root and absl loggers write through it,
    and so does a handler added to the root logger when it has none (absl
    records would otherwise reach Python's last-resort handler, which writes
    into the bar's line)."""
    import io
    import logging
    import sys
    import warnings

    class Above(io.TextIOBase):
        def write(self, text):
            if text.strip():
                bar.write(text.rstrip("\n"), file=bar.fp)
            return len(text)

    stream, swapped = Above(), []
    root = logging.getLogger()
    for handler in root.handlers + logging.getLogger("absl").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr,
                                                                              sys.stdout):
            swapped.append((handler, handler.setStream(stream)))
    added = None
    if not root.handlers and not logging.getLogger("absl").handlers:  # the last resort's case
        added = logging.StreamHandler(stream)
        added.setLevel(logging.WARNING)
        root.addHandler(added)
    show = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
    try:
        yield
    finally:
        warnings.showwarning = show
        if added is not None:
            root.removeHandler(added)
        for handler, old in swapped:
            handler.setStream(old)


def steps_to_reach(records: list[dict], target: float) -> int | None:
    """The first logged step whose training loss (a logging window's mean) is
    at most ``target``: :func:`kfac_jax_peft.curves.steps_to_reach` on the
    ``train`` records."""
    train = [r for r in records if r.get("kind") == "train"]
    return curves.steps_to_reach([r["step"] for r in train], [r["loss"] for r in train], target)


__all__ = ["Data", "ProgressBar", "RunResult", "Stopwatch", "compile_signature",
           "enable_compilation_cache", "evaluate", "load_data", "num_devices",
           "steps_to_reach", "train"]
