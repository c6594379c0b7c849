"""The optimizer chain of a run (the paper's four arms, SGD, the exact Fisher
family, Sophia, and the zeroth-order arms).

**Traced hyperparameters.** The values of :data:`TRACED`
(``learning_rate``, ``max_norm``, ``weight_decay``, ``damping``, ``decay``,
``fisher_damping``) are not compiled into the steps: the chain is built by
``optax.inject_hyperparams``, which keeps them as float32 arrays in the
optimizer state (``opt_state.hyperparams``) and rebuilds the chain from
them inside every ``update``. Runs that differ only in these values (and
the seed) therefore trace to the same program and share one compilation,
in one process (the trainer reuses its compiled steps) and across
processes (JAX's persistent compilation cache). The values are checked as
numbers when the config is made, and by each transformation in ``init``,
where they are still concrete.

``traced=False`` compiles them in as constants instead, as the pipeline
did before; ``benchmarks/compile.py`` measures the difference. The
zeroth-order arms (:mod:`kfac_jax_peft.finetune.zeroth_order`) keep their
hyperparameters as constants: their runs share no compilation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kfac_jax_peft.clipping import CLIP_SCOPES, clipped
from kfac_jax_peft.finetune.config import TRACED, ZEROTH_ORDER, TrainConfig
from kfac_jax_peft.kfac.transform import kfac_precondition


def learning_rate_shape(cfg: TrainConfig) -> optax.Schedule:
    """The learning rate relative to its peak: a linear rise from 0 to 1 over
    ``round(warmup_ratio * steps)`` steps, then a linear fall to 0 at ``steps``."""
    warmup = int(round(cfg.warmup_ratio * cfg.steps))
    fall = optax.linear_schedule(1.0, 0.0, max(cfg.steps - warmup, 1))
    if warmup == 0:
        return fall
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), fall], [warmup])


def learning_rate_schedule(cfg: TrainConfig, peak=None) -> optax.Schedule:
    """``peak * learning_rate_shape(cfg)``: linear warm-up from 0 to ``peak``
    (default ``cfg.learning_rate``; an array when traced) over ``round(
    warmup_ratio * steps)`` steps, then linear decay to 0 at ``steps``."""
    shape = learning_rate_shape(cfg)
    peak = cfg.learning_rate if peak is None else peak
    return lambda count: peak * shape(count)


def decay_mask(params):
    """Weight decay on matrices only (not biases, not LayerNorm scales)."""
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def build_optimizer(cfg: TrainConfig, *, input_groups=None, traced: bool = True
                    ) -> optax.GradientTransformationExtraArgs:
    """The chain of ``cfg.optimizer`` with ``cfg.clip``::

        adamw: [clip(max_norm)] -> adamw(schedule, weight_decay)
        sgd:   [clip(max_norm)] -> decay -> -schedule
        sophia: [clip(max_norm)] -> optax.contrib.sophia(schedule, weight_decay)
        ef, ief, sf: like kfac, with the exact Woodbury preconditioner
        mezo, mezo-adam, hizoo, loho-*: see finetune.zeroth_order
        kfac:  post: kfac_precondition -> clip(max_norm) -> decay -> -schedule
               pre:  clip(max_norm) -> kfac_precondition -> decay -> -schedule
               none: kfac_precondition -> decay -> -schedule
               (adaptive_step: scale_by_quadratic_model(schedule) for -schedule;
                adaptive_damping: the whole chain inside adaptive_damping)

    The clip is placed by :func:`kfac_jax_peft.clipping.clipped` (its state
    records the clip rate); ``cfg.clip_scope`` clips one global norm
    (``"global"``) or each kind of module (``"module"``) or layer
    (``"layer"``) on its own (:data:`kfac_jax_peft.clipping.CLIP_SCOPES`).
    For SGD, ``"post"`` and ``"pre"`` both clip the gradient (there is no
    preconditioner); ``"post"`` is refused for AdamW and Sophia (which
    clips each coordinate itself). Sophia's ``update`` needs the extra
    argument ``obj_fn`` (Hutchinson) or ``logits_fn``, ``gnb_loss_fn``,
    ``gnb_batch_size`` (GNB; :mod:`kfac_jax_peft.finetune.sophia`).
    ``input_groups`` is passed to ``kfac_precondition`` when
    ``cfg.share_input_factors``. The chain reduces nothing over devices: the
    loop runs it under ``jax.jit`` over a device mesh, where the batch sums
    are global (:mod:`kfac_jax_peft.finetune.devices`). ``traced``
    (default): the values of :data:`TRACED` live in the state (see the
    module docstring); the weight decay is then always in the chain (a decay
    of 0 adds ``0 * params``).
    """
    if cfg.optimizer in ZEROTH_ORDER:
        from kfac_jax_peft.finetune.zeroth_order import zeroth_order_optimizer

        return zeroth_order_optimizer(cfg)
    if cfg.optimizer == "adamw" and cfg.clip == "post":
        raise ValueError("optimizer='adamw' supports clip='pre' (gradient clipping) or "
                         "'none'; post-clipping is K-FAC's Newton-step clipping")
    values = {key: getattr(cfg, key) for key in TRACED}

    def chain(learning_rate, max_norm, weight_decay, damping, decay, fisher_damping):
        return _chain(cfg, dict(learning_rate=learning_rate, max_norm=max_norm,
                                weight_decay=weight_decay, damping=damping, decay=decay,
                                fisher_damping=fisher_damping),
                      input_groups, always_decay=traced)

    if not traced:
        return chain(**values)
    return optax.inject_hyperparams(chain, hyperparam_dtype=jnp.float32)(**values)


def _chain(cfg: TrainConfig, h: dict, input_groups, always_decay: bool
           ) -> optax.GradientTransformationExtraArgs:
    """The chain of :func:`build_optimizer` with hyperparameter values ``h``."""
    lr = learning_rate_schedule(cfg, h["learning_rate"])
    if cfg.optimizer == "adamw":
        return optax.chain(_clipped(cfg, h, optax.identity()),
                           optax.adamw(lr, weight_decay=h["weight_decay"], mask=decay_mask))
    if cfg.optimizer == "sophia":
        return _sophia_chain(cfg, h, lr)
    decays = always_decay or cfg.weight_decay
    tail = ([optax.add_decayed_weights(h["weight_decay"], decay_mask)] if decays else []) \
        + [optax.scale_by_learning_rate(lr)]
    if cfg.optimizer == "sgd":
        return optax.chain(_clipped(cfg, h, optax.identity()), *tail)
    preconditioner = _preconditioner(cfg, h, input_groups)
    if cfg.adaptive_damping or cfg.adaptive_step:
        return _adaptive_chain(cfg, h, preconditioner, tail[:-1], lr)
    return optax.chain(_clipped(cfg, h, preconditioner), *tail)


def _clipped(cfg: TrainConfig, h: dict, preconditioner) -> optax.GradientTransformation:
    """``preconditioner`` with the configured clip (place, threshold, scope)."""
    return clipped(preconditioner, cfg.clip, h["max_norm"], group=CLIP_SCOPES[cfg.clip_scope])


def _adaptive_chain(cfg: TrainConfig, h: dict, preconditioner, decay: list, lr):
    """K-FAC with ``adaptive_step`` and/or ``adaptive_damping``::

        [adaptive_damping(] kfac_precondition -> clip -> decay
                            -> scale_by_quadratic_model(lr) | -lr [)]

    The step reads the extra arguments ``grads`` and ``fvp_fn``; the damping
    wrapper also ``loss`` and ``value_fn`` (:mod:`kfac_jax_peft.adaptive`),
    which :func:`kfac_jax_peft.finetune.steps.make_steps` passes with
    ``adaptive=True``. The damping ``h["damping"]`` is the adapted damping's
    start value."""
    from kfac_jax_peft import adaptive

    # the model's damping: the adapted one (handed down by adaptive_damping), or the fixed one
    eta = None if cfg.adaptive_damping else h["damping"]
    step = (adaptive.scale_by_quadratic_model(lr, damping=eta, every=cfg.adaptive_every)
            if cfg.adaptive_step else optax.scale_by_learning_rate(lr))
    inner = optax.chain(_clipped(cfg, h, preconditioner), *decay, step)
    if not cfg.adaptive_damping:
        return inner
    return adaptive.adaptive_damping(inner, h["damping"], every=cfg.adaptive_every)


def _preconditioner(cfg: TrainConfig, h: dict, input_groups):
    """``kfac_precondition`` or the exact Woodbury preconditioner of the Fisher family."""
    if cfg.optimizer in ("ef", "ief", "sf"):
        from kfac_jax_peft import fisher

        make = {"ef": fisher.ef_precondition, "ief": fisher.ief_precondition,
                "sf": fisher.sampled_fisher_precondition}[cfg.optimizer]
        return make(h["fisher_damping"], damping_scale=cfg.fisher_damping_scale)
    return kfac_precondition(h["damping"], decay=h["decay"], invert_every=cfg.invert_every,
                             damping_mode=cfg.damping_mode,
                             damping_scale=cfg.damping_scale,
                             distribute_inversions=cfg.distribute_inversions,
                             input_groups=input_groups if cfg.share_input_factors else None)


def _sophia_chain(cfg: TrainConfig, h: dict, lr: optax.Schedule
                  ) -> optax.GradientTransformationExtraArgs:
    """``[clip(max_norm)] -> optax.contrib.sophia``; ``clip="post"`` is refused."""
    from kfac_jax_peft.finetune.sophia import sophia_arm

    if cfg.clip == "post":
        raise ValueError("optimizer='sophia' supports clip='pre' (gradient clipping) or "
                         "'none'; Sophia clips each coordinate of its step itself")
    return optax.chain(_clipped(cfg, h, optax.identity()),
                       sophia_arm(cfg, lr, decay_mask,
                                  weight_decay=h["weight_decay"]))
