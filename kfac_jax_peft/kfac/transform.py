r"""``kfac_precondition``: K-FAC as one optax gradient transformation.

For every registered layer (by default each 2-D floating ``kernel`` leaf,
with its ``bias`` sibling as a homogeneous coordinate; see
:mod:`kfac_jax_peft.kfac.layers`) the update becomes::

    U = (A kron G + damping I)^-1 vec([grad W; grad b])                 (exact)
    U = (A + pi sqrt(d) I)^-1 [grad W; grad b] (G + sqrt(d)/pi I)^-1      (factored)
    U = Q_A [(Q_A^T [grad W; grad b] Q_G) / (s + damping)] Q_G^T          (ekfac)

where ``A`` and ``G`` are bias-corrected exponential moving averages
(decay ``decay``; 0 means the current batch only) of the normalised
statistics of :mod:`kfac_jax_peft.capture`: ``A = E_tokens[abar abar^T]``
and ``G = E_examples[g g^T]`` for a loss that is a mean over examples. See
:mod:`kfac_jax_peft.kfac.inverse` for the damping modes,
:mod:`kfac_jax_peft.kfac.ekfac` for EKFAC's diagonal ``s``, and
:mod:`kfac_jax_peft.kfac.stages` for the stages composed here.

**Damping scale.** ``damping_scale="absolute"`` (the default) uses
``damping`` as it is. The factors' scale depends on the model width, the
batch size and the Fisher type (the empirical Fisher's ``G`` grows with the
batch size), so an absolute value does not transfer; with
``damping_scale="relative"`` each layer is damped by ``damping * s``, ``s =
(tr A / d_a)(tr G / d_g)`` the mean eigenvalue of its block ``A kron G``
(so relative ``1e-2`` is one hundredth of the layer's average curvature;
relative ``r`` equals absolute ``r * s`` layer by layer). Multiplying the
loss by ``c`` multiplies ``G`` by ``c^2`` and the gradient by ``c``: with
relative damping the direction is unchanged (its length is divided by
``c``); with absolute damping it changes.

**Damping at run time.** The extra argument ``damping=`` of ``update``
replaces the configured damping for that call (in the same scale): this is
how :func:`~kfac_jax_peft.adaptive.adaptive_damping` hands its
Levenberg-Marquardt damping to the preconditioner it wraps. With
``factored`` damping the damping enters at inversions only, so a value
passed between inversions takes effect at the next one.

**Schedule.** The statistics arrive as the keyword-only extra argument
``kfac_stats`` of ``update``. ``kfac_stats=None`` means "no new
statistics": the factors are untouched, no inversion happens, and the step
only multiplies by the stored curvature (a separate, cheap trace). On a
step with statistics the factors are updated, then the curvature is
re-inverted if no inversion happened yet or ``invert_every`` calls have
passed since the last one. So statistics may come every step or only on
inversion steps.

**What never enters the state.** Statistics that are not finite, from a
batch without a real token, or of a layer whose gradient is not finite on
the step are dropped and counted
(``num_rejected`` of the factor); an inversion that is not finite keeps
the previous curvature. Leaves that are not layers pass through
unchanged, and so does a layer until its first successful inversion
(``has_curvature`` of its :class:`~kfac_jax_peft.kfac.stages.LayerState`).

**Shared input factors** (``input_groups``). Layers that read the same
input with the same token mask have the same ``A``: the query, key and
value projections of a self-attention block (and so their LoRA ``lora_A``)
all read the block's normalised hidden states; in T5 the cross-attention
key and value projections of every decoder block read the encoder output.
``input_groups`` declares such groups, as a function ``path -> key or
None`` of the kernel path, or as ``(regex, key)`` rules (the first regex
that matches the whole path gives ``match.expand(key)``)::

    input_groups=[(r"(.*/SelfAttention)/[qkv]/lora_A/kernel", r"\1"),
                  (r".*/EncDecAttention/[kv]/lora_A/kernel", "encoder_output")]

The layers of a group of two or more then share one input factor, kept
under the group's key: one moving average and, with ``exact`` damping, one
eigendecomposition. The group's ``A`` statistics are those of its first
member (in path order) with statistics; the others' are not read (XLA
drops their computation), so with identical inputs the updates are those
without sharing, bit for bit. With ``factored`` damping the damped inverse
``(A + pi_l sqrt(d) I)^-1`` depends on each layer's own ``pi_l``, so only
the moving average is shared. The declaration is trusted, not checked:
layers that read different inputs must not be grouped (LoRA dropout draws
its own mask per module; the group then uses the first member's masked
input, an estimate of the same expected factor).

**Curvature-only state** (``store_factors=False``; ``exact`` damping, and
every statistics step inverts: to invert every ``k`` steps, pass
statistics every ``k`` steps). A factor keeps the eigendecomposition ``Q
diag(a) Q^T`` of its estimate and the weight ``w``, not the moving
average; a statistics step recovers and decomposes the new average::

    S_{t-1} = w_{t-1} Q diag(a) Q^T
    S_t = rho S_{t-1} + (1 - rho) X_t,   w_t = rho w_{t-1} + (1 - rho)
    Q diag(a) Q^T <- eigh(S_t / w_t)

which is the moving average up to the eigensolver's backward error (about
``eps ||S|| / (1 - rho)`` in all; float64 agrees to ~1e-15). It halves the
state of every factor for one extra ``d^3`` matmul per factor and
statistics step. A step whose decomposition is not finite drops that
factor's statistics.

**No silent fall-back.** A layer without statistics is preconditioned by
nothing: K-FAC quietly becomes the (clipped) gradient. So: ``init`` warns
when ``layer_filter`` registers no layer at all; a statistics step that
lacks statistics for some registered layers warns once per compiled step,
naming them; and a step without statistics that finds, at the
``invert_every``-th call, that no statistics have ever arrived (the model
does not capture its layers, or ``kfac_stats`` is never passed, as with
``TrainState.apply_gradients``) warns from the device through
``jax.debug.callback``. With ``strict=True`` each of these raises instead.
:func:`describe` prints what is registered and what each layer received.

**Hyperparameters** are checked when the transformation is built (see
:mod:`kfac_jax_peft._hyper`): ``damping >= 0``, ``decay`` in ``[0, 1)``,
``invert_every`` a positive integer, all finite; a schedule's value at
count 0 is checked at ``init``. Under ``optax.inject_hyperparams`` every
numeric argument may be a hyperparameter (``invert_every`` too: it is
compared as an array); only ``ns_iterations`` (with Newton-Schulz) and
callables (``layer_filter``, a callable ``input_groups``) must be listed
in ``static_args``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_peft import _hyper as H
from kfac_jax_peft.kfac import ekfac as E
from kfac_jax_peft.kfac import inverse as I
from kfac_jax_peft.kfac import stages as S
from kfac_jax_peft.kfac.layers import (
    InputGroups,
    default_layer_filter,
    factor_sizes,
    flatten,
    group_fn,
    register,
)
from kfac_jax_peft.kfac.spread import mesh_axes


class KFACState(NamedTuple):
    """State of :func:`kfac_precondition`.

    Attributes:
      count: number of ``update`` calls.
      last_inversion: ``count`` at the last inversion (-1 before any).
      num_inversions: number of inversions performed.
      factors: :class:`~kfac_jax_peft.kfac.stages.FactorState` per factor
        key (``"<kernel path>/A"``, ``"<kernel path>/G"``, or an input
        group's key).
      layers: :class:`~kfac_jax_peft.kfac.stages.LayerState` per kernel path.
    """

    count: jax.Array
    last_inversion: jax.Array
    num_inversions: jax.Array
    factors: dict
    layers: dict


class _Config(NamedTuple):
    exact: bool  # eigendecompositions of the factors (exact or ekfac damping)
    scale: str
    method: str
    dtype: Any
    store: bool
    layer_filter: Callable
    groups: Callable
    ekfac: bool = False
    distribute: bool = False


def kfac_precondition(
    damping: optax.ScalarOrSchedule = 1e-3,
    *,
    decay: optax.ScalarOrSchedule = 0.95,
    invert_every: int = 1,
    damping_mode: str = "exact",
    damping_scale: str = "absolute",
    inverse_method: str = "cholesky_solve",
    axis_name: str | None = None,
    layer_filter: Callable[[str, Any], bool] | None = None,
    factor_dtype: Any = "float32",
    ns_iterations: int = 1,
    ns_tolerance: float = 1e-3,
    input_groups: InputGroups | None = None,
    store_factors: bool = True,
    distribute_inversions: bool = False,
    strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Precondition gradients by the inverse K-FAC Fisher of each dense layer.

    The math, the schedule, the memory options and what is kept out of the
    state are in the module documentation of
    :mod:`kfac_jax_peft.kfac.transform`.

    Args:
      damping: Tikhonov damping ``lambda >= 0`` (float or schedule of ``count``).
      decay: moving-average decay of the factors, in ``[0, 1)`` (float or schedule).
      invert_every: calls between inversions (a positive integer).
      damping_mode: ``"exact"`` (eigenbasis, exact damping), ``"ekfac"``
        (the same eigenbasis with a re-estimated diagonal, see
        :mod:`kfac_jax_peft.kfac.ekfac`; the statistics must come from
        probes passed through :func:`~kfac_jax_peft.ekfac_probes`, and
        ``invert_every >= 2``) or ``"factored"``.
      damping_scale: ``"absolute"`` (``damping`` as given) or ``"relative"``
        (times each layer's mean eigenvalue ``(tr A / d_a)(tr G / d_g)``; see
        the module documentation).
      inverse_method: for ``factored``: ``"cholesky_solve"`` (the default:
        stored Cholesky factors, triangular solves each step), ``"cholesky"``
        (stored inverses), ``"eigh"`` or ``"newton_schulz"`` (matmul-only,
        warm-started, Cholesky fallback).
      axis_name: ``pmap`` axis over which statistics are summed (raw sums
        and counts, so the result equals one device on the global batch).
        ``None``: no collective, for ``jit`` with a sharded batch and for
        ``jax.shard_map`` (with its default ``check_vma=True`` the
        statistics of replicated probes come out of the backward pass
        summed over the batch axes, as the gradients of replicated
        parameters do). Gradients are not reduced here.
      layer_filter: ``(path, leaf) -> bool`` choosing the K-FAC layers
        (2-D floating leaves); ``None`` means every 2-D floating ``kernel``.
      factor_dtype: ``float32`` (default, whatever the parameter dtype) or
        ``float64`` (needs ``jax_enable_x64``).
      ns_iterations, ns_tolerance: Newton-Schulz iterations per inversion,
        and the largest predicted relative residual accepted before falling
        back to Cholesky.
      input_groups: layers sharing one input factor; ``None``: none.
      store_factors: ``False`` keeps only the curvature.
      distribute_inversions: under ``jax.jit`` over a device mesh (the step
        traced inside ``with jax.set_mesh(mesh):``), each device decomposes
        about ``1/N`` of the factors (of each size) and the results are
        gathered onto every device, instead of every device repeating
        every inversion (:mod:`kfac_jax_peft.kfac.spread`); the same update.
        Not with ``inverse_method="newton_schulz"`` nor under ``pmap``.
        To keep the factors themselves split over the mesh (memory), give
        the state the shardings of :func:`kfac_jax_peft.kfac_state_shardings`.
      strict: raise instead of warning when registered layers get no
        statistics (see *No silent fall-back* in the module documentation).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
      the keyword-only extra argument ``kfac_stats``.

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
    _check_settings(damping, decay, invert_every, damping_mode, inverse_method, ns_tolerance,
                    store_factors)
    distribute = bool(distribute_inversions)
    if distribute and (inverse_method == "newton_schulz" and damping_mode == "factored"):
        raise ValueError("distribute_inversions=True needs damping_mode='exact' or another "
                         "inverse_method than 'newton_schulz' (matmul-only; its Cholesky "
                         "fall-back is decided for a whole stack)")
    if distribute and axis_name is not None:
        raise ValueError(f"distribute_inversions=True is for jit over a device mesh; with "
                         f"axis_name={axis_name!r} (pmap) every device inverts")
    if inverse_method == "newton_schulz":
        ns_iterations = int(H.check_positive_int("ns_iterations", ns_iterations))
    H.check_choice("damping_scale", damping_scale, I.DAMPING_SCALES)
    strict = bool(strict)
    cfg = _Config(exact=damping_mode in ("exact", "ekfac"), scale=damping_scale,
                  method=inverse_method,
                  dtype=H.check_factor_dtype(factor_dtype), store=bool(store_factors),
                  layer_filter=layer_filter or default_layer_filter,
                  groups=group_fn(input_groups), ekfac=damping_mode == "ekfac",
                  distribute=distribute)

    def init_fn(params):
        H.check_schedule_start("damping", damping, low=0.0)
        H.check_schedule_start("decay", decay, low=0.0, high=1.0, high_open=True)
        return _init_state(cfg, params, strict)

    def update_fn(updates, state, params=None, *, kfac_stats=None, **extra_args):
        del params
        kernels = {_kernel_of(name) for name in state.layers}
        specs = register(updates, lambda p, x: cfg.layer_filter(p, x) if p in kernels else None,
                         cfg.groups)
        missing = sorted(set(state.layers) - set(specs))
        if missing:
            raise ValueError(f"K-FAC layers {missing} of the state are not in the updates")
        lam = _damping_now(damping, state.count, extra_args.get("damping"), cfg.dtype)
        if kfac_stats is not None:
            state = _statistics_step(cfg, specs, state, updates, kfac_stats, lam,
                                     H.resolve(decay, state.count), invert_every, axis_name,
                                     (ns_iterations, ns_tolerance), strict)
        elif specs:
            _check_statistics_arrived(state, invert_every, strict)
        new = S.precondition(updates, specs, state.factors, state.layers, lam, cfg.exact,
                             cfg.scale)
        return new, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_settings(damping, decay, invert_every, damping_mode, inverse_method, ns_tolerance,
                    store_factors) -> None:
    """Refuse, by name, the settings that make no sense (module doc)."""
    H.check_choice("damping_mode", damping_mode, I.DAMPING_MODES)
    H.check_choice("inverse_method", inverse_method, I.INVERSE_METHODS)
    H.check_scalar("damping", damping, low=0.0)
    H.check_scalar("decay", decay, low=0.0, high=1.0, high_open=True)
    H.check_positive_int("invert_every", invert_every)
    H.check_scalar("ns_tolerance", ns_tolerance, low=0.0, low_open=True)
    if (damping_mode == "ekfac" and not isinstance(invert_every, jax.core.Tracer)
            and int(invert_every) == 1):
        raise ValueError("damping_mode='ekfac' needs invert_every >= 2 (got 1): its diagonal "
                         "is re-estimated between decompositions and restarts at each one, "
                         "so with a decomposition at every statistics step it is K-FAC's")
    if not store_factors and (damping_mode != "exact" or _concrete_ne(invert_every, 1)):
        raise ValueError("store_factors=False needs damping_mode='exact' and invert_every=1 "
                         f"(got {damping_mode!r} and {invert_every}): the moving average is "
                         "recovered from the eigendecomposition of the last step")


def _init_state(cfg: _Config, params, strict: bool) -> KFACState:
    specs = register(params, cfg.layer_filter, cfg.groups)
    if not specs:
        _complain(strict, "kfac_precondition registered no layer among the "
                  f"{len(jax.tree_util.tree_leaves(params))} leaves of the parameters "
                  "(see layer_filter): every update passes through unchanged")
    factors = {k: S.init_factor(d, cfg.dtype, store=cfg.store, exact=cfg.exact)
               for k, d in factor_sizes(specs).items()}
    layers = {p: S.init_layer(s, cfg.dtype, exact=cfg.exact, method=cfg.method, ekfac=cfg.ekfac)
              for p, s in specs.items()}
    return KFACState(count=jnp.zeros((), jnp.int32), last_inversion=-jnp.ones((), jnp.int32),
                     num_inversions=jnp.zeros((), jnp.int32), factors=factors, layers=layers)


def _damping_now(damping, count, override, dtype) -> jax.Array:
    """The damping of this call: the extra argument ``damping=`` when given
    (checked like the configured value where it is concrete), else the
    configured value or schedule at ``count``."""
    if override is None:
        return jnp.asarray(H.resolve(damping, count), dtype)
    H.check_scalar("damping (extra argument of update)", override, low=0.0, schedule=False)
    return jnp.asarray(override, dtype)


def _concrete_ne(value, target) -> bool:
    return not isinstance(value, jax.core.Tracer) and int(value) != target


def _kernel_of(name: str) -> str:
    """The kernel path of a layer name (``path`` or ``path[i]`` in a stack)."""
    return re.sub(r"\[\d+\]$", "", name)


def _layer_grad_finite(flat, spec) -> jax.Array:
    w, b = S.layer_leaves(flat, spec)
    ok = jnp.all(jnp.isfinite(w))
    return ok if b is None else ok & jnp.all(jnp.isfinite(b))


def _complain(strict: bool, message: str) -> None:
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=4)


def _check_statistics_arrived(state: KFACState, invert_every, strict: bool) -> None:
    """At the ``invert_every``-th call without statistics, warn (or raise)
    from the device if no layer has ever accepted or rejected statistics."""
    seen = sum((f.num_stats + f.num_rejected for f in state.factors.values()),
               jnp.zeros((), jnp.int32))

    def tell(count):
        _complain(strict, f"kfac_precondition: {int(count)} updates and no K-FAC statistics "
                  "yet: every layer passes its gradient through unchanged. Pass "
                  "kfac_stats=... (from kfac_value_and_grad) on some steps, and capture the "
                  "model's layers (KFACDense, kp.dense).")

    jax.lax.cond((state.count == invert_every) & (seen == 0),
                 lambda c: jax.debug.callback(tell, c), lambda c: None, state.count)


def _statistics_step(cfg: _Config, specs, state: KFACState, updates, kfac_stats, lam, rho,
                     invert_every, axis_name, ns, strict=False) -> KFACState:
    """Accumulate the step's statistics, then invert when due (or, for the
    curvature-only state, decompose what changed)."""
    matched = S.match_statistics(updates, specs, kfac_stats)
    missing = sorted(set(specs) - set(matched))
    if missing:
        _complain(strict, f"kfac_precondition: no statistics for the registered layers "
                  f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} of "
                  f"{len(specs)}) on a statistics step; they keep their factors, and pass "
                  "their gradient through unchanged until they have curvature")
    if not matched:
        return state
    spread = mesh_axes() if cfg.distribute else None
    # a layer whose gradient is not finite keeps its factors (on every device
    # alike: the count of bad devices is summed with the statistics)
    flat = flatten(updates)
    bad = {p: (~_layer_grad_finite(flat, specs[p])).astype(jnp.int32) for p in matched}
    if axis_name is not None:
        matched, bad = jax.lax.psum((matched, bad), axis_name)
    stats = S.factor_statistics(specs, matched, cfg.dtype, {p: b == 0 for p, b in bad.items()})
    factors, accepted = S.accumulate(state.factors, stats, rho)
    layers = state.layers
    if cfg.ekfac:
        layers = E.accumulate_diagonals(layers, E.diagonal_statistics(matched, stats, specs,
                                                                      cfg.dtype), rho)
    elif any(s.ekfac is not None for s in matched.values()):
        raise ValueError("the statistics carry an EKFAC diagonal but damping_mode is not "
                         "'ekfac': capture them with the model's plain probes")
    if not cfg.store:
        new = {k: factors[k] for k in stats}
        dec, good = S.decompose(new, new, spread)
        factors = S.commit_curvature_only(state.factors, new, accepted, dec, good)
        layers = S.exact_flags(specs, factors, state.layers)
        return state._replace(factors=factors, layers=layers, last_inversion=state.count,
                              num_inversions=state.num_inversions + 1)

    def invert(carry):
        factors, layers = carry
        if cfg.exact:
            dec, good = S.decompose(factors, factors, spread)
            factors = S.commit_eigen(factors, dec, good)
            if cfg.ekfac:
                layers = E.restart_diagonals(specs, layers, good)
            return factors, S.exact_flags(specs, factors, layers)
        return factors, S.invert_layers(specs, factors, layers, lam, cfg.method, *ns,
                                        damping_scale=cfg.scale, spread=spread)

    last = state.last_inversion
    due = (last < 0) | (state.count - last >= invert_every)
    factors, layers = jax.lax.cond(due, invert, lambda c: c, (factors, layers))
    return state._replace(factors=factors, layers=layers,
                          last_inversion=jnp.where(due, state.count, last),
                          num_inversions=state.num_inversions + due.astype(jnp.int32))


def kfac_state(opt_state) -> KFACState | None:
    """The first :class:`KFACState` found in an optimizer state (for example
    inside an ``optax.chain``), or None."""
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, KFACState)):
        if isinstance(s, KFACState):
            return s
    return None


def describe(opt_state) -> str:
    """A short table of the K-FAC state found in ``opt_state``: each
    registered layer, its factor sizes, statistics accepted and rejected,
    and whether it has curvature (its gradient passes through unchanged
    until it has); then the shared input factors, if any."""
    st = kfac_state(opt_state)
    if st is None:
        return "no K-FAC state in this optimizer state"
    st = jax.device_get(st)
    lines = [f"K-FAC: {int(st.count)} updates, {int(st.num_inversions)} inversions (last at "
             f"update {int(st.last_inversion)}), {len(st.layers)} layers, "
             f"{len(st.factors)} factors"]
    rows = [("layer", "d_A", "d_G", "stats", "rejected", "curvature")]
    for path in sorted(st.layers):
        g, a = st.factors[f"{path}/G"], st.factors.get(f"{path}/A")
        rows.append((path, "shared" if a is None else _dim(a), _dim(g), str(int(g.num_stats)),
                     str(int(g.num_rejected)),
                     "yes" if bool(st.layers[path].has_curvature) else "NO"))
    own = {k for p in st.layers for k in (f"{p}/A", f"{p}/G")}
    for key in sorted(set(st.factors) - own):
        f = st.factors[key]
        rows.append((f"[shared input factor {key!r}]", _dim(f), "", str(int(f.num_stats)),
                     str(int(f.num_rejected)), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _dim(f) -> str:
    return str((f.average if f.average is not None else f.eigen.q).shape[0])
