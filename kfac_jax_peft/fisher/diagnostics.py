r"""How close an update is to the natural gradient: the paper's indicators.

**The gamma indicator** (Wu et al. 2024, Section 6) of an update direction
``u`` is::

    gamma(u) = sqrt(u^T F u) / |u^T g|

with ``F`` the exact Fisher (equal to the generalised Gauss-Newton matrix
for the categorical and Gaussian likelihoods) and ``g`` the gradient. It is
invariant to the scale and sign of ``u``. By Cauchy-Schwarz in the ``F``
inner product, for ``g`` in the range of ``F``::

    |u^T g| = |(F^1/2 u)^T (F^+1/2 g)| <= sqrt(u^T F u) sqrt(g^T F^+ g)
    =>  gamma(u) >= gamma* = 1 / sqrt(g^T F^+ g)

with equality exactly for the natural gradient ``u = F^+ g`` (up to scale
and a null-space component of ``F``). Smaller is better; the paper reports
``gamma(u) / gamma(g)``, the indicator relative to SGD's, which is also
independent of whether ``F`` and ``g`` are normalised for a sum or a mean
loss.

``F v`` is computed exactly, without forming ``F``, through the logits:
``F v = J_z^T H_z J_z v`` with one ``jvp`` of the model (``J_z v``), the
output curvature ``H_z`` and one transposed ``jvp`` (``J_z^T``). ``H_z`` is
the output Fisher of the likelihood (categorical: ``diag(p) - p p^T`` per
position; Gaussian: ``I``), or, given ``loss_fn``, the Hessian of the mean
loss with respect to the outputs (the GGN of any loss).

**Gradient-norm imbalance**: ``max_n ||grad l_n|| / min_n ||grad l_n||`` in a
batch, the quantity that drives EF's inversely-scaled projection.

**Where a step goes.** :func:`curvature_along` is the Rayleigh quotient
``u^T F u / u^T u``, the curvature the exact ``F`` has along ``u`` (also
scale-invariant): far below a preconditioner's damping, the step lies
mostly where the damping, not the curvature, set its length.
:func:`squared_norm_shares` splits ``||u||^2`` over groups of leaves (for
example LoRA's ``lora_A``, ``lora_B`` and the head), which shows where a
norm-clipped step spends its fixed length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from kfac_jax_peft.clipping import path_names

_HP = jax.lax.Precision.HIGHEST


def _vdot(a, b) -> jax.Array:
    parts = [jnp.vdot(x.astype(jnp.promote_types(x.dtype, jnp.float32)).ravel(),
                      y.astype(jnp.promote_types(y.dtype, jnp.float32)).ravel(),
                      precision=_HP)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(parts, jnp.zeros((), jnp.float32))


def fisher_vector_product(model_fn: Callable, params, *args,
                          likelihood: str = "categorical",
                          loss_fn: Callable | None = None) -> Callable:
    """``v -> F v`` for the trainable ``params``, exact, through the outputs.

    Args:
      model_fn: ``(params, *args) -> outputs [N, ..., C]`` (the function given
        to :func:`~kfac_jax_peft.fisher.per_sample_value_and_grad`).
      params, *args: the point and the batch.
      likelihood: ``"categorical"`` (logits) or ``"gaussian"`` (unit
        variance). ``F = (1/N) sum_n J_n^T H_n J_n``: the Fisher of the mean
        over examples of per-example log-likelihoods summed over positions.
      loss_fn: if given, ``H`` is instead the Hessian of
        ``mean(loss_fn(outputs, *args))`` with respect to the outputs (the
        GGN of the training loss; equal to the Fisher for a mean of
        cross-entropies).

    Returns:
      A function from a tree like ``params`` to a tree like ``params``.
    """
    outputs, jvp_fn = jax.linearize(lambda p: model_fn(p, *args), params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    n = outputs.shape[0]

    if loss_fn is not None:
        def H(w):
            f = jax.grad(lambda o: jnp.mean(loss_fn(o, *args)))
            return jax.jvp(f, (outputs,), (w,))[1]
    elif likelihood == "categorical":
        p = jax.nn.softmax(outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32)), -1)

        def H(w):
            wf = w.astype(p.dtype)
            return ((p * wf - p * jnp.sum(p * wf, -1, keepdims=True)) / n).astype(w.dtype)
    elif likelihood == "gaussian":
        def H(w):
            return w / n
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")

    def fvp(v):
        return vjp_fn(H(jvp_fn(v)))[0]

    return fvp


def gamma(update, grads, fvp: Callable) -> jax.Array:
    """``sqrt(u^T F u) / |u^T g|`` (module doc); ``fvp`` from :func:`fisher_vector_product`."""
    quad = _vdot(update, fvp(update))
    return jnp.sqrt(jnp.abs(quad)) / jnp.abs(_vdot(update, grads))


def curvature_along(update, fvp: Callable) -> jax.Array:
    """``u^T F u / u^T u``: the exact curvature along ``u`` (module doc)."""
    return _vdot(update, fvp(update)) / _vdot(update, update)


def gamma_and_curvature(update, grads, fvp: Callable) -> tuple[jax.Array, jax.Array]:
    """``(gamma_relative_to_sgd(u, g), curvature_along(u))`` from one product
    ``F u`` (and one ``F g``) instead of two of each."""
    quad = _vdot(update, fvp(update))
    relative = (jnp.sqrt(jnp.abs(quad)) / jnp.abs(_vdot(update, grads))) / gamma(grads, grads,
                                                                                 fvp)
    return relative, quad / _vdot(update, update)


def squared_norm_shares(tree, group: Callable[[tuple], str]) -> dict:
    """``{name: ||u_name||^2 / ||u||^2}``: the share of the squared norm of
    ``tree`` in each group of leaves, ``group(path)`` naming the group of
    the leaf at ``path`` (a tuple of keys as strings). The shares sum to 1;
    they are ``nan`` for an all-zero tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums: dict[str, jax.Array] = {}
    for path, leaf in flat:
        name = group(path_names(path))
        sq = jnp.sum(jnp.square(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))))
        sums[name] = sums.get(name, 0.0) + sq
    total = sum(sums.values())
    return {name: sq / total for name, sq in sums.items()}


def gamma_relative_to_sgd(update, grads, fvp: Callable) -> jax.Array:
    """``gamma(u) / gamma(g)``: below 1 means a better natural-gradient
    approximation than plain gradient descent."""
    return gamma(update, grads, fvp) / gamma(grads, grads, fvp)


def gamma_ratios(updates: Mapping[str, object], grads, fvp: Callable) -> dict:
    """``{name: gamma(u) / gamma(g)}`` for several updates at one point
    (one Fisher-vector product per update, and one for the gradient)."""
    g_sgd = gamma(grads, grads, fvp)
    return {k: gamma(u, grads, fvp) / g_sgd for k, u in updates.items()}


def per_sample_grad_norms(per_sample_grads) -> jax.Array:
    """``[N]``: ``||grad l_n||`` over all leaves (leading axis = examples)."""
    leaves = jax.tree_util.tree_leaves(per_sample_grads)
    sq = sum(jnp.sum(jnp.square(j.astype(jnp.promote_types(j.dtype, jnp.float32)))
                     .reshape(j.shape[0], -1), 1) for j in leaves)
    return jnp.sqrt(sq)


def gradient_norm_imbalance(per_sample_grads) -> jax.Array:
    """``max_n ||grad l_n|| / min_n ||grad l_n||`` (inf if some gradient is zero)."""
    norms = per_sample_grad_norms(per_sample_grads)
    return jnp.max(norms) / jnp.min(norms)
