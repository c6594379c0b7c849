"""Gradient accumulation over micro-batches that keeps every micro-batch's statistics.

``optax.MultiSteps(tx, k)`` averages the gradients of ``k`` micro-batches and
calls ``tx`` once; it calls ``tx.update`` on every micro-batch but keeps the
new state only on the last, so ``kfac_precondition`` would see the
statistics of the last micro-batch alone. :func:`multi_steps` wraps it and
sums the raw statistics (:class:`~kfac_jax_peft.LayerStats` hold sums with
their token and example counts) of all ``k`` micro-batches, handing the sum
to the inner transformation on the last one. For micro-batches whose loss
is a mean over their examples, and a gradient that ``MultiSteps`` averages,
that gives exactly the factors of one step on the concatenated batch::

    A = sum_micro A_i / sum_micro tokens_i,   G = sum_micro G_i / sum_micro examples_i

(``G_i`` is ``n_i^2 sum g g^T`` with ``g`` the cotangent of micro-batch
``i``'s mean loss, i.e. the sum of the per-example outer products).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MultiStepsStatsState(NamedTuple):
    """``optax.MultiSteps``'s state and the statistics summed so far."""

    multi_steps: optax.MultiStepsState
    stats: Any


def multi_steps(tx: optax.GradientTransformation, every_k_schedule, probes
                ) -> optax.GradientTransformationExtraArgs:
    """``optax.MultiSteps(tx, every_k_schedule)`` that accumulates K-FAC statistics.

    Args:
      tx: the chain to apply every ``k`` micro-batches (with
        ``kfac_precondition`` in it).
      every_k_schedule: ``k``, an int or a schedule of the step count, as for
        ``optax.MultiSteps``.
      probes: the zero statistics tree the model captures into (the
        ``"kfac"`` collection); it gives the accumulator its shapes.

    Pass ``kfac_stats`` on every micro-batch of an accumulation (or on none:
    ``kfac_stats=None`` throughout is a plain step); the sum is handed to
    ``tx`` on the last micro-batch and reset after it. Returns a
    ``GradientTransformationExtraArgs``; ``optax.MultiSteps``'s
    ``has_updated`` applies to the ``multi_steps`` field of its state.
    """
    inner = optax.MultiSteps(tx, every_k_schedule)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, probes)

    def init_fn(params):
        return MultiStepsStatsState(inner.init(params), zeros)

    def update_fn(updates, state, params=None, *, kfac_stats=None, **extra_args):
        if kfac_stats is None:
            new, ms = inner.update(updates, state.multi_steps, params, **extra_args)
            return new, state._replace(multi_steps=ms)
        total = jax.tree_util.tree_map(jnp.add, state.stats, kfac_stats)
        new, ms = inner.update(updates, state.multi_steps, params, kfac_stats=total,
                               **extra_args)
        emitted = ms.mini_step == 0  # MultiSteps wraps mini_step to 0 after the last one
        acc = jax.tree_util.tree_map(lambda t: jnp.where(emitted, jnp.zeros_like(t), t), total)
        return new, MultiStepsStatsState(ms, acc)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
