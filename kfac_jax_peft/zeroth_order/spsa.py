"""SPSA (MeZO's estimator): a gradient estimate from forward passes only.

For a loss ``L`` and ``z ~ N(0, I)`` over all trainable leaves::

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps) * z

is, for small ``eps``, ``z z^T grad L(theta)``; its mean over ``z`` is the
gradient (exactly so on a quadratic, where the central difference has no
``O(eps^2)`` term). n-SPSA averages ``g`` over ``n`` independent directions,
which divides the covariance by ``n``. On ``L = 0.5 theta^T H theta -
b^T theta`` with ``grad = H theta - b`` and ``d`` parameters, the covariance
of one draw is ``grad grad^T + |grad|^2 I`` (Isserlis), so the variance of
coordinate ``i`` is ``grad_i^2 + |grad|^2`` and its sum over coordinates is
``(d + 1) |grad|^2``.

:func:`spsa_value_and_grad` is a gradient source, not a transformation: it
returns ``(loss, g)`` and any optax chain consumes ``g``. MeZO is
``spsa_value_and_grad`` + ``optax.sgd``, MeZO-Adam the same with
``optax.adam``. The loss it returns is the mean of the ``2 n`` perturbed
evaluations, an ``O(eps^2)`` approximation of ``L(theta)`` that costs no
extra forward pass.

Memory. Each direction is regenerated from its key where it is used (see
:mod:`.directions`): perturb to ``theta + eps z``, evaluate, move the same
copy by ``-2 eps z`` (``z`` drawn again), evaluate, and accumulate ``proj *
z`` (drawn a third time). The caller's ``theta`` is never modified (JAX
arrays are immutable), so MeZO's final "restore" step is the identity here;
the price is one parameter-sized perturbed copy, which XLA updates in place
when it is dead after use. ``lax.optimization_barrier`` ties each fresh draw
of ``z`` to the loss evaluated before it, so XLA can neither merge the
three draws (common-subexpression elimination would otherwise compute ``z``
once and keep it alive through both forward passes) nor hoist them. Nothing
is differentiated: the jitted estimate contains no transpose or VJP.

What XLA makes of it (``compile().memory_analysis()``, CPU, float32, a
two-layer tanh MLP; ``temp`` excludes arguments and outputs)::

    MLP 784-512-10 (1.63 MB of parameters)      batch 512    batch 2048
      spsa_value_and_grad, n = 1                  4.89 MB      4.89 MB
      spsa_value_and_grad, n = 4 (loop)          16.24 MB     16.24 MB
      hizoo_value_and_grad                        9.77 MB      9.77 MB
      jax.value_and_grad                          1.07 MB      8.39 MB
    MLP 64-256-4 (0.07 MB), batch 1024: n = 1 0.21 MB, value_and_grad 2.10 MB

So the zeroth-order estimate costs three parameter-sized buffers (4.89 MB
is exactly 3 x 1.63 MB; presumably the random bits, the direction drawn
from them and the perturbed copy) and nothing that grows with the batch,
while ``value_and_grad`` keeps the activations. MeZO's "no extra memory
beyond inference" holds only up to those parameter-sized buffers: for
LoRA, whose trainable tree is small next to the activations, the estimate
is far cheaper; for full fine-tuning of a small model at a small batch it
is not. The n-SPSA loop keeps about ten parameter-sized buffers (its
carried accumulator besides the draws), the same for n = 4 and n = 16;
HiZOO (:mod:`.hizoo`) about six (``Sigma^{1/2}`` and the draws of its
update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kfac_jax_peft.zeroth_order.directions import (
    check_eps,
    check_num_directions,
    perturb,
    scaled_direction,
)


def two_point_losses(value_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array,
                     eps: float, scale: Any = None) -> tuple[jax.Array, jax.Array]:
    """``(L(theta + eps s z), L(theta - eps s z))`` with ``z`` from ``key`` and
    ``s = scale`` (1 when None), by two forward passes on one perturbed copy."""
    # A key computed in the program (fold_in) otherwise lets XLA fuse the
    # draw with the key's derivation and keep two more parameter-sized
    # buffers; the barrier makes the key an opaque value.
    key = jax.lax.optimization_barrier(key)
    shifted = perturb(params, key, eps, scale)
    l_plus = value_fn(shifted)
    # The barrier orders the second draw of z after the first pass.
    key, shifted, l_plus = jax.lax.optimization_barrier((key, shifted, l_plus))
    shifted = perturb(shifted, key, -2.0 * eps, scale)
    l_minus = value_fn(shifted)
    return l_plus, l_minus


def accumulate_direction(acc: Any, key: jax.Array, coeff, after: jax.Array,
                         scale: Any = None) -> Any:
    """``acc + coeff * scale * z`` in float32, ``z`` drawn from ``key`` once
    ``after`` (a loss) is computed."""
    key, _ = jax.lax.optimization_barrier((key, after))
    step = scaled_direction(acc, key, coeff, scale)
    return jax.tree_util.tree_map(jnp.add, acc, step)


def spsa_estimate(value_fn: Callable[[Any], jax.Array], params: Any, rng: jax.Array,
                  eps: float, num_directions: int) -> tuple[jax.Array, Any]:
    """``(mean of the 2 n losses, n-SPSA estimate)`` for a loss of the
    parameters alone; the estimate has the parameters' dtypes."""

    def direction(i):
        key = jax.random.fold_in(rng, i)
        l_plus, l_minus = two_point_losses(value_fn, params, key, eps)
        proj = (l_plus - l_minus).astype(jnp.float32) / (2.0 * eps)
        return key, proj / num_directions, l_minus, (l_plus + l_minus).astype(jnp.float32)

    if num_directions == 1:
        # No accumulator: the estimate is one scaled direction.
        key, coeff, after, total = direction(0)
        key, _ = jax.lax.optimization_barrier((key, after))
        acc = scaled_direction(params, key, coeff)
    else:
        def body(i, carry):
            acc, total = carry
            key, coeff, after, pair = direction(i)
            return accumulate_direction(acc, key, coeff, after), total + pair

        acc0 = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        acc, total = jax.lax.fori_loop(0, num_directions, body,
                                       (acc0, jnp.zeros((), jnp.float32)))
    grad = jax.tree_util.tree_map(lambda g, x: g.astype(jnp.result_type(x)), acc, params)
    return total / (2 * num_directions), grad


def spsa_value_and_grad(loss_fn: Callable[..., jax.Array], eps: float = 1e-3,
                        num_directions: int = 1) -> Callable[..., tuple[jax.Array, Any]]:
    """SPSA estimate of ``loss_fn``'s gradient with respect to its first argument.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      eps: the perturbation size (MeZO and LoHO use ``1e-3``); must be > 0.
      num_directions: ``n`` of n-SPSA, >= 1; the estimates of ``n`` directions
        (keys ``jax.random.fold_in(rng, i)``) are averaged in a loop, so memory
        does not grow with ``n``.

    Returns:
      ``value_and_grad(params, *args, rng) -> (loss, grad_estimate)``: pure and
      jittable; ``loss`` is the mean of the ``2 n`` perturbed losses, the
      estimate has the structure and dtypes of ``params``.
    """
    eps = check_eps(eps)
    num_directions = check_num_directions(num_directions)

    def value_and_grad(params, *args):
        if not args:
            raise TypeError("value_and_grad(params, *args, rng): the PRNG key comes last")
        *args, rng = args
        return spsa_estimate(lambda p: loss_fn(p, *args), params, rng, eps, num_directions)

    return value_and_grad
