"""K-FAC as three pure stages on a state kept per factor.

:func:`~kfac_jax_peft.kfac_precondition` composes them; a variant (another
inversion schedule, EKFAC) composes them differently. Each stage takes and
returns plain dicts of NamedTuples keyed by factor key or kernel path (see
:mod:`kfac_jax_peft.kfac.layers`), so it can be called, tested and jitted
on its own.

1. **Statistics** (:func:`match_statistics`, :func:`factor_statistics`):
   the :class:`~kfac_jax_peft.LayerStats` of a step, checked against the
   registered layers, become one normalised matrix per factor key with an
   ``ok`` flag (finite, from a batch with a real token). A layer's own
   ``A`` and its ``G`` are accepted together; a shared input factor takes
   the statistics of its group's first member (in path order) that has
   statistics, and a member's ``G`` is accepted only with a finite group
   ``A``.
2. **Accumulate** (:func:`accumulate`): the bias-corrected moving average
   of :mod:`kfac_jax_peft.kfac.factors`, factor by factor; a factor whose
   statistics or new average are not finite keeps its previous state and
   counts a rejection.
3. **Invert** (:func:`decompose`, :func:`commit_eigen`,
   :func:`invert_layers`): eigendecompositions of the factor estimates
   (``exact`` damping, kept per factor) or damped inverses of each layer's
   pair (``factored`` damping, kept per layer); a result that is not
   finite is dropped and the previous curvature kept.
   With ``ekfac`` damping, :mod:`kfac_jax_peft.kfac.ekfac` adds one stage:
   each layer's re-estimated diagonal in the eigenbasis, accumulated like
   the factors and restarted when its basis changes.
4. **Precondition** (:func:`precondition`): each registered layer's
   gradient times its damped inverse Kronecker block; layers without
   curvature yet, and leaves that are not layers, pass through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_peft.capture import LayerStats
from kfac_jax_peft.kfac import ekfac as E
from kfac_jax_peft.kfac import factors as F
from kfac_jax_peft.kfac import inverse as I
from kfac_jax_peft.kfac.layers import LayerSpec, flatten, is_masked, path_str


class FactorState(NamedTuple):
    """One Kronecker factor: the input factor ``A`` of a layer (or of a
    group of layers sharing their input), or the ``G`` of a layer.

    Attributes:
      average: the moving-average sum ``S`` (``None`` when only the
        curvature is kept: ``store_factors=False``).
      weight: the sum of the moving-average weights ``w``; ``S / w`` is the
        estimate.
      eigen: ``exact`` damping: the eigendecomposition of the estimate at
        the last successful inversion (``None`` with ``factored`` damping).
      decomposed: ``eigen`` holds a decomposition of real statistics.
      num_stats: statistics accepted.
      num_rejected: statistics rejected (not finite, no real token, a
        non-finite gradient on the step, an overflowing average).
    """

    average: jax.Array | None
    weight: jax.Array
    eigen: I.EigenFactor | None
    decomposed: jax.Array
    num_stats: jax.Array
    num_rejected: jax.Array


class LayerState(NamedTuple):
    """One layer: its damped inverses (``factored`` damping; ``None`` with
    ``exact`` damping, whose curvature is in the factors), whether it has
    curvature (before that, its gradient passes through unchanged), and
    with ``ekfac`` damping its re-estimated diagonal
    (:class:`~kfac_jax_peft.kfac.ekfac.Diagonal`; else ``None``)."""

    inverse: Any
    has_curvature: jax.Array
    diag: Any = None


def init_factor(d: int, dtype, *, store: bool, exact: bool) -> FactorState:
    return FactorState(average=jnp.zeros((d, d), dtype) if store else None,
                       weight=jnp.zeros((), dtype),
                       eigen=I.zeros_eigen_factor(d, dtype) if exact else None,
                       decomposed=jnp.zeros((), bool),
                       num_stats=jnp.zeros((), jnp.int32), num_rejected=jnp.zeros((), jnp.int32))


def init_layer(spec: LayerSpec, dtype, *, exact: bool, method: str,
               ekfac: bool = False) -> LayerState:
    inverse = None if exact else I.zeros_curvature(spec.d_a, spec.d_g, "factored", dtype, method)
    diag = E.init_diagonal(spec.d_a, spec.d_g, dtype) if ekfac else None
    return LayerState(inverse=inverse, has_curvature=jnp.zeros((), bool), diag=diag)


# ------------------------------------------------------------------ statistics


def match_statistics(updates, specs: Mapping[str, LayerSpec], kfac_stats) -> dict:
    """Check the statistics against the updates and layers; ``{layer name: stats}``.

    Statistics of a leaf masked out of the updates (``optax.masked``) are
    ignored; anything else that does not fit is an error naming the leaf.
    The statistics of a stacked kernel (``nn.scan``) carry the stack axes
    and are split into its layers.
    """
    flat_u = flatten(updates)
    by_kernel: dict = {}
    for spec in specs.values():
        by_kernel.setdefault(spec.kernel, []).append(spec)
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
        if is_masked(flat_u[path]):
            continue
        if path not in by_kernel:
            shape = tuple(getattr(flat_u[path], "shape", ()))
            why = (f" (its shape {shape} is not 2-D)" if len(shape) != 2 else "")
            raise ValueError(f"statistics for {path!r}, which is not a registered "
                             f"K-FAC layer{why} (see layer_filter)")
        for spec in by_kernel[path]:
            stack = spec.stack_shape
            want_a, want_g = stack + (spec.d_a, spec.d_a), stack + (spec.d_g, spec.d_g)
            if s.A.shape != want_a or s.G.shape != want_g:
                raise ValueError(
                    f"shape mismatch for layer {path!r}: statistics A{tuple(s.A.shape)}, "
                    f"G{tuple(s.G.shape)} but the parameters need A{want_a}, G{want_g} (an "
                    "extra row/column in A is the bias; leading axes are an nn.scan stack)")
            matched[spec.name] = (s if spec.index is None
                                  else jax.tree_util.tree_map(lambda x: x[spec.index], s))
    return matched


def factor_statistics(specs: Mapping[str, LayerSpec], matched: Mapping[str, LayerStats],
                      dtype, grad_ok: Mapping | None = None
                      ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{factor key: (normalised statistics, ok)}`` for the factors with statistics.

    ``A / num_tokens`` and ``G / num_examples`` (K-FAC "expand"); ``ok`` is
    False for a batch without a real token, non-finite statistics, or, for
    a layer's own factors, a gradient of the layer that is not finite
    (``grad_ok``, by kernel path: the layer's own check, so that its
    factors need not wait for the rest of the backward pass).
    """
    grad_ok = {} if grad_ok is None else grad_ok
    out: dict = {}
    source: dict = {}
    for path in sorted(matched):
        spec, s = specs[path], matched[path]
        if spec.a_key not in out:  # own A, or the first group member with statistics
            out[spec.a_key] = F.normalise_sum(s.A, s.num_tokens, dtype)
            source[spec.a_key] = path
        out[spec.g_key] = F.normalise_sum(s.G, s.num_examples, dtype)
        source[spec.g_key] = path
    # a shared input factor is judged by its statistics alone: waiting for its
    # source layer's gradient would hold every member's statistics in memory
    # until then (measured: +2 MiB, 6%, scratch on a small T5 inversion step)
    ok = {k: ok_k & (grad_ok.get(source[k], True) if k.startswith(source[k] + "/") else True)
          for k, (_, ok_k) in out.items()}
    coupled = dict(ok)
    for path in matched:
        spec = specs[path]
        both = ok[spec.a_key] & ok[spec.g_key]
        coupled[spec.g_key] = both
        if spec.a_key == f"{path}/A":
            coupled[spec.a_key] = both
    return {k: (x, coupled[k]) for k, (x, _) in out.items()}


