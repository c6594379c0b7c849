"""``kfac_precondition``: K-FAC as one optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.transforms import _masking

from kfac_jax_peft.capture import LayerStats
from kfac_jax_peft.kfac import factors as F
from kfac_jax_peft.kfac import inverse as I

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class LayerState(NamedTuple):
    """Per-layer K-FAC state: moving-average factors and their inverse."""

    factors: F.Factors
    curvature: Any  # inverse.Eigen or inverse.Inverses
    has_curvature: jax.Array  # bool: an inversion has succeeded at least once
    num_stats: jax.Array  # int32: statistics accepted into the factors
    num_rejected: jax.Array  # int32: non-finite or empty statistics skipped


class KFACState(NamedTuple):
    """State of :func:`kfac_precondition`.

    Attributes:
      count: number of ``update`` calls.
      last_inversion: ``count`` at the last inversion (-1 before any).
      num_inversions: number of inversions performed.
      layers: per-layer state keyed by the ``/``-joined path of the kernel.
    """

    count: jax.Array
    last_inversion: jax.Array
    num_inversions: jax.Array
    layers: dict


def path_str(path) -> str:
    """``/``-joined keys of a pytree path (``params/layer/kernel``)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_masked(x) -> bool:
    return isinstance(x, _masking.MaskedNode)


def default_layer_filter(path: str, leaf) -> bool:
    """Every 2-D leaf named ``kernel`` is a K-FAC layer (Flax convention)."""
    return path.split("/")[-1] == "kernel" and len(getattr(leaf, "shape", ())) == 2


def _bias_path(kernel_path: str) -> str:
    return "/".join(kernel_path.split("/")[:-1] + ["bias"])


def _layers(tree, layer_filter) -> dict:
    """``{kernel path: (kernel leaf, bias path or None)}`` of a params tree."""
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    out = {}
    for path, leaf in flat.items():
        if layer_filter(path, leaf):
            bp = _bias_path(path)
            bias = flat.get(bp)
            has_bias = bias is not None and tuple(bias.shape) == (leaf.shape[1],)
            out[path] = (leaf, bp if has_bias else None)
    return out


def _resolve(value, count):
    return value(count) if callable(value) else value


