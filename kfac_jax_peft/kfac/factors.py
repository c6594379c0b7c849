"""Kronecker factors: normalisation and the bias-corrected moving average.

The factors of a layer are running estimates of

    A_hat = E_tokens[abar abar^T]        G_hat = E_examples[g g^T]

(see :mod:`kfac_jax_peft.capture` for the exact normalisation). They are
kept as an exponential moving average with decay ``rho`` and an explicit
weight ``w`` so that the estimate is unbiased from the first step on::

    S_t = rho S_{t-1} + (1 - rho) X_t        w_t = rho w_{t-1} + (1 - rho)
    estimate_t = S_t / w_t

With ``rho = 0`` the estimate is the current batch alone; with ``rho -> 1``
it averages all batches seen, each with equal weight at first (``w`` is the
sum of the weights, as in kfac-jax's weighted moving average).

A factor that is not stored (``None``: an input factor shared with other
layers, or a transformation that keeps only the curvature) is skipped by
:func:`ema_update` and :func:`estimate`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_peft.capture import LayerStats


class Factors(NamedTuple):
    """Moving-average sums of one layer and the sum of their weights
    (``A`` or ``G`` is ``None`` where it is not stored here)."""

    A: jnp.ndarray | None
    G: jnp.ndarray | None
    weight: jnp.ndarray


def zeros_factors(d_a: int, d_g: int, dtype, store_a: bool = True,
                  store_g: bool = True) -> Factors:
    return Factors(jnp.zeros((d_a, d_a), dtype) if store_a else None,
                   jnp.zeros((d_g, d_g), dtype) if store_g else None,
                   jnp.zeros((), dtype))


def normalise_sum(total: jnp.ndarray, count: jnp.ndarray, dtype):
    """``(total / count, ok)``; ``ok`` is False when ``count`` is zero or the
    result is not finite."""
    count = count.astype(dtype)
    x = total.astype(dtype) / jnp.maximum(count, 1)
    return x, (count > 0) & jnp.all(jnp.isfinite(x))


def normalise(stats: LayerStats, dtype) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """``(A_hat, G_hat, ok)`` from raw sums; ``ok`` is False when the batch had
    no real token or the statistics are not finite."""
    A, ok_a = normalise_sum(stats.A, stats.num_tokens, dtype)
    G, ok_g = normalise_sum(stats.G, stats.num_examples, dtype)
    return A, G, ok_a & ok_g


def ema(s: jnp.ndarray, x: jnp.ndarray, ok: jnp.ndarray, decay) -> jnp.ndarray:
    """``decay s + (1 - decay) x`` where ``ok``, else ``s`` (so a NaN in a
    batch never reaches the state)."""
    decay = jnp.asarray(decay, s.dtype)
    return jnp.where(ok, decay * s + (1 - decay) * jnp.where(ok, x, 0.0), s)


def ema_weight(w: jnp.ndarray, ok: jnp.ndarray, decay) -> jnp.ndarray:
    decay = jnp.asarray(decay, w.dtype)
    return jnp.where(ok, decay * w + (1 - decay), w)


def ema_update(f: Factors, A: jnp.ndarray | None, G: jnp.ndarray | None, ok: jnp.ndarray,
               decay) -> Factors:
    """One moving-average step; a step with ``ok=False`` leaves ``f`` as it is."""
    return Factors(None if f.A is None else ema(f.A, A, ok, decay),
                   None if f.G is None else ema(f.G, G, ok, decay),
                   ema_weight(f.weight, ok, decay))


def estimate_one(s: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    """Bias-corrected ``s / w`` (zeros before any data)."""
    return s / jnp.where(weight > 0, weight, 1.0)


def estimate(f: Factors) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
    """Bias-corrected factors ``(S_A / w, S_G / w)`` (zeros before any data)."""
    return tuple(None if s is None else estimate_one(s, f.weight) for s in (f.A, f.G))


def ema_from_eigen(q: jnp.ndarray, vals: jnp.ndarray, weight: jnp.ndarray, x: jnp.ndarray,
                   ok: jnp.ndarray, decay) -> tuple[jnp.ndarray, jnp.ndarray]:
    """:func:`ema` and :func:`ema_weight` of a factor kept as the
    eigendecomposition ``q diag(vals) q^T`` of its estimate ``S / w``::

        S_new = q diag(c vals) q^T + (1 - decay) x,   w_new = c + (1 - decay)
        c = decay w                                   (where ok; else S_new = S, w_new = w)

    Returns ``(S_new, w_new)``. The old sum enters through ``c``, which
    depends on ``ok`` and so on the statistics: the ``d^3`` product cannot be
    scheduled before the statistics exist (it would hold a ``[d, d]`` buffer
    through the backward pass).
    """
    decay = jnp.asarray(decay, weight.dtype)
    c = jnp.where(ok, decay, 1.0) * weight
    keep = jnp.matmul(q * (c * vals)[None, :], q.T, precision=jax.lax.Precision.HIGHEST)
    return (keep + jnp.where(ok, 1 - decay, 0.0) * jnp.where(ok, x, 0.0),
            c + jnp.where(ok, 1 - decay, 0.0))
