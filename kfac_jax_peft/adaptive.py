r"""Adaptive damping and step size from the local quadratic model (Martens & Grosse 2015, sec. 6).

Around the current point ``theta``, on the current batch, the loss ``h`` is
modelled by::

    M(delta) = h(theta) + g^T delta + 1/2 delta^T C delta                 (1)

with ``g`` the gradient and ``C`` the exact curvature of the batch: the
Fisher, or the Gauss-Newton matrix of the training loss through the model's
outputs (:func:`kfac_jax_peft.fisher.fisher_vector_product`; the two are
equal for a mean of cross-entropies). ``C`` enters only through products
``C v``, one forward-mode and one reverse-mode pass through the model each.

:func:`adaptive_damping` (section 6.5): Levenberg-Marquardt adjustment of the
damping ``lambda`` of the preconditioner it wraps. After a step ``delta``,
the reduction ratio::

    rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))
        = (h(theta + delta) - h(theta)) / (g^T delta + 1/2 delta^T C delta)   (2)

compares the actual change of the batch loss with the change the model
predicts (the undamped model, as kfac-jax's default). Then::

    rho > 3/4:  lambda <- omega lambda       (the model is trusted: less damping)
    rho < 1/4:  lambda <- lambda / omega     (it is not: more damping)

with ``omega = (19/20)^every`` when the rule runs every ``every`` steps, and
``lambda`` kept in ``[min_damping, max_damping]``. A step on which the model
predicts no decrease (``M(delta) >= M(0)``) or whose new loss is not finite
has ``rho = NaN`` and raises the damping.

:func:`scale_by_quadratic_model` (section 6.4; kfac-jax's adaptive learning
rate and momentum): given the incoming direction ``d`` (the K-FAC direction
after the Newton-step clip) and the previous step ``p``, the step
``delta = alpha d + mu p`` minimises (1) with ``C + eta I``, ``eta`` the
damping (the argument ``damping``; by default the extra argument
``damping=`` that :func:`adaptive_damping` hands to the chain, as in section
6.4 where the model carries the preconditioner's damping, else 0). ``eta``
is what bounds the step where the exact curvature along ``d`` is small (a
LoRA direction that barely moves the logits): the step is then about
``-(g^T d / eta ||d||^2) d`` rather than unbounded. It is an absolute
value, added to ``C`` itself::

    [alpha, mu]^T = -S^-1 b,   S = [[d^T C' d, d^T C' p], [p^T C' d, p^T C' p]],
                               b = [g^T d, g^T p],   C' = C + eta I            (3)

without momentum (or while ``p = 0``, the first step) ``alpha = -g^T d /
d^T C' d`` and ``mu = 0``. The sign of ``d`` does not matter (``alpha``
absorbs it): the transformation outputs the update itself and takes the
place of ``optax.scale_by_learning_rate``. Its ``learning_rate`` multiplies
the model's step (1: the minimiser; a schedule keeps a warm-up).

**Where the state lives.** The damping must reach the preconditioner, which
runs before the step is known, while the ratio (2) needs the final step.
:func:`adaptive_damping` therefore wraps the whole chain: it owns ``lambda``
and passes it to the wrapped transformations as the extra argument
``damping=`` (which :func:`~kfac_jax_peft.kfac_precondition` reads in place
of its configured value), then measures (2) on the chain's output. Nothing
else in the chain needs to know about it.

**Cost.** On steps where a rule runs (every ``every`` calls, chosen by
``lax.cond`` so other steps pay nothing): (2) costs one forward pass for
``h(theta + delta)`` and one curvature product; (3) one curvature product
per vector (two with momentum). Between them the coefficients and the
damping are kept.

**Extra arguments** of ``update`` (keyword-only, passed through
``optax.chain`` to every member): ``loss`` (``h(theta)``, the batch loss at
the parameters passed to ``update``), ``value_fn`` (``params -> h`` on the
same batch, same dropout key), ``fvp_fn`` (``v -> C v`` at ``theta``), and
``grads`` (the raw gradient; :func:`adaptive_damping` passes the updates it
receives when ``grads`` is not given, so given first in line it needs none).
A missing one is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_peft import _hyper as H

#: Thresholds of the Levenberg-Marquardt rule on ``rho`` (Martens & Grosse, sec. 6.5).
RHO_LOW, RHO_HIGH = 0.25, 0.75


class AdaptiveDampingState(NamedTuple):
    """State of :func:`adaptive_damping`.

    Attributes:
      count: number of ``update`` calls.
      damping: the damping the wrapped chain gets on the next call.
      rho: the reduction ratio (2) at the last adjustment (NaN before any,
        and when the model predicted no decrease).
      num_adjusted: calls on which the rule ran.
      inner: the state of the wrapped transformation.
    """

    count: jax.Array
    damping: jax.Array
    rho: jax.Array
    num_adjusted: jax.Array
    inner: Any


class QuadraticModelState(NamedTuple):
    """State of :func:`scale_by_quadratic_model`.

    Attributes:
      count: number of ``update`` calls.
      alpha, mu: the coefficients (3) in use (recomputed every ``every`` calls).
      velocity: the previous update ``p`` (zeros without momentum's use: a
        tree like the parameters, or ``None`` with ``momentum=False``).
    """

    count: jax.Array
    alpha: jax.Array
    mu: jax.Array
    velocity: Any


def _vdot(a, b, dtype) -> jax.Array:
    return sum((jnp.vdot(x.astype(dtype), y.astype(dtype))
                for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))),
               jnp.zeros((), dtype))


def _dtype(tree):
    return jnp.result_type(jnp.float32, *[x.dtype for x in jax.tree_util.tree_leaves(tree)])


def _need(name: str, value, who: str):
    if value is None:
        raise ValueError(f"{who} needs the extra argument {name}= of update (see "
                         "kfac_jax_peft.adaptive)")
    return value


def reduction_ratio(loss, new_loss, grads, step, fvp_fn: Callable) -> jax.Array:
    """``rho`` of (2): actual over predicted change of the loss; NaN where the
    model predicts no decrease or the new loss is not finite."""
    dtype = _dtype(step)
    predicted = _vdot(grads, step, dtype) + 0.5 * _vdot(step, fvp_fn(step), dtype)
    actual = jnp.asarray(new_loss, dtype) - jnp.asarray(loss, dtype)
    ok = (predicted < 0) & jnp.isfinite(actual)
    return jnp.where(ok, actual / jnp.where(ok, predicted, -1.0), jnp.nan)


def levenberg_marquardt(damping, rho, omega, min_damping, max_damping) -> jax.Array:
    """The rule of section 6.5: ``omega * damping`` when ``rho > 3/4``,
    ``damping / omega`` when not ``rho >= 1/4`` (NaN included), else
    unchanged; clipped to ``[min_damping, max_damping]``."""
    new = jnp.where(rho > RHO_HIGH, damping * omega,
                    jnp.where(rho >= RHO_LOW, damping, damping / omega))
    return jnp.clip(new, min_damping, max_damping).astype(damping.dtype)


def adaptive_damping(
    inner: optax.GradientTransformation,
    damping: float = 1e-3,
    *,
    every: int = 1,
    omega: float | None = None,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
) -> optax.GradientTransformationExtraArgs:
    """Wrap a chain whose preconditioner reads ``damping=``; adapt it by LM.

    Args:
      inner: the chain (e.g. ``kfac_precondition -> clip -> ... -> step``),
        called with the extra argument ``damping=`` (the current value) and
        every extra argument given to this ``update``.
      damping: the initial damping (in the scale the preconditioner reads:
        absolute or relative).
      every: run the rule every ``every`` calls (a positive integer).
      omega: the factor of the rule in ``(0, 1)``; ``None``: ``(19/20)^every``.
      min_damping, max_damping: the range the damping is kept in.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`AdaptiveDampingState`; ``update`` needs ``params`` and the extra
      arguments ``loss``, ``value_fn`` and ``fvp_fn`` (module documentation);
      ``g`` in (2) is the extra argument ``grads``, or else the updates it
      receives (the raw gradient when it wraps the whole chain).
    """
    H.check_scalar("damping", damping, low=0.0, low_open=True, schedule=False)
    H.check_positive_int("every", every)
    omega = (19.0 / 20.0) ** int(every) if omega is None else omega
    H.check_scalar("omega", omega, low=0.0, high=1.0, low_open=True, high_open=True,
                   schedule=False)
    H.check_scalar("min_damping", min_damping, low=0.0, schedule=False)
    H.check_scalar("max_damping", max_damping, low=0.0, low_open=True, schedule=False)
    inner = optax.with_extra_args_support(inner)
    if float(min_damping) > float(max_damping):
        raise ValueError(f"min_damping ({min_damping}) must not exceed max_damping "
                         f"({max_damping})")

    def init_fn(params):
        # a copy: under optax.inject_hyperparams ``damping`` is the state's own
        # hyperparameter array, and one buffer twice in a state cannot be donated
        return AdaptiveDampingState(jnp.zeros((), jnp.int32), jnp.array(damping, jnp.float32),
                                    jnp.asarray(jnp.nan, jnp.float32), jnp.zeros((), jnp.int32),
                                    inner.init(params))

    def update_fn(updates, state, params=None, *, loss=None, value_fn=None, fvp_fn=None,
                  **extra_args):
        who = "adaptive_damping"
        if params is None:
            raise ValueError(f"{who} needs params (the point the loss was taken at)")
        loss, value_fn, fvp_fn = (_need(n, v, who) for n, v in
                                  (("loss", loss), ("value_fn", value_fn), ("fvp_fn", fvp_fn)))
        grads = extra_args.pop("grads", None)
        grads = updates if grads is None else grads
        step, inner_state = inner.update(updates, state.inner, params, damping=state.damping,
                                         loss=loss, value_fn=value_fn, fvp_fn=fvp_fn,
                                         grads=grads, **extra_args)

        def adjust(_):
            new_loss = value_fn(optax.apply_updates(params, step))
            rho = reduction_ratio(loss, new_loss, grads, step, fvp_fn)
            return (levenberg_marquardt(state.damping, rho, omega, min_damping, max_damping),
                    rho.astype(jnp.float32))

        due = state.count % every == 0
        lam, rho = jax.lax.cond(due, adjust, lambda _: (state.damping, state.rho), None)
        return step, AdaptiveDampingState(optax.safe_increment(state.count), lam, rho,
                                          state.num_adjusted + due.astype(jnp.int32),
                                          inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def quadratic_model_coefficients(grads, direction, velocity, fvp_fn: Callable,
                                 damping=0.0, momentum: bool = True):
    """``(alpha, mu, ok)`` of (3); ``ok`` is False where the model has no
    minimum along the directions (non-positive or non-finite curvature)."""
    dtype = _dtype(direction)
    eta = jnp.asarray(damping, dtype)
    cd = fvp_fn(direction)
    s00 = _vdot(direction, cd, dtype) + eta * _vdot(direction, direction, dtype)
    b0 = _vdot(grads, direction, dtype)
    alpha1 = -b0 / jnp.where(s00 > 0, s00, 1.0)
    ok1 = (s00 > 0) & jnp.isfinite(alpha1)
    if not momentum:
        return alpha1, jnp.zeros((), dtype), ok1
    cp = fvp_fn(velocity)
    s01 = _vdot(direction, cp, dtype) + eta * _vdot(direction, velocity, dtype)
    s11 = _vdot(velocity, cp, dtype) + eta * _vdot(velocity, velocity, dtype)
    b1 = _vdot(grads, velocity, dtype)
    det = s00 * s11 - s01 * s01
    # p = 0 (the first step) or p parallel to d: the 2x2 system is singular
    two = (s11 > 0) & (det > 1e3 * jnp.finfo(dtype).eps * jnp.abs(s00 * s11))
    safe = jnp.where(two, det, 1.0)
    alpha2, mu2 = (-s11 * b0 + s01 * b1) / safe, (s01 * b0 - s00 * b1) / safe
    ok2 = two & ok1 & jnp.isfinite(alpha2) & jnp.isfinite(mu2)
    return (jnp.where(ok2, alpha2, alpha1), jnp.where(ok2, mu2, 0.0), ok1)


def scale_by_quadratic_model(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    momentum: bool = True,
    damping: float | None = None,
    every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """The step ``learning_rate * (alpha d + mu p)`` minimising the quadratic model.

    Place it last in the chain, in place of ``optax.scale_by_learning_rate``
    (its output is the update to add to the parameters)::

        chain(kfac_precondition(...), clip_by_update_norm(1.0),
              scale_by_quadratic_model())

    Args:
      learning_rate: factor on the model's step (float or schedule; 1 is the
        minimiser of (3)).
      momentum: also choose ``mu`` for the previous update (section 6.4).
      damping: ``eta >= 0`` added to the curvature in (3); ``None``: the
        extra argument ``damping=`` of ``update`` where given (what
        :func:`adaptive_damping` passes), else 0.
      every: recompute ``alpha, mu`` every ``every`` calls (a positive
        integer); between, the last ones are used. Where the model has no
        minimum along ``d`` the previous coefficients are kept (zero before
        any: no step).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a
      :class:`QuadraticModelState`; ``update`` needs the extra arguments
      ``grads`` (the raw gradient) and ``fvp_fn``.
    """
    H.check_scalar("learning_rate", learning_rate, low=0.0)
    if damping is not None:
        H.check_scalar("damping", damping, low=0.0, schedule=False)
    H.check_positive_int("every", every)
    momentum = bool(momentum)

    def init_fn(params):
        H.check_schedule_start("learning_rate", learning_rate, low=0.0)
        dtype = _dtype(params)
        velocity = (jax.tree_util.tree_map(jnp.zeros_like, params) if momentum else None)
        return QuadraticModelState(jnp.zeros((), jnp.int32), jnp.zeros((), dtype),
                                   jnp.zeros((), dtype), velocity)

    def update_fn(updates, state, params=None, *, grads=None, fvp_fn=None, **extra_args):
        del params
        who = "scale_by_quadratic_model"
        grads, fvp_fn = _need("grads", grads, who), _need("fvp_fn", fvp_fn, who)
        eta = damping if damping is not None else extra_args.get("damping")
        eta = 0.0 if eta is None else eta

        def solve(_):
            a, m, ok = quadratic_model_coefficients(grads, updates, state.velocity, fvp_fn,
                                                    eta, momentum)
            return (jnp.where(ok, a, state.alpha).astype(state.alpha.dtype),
                    jnp.where(ok, m, state.mu).astype(state.mu.dtype))

        due = state.count % every == 0
        alpha, mu = jax.lax.cond(due, solve, lambda _: (state.alpha, state.mu), None)
        lr = jnp.asarray(H.resolve(learning_rate, state.count), alpha.dtype)
        if momentum:
            step = jax.tree_util.tree_map(
                lambda d, p: (lr * (alpha * d.astype(alpha.dtype) + mu * p.astype(alpha.dtype))
                              ).astype(d.dtype), updates, state.velocity)
        else:
            step = jax.tree_util.tree_map(lambda d: (lr * alpha * d).astype(d.dtype), updates)
        return step, QuadraticModelState(optax.safe_increment(state.count), alpha, mu,
                                         step if momentum else None)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adaptive_state(opt_state, kind=AdaptiveDampingState):
    """The first :class:`AdaptiveDampingState` (or ``kind``, e.g.
    :class:`QuadraticModelState`) found in an optimizer state, or None."""
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kind)):
        if isinstance(s, kind):
            return s
    return None