# ------------------------------------------------------------------ accumulate


def accumulate(factors: Mapping[str, FactorState], stats: Mapping[str, tuple], decay
               ) -> tuple[dict[str, FactorState], dict[str, jax.Array]]:
    """One moving-average step of each factor in ``stats``; ``(factors, accepted)``.

    A factor kept as its eigendecomposition only (``average is None``) has
    its sum recovered from it (:func:`~kfac_jax_peft.kfac.factors.ema_from_eigen`)
    and the returned ``average`` holds the new sum, to be decomposed and
    dropped by the caller (see :func:`commit_curvature_only`).
    """
    # With finite statistics and a decay in [0, 1) the new average is a convex
    # combination of finite matrices, hence finite: checking the (scalar) decay
    # here, where a traced hyperparameter escapes the construction-time check,
    # keeps overflow out without a pass over, and a second buffer for, each sum.
    decay_ok = (jnp.asarray(decay) >= 0) & (jnp.asarray(decay) < 1)
    out, accepted = dict(factors), {}
    for key, (x, ok) in stats.items():
        f = factors[key]
        ok = ok & decay_ok
        if f.average is None:
            s, w = F.ema_from_eigen(f.eigen.q, f.eigen.vals, f.weight, x, ok, decay)
        else:
            s, w = F.ema(f.average, x, ok, decay), F.ema_weight(f.weight, ok, decay)
        out[key] = f._replace(average=s, weight=w, num_stats=f.num_stats + ok.astype(jnp.int32),
                              num_rejected=f.num_rejected + (~ok).astype(jnp.int32))
        accepted[key] = ok
    return out, accepted


