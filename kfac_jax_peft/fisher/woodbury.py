r"""Exact damped EF, iEF and sampled-Fisher preconditioners via Woodbury.

All three are one operation. Given ``K`` *rows* ``r_1..r_K`` (vectors of
the trainable-parameter space, stacked as a ``K x P`` matrix ``R``) and the
number of examples ``N`` of the batch, the preconditioner is::

    C = (R^T R + lambda I) / N                                      (1)

and the update is ``C^-1 u`` for the incoming update ``u`` (the gradient of
the *mean* training loss, possibly clipped). The rows are:

* :func:`ef_precondition`: ``r_n = grad l_n``, so ``R^T R`` is the EF (eq. 4, 17);
* :func:`ief_precondition`: ``r_n = grad l_n / ||grad_z l_n||``, the iEF matrix (eq. 5, 20);
* :func:`sampled_fisher_precondition`: ``r_nm = grad log p(y_hat_m | x_n) / sqrt(k)``,
  ``k`` labels drawn from the model per example, ``F(k)`` (eq. 22-23).

**Normalisation.** The paper writes the loss as a *sum* ``L = sum_n l_n``
with curvature ``R^T R`` and damping ``lambda``. Our loss is the mean, whose
gradient is ``g = J^T 1 / N`` and whose curvature is ``R^T R / N``; (1) is
the paper's damped matrix divided by ``N``, so that ``C^-1 g = (R^T R +
lambda I)^-1 J^T 1`` *is the paper's update with the paper's lambda*: for
EF ``(J^T J + lambda I)^-1 J^T 1`` (eq. 17), for the sampled Fisher
equation 24. The damping value therefore means what it means in the paper
(1e-7 there), independently of ``N``. With ``damping_scale="relative"`` the
damping is ``lambda * max_n (R R^T)_nn``, relative to the largest diagonal
of the Gram matrix of the rows.

**Woodbury.** With the ``K x K`` Gram matrix ``Q = R R^T = V diag(e) V^T``,
``u = R^T c + u_perp`` (``c = Q^+ R u``, ``R u_perp = 0``) and the push-through
identity ``(R^T R + lambda I)^-1 R^T = R^T (Q + lambda I)^-1``::

    C^-1 u = N R^T (Q + lambda I)^-1 c  +  N u_perp / lambda         (2)

which is equation 24 of the supporting material, ``lambda^-1 [I - R^T (Q +
lambda I)^-1 R] u``, rearranged. Cost ``O(K^2 P + K^3)``, memory ``O(K P)``.

**The span.** The EF and iEF inputs, the gradient ``J^T 1 / N`` and any
clipped multiple of it, lie in the span of the rows, where the second term
of (2) vanishes. In floating point ``u_perp`` is then rounding noise of
relative size ``eps``, which ``1/lambda = 10^7`` would blow up to the size
of the update; so :func:`ef_precondition` and :func:`ief_precondition` use only the first term
(``span_only=True``): the exact damped inverse on the span of the rows,
zero on its complement. This is equivalent to the paper's formulas on
every input they define, and stays linear in ``u``. For the sampled Fisher
the gradient is *not* in the span of the sampled gradients, ``u_perp`` is
genuine and dominant, and equation 24 keeps it (``span_only=False``).

**Pre- and post-clipping.** Because the update is linear in ``u``,
``optax.chain(clip_by_update_norm(t), ef(...))`` gives ``alpha`` times the
paper's update, ``alpha = min(1, t / ||g||)`` (the direction is unchanged,
only its length). ``optax.chain(ef(...), clip_by_update_norm(t))`` clips
the preconditioned step (the paper's EF runs use a normalised update,
which is post-clipping with a small threshold). Transformations placed
before the preconditioner that move ``u`` out of the span (weight decay,
momentum) lose that part under ``span_only=True``: put them after.

**The iEF damping.** The supporting material writes the damped iEF update
as ``(J^T J + lambda I)^-1 J^T s`` (eq. 19), i.e. ``J^T (J J^T + lambda
I)^-1 s``, while :func:`ief_precondition` computes ``(J^T S^-1 J + lambda I)^-1 J^T 1 =
J^T (J J^T + lambda S)^-1 s`` (``S = diag(s)``). Without damping, and
whenever ``J J^T`` is invertible, both are ``J^T (J J^T)^-1 s``; they
differ only in where ``lambda`` enters (``lambda`` versus ``lambda s_n``
on the Gram diagonal, an ``O(lambda)`` difference at the paper's 1e-7). We
take the damped iEF *matrix* because it is a preconditioner (symmetric
positive definite, linear in ``u``, usable in a chain) and because it is
what equals natural-gradient descent on least squares also when ``N > P``
(Section 2.2), where equation 19 does not.

**Precision.** The ``K x K`` algebra runs in float32, or float64 when the
inputs are float64 (``jax.enable_x64``), on the Gram matrix scaled to unit
diagonal (:func:`woodbury_precondition`), so that per-sample gradient norms
spread over orders of magnitude, the regime where EF and iEF differ, do not
cost accuracy. Non-finite per-sample gradients give a non-finite update.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_peft import _hyper as H

#: How ``damping`` is read: as ``lambda`` itself, or relative to the largest
#: diagonal entry of the rows' Gram matrix (``damping_scale``; named
#: ``damping_mode`` in the first release, a name K-FAC uses for another idea).
DAMPING_SCALES = ("absolute", "relative")

_HP = jax.lax.Precision.HIGHEST


class WoodburyState(NamedTuple):
    """State of the three preconditioners of this module, for logging.

    Attributes:
      count: number of ``update`` calls.
      damping: the absolute damping ``lambda`` of the last call (after the
        relative mode's scaling).
      rank: numerical rank of the rows' Gram matrix at the last call.
    """

    count: jax.Array
    damping: jax.Array
    rank: jax.Array


def _check(rows, updates, lead: int, what: str):
    ts_r = jax.tree_util.tree_structure(rows)
    ts_u = jax.tree_util.tree_structure(updates)
    if ts_r != ts_u:
        raise ValueError(f"{what} must have the tree structure of the updates: "
                         f"{ts_r} vs {ts_u}")
    for r, u in zip(jax.tree_util.tree_leaves(rows), jax.tree_util.tree_leaves(updates)):
        if tuple(r.shape[lead:]) != tuple(u.shape):
            raise ValueError(f"{what} leaf of shape {r.shape} does not match an update of "
                             f"shape {u.shape} (expected {lead} leading axes)")


def woodbury_precondition(rows, updates, damping, *, num_examples, row_scale=None,
                          damping_scale: str = "absolute", span_only: bool = True,
                          rcond: float | None = None):
    """``(R^T R + lambda I)^-1 N u`` through the ``K x K`` Gram matrix (module doc, (2)).

    The ``K x K`` algebra is done on the Gram matrix of the *unit* rows,
    ``Qhat = D^-1 Q D^-1`` with ``D = diag(||r_k||)``, whose conditioning does
    not suffer from the spread of the per-sample gradient norms (the
    gradient-norm imbalance that the paper studies, often 10^2-10^4)::

        a = Qhat^+ D^-1 R u                  (coordinates of the projection of u)
        b = (Qhat + lambda D^-2)^-1 D^-2 a
        C^-1 u = N R^T D^-1 b  [+ N (u - R^T D^-1 a) / lambda  if not span_only]

    which is (2) rewritten with ``Q + lambda I = D (Qhat + lambda D^-2) D``.
    The second solve is done in the eigenbasis of ``Qhat``; when the rows
    are linearly dependent (``N > P``, repeated examples) the null directions
    of ``Qhat``, which ``R^T D^-1`` annihilates, are eliminated by a Schur
    complement rather than solved for (their coefficients are ``O(1/lambda)``
    and would swamp the result in rounding).
    Eigendecomposing ``Q`` itself instead loses, in float32, every direction
    of a gradient 10^3 times smaller than the largest (measured: 90% error
    at an imbalance of 10^3, against 1e-4 with the scaling).

    Args:
      rows: tree like ``updates`` whose leaves have one leading axis of size
        ``K`` (the rows ``r_k``).
      updates: the vector ``u`` (a tree).
      damping: ``lambda`` (absolute, or relative to the largest Gram diagonal).
      num_examples: ``N``, the number of examples the mean loss averages.
      row_scale: optional ``[K]`` factors ``d_k``: the rows used are ``d_k
        r_k``. Applied in the ``K``-dimensional space, so the scaled rows
        are never materialised.
      damping_scale: ``"absolute"`` or ``"relative"``.
      span_only: drop the component of ``u`` orthogonal to the rows (module
        doc). ``False`` needs ``lambda > 0``.
      rcond: eigenvalues of ``Qhat`` (whose diagonal is 1) below ``rcond *``
        its largest count as zero: the rows they span are linearly dependent
        (default ``K * eps`` of the compute dtype, as in ``pinv``).
        ``lambda = 0`` gives the limit ``lambda -> 0`` (the pseudo-inverse of
        ``R^T R`` on the span).

    Returns:
      ``(direction, (lambda, rank))``: the preconditioned tree (dtypes of
      ``updates``), the absolute damping used and the numerical rank.
    """
    H.check_choice("damping_scale", damping_scale, DAMPING_SCALES)
    r_leaves = jax.tree_util.tree_leaves(rows)
    u_leaves, treedef = jax.tree_util.tree_flatten(updates)
    if not u_leaves:
        return updates, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    K = r_leaves[0].shape[0]
    dt = jnp.result_type(jnp.float32, *r_leaves, *u_leaves)
    R = [r.reshape(K, -1).astype(dt) for r in r_leaves]
    U = [u.reshape(-1).astype(dt) for u in u_leaves]
    Q = sum(jnp.matmul(r, r.T, precision=_HP) for r in R)
    w = sum(jnp.matmul(r, u, precision=_HP) for r, u in zip(R, U))
    if row_scale is not None:
        sc = jnp.asarray(row_scale, dt).reshape(K)
        Q = sc[:, None] * Q * sc[None, :]
        w = sc * w
    sq = jnp.maximum(jnp.diagonal(Q), 0.0)
    lam = jnp.asarray(damping, dt)
    if damping_scale == "relative":
        lam = lam * jnp.max(sq)
    nz = sq > 0
    inv_d = jnp.where(nz, jax.lax.rsqrt(jnp.where(nz, sq, 1.0)), 0.0)
    W = jnp.where(nz, inv_d**2, 1.0)  # D^-2; 1 for zero rows, which decouple
    Qh = Q * inv_d[:, None] * inv_d[None, :]
    Qh = 0.5 * (Qh + Qh.T)
    e, V = jnp.linalg.eigh(Qh)
    tol = (K * jnp.finfo(dt).eps) if rcond is None else rcond
    keep = e > tol * jnp.maximum(jnp.max(e), 0.0)
    m = keep.astype(dt)
    mn = 1.0 - m
    inv_e = jnp.where(keep, 1.0 / jnp.where(keep, e, 1.0), 0.0)
    alpha = inv_e * jnp.matmul(V.T, inv_d * w, precision=_HP)  # a = V alpha
    # (Qhat + lambda W) b = W a in the eigenbasis of Qhat, the dependent
    # (null) directions eliminated exactly by a Schur complement
    Wt = jnp.matmul(V.T * W[None, :], V, precision=_HP)
    f = jnp.matmul(Wt, alpha, precision=_HP)
    Z = jnp.linalg.inv(Wt * (mn[:, None] * mn[None, :]) + jnp.diag(m))
    X = Wt * (m[:, None] * mn[None, :])
    Y = jnp.matmul(X, Z, precision=_HP)
    S = (jnp.diag(m * e + mn)
         + lam * (Wt * (m[:, None] * m[None, :]) - jnp.matmul(Y, X.T, precision=_HP)))
    beta = jnp.linalg.solve(S, m * f - jnp.matmul(Y, mn * f, precision=_HP))
    b = jnp.matmul(V, beta, precision=_HP)
    a = jnp.matmul(V, alpha, precision=_HP)
    x = inv_d * b
    if row_scale is not None:
        x = sc * x
    n = jnp.asarray(num_examples, dt)
    out = [n * jnp.matmul(x, r, precision=_HP) for r in R]
    if not span_only:
        c = inv_d * a
        if row_scale is not None:
            c = sc * c
        out = [o + n * (u - jnp.matmul(c, r, precision=_HP)) / lam
               for o, u, r in zip(out, U, R)]
    out = [o.reshape(u.shape).astype(u.dtype) for o, u in zip(out, u_leaves)]
    return (jax.tree_util.tree_unflatten(treedef, out),
            (lam.astype(jnp.float32), jnp.sum(keep).astype(jnp.int32)))


def _transformation(rows_fn, damping, damping_scale, span_only, rcond):
    H.check_choice("damping_scale", damping_scale, DAMPING_SCALES)
    H.check_scalar("damping", damping, low=0.0)
    if rcond is not None:
        H.check_scalar("rcond", rcond, low=0.0, high=1.0, schedule=False)

    def init_fn(params):
        del params
        H.check_schedule_start("damping", damping, low=0.0)
        return WoodburyState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                             jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del params
        rows, n, scale = rows_fn(updates, extra_args)
        lam = H.resolve(damping, state.count)
        direction, (lam_abs, rank) = woodbury_precondition(
            rows, updates, lam, num_examples=n, row_scale=scale, damping_scale=damping_scale,
            span_only=span_only, rcond=rcond)
        return direction, WoodburyState(optax.safe_increment(state.count), lam_abs, rank)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scale_arg(damping_scale, damping_mode, who):
    """``damping_mode`` is the first release's name of ``damping_scale``."""
    if damping_mode is None:
        return damping_scale
    warnings.warn(f"{who}(damping_mode=...) is deprecated; use damping_scale="
                  f"{damping_mode!r}", DeprecationWarning, stacklevel=3)
    return damping_mode


def _need(extra_args, name, who, produced_by):
    value = extra_args.get(name)
    if value is None:
        raise ValueError(f"{who} needs the extra argument {name!r}: call "
                         f"tx.update(grads, state, params, **extras) with the extras of "
                         f"per_sample_value_and_grad(..., fisher_type={produced_by!r})")
    return value


def ef_precondition(damping: optax.ScalarOrSchedule = 1e-7, *,
                    damping_scale: str = "absolute", damping_mode: str | None = None,
                    span_only: bool = True, rcond: float | None = None
                    ) -> optax.GradientTransformationExtraArgs:
    r"""Exact damped empirical-Fisher preconditioning (supporting material, eq. 17).

    ``u -> N (J^T J + lambda I)^-1 u`` on the span of the per-sample
    gradients ``J`` (the module doc gives the conventions); on the gradient
    ``u = J^T 1 / N`` of the mean loss this is the paper's EF update
    ``(J^T J + lambda I)^-1 J^T 1``, before the learning rate.

    Args:
      damping: ``lambda`` (float, array or schedule of ``count``); the paper
        uses 1e-7.
      damping_scale: ``"absolute"``, or ``"relative"`` (``lambda`` times the
        largest squared per-sample gradient norm).
      damping_mode: deprecated name of ``damping_scale``.
      span_only: see the module doc; ``False`` applies the full damped
        inverse, ``u_perp / lambda`` included.
      rcond: relative cutoff of the Gram eigenvalues (pseudo-inverse).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
      extra argument ``per_sample_grads`` (from
      :func:`~kfac_jax_peft.fisher.per_sample_value_and_grad`, ``fisher_type="empirical"``)
      and ignores the others.

    Example::

      tx = optax.chain(ef_precondition(1e-7), clip_by_update_norm(1.0),
                       optax.scale_by_learning_rate(0.01))

    Reference: Wu et al., "An Improved Empirical Fisher Approximation for
    Natural Gradient Descent", 2024.
    """

    def rows_fn(updates, extra):
        J = _need(extra, "per_sample_grads", "ef_precondition", "empirical")
        _check(J, updates, 1, "per_sample_grads")
        return J, jax.tree_util.tree_leaves(J)[0].shape[0], None

    scale = _scale_arg(damping_scale, damping_mode, "ef_precondition")
    return _transformation(rows_fn, damping, scale, span_only, rcond)


def ief_row_scale(scales) -> jax.Array:
    """``1 / ||grad_z l_n||`` from ``s_n = ||grad_z l_n||^2``; zero where ``s_n = 0``
    (such an example's parameter gradient is zero too: it drops out)."""
    s = jnp.asarray(scales)
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
    return jnp.where(s > 0, jax.lax.rsqrt(jnp.where(s > 0, s, 1.0)), 0.0)


def ief_precondition(damping: optax.ScalarOrSchedule = 1e-7, *,
                     damping_scale: str = "absolute", damping_mode: str | None = None,
                     span_only: bool = True, rcond: float | None = None
                     ) -> optax.GradientTransformationExtraArgs:
    r"""Exact damped improved-empirical-Fisher (iEF) preconditioning.

    ``u -> N (J^T S^-1 J + lambda I)^-1 u`` on the span of ``J``, with
    ``S = diag(s)``, ``s_n = ||grad_z l_n||^2`` the squared logits-level
    gradient norms (eq. 5-6, 20). On the gradient of the mean loss it is
    ``J^T (J J^T + lambda S)^-1 s``: the iEF update of equation 19 up to
    where the damping enters (module doc). Undamped, each per-sample loss
    changes to first order by ``-s_n`` per unit step (eq. 13).

    Args: as :func:`ef_precondition`; ``damping_scale="relative"`` scales ``lambda`` by
    ``max_n ||grad l_n||^2 / s_n``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
      extra arguments ``per_sample_grads`` and ``scales`` (from
      :func:`~kfac_jax_peft.fisher.per_sample_value_and_grad`, ``fisher_type="ief"``).
    """

    def rows_fn(updates, extra):
        J = _need(extra, "per_sample_grads", "ief_precondition", "ief")
        s = _need(extra, "scales", "ief_precondition", "ief")
        _check(J, updates, 1, "per_sample_grads")
        n = jax.tree_util.tree_leaves(J)[0].shape[0]
        if jnp.shape(s) != (n,):
            raise ValueError(f"scales has shape {jnp.shape(s)}, expected ({n},)")
        return J, n, ief_row_scale(s)

    scale = _scale_arg(damping_scale, damping_mode, "ief_precondition")
    return _transformation(rows_fn, damping, scale, span_only, rcond)


def sampled_fisher_precondition(damping: optax.ScalarOrSchedule = 1e-7, *,
                                damping_scale: str = "absolute", damping_mode: str | None = None,
                                span_only: bool = False, rcond: float | None = None
                                ) -> optax.GradientTransformationExtraArgs:
    r"""Exact damped sampled-Fisher ``F(k)`` preconditioning (eq. 22-24).

    ``u -> N (F_s + lambda I)^-1 u`` with ``F_s = (1/k) sum_{n,m} j_nm
    j_nm^T``, ``j_nm = grad log p(y_hat_m | x_n)``, ``y_hat_m`` drawn from the
    model (``k`` per example). On the gradient of the mean loss it is
    equation 24 with ``M = k``. The gradient is not in the span of the
    sampled gradients, so by default the full inverse is applied
    (``span_only=False``); its orthogonal part is ``u_perp / lambda``, which
    dominates the update at small damping (use ``damping_scale="relative"``
    or a larger ``lambda`` for a usable step). As ``k`` grows ``F_s``
    converges to the exact Fisher.

    Args: as :func:`ef_precondition`; ``damping_scale="relative"`` scales ``lambda`` by the
    largest ``||j_nm||^2 / k``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
      extra argument ``sampled_grads`` (leaves with leading axes ``[N, k]``,
      from :func:`~kfac_jax_peft.fisher.per_sample_value_and_grad`,
      ``fisher_type="sampled"``).
    """

    def rows_fn(updates, extra):
        Js = _need(extra, "sampled_grads", "sampled_fisher_precondition", "sampled")
        _check(Js, updates, 2, "sampled_grads")
        n, k = jax.tree_util.tree_leaves(Js)[0].shape[:2]
        rows = jax.tree_util.tree_map(lambda j: j.reshape((n * k,) + j.shape[2:]), Js)
        return rows, n, jnp.full((n * k,), 1.0 / k**0.5, jnp.float32)

    scale = _scale_arg(damping_scale, damping_mode, "sampled_fisher_precondition")
    return _transformation(rows_fn, damping, scale, span_only, rcond)


def _deprecated(new, old_name):
    @functools.wraps(new)
    def old(*args, **kwargs):
        warnings.warn(f"fisher.{old_name} is deprecated; use fisher.{new.__name__} (a "
                      "preconditioner, not a full optimizer)", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    old.__name__ = old_name
    return old


#: The first release's names, kept for one release.
ef = _deprecated(ef_precondition, "ef")
ief = _deprecated(ief_precondition, "ief")
sampled_fisher = _deprecated(sampled_fisher_precondition, "sampled_fisher")
