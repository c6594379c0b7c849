"""Update clipping: where it sits in the chain decides what it clips.

``optax.chain(kfac_precondition(...), clip_by_update_norm(tau), ...)`` clips
the preconditioned (Newton) step, the paper's *Newton-step* or
*post-clipping*::

    u_clp = min(1, tau / ||u||) u                   (paper, eq. 11)

and ``optax.chain(clip_by_update_norm(tau), kfac_precondition(...), ...)``
clips the gradient before preconditioning (*pre-clipping*), which bounds
``||g||`` but not ``||F^-1 g||``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfac_jax_peft import _hyper as H

CLIP_MODES = ("post", "pre", "none")
_F32_MAX = float(jnp.finfo(jnp.float32).max)


class ClipState(NamedTuple):
    """State of the clipping transformations, for logging.

    Attributes:
      count: number of ``update`` calls.
      norm: the norm (or Fisher norm) seen at the last call with a finite
        update, before clipping, in float32 (saturating at the float32
        maximum: the norm of a finite update may exceed it).
      clipped: whether the last call scaled its input down (or skipped it).
      num_clipped: number of calls that clipped, skipped calls included
        (the paper's Fig. 10 is ``num_clipped / count`` over a window).
      num_skipped: number of calls whose input was not finite and which
        returned a zero update.
    """

    count: jax.Array
    norm: jax.Array
    clipped: jax.Array
    num_clipped: jax.Array
    # a numpy default: a jax array made at import would start JAX's backend,
    # after which a multi-process job can no longer call jax.distributed.initialize
    num_skipped: jax.Array = np.zeros((), np.int32)


def _init(params) -> ClipState:
    del params
    return ClipState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                     jnp.zeros((), bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def _compute_dtype(leaves):
    """float32, or float64 where a leaf is float64 (never narrower than float32)."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in leaves])


def _scaled_sq_norm(leaves, dtype):
    """``(m, s)`` with ``||u||_2 = m sqrt(s)``: ``m = max_i |u_i|`` and ``s =
    sum_i (u_i / m)^2``, so nothing overflows whatever the leaves' dtype
    (a float16 update of norm above 256 has a float16 sum of squares of
    inf); ``m`` is not finite exactly when some ``u_i`` is not."""
    m = jnp.zeros((), dtype)
    for x in leaves:
        m = jnp.maximum(m, jnp.max(jnp.abs(x.astype(dtype)), initial=0.0))
    safe = jnp.where(jnp.isfinite(m) & (m > 0), m, 1.0)
    s = sum((jnp.sum(jnp.square(x.astype(dtype) / safe)) for x in leaves),
            jnp.zeros((), dtype))
    return m, s


def _next(state: ClipState, norm, clipped, skipped) -> ClipState:
    norm = jnp.minimum(norm.astype(jnp.float32), _F32_MAX)
    return ClipState(optax.safe_increment(state.count),
                     jnp.where(skipped, state.norm, norm), clipped | skipped,
                     state.num_clipped + (clipped | skipped).astype(jnp.int32),
                     state.num_skipped + skipped.astype(jnp.int32))


def clip_by_update_norm(max_norm: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Scale the whole update tree to global L2 norm at most ``max_norm``.

    ``u <- u * min(1, max_norm / ||u||_2)`` with ``||u||_2`` the norm over all
    leaves. Placed after ``kfac_precondition`` it is Newton-step clipping,
    before it gradient clipping.

    The norm is computed without overflow in any dtype (float16 and
    bfloat16 leaves in float32; as ``m sqrt(sum (u/m)^2)`` with ``m`` the
    largest magnitude), and a clipped leaf is ``(u / m) (max_norm /
    sqrt(sum (u/m)^2))``, so a finite update is always bounded, however
    large. An update with a non-finite entry cannot be bounded: it becomes
    zero (the step is skipped), counted in ``num_skipped`` of the state.

    Args:
      max_norm: the threshold ``tau > 0`` (float, array or schedule of ``count``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ClipState`.
    """
    H.check_scalar("max_norm", max_norm, low=0.0, low_open=True)

    def init_fn(params):
        H.check_schedule_start("max_norm", max_norm, low=0.0, low_open=True)
        return _init(params)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves = jax.tree_util.tree_leaves(updates)
        dtype = _compute_dtype(leaves)
        tau = jnp.asarray(H.resolve(max_norm, state.count), dtype)
        m, s = _scaled_sq_norm(leaves, dtype)
        finite = jnp.isfinite(m)
        m_safe = jnp.where(finite & (m > 0), m, 1.0)
        norm = m_safe * jnp.sqrt(s)
        root = jnp.sqrt(s)
        clipped = finite & (m > 0) & (root > tau / m_safe)  # ||u|| > tau, without overflow
        factor = tau / jnp.where(clipped, root, 1.0)

        def leaf(u):
            x = u.astype(dtype)
            out = jnp.where(clipped, (x / m_safe) * factor, x)
            return jnp.where(finite, out, jnp.zeros_like(out)).astype(u.dtype)

        new = jax.tree_util.tree_map(leaf, updates)
        return new, _next(state, norm, clipped, ~finite)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clipped(preconditioner: optax.GradientTransformation, clip: str,
            max_norm: optax.ScalarOrSchedule | None) -> optax.GradientTransformationExtraArgs:
    """A preconditioner with the update clipped where the paper puts it::

        "post": preconditioner -> clip_by_update_norm(max_norm)   (Newton-step clipping)
        "pre":  clip_by_update_norm(max_norm) -> preconditioner   (gradient clipping)
        "none": preconditioner

    The one place where the order is decided: :func:`~kfac_jax_peft.kfac`,
    the pipeline and the demo build their chains with it. Pass
    ``optax.identity()`` as ``preconditioner`` for a first-order method.
    """
    H.check_choice("clip", clip, CLIP_MODES)
    if clip == "none":
        return optax.chain(preconditioner)
    if max_norm is None:
        raise ValueError(f"clip={clip!r} needs max_norm (or clip='none')")
    cut = clip_by_update_norm(max_norm)
    return optax.chain(preconditioner, cut) if clip == "post" else optax.chain(cut, preconditioner)


def clip_by_fisher_norm(max_sq_norm: optax.ScalarOrSchedule,
                        learning_rate: optax.ScalarOrSchedule = 1.0,
                        ) -> optax.GradientTransformationExtraArgs:
    """Fisher-norm (KL) clipping of a preconditioned update.

    With ``u = F^-1 g`` the preconditioned update reaching this
    transformation and ``g`` the raw gradient (the extra argument ``grads``
    of ``update``, passed through ``optax.chain`` unchanged), the squared
    Fisher norm of the step ``eta u`` is estimated as ``eta^2 u^T F u =
    eta^2 <u, g>``, and the update is scaled by::

        nu = min(1, sqrt(max_sq_norm / (eta^2 |<u, g>|)))

    This is kfac-pytorch's ``kl_clip`` and kfac-jax's ``norm_constraint``: a
    trust region on the predicted KL divergence of one step. Place it right
    after ``kfac_precondition`` (``<u, g>`` uses the curvature of the
    preconditioner, so other transformations in between change its meaning).

    Args:
      max_sq_norm: the bound ``kappa`` on ``eta^2 u^T F u``.
      learning_rate: ``eta`` (float or schedule), the step size applied later.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ClipState`
      whose ``norm`` is ``sqrt(eta^2 |<u, g>|)``. Like
      :func:`clip_by_update_norm`, the comparison cannot overflow (it is
      made on logarithms of scaled quantities) and a non-finite update or
      gradient gives a zero update, counted in ``num_skipped``.
    """
    H.check_scalar("max_sq_norm", max_sq_norm, low=0.0, low_open=True)
    H.check_scalar("learning_rate", learning_rate, low=0.0)

    def init_fn(params):
        H.check_schedule_start("max_sq_norm", max_sq_norm, low=0.0, low_open=True)
        return _init(params)

    def update_fn(updates, state, params=None, *, grads=None, **extra_args):
        del params, extra_args
        if grads is None:
            raise ValueError("clip_by_fisher_norm needs the raw gradient: call "
                             "tx.update(grads, state, params, grads=grads, ...)")
        if jax.tree_util.tree_structure(grads) != jax.tree_util.tree_structure(updates):
            raise ValueError("clip_by_fisher_norm: `grads` and the updates have different "
                             "tree structures")
        leaves_u, leaves_g = jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(grads)
        dtype = _compute_dtype(leaves_u + leaves_g)
        eta = jnp.asarray(H.resolve(learning_rate, state.count), dtype)
        kappa = jnp.asarray(H.resolve(max_sq_norm, state.count), dtype)
        # <u, g> = mu mg <u/mu, g/mg>, and the comparison in logs: no overflow
        mu, _ = _scaled_sq_norm(leaves_u, dtype)
        mg, _ = _scaled_sq_norm(leaves_g, dtype)
        finite = jnp.isfinite(mu) & jnp.isfinite(mg)
        su, sg = (jnp.where(finite & (x > 0), x, 1.0) for x in (mu, mg))
        dot = jnp.abs(sum((jnp.sum((u.astype(dtype) / su) * (g.astype(dtype) / sg))
                           for u, g in zip(leaves_u, leaves_g)), jnp.zeros((), dtype)))
        tiny = jnp.finfo(dtype).tiny
        log_sq = (2 * jnp.log(jnp.abs(eta) + tiny) + jnp.log(su) + jnp.log(sg)
                  + jnp.log(dot + tiny))
        clipped = finite & (dot > 0) & (log_sq > jnp.log(kappa))
        factor = jnp.where(clipped, jnp.exp(0.5 * (jnp.log(kappa) - log_sq)), 1.0)

        def leaf(u):
            out = u.astype(dtype) * factor
            return jnp.where(finite, out, jnp.zeros_like(out)).astype(u.dtype)

        norm = jnp.exp(0.5 * jnp.minimum(log_sq, 2 * jnp.log(jnp.asarray(_F32_MAX, dtype))))
        return jax.tree_util.tree_map(leaf, updates), _next(state, norm, clipped, ~finite)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_stats(opt_state) -> ClipState | None:
    """The first :class:`ClipState` found in an optimizer state, or None."""
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ClipState)):
        if isinstance(s, ClipState):
            return s
    return None
