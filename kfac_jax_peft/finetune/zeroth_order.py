"""The zeroth-order arms of the pipeline: their chains, gradient sources and logs.

Each arm is a gradient source of :mod:`kfac_jax_peft.zeroth_order` in front
of an optax chain (``clip`` is ``"pre"`` or ``"none"``; ``"pre"`` clips
the gradient tree, estimate and exact parts together)::

    mezo:             spsa               -> [clip] -> decay -> -zo_lr
    mezo-adam:        spsa               -> [clip] -> adamw(zo_lr)
    hizoo:            hizoo              -> Sigma carrier -> [clip] -> decay -> -zo_lr
    loho-sgd-inter:   loho (inter-layer) -> [clip] -> partition(fo: decay -> -lr,
                                                               zo: decay -> -zo_lr)
    loho-adam-inter:  loho (inter-layer) -> [clip] -> partition(fo: adamw(lr),
                                                               zo: decay -> -zo_lr)
    loho-adam-intra:  the same with intra-layer labels

``lr`` is the schedule of ``learning_rate`` and ``zo_lr`` the same schedule
(warm-up, then linear decay) peaking at ``zo_lr``.

HiZOO's ``Sigma`` lives in the optimizer state, so that it is checkpointed
and restored with the rest: the chain starts with :func:`carry_hizoo_state`,
a transformation that passes the updates through and whose state is a
:class:`~kfac_jax_peft.zeroth_order.HiZOOState`; the step reads it
(:func:`find_hizoo_state`), and hands the updated one back through the
extra argument ``hizoo_state`` of ``update`` (``optax.chain`` gives
transformations no other way in).

Randomness: the step's key is ``fold_in(PRNGKey(seed), step)``, split into
the dropout key (the same mask for every forward pass of the step, so that
the two perturbed losses differ only by the perturbation) and the key of
the directions; both depend only on ``(seed, step)``, so a resumed run is
bit-identical to an uninterrupted one. MeZO's reference code evaluates its
forward passes without dropout: ``--dropout 0`` does the same.

The training records of these arms log ``lr`` (``zo_lr``'s schedule for
MeZO, MeZO-Adam and HiZOO; ``learning_rate``'s, the first-order part's, for
LoHO, with ``zo_lr`` beside it) and, for HiZOO, the spread of ``Sigma``:
``sigma_min``, ``sigma_median``, ``sigma_max`` over all its entries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from kfac_jax_peft import zeroth_order as Z
from kfac_jax_peft.clipping import CLIP_SCOPES, clipped
from kfac_jax_peft.finetune.config import TrainConfig

#: A leaf's layer: ``encoder/layer_3/...`` (BERT, RoBERTa) or
#: ``encoder/block_3/layer_0/...`` (T5, whose ``layer_k`` are sub-layers: the
#: leftmost match is the block).
LAYER_PATTERN = r"(?:block|layer)_(\d+)"


def zo_learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule of the run, peaking at ``zo_lr``."""
    from kfac_jax_peft.finetune.optim import learning_rate_schedule

    return learning_rate_schedule(cfg.replace(learning_rate=cfg.zo_lr))


def learning_rates(cfg: TrainConfig, step: int) -> dict[str, float]:
    """The learning rates a training record logs at 0-based ``step``:
    ``lr`` (see the module doc) and, for LoHO, ``zo_lr``."""
    from kfac_jax_peft.finetune.optim import learning_rate_schedule

    zo_lr = float(zo_learning_rate_schedule(cfg)(step))
    if not cfg.optimizer.startswith("loho"):
        return {"lr": zo_lr}
    return {"lr": float(learning_rate_schedule(cfg)(step)), "zo_lr": zo_lr}


# --------------------------------------------------------------------------- HiZOO's state

def carry_hizoo_state(sigma: float = 1.0) -> optax.GradientTransformationExtraArgs:
    """A transformation whose state is HiZOO's (``Sigma_0 = sigma * I``):
    ``update`` passes the updates through and takes the new state from the
    extra argument ``hizoo_state`` (kept as it is when none is given)."""

    def init_fn(params):
        return Z.hizoo_init(params, sigma)

    def update_fn(updates, state, params=None, *, hizoo_state=None, **extra_args):
        del params, extra_args
        return updates, state if hizoo_state is None else hizoo_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_hizoo_state(opt_state) -> Z.HiZOOState | None:
    """The :class:`~kfac_jax_peft.zeroth_order.HiZOOState` in an optimizer
    state, or None."""
    is_state = lambda x: isinstance(x, Z.HiZOOState)
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state):
        if is_state(s):
            return s
    return None


def sigma_spread(opt_state) -> dict[str, float]:
    """``sigma_min``, ``sigma_median``, ``sigma_max`` over every entry of
    HiZOO's ``Sigma`` in ``opt_state`` (host arrays); empty without one."""
    state = find_hizoo_state(opt_state)
    if state is None:
        return {}
    sigma = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.sigma)])
    return {"sigma_min": float(sigma.min()), "sigma_median": float(np.median(sigma)),
            "sigma_max": float(sigma.max())}


# --------------------------------------------------------------------------- LoHO's partition

