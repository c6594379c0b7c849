"""Predictive distributions of a model's outputs, and labels sampled from them.

One definition for the places that sample labels: the sampled-Fisher
K-FAC statistics (:func:`kfac_jax_peft.kfac_value_and_grad` with
``fisher_type="sampled"``) and the sampled-Fisher per-sample gradients
(:func:`kfac_jax_peft.fisher.per_sample_value_and_grad`) take the
cotangents of :func:`sample_cotangents`; Sophia's Gauss-Newton-Bartlett
estimator (:mod:`kfac_jax_peft.finetune.sophia`) takes the labels of
:func:`sample_labels`.

* ``"categorical"``: outputs are logits; ``-grad_z log p(y | z) = softmax(z) - onehot(y)``.
* ``"gaussian"``: outputs are means of a unit-variance Gaussian;
  ``-grad_z log p(y | z) = -(y - z) = -eps`` with ``eps ~ N(0, I)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LIKELIHOODS = ("categorical", "gaussian")

#: The Fisher types of the library: which curvature a statistic or a
#: per-sample quantity describes. ``"empirical"``: outer products of the
#: gradients of the training loss (the empirical Fisher, EF); ``"ief"``: the
#: same with each example's gradient divided by its logits-level gradient
#: norm (the improved empirical Fisher); ``"sampled"``: gradients of the
#: log-likelihood of labels drawn from the model (a Monte-Carlo estimate of
#: the Fisher); ``"exact"``: the Fisher through the exact output Fisher
#: (K-FAC statistics only).
FISHER_TYPES = ("empirical", "ief", "sampled", "exact")


def check_likelihood(likelihood: str) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
    return likelihood


def sample_cotangents(outputs: jax.Array, rng: jax.Array, num_samples: int,
                      likelihood: str = "categorical") -> jax.Array:
    """``num_samples`` cotangents ``-grad_z log p(y_hat | z)`` for ``y_hat ~ p(. | z)``.

    Every position of ``outputs [..., C]`` is an independent prediction whose
    negative log-likelihoods are summed; the result has shape
    ``[num_samples, *outputs.shape]``, in the outputs' dtype.
    """
    check_likelihood(likelihood)
    z = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
    if likelihood == "categorical":
        y = jax.random.categorical(rng, z, axis=-1, shape=(num_samples,) + z.shape[:-1])
        cot = jax.nn.softmax(z, axis=-1)[None] - jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
    else:
        cot = -jax.random.normal(rng, (num_samples,) + z.shape, z.dtype)
    return cot.astype(outputs.dtype)


def sample_labels(outputs: jax.Array, rng: jax.Array, likelihood: str = "categorical",
                  variance: float = 1.0) -> jax.Array:
    """One label ``y_hat ~ p(. | z)`` per prediction of ``outputs``.

    ``"categorical"``: ``outputs [..., C]`` are logits and the result is
    ``int32 [...]``, ``y_hat ~ softmax(z)`` over the last axis.
    ``"gaussian"``: ``outputs`` are means and the result, of their shape and
    dtype, is ``y_hat = z + sqrt(variance) * eps`` with ``eps ~ N(0, I)``
    (``variance`` is ignored for ``"categorical"``). The labels carry no
    gradient.
    """
    check_likelihood(likelihood)
    z = jax.lax.stop_gradient(outputs)
    if likelihood == "categorical":
        return jax.random.categorical(rng, z.astype(jnp.promote_types(z.dtype, jnp.float32)),
                                      axis=-1).astype(jnp.int32)
    eps = jax.random.normal(rng, z.shape, jnp.promote_types(z.dtype, jnp.float32))
    return (z + jnp.sqrt(variance) * eps).astype(z.dtype)
