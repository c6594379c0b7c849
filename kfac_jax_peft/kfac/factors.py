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
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from kfac_jax_peft.capture import LayerStats


class Factors(NamedTuple):
    """Moving-average sums of one layer and the sum of their weights."""

    A: jnp.ndarray
    G: jnp.ndarray
    weight: jnp.ndarray


def zeros_factors(d_a: int, d_g: int, dtype) -> Factors:
    return Factors(jnp.zeros((d_a, d_a), dtype), jnp.zeros((d_g, d_g), dtype),
                   jnp.zeros((), dtype))


def normalise(stats: LayerStats, dtype) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """``(A_hat, G_hat, ok)`` from raw sums; ``ok`` is False when the batch had
    no real token or the statistics are not finite."""
    n_tok = stats.num_tokens.astype(dtype)
    n_ex = stats.num_examples.astype(dtype)
    A = stats.A.astype(dtype) / jnp.maximum(n_tok, 1)
    G = stats.G.astype(dtype) / jnp.maximum(n_ex, 1)
    ok = (n_tok > 0) & (n_ex > 0) & jnp.all(jnp.isfinite(A)) & jnp.all(jnp.isfinite(G))
    return A, G, ok


def ema_update(f: Factors, A: jnp.ndarray, G: jnp.ndarray, ok: jnp.ndarray,
               decay) -> Factors:
    """One moving-average step; a step with ``ok=False`` leaves ``f`` as it is
    (so a NaN in a batch never reaches the state)."""
    decay = jnp.asarray(decay, f.A.dtype)
    new = Factors(decay * f.A + (1 - decay) * jnp.where(ok, A, 0.0),
                  decay * f.G + (1 - decay) * jnp.where(ok, G, 0.0),
                  decay * f.weight + (1 - decay))
    return Factors(*(jnp.where(ok, n, o) for n, o in zip(new, f)))


def estimate(f: Factors) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Bias-corrected factors ``(S_A / w, S_G / w)`` (zeros before any data)."""
    w = jnp.where(f.weight > 0, f.weight, 1.0)
    return f.A / w, f.G / w