def kfac_precondition(
    damping: ScalarOrSchedule = 1e-3,
    *,
    decay: ScalarOrSchedule = 0.95,
    invert_every: int = 1,
    damping_mode: str = "exact",
    inverse_method: str = "cholesky_solve",
    axis_name: str | None = None,
    layer_filter: Callable[[str, Any], bool] | None = None,
    factor_dtype: Any = "float32",
    ns_iterations: int = 1,
    ns_tolerance: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition gradients by the inverse K-FAC Fisher of each dense layer.

    For every registered layer (by default each 2-D ``kernel`` leaf, with its
    ``bias`` sibling as a homogeneous coordinate) the update becomes::

        U = (A kron G + damping I)^-1 vec([grad W; grad b])      (exact)
        U = (A + pi sqrt(d) I)^-1 [grad W; grad b] (G + sqrt(d)/pi I)^-1  (factored)

    where ``A`` and ``G`` are bias-corrected exponential moving averages
    (decay ``decay``; 0 means the current batch only) of the normalised
    statistics of :mod:`kfac_jax_peft.capture`: ``A = E_tokens[abar
    abar^T]`` and ``G = E_examples[g g^T]`` for a loss that is a mean over
    examples. See :mod:`kfac_jax_peft.kfac.inverse` for the damping modes.

    The statistics arrive as the keyword-only extra argument ``kfac_stats``
    of ``update``: a pytree of :class:`~kfac_jax_peft.LayerStats` placed at
    the path of the kernel they describe (what
    :func:`~kfac_jax_peft.kfac_value_and_grad` returns for probes created by
    :class:`~kfac_jax_peft.KFACDense`). ``kfac_stats=None`` means "no new
    statistics": factors are untouched, no inversion happens, and the step
    only multiplies by the stored inverse (a separate, cheap trace).

    On a step with statistics, the factors are updated, then the curvature is
    re-inverted if no inversion happened yet or ``invert_every`` calls have
    passed since the last one (the paper's "second-order update interval").
    So one may pass statistics every step, or only on inversion steps.

    Leaves that are not registered layers (LayerNorm scales, a bias without
    its kernel) pass through unchanged; so does a registered layer until its
    first successful inversion (before it, there is no curvature; the
    layer's ``has_curvature`` flag in the state tells). Non-finite
    statistics, or a batch without a real token, are skipped (counted in
    ``num_rejected``); an inversion that yields non-finite values keeps the
    previous inverse. NaNs never enter the state.

    Args:
      damping: Tikhonov damping ``lambda`` (float or schedule of ``count``).
      decay: moving-average decay of the factors (float or schedule).
      invert_every: calls between inversions.
      damping_mode: ``"exact"`` (eigenbasis, exact damping) or ``"factored"``.
      inverse_method: for ``factored``: ``"cholesky_solve"`` (the default:
        stored Cholesky factors, triangular solves each step; the cheapest
        inversion), ``"cholesky"`` (stored inverses), ``"eigh"`` or ``"newton_schulz"``
        (matmul-only, warm-started, Cholesky fallback).
      axis_name: pmap/shard_map axis over which statistics are summed (raw
        sums and counts, so the result equals one device on the global
        batch). ``None``: no collective (under ``jit`` with a sharded batch
        the sums are global already). Gradients are not reduced here.
      layer_filter: ``(path, leaf) -> bool`` choosing the K-FAC layers; ``None``
        means :func:`default_layer_filter`. (With ``optax.inject_hyperparams``,
        list a custom filter in ``static_args``: callables are taken for
        schedules there; likewise ``invert_every`` and ``ns_iterations``, which
        must stay Python integers.)
      factor_dtype: dtype of factors and inverses (float32 by default,
        whatever the parameter dtype; float64 needs ``jax_enable_x64``).
      ns_iterations, ns_tolerance: Newton-Schulz settings: iterations per
        inversion, and the largest predicted relative residual
        ``r0 ** (2 ** ns_iterations)`` accepted before falling back to Cholesky.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optax.chain(kfac_precondition(1e-3, invert_every=10),
                       clip_by_update_norm(1.0), optax.scale(-0.05))
      loss, grads, stats = kfac_value_and_grad(loss_fn)(params, probes, batch)
      updates, opt_state = tx.update(grads, opt_state, params, kfac_stats=stats)

    References:
      Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature", 2015; Eschenhagen et al., "Kronecker-Factored
      Approximate Curvature for Modern Neural Network Architectures", 2023.
    """
    if damping_mode not in I.DAMPING_MODES:
        raise ValueError(f"unknown damping_mode {damping_mode!r}; expected one of "
                         f"{I.DAMPING_MODES}")
    if inverse_method not in I.INVERSE_METHODS:
        raise ValueError(f"unknown inverse_method {inverse_method!r}; expected one of "
                         f"{I.INVERSE_METHODS}")
    if int(invert_every) < 1:
        raise ValueError(f"invert_every must be >= 1, got {invert_every}")
    invert_every = int(invert_every)
    factor_dtype = jnp.dtype(factor_dtype)
    if layer_filter is None:
        layer_filter = default_layer_filter

    def init_fn(params):
        layers = {}
        for path, (kernel, bias_path) in _layers(params, layer_filter).items():
            d_a = kernel.shape[0] + int(bias_path is not None)
            d_g = kernel.shape[1]
            layers[path] = LayerState(
                factors=F.zeros_factors(d_a, d_g, factor_dtype),
                curvature=I.zeros_curvature(d_a, d_g, damping_mode, factor_dtype,
                                            inverse_method),
                has_curvature=jnp.zeros((), bool),
                num_stats=jnp.zeros((), jnp.int32),
                num_rejected=jnp.zeros((), jnp.int32))
        return KFACState(count=jnp.zeros((), jnp.int32),
                         last_inversion=-jnp.ones((), jnp.int32),
                         num_inversions=jnp.zeros((), jnp.int32), layers=layers)

    def _match(updates, state, kfac_stats) -> dict:
        """Validate the statistics against the updates; ``{path: stats}``."""
        flat_u = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
            updates, is_leaf=_is_masked)[0]}
        flat_s = jax.tree_util.tree_flatten_with_path(
            kfac_stats, is_leaf=lambda x: isinstance(x, LayerStats))[0]
        matched = {}
        for p, s in flat_s:
            path = path_str(p)
            if not isinstance(s, LayerStats):
                raise TypeError(f"kfac_stats leaf at {path!r} is {type(s).__name__}, "
                                "expected LayerStats")
            if path not in flat_u:
                raise ValueError(f"statistics for {path!r}, which is not a leaf of the "
                                 f"updates tree (leaves: {sorted(flat_u)[:8]}...)")
            if _is_masked(flat_u[path]):
                continue  # masked out by optax.masked / optax.partition
            if path not in state.layers:
                raise ValueError(f"statistics for {path!r}, which is not a registered "
                                 "K-FAC layer (see layer_filter)")
            want = state.layers[path].factors
            if s.A.shape != want.A.shape or s.G.shape != want.G.shape:
                raise ValueError(
                    f"shape mismatch for layer {path!r}: statistics A{tuple(s.A.shape)}, "
                    f"G{tuple(s.G.shape)} but the parameters need A{tuple(want.A.shape)}, "
                    f"G{tuple(want.G.shape)} (an extra row/column in A is the bias)")
            matched[path] = s
        return matched

    def update_fn(updates, state, params=None, *, kfac_stats=None, **extra_args):
        del params, extra_args
        layer_info = _layers(updates, lambda p, x: p in state.layers)
        missing = sorted(set(state.layers) - set(layer_info))
        if missing:
            raise ValueError(f"K-FAC layers {missing} of the state are not in the updates")
        count = state.count
        lam = jnp.asarray(_resolve(damping, count), factor_dtype)
        layers = dict(state.layers)
        last_inv, n_inv = state.last_inversion, state.num_inversions

        if kfac_stats is not None:
            matched = _match(updates, state, kfac_stats)
            if axis_name is not None:
                matched = jax.lax.psum(matched, axis_name)
            rho = _resolve(decay, count)
            for path, s in matched.items():
                ls = layers[path]
                A, G, ok = F.normalise(s, factor_dtype)
                layers[path] = ls._replace(
                    factors=F.ema_update(ls.factors, A, G, ok, rho),
                    num_stats=ls.num_stats + ok.astype(jnp.int32),
                    num_rejected=ls.num_rejected + (~ok).astype(jnp.int32))

            due = (last_inv < 0) | (count - last_inv >= invert_every)
            paths = sorted(layers)

            def do_invert(ls_dict):
                ests = [F.estimate(ls_dict[p].factors) for p in paths]
                prev = [ls_dict[p].curvature for p in paths]
                new = I.invert(ests, prev, damping_mode, inverse_method, lam,
                               ns_iterations, ns_tolerance)
                out = dict(ls_dict)
                for p, c in zip(paths, new):
                    ls = ls_dict[p]
                    good = I.is_finite(c) & (ls.factors.weight > 0)
                    curv = jax.tree_util.tree_map(
                        lambda n, o, good=good: jnp.where(good, n, o), c, ls.curvature)
                    out[p] = ls._replace(curvature=curv,
                                         has_curvature=ls.has_curvature | good)
                return out

            if paths:
                layers = jax.lax.cond(due, do_invert, lambda d: d, layers)
                last_inv = jnp.where(due, count, last_inv)
                n_inv = n_inv + due.astype(jnp.int32)

        def apply(path, grad_w, grad_b):
            ls = layers[path]
            v = grad_w if grad_b is None else jnp.concatenate([grad_w, grad_b[None]], 0)
            u = I.precondition(v, ls.curvature, lam)
            u = jnp.where(ls.has_curvature, u, v.astype(u.dtype))
            if grad_b is None:
                return u.astype(grad_w.dtype), None
            return u[:-1].astype(grad_w.dtype), u[-1].astype(grad_b.dtype)

        new_leaves = {}
        flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(updates)[0]}
        for path, (kernel, bias_path) in layer_info.items():
            gb = flat[bias_path] if bias_path is not None else None
            uw, ub = apply(path, kernel, gb)
            new_leaves[path] = uw
            if bias_path is not None:
                new_leaves[bias_path] = ub

        new_updates = jax.tree_util.tree_map_with_path(
            lambda p, x: new_leaves.get(path_str(p), x), updates)
        new_state = KFACState(count=optax.safe_increment(count), last_inversion=last_inv,
                              num_inversions=n_inv, layers=layers)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

