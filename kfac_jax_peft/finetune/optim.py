"""The optimizer chain of a run (the paper's four arms, and SGD)."""

from __future__ import annotations

import jax
import optax

from kfac_jax_peft.clipping import clipped
from kfac_jax_peft.finetune.config import TrainConfig
from kfac_jax_peft.kfac.transform import kfac_precondition


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``round(warmup_ratio
    * steps)`` steps, then linear decay to 0 at ``steps``."""
    warmup = int(round(cfg.warmup_ratio * cfg.steps))
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.steps - warmup, 1))
    if warmup == 0:
        return decay
    rise = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    return optax.join_schedules([rise, decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only (not biases, not LayerNorm scales)."""
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def build_optimizer(cfg: TrainConfig, *, input_groups=None
                    ) -> optax.GradientTransformationExtraArgs:
    """The chain of ``cfg.optimizer`` with ``cfg.clip``::

        adamw: [clip(max_norm)] -> adamw(schedule, weight_decay)
        sgd:   [clip(max_norm)] -> decay -> -schedule
        ef, ief, sf: like kfac, with the exact Woodbury preconditioner
        kfac:  post: kfac_precondition -> clip(max_norm) -> decay -> -schedule
               pre:  clip(max_norm) -> kfac_precondition -> decay -> -schedule
               none: kfac_precondition -> decay -> -schedule

    The clip is placed by :func:`kfac_jax_peft.clipping.clipped` (its state
    records the clip rate). For SGD, ``"post"`` and ``"pre"`` both clip the
    gradient (there is no preconditioner); ``"post"`` is refused for AdamW.
    ``input_groups`` is passed to ``kfac_precondition`` when
    ``cfg.share_input_factors``. The chain reduces nothing over devices: the
    loop runs it under ``jax.jit`` over a device mesh, where the batch sums
    are global (:mod:`kfac_jax_peft.finetune.devices`).
    """
    lr = learning_rate_schedule(cfg)
    wd = optax.add_decayed_weights(cfg.weight_decay, decay_mask) if cfg.weight_decay else None
    tail = ([wd] if wd is not None else []) + [optax.scale_by_learning_rate(lr)]
    if cfg.optimizer == "adamw":
        if cfg.clip == "post":
            raise ValueError("optimizer='adamw' supports clip='pre' (gradient clipping) or "
                             "'none'; post-clipping is K-FAC's Newton-step clipping")
        return optax.chain(clipped(optax.identity(), cfg.clip, cfg.max_norm),
                           optax.adamw(lr, weight_decay=cfg.weight_decay, mask=decay_mask))
    if cfg.optimizer == "sgd":
        return optax.chain(clipped(optax.identity(), cfg.clip, cfg.max_norm), *tail)
    return optax.chain(clipped(_preconditioner(cfg, input_groups), cfg.clip,
                               cfg.max_norm), *tail)


def _preconditioner(cfg: TrainConfig, input_groups):
    """``kfac_precondition`` or the exact Woodbury preconditioner of the Fisher family."""
    if cfg.optimizer in ("ef", "ief", "sf"):
        from kfac_jax_peft import fisher

        make = {"ef": fisher.ef_precondition, "ief": fisher.ief_precondition,
                "sf": fisher.sampled_fisher_precondition}[cfg.optimizer]
        return make(cfg.fisher_damping, damping_scale=cfg.fisher_damping_scale)
    return kfac_precondition(cfg.damping, decay=cfg.decay, invert_every=cfg.invert_every,
                             damping_mode=cfg.damping_mode,
                             distribute_inversions=cfg.distribute_inversions,
                             input_groups=input_groups if cfg.share_input_factors else None)
