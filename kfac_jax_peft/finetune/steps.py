"""The pure step functions of a run, over one :class:`TrainState`.

A training step is ``train_step(state, fixed, batch) -> (state, loss)``
whatever the optimizer; what differs between optimizers is which of the
*kinds* the host runs at a step (:func:`step_kind`), each compiled once:

* ``"stats"``: K-FAC statistics captured in the backward pass and passed to
  the chain (``kfac_stats=``); the transformation folds them into its
  factors and re-inverts when ``invert_every`` statistics calls have passed;
* ``"plain"``: gradients only (any optax chain; K-FAC uses its stored
  inverse), the step of every step that is not a statistics step; with
  ``objective=True`` (Sophia) the chain also gets ``obj_fn``, the step's
  loss as a function of the trainable parameters (same batch, same dropout
  key), for Hutchinson's Hessian-vector products, and ``logits_fn``,
  ``gnb_loss_fn``, ``gnb_batch_size`` for the Gauss-Newton-Bartlett
  estimator (:func:`_objective`);
* ``"sample"``: the exact Fisher-family updates (EF, iEF, SF) fed with
  per-sample gradients; deterministic (no dropout), one device;
* ``"zo"``: the zeroth-order arms (:mod:`kfac_jax_peft.finetune.zeroth_order`):
  forward passes only (MeZO, HiZOO), or forward passes and one backward pass
  limited to the first-order leaves (LoHO); one device. Its directions are
  drawn from a key split off the step's key, so they too depend only on the
  seed and the step number.

``eval_step(trainable, fixed, batch)`` returns predictions, and
``diagnose(state, fixed, batch)`` indicators of the direction the chain
would take (nothing is updated): :func:`_make_diagnose`.

Determinism: the dropout key of a step is ``fold_in(state.rng,
state.step)``, with ``state.rng = PRNGKey(seed)`` for the whole run, so it
depends only on the seed and the step number. The steps are written for the
global batch and reduce nothing over devices: under ``jax.jit`` over a
device mesh with the batch split by rows
(:mod:`kfac_jax_peft.finetune.devices`) XLA makes every sum global, and the
dropout masks are drawn for the global batch from the one key, so the same
seed gives the same run on 1 and on N devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_peft.capture import kfac_value_and_grad
from kfac_jax_peft.clipping import module_group
from kfac_jax_peft.finetune.config import PER_SAMPLE, ZEROTH_ORDER, TrainConfig
from kfac_jax_peft.finetune.model import TaskModel
from kfac_jax_peft.peft import merge_trainable


class TrainState(NamedTuple):
    """Everything a training step changes, and nothing else: the step number
    (``int32``), the trainable parameters, the optimizer state, and the run's
    base PRNG key (constant; each step folds its number in)."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


class Fixed(NamedTuple):
    """What the steps read and never change: the frozen parameters, and the
    K-FAC probes (``None`` when no step captures statistics)."""

    frozen: Any
    probes: Any = None


class Steps(NamedTuple):
    """The un-jitted step functions of a run (see the module docstring):
    ``train[kind](state, fixed, batch) -> (state, loss)`` for each kind the
    optimizer uses, ``eval(trainable, fixed, batch) -> predictions``,
    ``diagnose(state, fixed, batch) -> {name: scalar}``."""

    train: Mapping[str, Callable]
    eval: Callable
    diagnose: Callable


def init_state(trainable, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable),
                      jax.random.PRNGKey(seed))


def step_kinds(cfg: TrainConfig, uses_stats: bool) -> tuple[str, ...]:
    """The kinds of training step a run of ``cfg`` uses."""
    if cfg.optimizer in PER_SAMPLE:
        return ("sample",)
    if cfg.optimizer in ZEROTH_ORDER:
        return ("zo",)
    return ("plain", "stats") if uses_stats else ("plain",)


def step_kind(cfg: TrainConfig, step: int, uses_stats: bool) -> str:
    """The kind of training step number ``step`` (0-based); a host-side
    choice, so that each kind is its own compiled trace."""
    if cfg.optimizer in PER_SAMPLE:
        return "sample"
    if cfg.optimizer in ZEROTH_ORDER:
        return "zo"
    return "stats" if uses_stats and step % cfg.stats_every == 0 else "plain"


