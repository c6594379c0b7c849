"""``kfac_precondition``: K-FAC as one optax gradient transformation."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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


class SharedInput(NamedTuple):
    """State of an input factor ``A`` shared by a group of layers (see
    ``input_groups`` of :func:`kfac_precondition`); the members' own
    :class:`LayerState` then hold ``factors.A = None`` (and, with ``exact``
    damping, ``curvature.qa = curvature.a = None``)."""

    A: jax.Array | None  # moving-average sum (None with store_factors=False)
    weight: jax.Array  # sum of the moving-average weights
    curvature: Any  # inverse.EigenFactor (exact damping) or None (factored)
    has_curvature: jax.Array
    num_stats: jax.Array
    num_rejected: jax.Array


class KFACState(NamedTuple):
    """State of :func:`kfac_precondition`.

    Attributes:
      count: number of ``update`` calls.
      last_inversion: ``count`` at the last inversion (-1 before any).
      num_inversions: number of inversions performed.
      layers: per-layer state keyed by the ``/``-joined path of the kernel.
      shared_inputs: :class:`SharedInput` keyed by group (empty unless
        ``input_groups`` puts two or more layers in one group).
    """

    count: jax.Array
    last_inversion: jax.Array
    num_inversions: jax.Array
    layers: dict
    shared_inputs: dict = {}  # never mutated


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


InputGroups = Callable[[str], Any] | Sequence[tuple[str, str]]


def _group_fn(input_groups) -> Callable[[str], str | None]:
    """``path -> group key or None`` from a callable or ``(regex, key template)`` rules
    (the first rule whose pattern matches the whole path gives ``match.expand(key)``)."""
    if input_groups is None:
        return lambda path: None
    if callable(input_groups):
        return lambda path: (None if (k := input_groups(path)) is None else str(k))
    rules = [(re.compile(pattern), template) for pattern, template in input_groups]

    def fn(path):
        for rx, template in rules:
            m = rx.fullmatch(path)
            if m is not None:
                return m.expand(template)
        return None

    return fn


def _groups(paths, group_fn) -> dict:
    """``{key: [paths]}`` of the groups with two or more members."""
    groups: dict = {}
    for path in sorted(paths):
        key = group_fn(path)
        if key is not None:
            groups.setdefault(key, []).append(path)
    return {k: v for k, v in groups.items() if len(v) > 1}


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
    input_groups: InputGroups | None = None,
    store_factors: bool = True,
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

    **Shared input factors** (``input_groups``). Layers that read the same
    input with the same token mask have the same ``A``: the query, key and
    value projections of a self-attention block (and so their LoRA
    ``lora_A``) all read the block's normalised hidden states; in T5 the
    cross-attention key and value projections of every decoder block read
    the encoder output. ``input_groups`` declares such groups, as a function
    ``path -> key or None`` of the kernel path, or as ``(regex, key)`` rules
    (the first regex that matches the whole path gives ``match.expand(key)``)::

        input_groups=[(r"(.*/SelfAttention)/[qkv]/lora_A/kernel", r"\1"),
                      (r".*/EncDecAttention/[kv]/lora_A/kernel", "encoder_output")]

    The layers of a group of two or more (their ``A`` must have one shape)
    keep one moving average of ``A`` and, with ``exact`` damping, one
    eigendecomposition of it (:class:`SharedInput` in ``shared_inputs`` of
    the state), instead of one per layer; their ``G`` stay per layer. On a
    statistics step the group's ``A`` statistics are those of its first
    member (in path order) that has statistics; the others' ``A`` statistics
    are not read (so XLA drops their computation). With identical inputs
    that is every member's own ``A``, and the updates are those without
    sharing, bit for bit. A member's ``G`` is accepted when its own
    statistics and the group's ``A`` are finite with a real token (as
    without sharing, where a non-finite ``A`` rejects the layer). With
    ``factored`` damping the damped inverse ``(A + pi_l sqrt(d) I)^-1``
    depends on each layer's own ``pi_l``, so only the moving average is
    shared. The group's curvature is inverted independently of its members'
    ``G`` (its own ``has_curvature``, ``num_stats`` and ``num_rejected``); a
    member uses its curvature once both halves have been inverted. The
    declaration is trusted, not checked: layers that read different inputs
    must not be grouped. (LoRA dropout, which draws its own mask for each
    module, makes the inputs differ; the group then uses the first member's
    masked input, an estimate of the same expected factor.)

    **Curvature-only state** (``store_factors=False``; ``exact`` damping and
    ``invert_every=1``, i.e. every step with statistics inverts: to invert
    every ``k`` steps, pass statistics every ``k`` steps). The state keeps
    the eigendecomposition ``Q diag(a) Q^T`` of each factor's estimate and
    the moving-average weight ``w``, not the moving average itself; a
    statistics step recovers it and decomposes the new average::

        S_{t-1} = w_{t-1} Q diag(a) Q^T
        S_t = rho S_{t-1} + (1 - rho) X_t,   w_t = rho w_{t-1} + (1 - rho)
        Q diag(a) Q^T <- eigh(S_t / w_t)

    (the eigenvalues are stored as computed, round-off negatives included,
    and clipped only where the direction is computed), which is the moving
    average above up to round-off: the eigensolver's backward error
    ``~ eps ||S||`` per step, damped by the decay (about ``eps ||S|| / (1 -
    rho)`` in all; in float64 the recovered averages agree to ~1e-15). It
    halves the state of every factor (one ``[d, d]`` array instead of two)
    for one extra ``d^3`` matmul per factor and statistics step. Since no
    separate average holds a step's statistics, a step whose inversion is
    not finite drops them (counted in ``num_rejected``; the state is left
    as it was).

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
        schedules there; likewise a callable ``input_groups``, and
        ``invert_every`` and ``ns_iterations``, which must stay Python integers.)
      factor_dtype: dtype of factors and inverses (float32 by default,
        whatever the parameter dtype; float64 needs ``jax_enable_x64``).
      ns_iterations, ns_tolerance: Newton-Schulz settings: iterations per
        inversion, and the largest predicted relative residual
        ``r0 ** (2 ** ns_iterations)`` accepted before falling back to Cholesky.
      input_groups: layers sharing one input factor (see above); ``None``: none.
      store_factors: ``False`` keeps only the curvature (see above).

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
    store_factors = bool(store_factors)
    if not store_factors and (damping_mode != "exact" or invert_every != 1):
        raise ValueError("store_factors=False needs damping_mode='exact' and invert_every=1 "
                         f"(got {damping_mode!r} and {invert_every}): the moving average is "
                         "recovered from the eigendecomposition of the last step")
    factor_dtype = jnp.dtype(factor_dtype)
    if layer_filter is None:
        layer_filter = default_layer_filter
    group_fn = _group_fn(input_groups)
    exact = damping_mode == "exact"

    def init_fn(params):
        info = _layers(params, layer_filter)
        d_a = {p: k.shape[0] + int(b is not None) for p, (k, b) in info.items()}
        groups = _groups(info, group_fn)
        shared_inputs = {}
        for key, members in groups.items():
            dims = {d_a[p] for p in members}
            if len(dims) > 1:
                raise ValueError(f"input group {key!r} has layers with input factors of "
                                 f"different sizes: {({p: d_a[p] for p in members})}")
            d = dims.pop()
            shared_inputs[key] = SharedInput(
                A=jnp.zeros((d, d), factor_dtype) if store_factors else None,
                weight=jnp.zeros((), factor_dtype),
                curvature=I.zeros_eigen_factor(d, factor_dtype) if exact else None,
                has_curvature=jnp.zeros((), bool),
                num_stats=jnp.zeros((), jnp.int32),
                num_rejected=jnp.zeros((), jnp.int32))
        member = {p for ms in groups.values() for p in ms}
        layers = {}
        for path, (kernel, _) in info.items():
            d_g = kernel.shape[1]
            own_a = path not in member
            layers[path] = LayerState(
                factors=F.zeros_factors(d_a[path], d_g, factor_dtype,
                                        store_a=own_a and store_factors,
                                        store_g=store_factors),
                curvature=I.zeros_curvature(d_a[path], d_g, damping_mode, factor_dtype,
                                            inverse_method, store_a=own_a or not exact),
                has_curvature=jnp.zeros((), bool),
                num_stats=jnp.zeros((), jnp.int32),
                num_rejected=jnp.zeros((), jnp.int32))
        return KFACState(count=jnp.zeros((), jnp.int32),
                         last_inversion=-jnp.ones((), jnp.int32),
                         num_inversions=jnp.zeros((), jnp.int32), layers=layers,
                         shared_inputs=shared_inputs)

    def _match(updates, state, kfac_stats, members) -> dict:
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
            d_a, d_g = _dims(state, path, members)
            if s.A.shape != (d_a, d_a) or s.G.shape != (d_g, d_g):
                raise ValueError(
                    f"shape mismatch for layer {path!r}: statistics A{tuple(s.A.shape)}, "
                    f"G{tuple(s.G.shape)} but the parameters need A{(d_a, d_a)}, "
                    f"G{(d_g, d_g)} (an extra row/column in A is the bias)")
            matched[path] = s
        return matched

    def member_of(state) -> dict:
        """``{layer path: group key}`` of the layers whose ``A`` is shared."""
        if not state.shared_inputs:
            return {}
        out = {}
        for path in state.layers:
            key = group_fn(path)
            if key is not None and key in state.shared_inputs:
                out[path] = key
        return out

    def _dims(state, path, members) -> tuple[int, int]:
        """``(d_a, d_g)`` of a registered layer (from its curvature's shapes)."""
        c = state.layers[path].curvature
        if exact:
            qa = state.shared_inputs[members[path]].curvature.q if path in members else c.qa
            return qa.shape[0], c.qg.shape[0]
        return c[0].shape[0], c[1].shape[0]

    def new_curvature(lf: dict, gf: dict, members: dict, prev: dict, lam):
        """Decompose or invert the estimates of the layer factors ``lf``
        (``{path: Factors}``) and of the shared input factors ``gf`` (``{key:
        (sum, weight)}``); ``({path: curvature}, {key: EigenFactor or None})``."""
        g_est = {k: F.estimate_one(s, w) for k, (s, w) in gf.items()}
        paths = sorted(lf)
        ests = {p: F.estimate(lf[p]) for p in paths}
        if exact:
            mats = [m for p in paths for m in ests[p] if m is not None]
            keys = sorted(g_est)
            dec = I.eigen_factors(mats + [g_est[k] for k in keys])
            it = iter(dec[:len(mats)])
            layer_curv = {}
            for p in paths:
                a_half = next(it) if ests[p][0] is not None else (None, None)
                layer_curv[p] = I.Eigen(*a_half, *next(it))
            return layer_curv, dict(zip(keys, dec[len(mats):]))
        pairs = [(g_est[members[p]] if p in members else ests[p][0], ests[p][1]) for p in paths]
        new = I.invert(pairs, [prev[p] for p in paths], damping_mode, inverse_method, lam,
                       ns_iterations, ns_tolerance)
        return dict(zip(paths, new)), dict.fromkeys(gf)

    def _where(cond, new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(cond, n, o), new, old)

    def update_fn(updates, state, params=None, *, kfac_stats=None, **extra_args):
        del params, extra_args
        layer_info = _layers(updates, lambda p, x: p in state.layers)
        missing = sorted(set(state.layers) - set(layer_info))
        if missing:
            raise ValueError(f"K-FAC layers {missing} of the state are not in the updates")
        members = member_of(state)
        count = state.count
        lam = jnp.asarray(_resolve(damping, count), factor_dtype)
        layers = dict(state.layers)
        shared = dict(state.shared_inputs)
        last_inv, n_inv = state.last_inversion, state.num_inversions

        if kfac_stats is not None:
            matched = _match(updates, state, kfac_stats, members)
            if axis_name is not None:
                matched = jax.lax.psum(matched, axis_name)
            rho = _resolve(decay, count)

            # a group's A: the statistics of its first member (in path order) that
            # has statistics; the other members' A statistics are not read
            new_gf, ok_g = {}, {}
            for path in sorted(matched):
                key = members.get(path)
                if key is None or key in new_gf:
                    continue
                g = shared[key]
                X, ok = F.normalise_sum(matched[path].A, matched[path].num_tokens,
                                        factor_dtype)
                if store_factors:
                    new_gf[key] = (F.ema(g.A, X, ok, rho), F.ema_weight(g.weight, ok, rho))
                else:
                    new_gf[key] = F.ema_from_eigen(*g.curvature, g.weight, X, ok, rho)
                ok_g[key] = ok
            # new moving averages (sums and weights; recovered from the curvature
            # when the averages are not stored)
            new_lf, ok_l = {}, {}
            for path, s in matched.items():
                ls = layers[path]
                if path in members:
                    A = None
                    G, ok = F.normalise_sum(s.G, s.num_examples, factor_dtype)
                    ok = ok_g[members[path]] & ok
                else:
                    A, G, ok = F.normalise(s, factor_dtype)
                if store_factors:
                    new_lf[path] = F.ema_update(ls.factors, A, G, ok, rho)
                else:
                    c = ls.curvature
                    sg, w = F.ema_from_eigen(c.qg, c.g, ls.factors.weight, G, ok, rho)
                    sa = None if A is None else F.ema_from_eigen(c.qa, c.a, ls.factors.weight,
                                                                 A, ok, rho)[0]
                    new_lf[path] = F.Factors(sa, sg, w)
                ok_l[path] = ok

            if store_factors:
                for path, f in new_lf.items():
                    ls, ok = layers[path], ok_l[path]
                    layers[path] = ls._replace(
                        factors=f, num_stats=ls.num_stats + ok.astype(jnp.int32),
                        num_rejected=ls.num_rejected + (~ok).astype(jnp.int32))
                for key, (S, w) in new_gf.items():
                    g, ok = shared[key], ok_g[key]
                    shared[key] = g._replace(
                        A=S, weight=w, num_stats=g.num_stats + ok.astype(jnp.int32),
                        num_rejected=g.num_rejected + (~ok).astype(jnp.int32))

                due = (last_inv < 0) | (count - last_inv >= invert_every)

                def do_invert(carry):
                    ls_d, sh_d = carry
                    lc, gc = new_curvature({p: ls.factors for p, ls in ls_d.items()},
                                           {k: (g.A, g.weight) for k, g in sh_d.items()},
                                           members, {p: ls.curvature for p, ls in ls_d.items()},
                                           lam)
                    sh_out = dict(sh_d)
                    for k, g in sh_d.items():
                        if gc[k] is None:  # factored: the members hold the inverses
                            sh_out[k] = g._replace(has_curvature=g.has_curvature | (g.weight > 0))
                        else:
                            good = I.is_finite(gc[k]) & (g.weight > 0)
                            sh_out[k] = g._replace(curvature=_where(good, gc[k], g.curvature),
                                                   has_curvature=g.has_curvature | good)
                    out = dict(ls_d)
                    for p, ls in ls_d.items():
                        good = I.is_finite(lc[p]) & (ls.factors.weight > 0)
                        usable = good
                        if exact and p in members:
                            usable = good & sh_out[members[p]].has_curvature
                        out[p] = ls._replace(curvature=_where(good, lc[p], ls.curvature),
                                             has_curvature=ls.has_curvature | usable)
                    return out, sh_out

                if layers:
                    layers, shared = jax.lax.cond(due, do_invert, lambda c: c, (layers, shared))
                    last_inv = jnp.where(due, count, last_inv)
                    n_inv = n_inv + due.astype(jnp.int32)
            elif matched:
                # curvature-only state: every statistics step inverts what changed
                lc, gc = new_curvature(new_lf, new_gf, members, {}, lam)
                for key, (_, w) in new_gf.items():
                    g = shared[key]
                    commit = ok_g[key] & I.is_finite(gc[key]) & (w > 0)
                    shared[key] = g._replace(
                        weight=jnp.where(commit, w, g.weight),
                        curvature=_where(commit, gc[key], g.curvature),
                        has_curvature=g.has_curvature | commit,
                        num_stats=g.num_stats + commit.astype(jnp.int32),
                        num_rejected=g.num_rejected + (~commit).astype(jnp.int32))
                for path, f in new_lf.items():
                    ls = layers[path]
                    commit = ok_l[path] & I.is_finite(lc[path]) & (f.weight > 0)
                    usable = commit
                    if path in members:
                        usable = commit & shared[members[path]].has_curvature
                    layers[path] = ls._replace(
                        factors=ls.factors._replace(
                            weight=jnp.where(commit, f.weight, ls.factors.weight)),
                        curvature=_where(commit, lc[path], ls.curvature),
                        has_curvature=ls.has_curvature | usable,
                        num_stats=ls.num_stats + commit.astype(jnp.int32),
                        num_rejected=ls.num_rejected + (~commit).astype(jnp.int32))
                last_inv = count
                n_inv = n_inv + 1

        def curvature_of(path):
            c = layers[path].curvature
            if exact and path in members:
                q, vals = shared[members[path]].curvature
                return I.Eigen(q, vals, c.qg, c.g)
            return c

        def apply(path, grad_w, grad_b):
            ls = layers[path]
            v = grad_w if grad_b is None else jnp.concatenate([grad_w, grad_b[None]], 0)
            u = I.precondition(v, curvature_of(path), lam)
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
                              num_inversions=n_inv, layers=layers, shared_inputs=shared)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
