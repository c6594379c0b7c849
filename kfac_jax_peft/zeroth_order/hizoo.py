"""HiZOO: SPSA along directions shaped by a diagonal inverse-Hessian estimate.

With ``Sigma_t`` a diagonal estimate of the inverse Hessian (kept per leaf)
and ``z ~ N(0, I)``::

    l_0 = L(theta)    l_+ = L(theta + eps Sigma^{1/2} z)    l_- = L(theta - eps Sigma^{1/2} z)
    g   = (l_+ - l_-) / (2 eps) * Sigma^{1/2} z                        (three forward passes)

so ``E[g] = Sigma grad L``: SGD on ``g`` is a diagonally preconditioned step.
The same three losses update the curvature ``D = Sigma^{-1}``. The second
difference ``l_+ + l_- - 2 l_0 = eps^2 z^T Sigma^{1/2} H Sigma^{1/2} z`` (up to
``O(eps^4)``) gives, with the diagonal of ``Sigma^{-1/2} z z^T Sigma^{-1/2}``,
the estimate and moving average of HiZOO's reference code::

    D_hat = |l_+ + l_- - 2 l_0| / (2 eps^2) * D * z^2
    D_t   = (1 - alpha) D_{t-1} + alpha D_hat,   i.e.
    Sigma_t = Sigma_{t-1} / ((1 - alpha) + alpha |l_+ + l_- - 2 l_0| / (2 eps^2) z^2)

``alpha`` is ``hessian_smooth``. The HiZOO summary we follow gives the
formulas but no constants; HiZOO's reference code schedules ``alpha`` as a
constant chosen among ``0, 1e-2, 1e-4, ..., 1e-12`` (``1e-8`` where none is
named; our default), a tiny step because one direction's estimate is very
noisy. The absolute value keeps ``Sigma`` positive. The reference code's
only guard against a degenerate ``Sigma`` is ``1e-12`` added to
``D^{1/2}`` (which bounds ``Sigma^{1/2}`` by ``1e12``); here ``Sigma`` is
clipped into ``sigma_bounds`` (default ``(1e-10, 1e10)``, our choice),
configurable.

What it converges to. On a quadratic with diagonal ``H = diag(h)`` in ``d``
parameters, ``l_+ + l_- - 2 l_0 = eps^2 sum_j (h_j / D_j) z_j^2`` exactly,
and the expected update leaves ``D`` unchanged when ``E[sum_j r_j z_j^2
z_i^2] = 2`` for every ``i`` (``r_j = h_j / D_j``), that is ``sum_j r_j + 2
r_i = 2``: all ``r_i = 2 / (d + 2)``. So ``Sigma`` tends to ``2 / (d + 2) *
diag(H)^{-1}``, not ``diag(H)^{-1}``: the estimator uses ``z z^T`` where an
unbiased one would use ``z z^T - I``. The direction, which is what
preconditions, is right; the scale ``2 / (d + 2)`` is absorbed by the
learning rate (HiZOO's learning rates are tuned with it). We keep the
source's update; the tests check this fixed point.

Differences from the reference code, on purpose: ``g`` uses the ``Sigma``
that shaped the perturbation (the reference updates ``Sigma`` first, which
biases ``g`` by the change), and the loss returned is ``l_0``, the exact
loss at ``theta``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_peft.zeroth_order.directions import check_eps, normal_like, scaled_direction
from kfac_jax_peft.zeroth_order.spsa import two_point_losses


class HiZOOState(NamedTuple):
    """``count``: steps taken; ``sigma``: the diagonal of ``Sigma_t`` per leaf
    (float32, shaped like the parameters)."""

    count: jax.Array
    sigma: Any


def hizoo_init(params: Any, sigma: float = 1.0) -> HiZOOState:
    """``Sigma_0 = sigma * I`` (HiZOO starts from the identity)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    return HiZOOState(
        count=jnp.zeros((), jnp.int32),
        sigma=jax.tree_util.tree_map(lambda x: jnp.full(jnp.shape(x), sigma, jnp.float32),
                                     params))


def update_sigma(sigma: Any, key: jax.Array, second_difference: jax.Array, eps: float,
                 hessian_smooth: float, bounds: tuple[float, float]) -> Any:
    """One moving-average step of ``Sigma`` (see the module doc), ``z`` from ``key``."""
    curvature = jnp.abs(second_difference.astype(jnp.float32)) / (2.0 * eps ** 2)
    z = normal_like(key, sigma)
    return jax.tree_util.tree_map(
        lambda s, d: jnp.clip(s / ((1.0 - hessian_smooth) + hessian_smooth * curvature * d * d),
                              *bounds),
        sigma, z)


def _check(hessian_smooth, sigma_bounds):
    if not 0 <= hessian_smooth < 1:
        raise ValueError(f"hessian_smooth must be in [0, 1), got {hessian_smooth!r}")
    lo, hi = sigma_bounds
    if not 0 < lo <= hi:
        raise ValueError(f"sigma_bounds must satisfy 0 < low <= high, got {sigma_bounds!r}")
    return float(hessian_smooth), (float(lo), float(hi))


def hizoo_value_and_grad(loss_fn: Callable[..., jax.Array], eps: float = 1e-3,
                         hessian_smooth: float = 1e-8,
                         sigma_bounds: tuple[float, float] = (1e-10, 1e10)
                         ) -> Callable[..., tuple[jax.Array, Any, HiZOOState]]:
    """HiZOO's gradient estimate and ``Sigma`` update, from three forward passes.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      eps: the perturbation size (> 0; HiZOO uses ``1e-3``).
      hessian_smooth: ``alpha`` of the moving average of ``Sigma^{-1}``, in
        ``[0, 1)``; 0 keeps ``Sigma`` fixed.
      sigma_bounds: ``(low, high)`` that ``Sigma`` is clipped into.

    Returns:
      ``value_and_grad(params, state, *args, rng) -> (loss, grad_estimate,
      new_state)`` with ``state`` from :func:`hizoo_init`; ``loss`` is
      ``L(theta)``. Feed the estimate to ``optax.sgd`` (HiZOO) or any chain.
    """
    eps = check_eps(eps)
    hessian_smooth, sigma_bounds = _check(hessian_smooth, sigma_bounds)

    def value_and_grad(params, state: HiZOOState, *args):
        if not args:
            raise TypeError("value_and_grad(params, state, *args, rng): the PRNG key comes last")
        *args, rng = args
        value_fn = lambda p: loss_fn(p, *args)
        loss = value_fn(params)
        scale = jax.tree_util.tree_map(jnp.sqrt, state.sigma)
        l_plus, l_minus = two_point_losses(value_fn, params, rng, eps, scale)
        key, _ = jax.lax.optimization_barrier((rng, l_minus))
        proj = (l_plus - l_minus).astype(jnp.float32) / (2.0 * eps)
        grad = jax.tree_util.tree_map(lambda g, x: g.astype(jnp.result_type(x)),
                                      scaled_direction(params, key, proj, scale), params)
        second = (l_plus.astype(jnp.float32) + l_minus.astype(jnp.float32)
                  - 2.0 * loss.astype(jnp.float32))
        sigma = update_sigma(state.sigma, key, second, eps,
                             hessian_smooth, sigma_bounds)
        return loss, grad, HiZOOState(count=state.count + 1, sigma=sigma)

    return value_and_grad