def all_finite(tree) -> jax.Array:
    """One boolean: every element of every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_steps(model: TaskModel, tx: optax.GradientTransformation, *,
               per_sample: str | None = None, num_samples: int = 1,
               objective: bool = False, prepare_probes: Callable | None = None,
               adaptive: bool = False, zeroth_order: Callable | None = None) -> Steps:
    """The step functions of a run, un-jitted. ``per_sample`` (``"ef" |
    "ief" | "sf"``) adds the ``"sample"`` kind; ``num_samples`` is SF's
    number of sampled labels per example; ``objective``: pass Sophia's
    estimators' arguments (:func:`_objective`) to the chain; ``prepare_probes(probes,
    opt_state) -> probes`` runs before a statistics step's capture (EKFAC's
    :func:`~kfac_jax_peft.ekfac_probes`). ``adaptive``: the chain takes the
    extra arguments of :mod:`kfac_jax_peft.adaptive` (see
    :func:`adaptive_args`). ``zeroth_order`` makes the ``"zo"`` kind the
    only one: a function of ``loss(trainable, frozen, batch, rng)``
    returning the gradient source ``(trainable, opt_state, frozen, batch,
    rng, key) -> (loss, grads, extra)``
    (:func:`kfac_jax_peft.finetune.zeroth_order.zeroth_order_value_and_grad`
    with its config bound); ``extra`` goes to the chain's ``update``."""
    def loss_fn(trainable, frozen, probes, batch, rng):
        logits = model.logits(merge_trainable(trainable, frozen), probes, batch, rng)
        return model.loss(logits, batch)

    grad_stats = kfac_value_and_grad(
        lambda tr, probes, frozen, batch, rng: loss_fn(tr, frozen, probes, batch, rng))
    per_sample_fn = _per_sample_fn(model, num_samples)

    def apply(state, loss, grads, **extra):
        if adaptive:  # the step's loss and raw gradient (kfac_jax_peft.adaptive)
            extra.update(loss=loss, grads=grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable, **extra)
        trainable = optax.apply_updates(state.trainable, updates)
        return state._replace(step=state.step + 1, trainable=trainable,
                              opt_state=opt_state), loss

    def extras(state, fixed, batch):
        if not adaptive:
            return {}
        rng = _step_rng(state)
        return adaptive_args(model, state.trainable, fixed.frozen, batch,
                             lambda p: loss_fn(p, fixed.frozen, None, batch, rng))

    def stats_step(state, fixed, batch):
        probes = (fixed.probes if prepare_probes is None
                  else prepare_probes(fixed.probes, state.opt_state))
        loss, grads, stats = grad_stats(state.trainable, probes, fixed.frozen, batch,
                                        _step_rng(state))
        return apply(state, loss, grads, kfac_stats=stats, **extras(state, fixed, batch))

    def plain_step(state, fixed, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.trainable, fixed.frozen, None, batch,
                                                  _step_rng(state))
        extra = (_objective(model, loss_fn, fixed, batch, _step_rng(state)) if objective
                 else {})
        return apply(state, loss, grads, **extra, **extras(state, fixed, batch))

    def sample_step(state, fixed, batch):
        loss, grads, extras = per_sample_fn(per_sample)(state.trainable, fixed.frozen, batch,
                                                        rng=_step_rng(state))
        return apply(state, loss, grads, **extras)

    def eval_step(trainable, fixed, batch):
        logits = model.logits(merge_trainable(trainable, fixed.frozen), None, batch, None)
        return model.predictions(logits)

    train = {"stats": stats_step, "plain": plain_step}
    if per_sample:
        train = {"sample": sample_step}
    if zeroth_order is not None:
        train = {"zo": _zo_step(zeroth_order, loss_fn, apply, _step_rng)}
    diagnose = _make_diagnose(model, tx, per_sample, per_sample_fn,
                              loss_fn if objective else None)
    return Steps(train, eval_step, diagnose)


def _objective(model: TaskModel, loss_fn: Callable, fixed: Fixed, batch, rng
               ) -> dict[str, Any]:
    """The extra arguments of Sophia's Hessian-diagonal estimators
    (:mod:`kfac_jax_peft.finetune.sophia`), all on this step's batch with its
    dropout key and no K-FAC probes (each estimator takes its own and
    ignores the others; an unused one is never traced):

    * ``obj_fn(trainable)``: the step's loss (Hutchinson's);
    * ``logits_fn(trainable)``: the model's logits on the batch,
      ``gnb_loss_fn(logits, labels)``: the training loss (the mean over the
      valid rows, :meth:`TaskModel.loss`) with ``labels`` in place of the
      batch's, and ``gnb_batch_size``: the number of valid rows, that mean's
      ``B`` (GNB's; padding rows get sampled labels that the mask drops).

    On a ``pmap`` axis they are this shard's; the estimator averages."""
    def gnb_loss_fn(logits, labels):
        return model.loss(logits, {**batch, "labels": labels})

    return {"obj_fn": lambda trainable: loss_fn(trainable, fixed.frozen, None, batch, rng),
            "logits_fn": lambda trainable: model.logits(
                merge_trainable(trainable, fixed.frozen), None, batch, rng),
            "gnb_loss_fn": gnb_loss_fn,
            "gnb_batch_size": jnp.sum(batch["valid"].astype(jnp.float32))}