def num_layers(params) -> int:
    """The number of distinct layer indices (:data:`LAYER_PATTERN`) among the
    leaves of ``params``."""
    pattern = re.compile(LAYER_PATTERN)
    return len({m.group(1) for m in map(pattern.search, Z.leaf_paths(params)) if m})


def loho_labels(cfg: TrainConfig) -> Callable[[Any], Any]:
    """``params -> "fo"/"zo" labels`` of a LoHO arm: inter-layer, the last
    ``fo_layers`` layers (unset: half) first-order; intra-layer, a fraction
    ``fo_ratio`` of each layer. The head (no layer) is first-order. A
    partition without a zeroth-order leaf is refused (that arm would be
    first-order training)."""
    intra = cfg.optimizer.endswith("-intra")

    def labels(params):
        if intra:
            tree = Z.intra_layer_labels(cfg.fo_ratio, LAYER_PATTERN, unindexed=Z.FO)(params)
        else:
            n = num_layers(params)
            k = n // 2 if cfg.fo_layers is None else cfg.fo_layers
            if k > n:
                raise ValueError(f"fo_layers={k} but the trainable parameters span {n} "
                                 "layers")
            tree = Z.inter_layer_labels(k, "last", LAYER_PATTERN, unindexed=Z.FO)(params)
        if Z.ZO not in jax.tree_util.tree_leaves(tree):
            raise ValueError(
                f"optimizer={cfg.optimizer!r} leaves no trainable parameter to the "
                f"zeroth-order part (fo_layers={cfg.fo_layers}, fo_ratio={cfg.fo_ratio}, "
                f"peft={cfg.peft!r}; layers are found by {LAYER_PATTERN!r}): lower "
                "fo_layers, or train first-order with optimizer 'sgd' or 'adamw'")
        return tree

    return labels


# --------------------------------------------------------------------------- chains and sources

def _sgd(cfg: TrainConfig, schedule) -> optax.GradientTransformation:
    from kfac_jax_peft.finetune.optim import decay_mask

    wd = [optax.add_decayed_weights(cfg.weight_decay, decay_mask)] if cfg.weight_decay else []
    return optax.chain(*wd, optax.scale_by_learning_rate(schedule))


def _adamw(cfg: TrainConfig, schedule) -> optax.GradientTransformation:
    from kfac_jax_peft.finetune.optim import decay_mask

    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)


def zeroth_order_optimizer(cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The chain of a zeroth-order arm (see the module doc)."""
    from kfac_jax_peft.finetune.optim import learning_rate_schedule

    zo_lr = zo_learning_rate_schedule(cfg)
    clip = clipped(optax.identity(), cfg.clip, cfg.max_norm, group=CLIP_SCOPES[cfg.clip_scope])
    name = cfg.optimizer
    if name == "mezo":
        return optax.chain(clip, _sgd(cfg, zo_lr))
    if name == "mezo-adam":
        return optax.chain(clip, _adamw(cfg, zo_lr))
    if name == "hizoo":
        return optax.chain(carry_hizoo_state(), clip, _sgd(cfg, zo_lr))
    if name in ("loho-sgd-inter", "loho-adam-inter", "loho-adam-intra"):
        lr = learning_rate_schedule(cfg)
        first = _sgd(cfg, lr) if name == "loho-sgd-inter" else _adamw(cfg, lr)
        return optax.chain(clip, Z.loho(first, _sgd(cfg, zo_lr), loho_labels(cfg)))
    raise ValueError(f"{name!r} is not a zeroth-order optimizer")


def zeroth_order_value_and_grad(cfg: TrainConfig, loss_fn: Callable[..., jax.Array]
                                ) -> Callable[..., tuple[jax.Array, Any, dict]]:
    """The gradient source of a zeroth-order arm for ``loss_fn(params, *args)``.

    Returns ``grad_fn(params, opt_state, *args, key) -> (loss, grads, extra)``:
    ``key`` draws the directions, ``extra`` holds the extra arguments of the
    chain's ``update`` (``hizoo_state`` for HiZOO, from the ``Sigma`` found in
    ``opt_state``).
    """
    name = cfg.optimizer
    if name == "hizoo":
        source = Z.hizoo_value_and_grad(loss_fn, cfg.zo_eps, cfg.hizoo_smooth)

        def hizoo(params, opt_state, *args):
            state = find_hizoo_state(opt_state)
            if state is None:
                raise ValueError("optimizer='hizoo': no HiZOOState in the optimizer state "
                                 "(the chain must start with carry_hizoo_state())")
            loss, grads, state = source(params, state, *args)
            return loss, grads, {"hizoo_state": state}

        return hizoo
    if name in ("mezo", "mezo-adam"):
        source = Z.spsa_value_and_grad(loss_fn, cfg.zo_eps, cfg.zo_directions)
    else:
        source = Z.loho_value_and_grad(loss_fn, loho_labels(cfg), cfg.zo_eps,
                                       cfg.zo_directions)

    def plain(params, opt_state, *args):
        del opt_state
        loss, grads = source(params, *args)
        return loss, grads, {}

    return plain