# ------------------------------------------------------------------ invert


def _where(cond, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(cond, n, o), new, old)


def decompose(factors: Mapping[str, FactorState], keys, spread: tuple[str, ...] | None = None
              ) -> tuple[dict, dict]:
    """Eigendecompositions of the estimates ``S / w`` of ``keys``;
    ``({key: EigenFactor}, {key: usable})`` (usable: finite, from data).
    ``spread``: mesh axes to split the decompositions over
    (:mod:`kfac_jax_peft.kfac.spread`)."""
    keys = sorted(keys)
    dec = I.eigen_factors([F.estimate_one(factors[k].average, factors[k].weight) for k in keys],
                          spread)
    good = {k: I.is_finite(d) & (factors[k].weight > 0) for k, d in zip(keys, dec)}
    return dict(zip(keys, dec)), good


def commit_eigen(factors: Mapping[str, FactorState], dec: Mapping, good: Mapping) -> dict:
    """Store the usable decompositions; a failed one keeps the previous."""
    out = dict(factors)
    for k, d in dec.items():
        f = factors[k]
        out[k] = f._replace(eigen=_where(good[k], d, f.eigen), decomposed=f.decomposed | good[k])
    return out


def commit_curvature_only(old: Mapping[str, FactorState], new: Mapping[str, FactorState],
                          accepted: Mapping, dec: Mapping, good: Mapping) -> dict:
    """Curvature-only state: keep a factor's new weight and decomposition only
    where both its statistics and its decomposition are usable; otherwise
    the step's statistics are dropped (counted in ``num_rejected``). The
    recovered sums are not kept."""
    out = dict(old)
    for k in new:
        f, c = old[k], accepted[k] & good[k]
        out[k] = f._replace(weight=jnp.where(c, new[k].weight, f.weight),
                            eigen=_where(c, dec[k], f.eigen), decomposed=f.decomposed | c,
                            num_stats=f.num_stats + c.astype(jnp.int32),
                            num_rejected=f.num_rejected + (~c).astype(jnp.int32))
    return out


def exact_flags(specs: Mapping[str, LayerSpec], factors: Mapping[str, FactorState],
                layers: Mapping[str, LayerState]) -> dict:
    """``exact`` damping: a layer has curvature once both its factors are decomposed."""
    return {p: layers[p]._replace(has_curvature=factors[s.a_key].decomposed
                                  & factors[s.g_key].decomposed)
            for p, s in specs.items()}


