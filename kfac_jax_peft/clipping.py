"""Update clipping: where it sits in the chain decides what it clips.

``optax.chain(kfac_precondition(...), clip_by_update_norm(tau), ...)`` clips
the preconditioned (Newton) step, the paper's *Newton-step* or
*post-clipping*::

    u_clp = min(1, tau / ||u||) u                   (paper, eq. 11)

and ``optax.chain(clip_by_update_norm(tau), kfac_precondition(...), ...)``
clips the gradient before preconditioning (*pre-clipping*), which bounds
``||g||`` but not ``||F^-1 g||``.

**Clipping by group** (``clip_by_update_norm(tau, group=...)``). One global
norm lets the largest block of the update decide the length of every
other: after K-FAC on a LoRA model the head's block can hold 90% or more
of ``||u||^2`` early in training (measured on all-MiniLM-L6-v2, SST-2), so
a clipped step barely moves the LoRA weights. With ``group``, a function
naming the group of each leaf from its path, every group is clipped to
``tau`` on its own (:func:`module_group`: LoRA's ``lora_A``, ``lora_B``,
the adapters' ``down``/``up``, the head; :func:`layer_group`: each layer).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
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


def _div(x, m):
    """``x / m`` for ``m > 0``, also where ``1 / m`` is subnormal: XLA computes
    a division as a multiplication by the reciprocal, which flushes to zero
    for ``m`` above ``1 / tiny`` (about 8.5e37 in float32) and would turn
    every ``x / m`` into 0; two factors ``m^-1/2`` stay normal."""
    r = jax.lax.rsqrt(m)
    return (x * r) * r


def _scaled_sq_norm(leaves, dtype):
    """``(m, s)`` with ``||u||_2 = m sqrt(s)``: ``m = max_i |u_i|`` and ``s =
    sum_i (u_i / m)^2``, so nothing overflows whatever the leaves' dtype
    (a float16 update of norm above 256 has a float16 sum of squares of
    inf); ``m`` is not finite exactly when some ``u_i`` is not."""
    m = jnp.zeros((), dtype)
    for x in leaves:
        m = jnp.maximum(m, jnp.max(jnp.abs(x.astype(dtype)), initial=0.0))
    safe = jnp.where(jnp.isfinite(m) & (m > 0), m, 1.0)
    s = sum((jnp.sum(jnp.square(_div(x.astype(dtype), safe))) for x in leaves),
            jnp.zeros((), dtype))
    return m, s


def _next(state: ClipState, norm, clipped, skipped) -> ClipState:
    norm = jnp.minimum(norm.astype(jnp.float32), _F32_MAX)
    return ClipState(optax.safe_increment(state.count),
                     jnp.where(skipped, state.norm, norm), clipped | skipped,
                     state.num_clipped + (clipped | skipped).astype(jnp.int32),
                     state.num_skipped + skipped.astype(jnp.int32))


def clip_by_update_norm(max_norm: optax.ScalarOrSchedule, *,
                        group: Callable[[tuple[str, ...]], Hashable] | None = None,
                        ) -> optax.GradientTransformationExtraArgs:
    """Scale the update to L2 norm at most ``max_norm``, globally or by group.

    ``u <- u * min(1, max_norm / ||u||_2)`` with ``||u||_2`` the norm over all
    leaves. Placed after ``kfac_precondition`` it is Newton-step clipping,
    before it gradient clipping. With ``group``, the leaves are split into
    groups by ``group(path)`` (``path`` the leaf's keys as strings, e.g.
    ``("encoder", "layer_0", "query", "lora_A", "kernel")``) and each group
    ``u_k`` becomes ``u_k * min(1, max_norm / ||u_k||_2)`` on its own, so
    the whole update is at most ``sqrt(K) max_norm`` long for ``K`` groups
    (module doc: why).

    The norms are computed without overflow in any dtype (float16 and
    bfloat16 leaves in float32; as ``m sqrt(sum (u/m)^2)`` with ``m`` the
    largest magnitude), and a clipped leaf is ``(u / m) (max_norm /
    sqrt(sum (u/m)^2))``, so a finite update is always bounded, however
    large. An update with a non-finite entry cannot be bounded: it becomes
    zero, all of it (the step is skipped), counted in ``num_skipped`` of the
    state.

    Args:
      max_norm: the threshold ``tau > 0`` (float, array or schedule of ``count``).
      group: ``path -> name`` (any hashable); ``None``: one global norm.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ClipState` (``norm``: the global norm before clipping;
      ``clipped``: whether any group was scaled down).
    """
    H.check_scalar("max_norm", max_norm, low=0.0, low_open=True)

    def init_fn(params):
        H.check_schedule_start("max_norm", max_norm, low=0.0, low_open=True)
        return _init(params)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        leaves = [leaf for _, leaf in flat]
        if not leaves:
            return updates, _next(state, jnp.zeros(()), jnp.asarray(False), jnp.asarray(False))
        dtype = _compute_dtype(leaves)
        tau = jnp.asarray(H.resolve(max_norm, state.count), dtype)
        names = [None if group is None else group(path_names(path)) for path, _ in flat]
        out = list(leaves)
        scaled, finite, clipped = [], jnp.asarray(True), jnp.asarray(False)
        for name in dict.fromkeys(names):
            members = [i for i, n in enumerate(names) if n == name]
            m, s = _scaled_sq_norm([leaves[i] for i in members], dtype)
            ok = jnp.isfinite(m)
            m_safe = jnp.where(ok & (m > 0), m, 1.0)
            root = jnp.sqrt(s)
            cut = ok & (m > 0) & (root > tau / m_safe)  # ||u_k|| > tau, without overflow
            factor = tau / jnp.where(cut, root, 1.0)
            for i in members:
                x = leaves[i].astype(dtype)
                out[i] = jnp.where(cut, _div(x, m_safe) * factor, x)
            scaled.append((m_safe, s))
            finite, clipped = finite & ok, clipped | cut
        # the global norm from the groups' (m_k, s_k), without overflow
        top = jnp.max(jnp.stack([m for m, _ in scaled]))
        norm = top * jnp.sqrt(sum(jnp.square(_div(m, top)) * s for m, s in scaled))
        new = [jnp.where(finite, x, jnp.zeros_like(x)).astype(leaf.dtype)
               for x, leaf in zip(out, leaves, strict=True)]
        return (jax.tree_util.tree_unflatten(treedef, new),
                _next(state, norm, clipped & finite, ~finite))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def path_names(path) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as a tuple of strings."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


#: The PEFT modules :func:`module_group` names wherever they sit.
PEFT_MODULE_NAMES = ("lora_A", "lora_B", "down", "up")


def module_group(path: tuple[str, ...]) -> str:
    """The kind of module a leaf belongs to: its PEFT module (``lora_A``,
    ``lora_B``, an adapter's ``down`` or ``up``) wherever it sits, else the
    top-level module that holds it (the head: ``classifier``)."""
    for name in reversed(path[:-1]):
        if name in PEFT_MODULE_NAMES:
            return name
    return path[0]


def layer_group(path: tuple[str, ...]) -> str:
    """The layer a leaf belongs to: its path without the parameter's own name
    (a kernel and its bias together)."""
    return "/".join(path[:-1]) or path[-1]


#: ``clip_scope`` -> the ``group`` of :func:`clip_by_update_norm`.
CLIP_SCOPES = {"global": None, "module": module_group, "layer": layer_group}


def clipped(preconditioner: optax.GradientTransformation, clip: str,
            max_norm: optax.ScalarOrSchedule | None, *,
            group: Callable[[tuple[str, ...]], Hashable] | None = None,
            ) -> optax.GradientTransformationExtraArgs:
    """A preconditioner with the update clipped where the paper puts it::

        "post": preconditioner -> clip_by_update_norm(max_norm)   (Newton-step clipping)
        "pre":  clip_by_update_norm(max_norm) -> preconditioner   (gradient clipping)
        "none": preconditioner

    The one place where the order is decided: :func:`~kfac_jax_peft.kfac`,
    the pipeline and the demo build their chains with it. Pass
    ``optax.identity()`` as ``preconditioner`` for a first-order method.
    ``group``: clip each group of leaves on its own (:func:`clip_by_update_norm`).
    """
    H.check_choice("clip", clip, CLIP_MODES)
    if clip == "none":
        return optax.chain(preconditioner)
    if max_norm is None:
        raise ValueError(f"clip={clip!r} needs max_norm (or clip='none')")
    cut = clip_by_update_norm(max_norm, group=group)
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
        dot = jnp.abs(sum((jnp.sum(_div(u.astype(dtype), su) * _div(g.astype(dtype), sg))
                           for u, g in zip(leaves_u, leaves_g)), jnp.zeros((), dtype)))
        tiny = jnp.finfo(dtype).tiny
        log_sq = (2 * jnp.log(jnp.abs(eta) + tiny) + jnp.log(su) + jnp.log(sg)
                  + jnp.log(dot + tiny))
        clipped = finite & (dot > 0) & (log_sq > jnp.log(kappa))
        # applied as two factors: the factor itself is subnormal (flushed to
        # zero) for an update above ~1e19 per entry in float32
        half = jnp.where(clipped, jnp.exp(0.25 * (jnp.log(kappa) - log_sq)), 1.0)

        def leaf(u):
            out = (u.astype(dtype) * half) * half
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