def adaptive_args(model: TaskModel, trainable, frozen, batch, value_fn: Callable) -> dict:
    """The extra arguments of :mod:`kfac_jax_peft.adaptive` for one step
    besides its ``loss`` and ``grads``: ``value_fn`` (the training loss on
    the same batch with the same dropout key) and ``fvp_fn``, the exact
    Gauss-Newton (= Fisher, for cross-entropy) product of the training loss
    through the logits, without dropout. ``fvp_fn`` linearises the model
    when called, so a step on which no rule runs (``lax.cond``) pays nothing."""
    from kfac_jax_peft import fisher

    def batch_loss(outputs, frozen, batch):
        # per-example terms whose mean over all rows is the training loss (a
        # mean over the valid rows): the curvature is that of the loss optimised
        valid = batch["valid"].astype(jnp.float32)
        n = valid.shape[0] / jnp.maximum(jnp.sum(valid), 1.0)
        return model.per_example_loss(outputs, batch["labels"]) * valid * n

    def fvp_fn(v):
        return fisher.fisher_vector_product(_model_fn(model), trainable, frozen, batch,
                                            loss_fn=batch_loss)(v)

    return dict(value_fn=value_fn, fvp_fn=fvp_fn)


def _zo_step(zeroth_order: Callable, loss_fn: Callable, apply: Callable,
             step_rng: Callable) -> Callable:
    """The ``"zo"`` step: the dropout key and the directions' key are split
    from the step's key; every forward pass of the step uses the same
    dropout key."""
    source = zeroth_order(lambda tr, frozen, batch, rng: loss_fn(tr, frozen, None, batch, rng))

    def zo_step(state, fixed, batch):
        dropout_rng, key = jax.random.split(_step_rng(state))
        loss, grads, extra = source(state.trainable, state.opt_state, fixed.frozen, batch,
                                    dropout_rng, key)
        return apply(state, loss, grads, **extra)

    return zo_step


def _step_rng(state: TrainState) -> jax.Array:
    """The dropout key of the step: the run's key with the step number folded in."""
    return jax.random.fold_in(state.rng, state.step)


def _make_diagnose(model: TaskModel, tx: optax.GradientTransformation,
                   per_sample: str | None, per_sample_fn: Callable,
                   objective_loss: Callable | None = None) -> Callable:
    """``diagnose(state, fixed, batch) -> {name: scalar}``, of the direction
    ``d`` the chain would take on ``batch`` (the curvature ``F`` is the
    Gauss-Newton matrix of the training loss, i.e. the Fisher for
    cross-entropy; :mod:`kfac_jax_peft.fisher`):

    * ``gamma``: the gamma indicator of ``d`` relative to SGD's;
    * ``imbalance``: the largest over the smallest per-sample gradient norm;
    * ``step_curvature``: ``d^T F d / d^T d``, the exact curvature along the
      step (compare it with the damping);
    * ``share_<group>``: the share of ``||d||^2`` in each group of trainable
      leaves: ``lora_A``, ``lora_B``, the adapters' ``down`` and ``up``, and
      the head (``classifier``); :func:`kfac_jax_peft.clipping.module_group`.

    ``objective_loss``: the steps' ``loss_fn``, when the chain takes
    ``obj_fn`` and GNB's arguments (here without dropout, like the gradient)."""
    from kfac_jax_peft import fisher

    def diagnose(state, fixed, batch):
        args = (state.trainable, fixed.frozen, batch)
        _, grads, extras = per_sample_fn("ief" if per_sample == "ief" else "ef")(*args)
        if per_sample == "sf":
            step_extras = per_sample_fn("sf")(*args, rng=_step_rng(state))[2]
        else:
            step_extras = extras if per_sample else {}
        if objective_loss is not None:
            step_extras = {**step_extras,
                           **_objective(model, objective_loss, fixed, batch, None)}
        direction, _ = tx.update(grads, state.opt_state, state.trainable, **step_extras)
        fvp = fisher.fisher_vector_product(_model_fn(model), *args,
                                           loss_fn=_example_loss(model))
        shares = fisher.squared_norm_shares(direction, module_group)
        gamma, curvature = fisher.gamma_and_curvature(direction, grads, fvp)
        return {"gamma": gamma,
                "imbalance": fisher.gradient_norm_imbalance(extras["per_sample_grads"]),
                "step_curvature": curvature,
                **{f"share_{name}": v for name, v in sorted(shares.items())}}

    return diagnose


# per-example forms for kfac_jax_peft.fisher (the frozen weights broadcast)


def _model_fn(model: TaskModel) -> Callable:
    def model_fn(trainable, frozen, batch):
        return model.logits(merge_trainable(trainable, frozen), None, batch, None)

    return model_fn


def _example_loss(model: TaskModel) -> Callable:
    def example_loss(outputs, frozen, batch):
        del frozen
        return model.per_example_loss(outputs, batch["labels"]) * batch["valid"]

    return example_loss


#: The pipeline's exact-Fisher optimizers and the Fisher type each preconditions with.
FISHER_TYPE_OF = {"ef": "empirical", "ief": "ief", "sf": "sampled"}


def _per_sample_fn(model: TaskModel, num_samples: int) -> Callable[[str], Callable]:
    from kfac_jax_peft import fisher

    likelihood = "gaussian" if model.spec.kind == "regression" else "categorical"

    def make(optimizer: str) -> Callable:
        return fisher.per_sample_value_and_grad(_model_fn(model), _example_loss(model),
                                                fisher_type=FISHER_TYPE_OF[optimizer],
                                                num_samples=num_samples,
                                                likelihood=likelihood, in_axes=(None, 0))

    return make