def invert_layers(specs: Mapping[str, LayerSpec], factors: Mapping[str, FactorState],
                  layers: Mapping[str, LayerState], damping, method: str,
                  ns_iterations: int, ns_tolerance: float,
                  damping_scale: str = "absolute",
                  spread: tuple[str, ...] | None = None) -> dict:
    """``factored`` damping: new damped inverses of every layer's pair of
    estimates; a non-finite result keeps the previous inverses. With
    ``damping_scale="relative"`` each pair is damped by ``damping`` times its
    :func:`~kfac_jax_peft.kfac.inverse.relative_scale`. ``spread``: see
    :func:`decompose`."""
    paths = sorted(specs)
    pairs = [tuple(F.estimate_one(factors[k].average, factors[k].weight)
                   for k in (specs[p].a_key, specs[p].g_key)) for p in paths]
    if damping_scale == "relative":
        damping = [damping * I.relative_scale(A, G) for A, G in pairs]
    new = I.invert(pairs, [layers[p].inverse for p in paths], "factored", method, damping,
                   ns_iterations, ns_tolerance, spread)
    out = dict(layers)
    for p, inv in zip(paths, new):
        ls, s = layers[p], specs[p]
        good = (I.is_finite(inv) & (factors[s.a_key].weight > 0)
                & (factors[s.g_key].weight > 0))
        out[p] = LayerState(inverse=_where(good, inv, ls.inverse),
                            has_curvature=ls.has_curvature | good)
    return out


# ------------------------------------------------------------------ precondition


def _curvature(spec: LayerSpec, factors, layers, exact: bool):
    diag = layers[spec.name].diag
    if diag is not None:  # ekfac
        (qa, a), (qg, g) = factors[spec.a_key].eigen, factors[spec.g_key].eigen
        return I.EigenCorrected(qa, qg, E.scale(diag, a, g))
    if exact:
        return I.Eigen(*factors[spec.a_key].eigen, *factors[spec.g_key].eigen)
    return layers[spec.name].inverse


def layer_leaves(flat: Mapping, spec: LayerSpec):
    """``(kernel, bias or None)`` of one layer from a flat tree (its slice of a stack)."""
    w = flat[spec.kernel]
    b = None if spec.bias is None else flat[spec.bias]
    if spec.index is not None:
        w, b = w[spec.index], (None if b is None else b[spec.index])
    return w, b


def precondition(updates, specs: Mapping[str, LayerSpec], factors: Mapping[str, FactorState],
                 layers: Mapping[str, LayerState], damping, exact: bool,
                 damping_scale: str = "absolute"):
    """Each registered layer's ``[grad W; grad b]`` times its damped inverse
    Kronecker block (see :mod:`kfac_jax_peft.kfac.inverse`), in the
    factors' dtype, cast back to the gradient's; other leaves unchanged.
    ``exact`` damping with ``damping_scale="relative"`` damps each layer by
    ``damping`` times the mean eigenvalue of its block
    (:func:`~kfac_jax_peft.kfac.inverse.relative_scale_eigen`)."""
    flat = flatten(updates)
    parts: dict = {}  # leaf path -> {index: new value}
    for name, spec in specs.items():
        gw, gb = layer_leaves(flat, spec)
        w2 = gw.reshape(-1, spec.d_g)  # [prod(in axes), prod(out axes)]
        v = w2 if gb is None else jnp.concatenate([w2, gb.reshape(1, -1).astype(gw.dtype)], 0)
        curv = _curvature(spec, factors, layers, exact)
        lam = (damping * I.relative_scale_eigen(curv)
               if exact and damping_scale == "relative" else damping)
        u = I.precondition(v, curv, lam)
        u = jnp.where(layers[name].has_curvature, u, v.astype(u.dtype))
        parts.setdefault(spec.kernel, {})[spec.index] = u[:w2.shape[0]].reshape(gw.shape)
        if gb is not None:
            parts.setdefault(spec.bias, {})[spec.index] = u[-1].reshape(gb.shape)
    new = {path: _assemble(pieces, flat[path]) for path, pieces in parts.items()}
    return jax.tree_util.tree_map_with_path(lambda p, x: new.get(path_str(p), x), updates,
                                            is_leaf=is_masked)


def _assemble(pieces: dict, like):
    """A leaf from its preconditioned part (``{None: value}``) or from the
    layers of its stack (``{index: value}``), in the leaf's dtype."""
    if None in pieces:
        return pieces[None].astype(like.dtype)
    # every layer of the stack is registered: stack them in index (C) order
    return jnp.stack([pieces[i] for i in sorted(pieces)]).reshape(like.shape).astype(like.dtype)
