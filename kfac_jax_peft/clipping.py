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
import optax

from kfac_jax_peft.kfac.transform import ScalarOrSchedule, _resolve


class ClipState(NamedTuple):
    """State of the clipping transformations, for logging.

    Attributes:
      count: number of ``update`` calls.
      norm: the norm (or Fisher norm) seen at the last call, before clipping.
      clipped: whether the last call scaled its input down.
      num_clipped: number of calls that clipped (the paper's Fig. 10 is
        ``num_clipped / count`` over a window).
    """

    count: jax.Array
    norm: jax.Array
    clipped: jax.Array
    num_clipped: jax.Array


def _init(params) -> ClipState:
    del params
    return ClipState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                     jnp.zeros((), bool), jnp.zeros((), jnp.int32))


def _scale(updates, factor):
    return jax.tree_util.tree_map(lambda u: (u * factor).astype(u.dtype), updates)


def _next(state: ClipState, norm, clipped) -> ClipState:
    return ClipState(optax.safe_increment(state.count), norm.astype(jnp.float32), clipped,
                     state.num_clipped + clipped.astype(jnp.int32))


def clip_by_update_norm(max_norm: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Scale the whole update tree to global L2 norm at most ``max_norm``.

    ``u <- u * min(1, max_norm / ||u||_2)`` with ``||u||_2`` the norm over all
    leaves. Placed after ``kfac_precondition`` it is Newton-step clipping,
    before it gradient clipping. A non-finite norm leaves the update as is
    (and is reported in the state) rather than turning it into NaN * 0.

    Args:
      max_norm: the threshold ``tau`` (float, array or schedule of ``count``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ClipState`.
    """

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        tau = jnp.asarray(_resolve(max_norm, state.count), jnp.float32)
        norm = optax.tree.norm(updates).astype(jnp.float32)
        clipped = jnp.isfinite(norm) & (norm > tau)
        factor = jnp.where(clipped, tau / jnp.where(clipped, norm, 1.0), 1.0)
        return _scale(updates, factor), _next(state, norm, clipped)

    return optax.GradientTransformationExtraArgs(_init, update_fn)


def clip_by_fisher_norm(max_sq_norm: ScalarOrSchedule,
                        learning_rate: ScalarOrSchedule = 1.0,
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
      whose ``norm`` is ``sqrt(eta^2 |<u, g>|)``.
    """

    def update_fn(updates, state, params=None, *, grads=None, **extra_args):
        del params, extra_args
        if grads is None:
            raise ValueError("clip_by_fisher_norm needs the raw gradient: call "
                             "tx.update(grads, state, params, grads=grads, ...)")
        if jax.tree_util.tree_structure(grads) != jax.tree_util.tree_structure(updates):
            raise ValueError("clip_by_fisher_norm: `grads` and the updates have different "
                             "tree structures")
        eta = jnp.asarray(_resolve(learning_rate, state.count), jnp.float32)
        dots = jax.tree_util.tree_map(
            lambda u, g: jnp.sum(u.astype(jnp.float32) * g.astype(jnp.float32)),
            updates, grads)
        sq = eta**2 * jnp.abs(sum(jax.tree_util.tree_leaves(dots), jnp.zeros((), jnp.float32)))
        kappa = jnp.asarray(_resolve(max_sq_norm, state.count), jnp.float32)
        clipped = jnp.isfinite(sq) & (sq > kappa)
        factor = jnp.where(clipped, jnp.sqrt(kappa / jnp.where(clipped, sq, 1.0)), 1.0)
        return _scale(updates, factor), _next(state, jnp.sqrt(sq), clipped)

    return optax.GradientTransformationExtraArgs(_init, update_fn)


def clip_stats(opt_state) -> ClipState | None:
    """The first :class:`ClipState` found in an optimizer state, or None."""
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ClipState)):
        if isinstance(s, ClipState):
            return s
    return None
