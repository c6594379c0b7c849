"""Per-sample gradients and logits-level gradient norms from one pass.

The exact EF, iEF and sampled-Fisher updates of :mod:`kfac_jax_peft.fisher.woodbury`
need, for a batch of ``N`` examples, the matrix of per-sample gradients of the
trainable parameters ``theta`` (``P`` numbers)::

    J = [grad_theta l_1, ..., grad_theta l_N]^T            (N x P)

and the logits-level gradient norms ``||grad_z l_n||`` of each example's
output ``z_n``. Both come from the same per-example forward/backward pass:
the model is ``vmap``-ed over the examples, each example runs its forward
pass, differentiates its own loss with respect to its own logits
(``grad_z l_n``, whose squared norm is the iEF scale ``s_n``), and pulls
that cotangent back to the parameters (``grad_theta l_n``). For the sampled
Fisher the same pull-back is applied to ``k`` further cotangents
``-grad_z log p(y_hat | z_n)``, ``y_hat`` drawn from the model's predictive
distribution.

Memory. The per-sample gradients are materialised: ``N x P`` numbers (for
``fisher_type="sampled"``: ``N x k x P`` returned and ``N x (k + 1) x P`` transient),
in the parameters' dtype. With ``N = 32`` and ``P = 10^6`` float32 that is
128 MB. The frozen base model is shared, never copied per example, and
activations are those of one batched forward pass. This is the ``O(NP)``
bound of the exact methods (Section 7 of the supporting material).

Conventions. ``model_fn(params, *args) -> outputs`` with outputs of shape
``[N, ..., C]`` (logits for ``likelihood="categorical"``, means of a
unit-variance Gaussian for ``"gaussian"``): the leading axis indexes
examples. ``loss_fn(outputs, *args)`` returns the per-example losses ``[N]``
*or their mean*: it is called on batches of one example, where both are the
example's loss ``l_n``. (A loss averaged over the tokens of the whole batch
is therefore replaced by the per-example token average; the training loss
returned is the mean of the ``l_n``.) Every leaf of ``args`` is batched
along axis 0 unless ``in_axes`` says ``None`` for that argument.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kfac_jax_peft import _hyper as H
from kfac_jax_peft.likelihoods import check_likelihood, sample_cotangents

#: The Fisher types a per-sample pass can serve (see
#: :data:`kfac_jax_peft.likelihoods.FISHER_TYPES`).
PER_SAMPLE_FISHER_TYPES = ("empirical", "ief", "sampled")
#: The names of the first release, accepted with a DeprecationWarning.
_OLD_KINDS = {"ef": "empirical", "ief": "ief", "sf": "sampled"}


def _axes(in_axes, num_args: int) -> tuple:
    if in_axes is None or isinstance(in_axes, int):
        axes = (in_axes,) * num_args
    else:
        axes = tuple(in_axes)
        if len(axes) != num_args:
            raise ValueError(f"in_axes has {len(axes)} entries for {num_args} arguments")
    for a in axes:
        if a not in (0, None):
            raise ValueError(f"in_axes entries must be 0 or None, got {a!r}")
    return axes


def _mean0(j: jax.Array) -> jax.Array:
    """Mean over the leading axis as a ``[1, N] @ [N, P]`` product: XLA's CPU
    reduction over a leading axis of a large array is ~50x slower."""
    n = j.shape[0]
    w = jnp.full((1, n), 1.0 / n, jnp.promote_types(j.dtype, jnp.float32))
    out = jnp.matmul(w, j.reshape(n, -1).astype(w.dtype), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(j.shape[1:]).astype(j.dtype)


def per_sample_value_and_grad(model_fn: Callable, loss_fn: Callable, *,
                              fisher_type: str = "empirical", num_samples: int = 1,
                              likelihood: str = "categorical",
                              in_axes: int | None | Sequence[int | None] = 0,
                              kind: str | None = None) -> Callable:
    """Loss, gradient and the per-sample quantities the exact updates need.

    Args:
      model_fn: ``(params, *args) -> outputs [N, ..., C]``; ``params`` is the
        tree of *trainable* parameters (close over, or pass with
        ``in_axes=None``, the frozen ones).
      loss_fn: ``(outputs, *args) -> per-example losses [N]`` (or their mean).
      fisher_type: ``"empirical"``, ``"ief"`` or ``"sampled"``: which
        preconditioner of :mod:`kfac_jax_peft.fisher` the extras are for.
      num_samples: Monte-Carlo labels per example for ``"sampled"`` (``k``
        in ``F(k)``; the paper's equation 24 calls it ``M``).
      likelihood: ``"categorical"`` (logits) or ``"gaussian"`` (unit-variance
        means), the predictive distribution sampled for ``"sampled"``. With
        outputs ``[N, T, C]`` every position is sampled and weighted 1, i.e.
        the example's log-likelihood is the sum over positions.
      in_axes: ``0`` (every argument batched along its leading axis),
        ``None`` (none), or one entry (``0``/``None``) per argument.
      kind: deprecated name of ``fisher_type`` (``"ef"``, ``"ief"``, ``"sf"``).

    Returns:
      A pure function ``(params, *args, rng=None) -> (loss, grads, extras)``:
      ``loss`` is the mean of the per-example losses (the training loss),
      ``grads`` its gradient (the mean of the per-sample gradients), and
      ``extras`` the keyword arguments of the matching transformation's
      ``update``:

      * ``"empirical"``: ``{"per_sample_grads": J}``, a tree like ``params`` whose
        leaves have a leading axis of size ``N`` (``J[n] = grad l_n``);
      * ``"ief"``: also ``"scales"``: ``s [N]``, ``s_n = ||grad_z l_n||^2``;
      * ``"sampled"``: ``{"sampled_grads": Js}``, leaves with leading axes
        ``[N, k]`` (``Js[n, m] = -grad log p(y_hat_m | x_n)``); needs ``rng``.

    Example::

      vg = per_sample_value_and_grad(model_fn, loss_fn, fisher_type="ief")
      tx = optax.chain(ief_precondition(1e-7), optax.scale_by_learning_rate(lr))
      loss, grads, extras = vg(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, **extras)
    """
    if kind is not None:
        if kind not in _OLD_KINDS:
            raise ValueError(f"unknown kind {kind!r}; use fisher_type, one of "
                             f"{PER_SAMPLE_FISHER_TYPES}")
        warnings.warn(f"per_sample_value_and_grad(kind={kind!r}) is deprecated; use "
                      f"fisher_type={_OLD_KINDS[kind]!r}", DeprecationWarning, stacklevel=2)
        fisher_type = _OLD_KINDS[kind]
    if fisher_type not in PER_SAMPLE_FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of "
                         f"{PER_SAMPLE_FISHER_TYPES}")
    check_likelihood(likelihood)
    H.check_positive_int("num_samples", num_samples)
    sampled = fisher_type == "sampled"

    def fn(params, *args, rng=None):
        axes = _axes(in_axes, len(args))
        if sampled and rng is None:
            raise ValueError("fisher_type='sampled' samples labels: call the function returned by "
                             "per_sample_value_and_grad with rng=key")
        n = None
        for a, ax in zip(args, axes):
            if ax == 0:
                leaves = jax.tree_util.tree_leaves(a)
                if leaves:
                    n = leaves[0].shape[0]
                    break
        if n is None:
            raise ValueError("no batched argument: at least one argument needs in_axes=0")
        keys = jax.random.split(rng, n) if sampled else jnp.zeros((n,), jnp.uint32)

        def one(args_n, key):
            args1 = tuple(jax.tree_util.tree_map(lambda x: x[None], a) if ax == 0 else a
                          for a, ax in zip(args_n, axes))
            z, vjp_fn = jax.vjp(lambda p: model_fn(p, *args1), params)
            l, dz = jax.value_and_grad(lambda o: jnp.sum(loss_fn(o, *args1)))(z)
            (g,) = vjp_fn(dz)
            dzf = dz.astype(jnp.promote_types(dz.dtype, jnp.float32))
            out: dict[str, Any] = {"loss": l, "grad": g, "s": jnp.sum(dzf * dzf)}
            if sampled:
                cots = sample_cotangents(z, key, num_samples, likelihood)
                out["sampled"] = jax.vmap(lambda c: vjp_fn(c)[0])(cots)
            return out

        per = jax.vmap(one, in_axes=(tuple(axes), 0))(args, keys)
        loss = jnp.mean(per["loss"])
        grads = jax.tree_util.tree_map(_mean0, per["grad"])
        if fisher_type == "empirical":
            extras = {"per_sample_grads": per["grad"]}
        elif fisher_type == "ief":
            extras = {"per_sample_grads": per["grad"], "scales": per["s"]}
        else:
            extras = {"sampled_grads": per["sampled"]}
        return loss, grads, extras

    return fn
