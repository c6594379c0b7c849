"""NysNewton-CG: a damped Newton method with Nystrom-preconditioned CG and an
Armijo line search, as an optax transformation.

Rathore et al. 2024 ("Challenges in training PINNs: a loss landscape
perspective", Algorithm 4) proposes it for losses that must be driven to
near zero after Adam and L-BFGS stall, as in physics-informed networks. At
iteration ``k``, with ``w`` the flattened parameters, ``g = grad L(w)`` and
``H = hess L(w)`` (never formed: only Hessian-vector products ``H v =
jvp(grad L, (w,), (v,))``):

1. every ``F`` iterations (``precondition_every``), a randomized Nystrom
   approximation of ``H`` of rank ``s`` (Frangella, Tropp and Udell 2023,
   Algorithm 2.1): ``Omega`` an ``n x s`` orthonormalised Gaussian sketch,
   ``Y = H Omega`` (``s`` products), a shift ``nu``, ``Y_nu = Y + nu Omega``,
   ``C = chol(Omega^T Y_nu)``, ``B = Y_nu C^-T = U S V^T`` (thin SVD), and::

       H_nys = U diag(lam) U^T,   lam = max(S^2 - nu, 0),

   which equals ``(H Omega)(Omega^T H Omega)^+ (H Omega)^T`` for a positive
   semi-definite ``H``. ``nu = sqrt(n) eps ||Y||_F`` (rounding), plus twice
   the most negative eigenvalue of ``Omega^T Y`` when ``H`` is indefinite
   there (the source falls back to the same shift when the Cholesky
   factorisation fails; here it is always applied, so the trace has no
   branch on failure);
2. the damped Newton direction ``d = (H + mu I)^-1 g`` by conjugate
   gradients preconditioned with the Nystrom preconditioner of ``H + mu I``
   (Frangella et al., eq. 5.3)::

       P^-1 = (lam_s + mu) U (diag(lam) + mu I)^-1 U^T + (I - U U^T),

   started from the previous direction, until ``||r|| <= cg_tol ||g||`` or
   ``cg_maxiter`` iterations. If ``H + mu I`` is indefinite along the way,
   ``d`` may not descend (``<g, d> <= 0``); then ``d = g`` (a gradient step,
   counted in the state);
3. the Armijo backtracking line search: the largest ``t = eta beta^j``
   (``j = 0 .. max_backtracks``) with::

       L(w - t d) <= L(w) - alpha t <g, d>,

   and ``t = 0`` (no step) if none qualifies; the update is ``-t d``.

With ``P`` exact for a Hessian of rank ``s`` plus ``mu I``, ``P^-1 (H + mu I)``
has two distinct eigenvalues, ``lam_s + mu`` and ``mu``, and CG converges in
two iterations; a rank-``s`` part it does not capture adds at most ``s``.

Usage mirrors optax's L-BFGS: the update takes the loss as ``value_fn``
(and, optionally, its ``value`` at ``params``)::

    tx = kfac_jax_peft.nys_newton_cg(rank=60, mu=1e-2)
    state = tx.init(params)
    value, grad = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grad, state, params, value=value, value_fn=loss)
    params = optax.apply_updates(params, updates)

The transformation computes the whole step (direction and step size): put
nothing after it. Parameters are handled as one flat vector
(``jax.flatten_util.ravel_pytree``); the preconditioner keeps an ``n x s``
matrix, so this is for models of up to some millions of parameters, as in
the source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from kfac_jax_peft import _hyper as H


class NystromState(NamedTuple):
    """A rank-``s`` Nystrom approximation ``U diag(lam) U^T``: ``u`` is ``n x s``
    with orthonormal columns, ``lam`` (length ``s``) non-negative, descending."""

    u: jax.Array
    lam: jax.Array


class NysNewtonCGState(NamedTuple):
    """State of :func:`nys_newton_cg`.

    Attributes:
      count: number of ``update`` calls.
      key: the PRNG key of the next sketch.
      nystrom: the current preconditioner (:class:`NystromState`).
      direction: the last direction ``d`` (CG's next starting point).
      step_size: the last accepted step size ``t`` (0: no step).
      cg_iterations: CG iterations of the last call.
      cg_residual: ``||(H + mu I) d - g||`` of the last direction.
      num_gradient_steps: calls whose CG direction did not descend (``d = g``).
      num_rejected: calls where no backtracking step met Armijo's condition.
    """

    count: jax.Array
    key: jax.Array
    nystrom: NystromState
    direction: jax.Array
    step_size: jax.Array
    cg_iterations: jax.Array
    cg_residual: jax.Array
    num_gradient_steps: jax.Array
    num_rejected: jax.Array


def nystrom_approximation(matvec: Callable[[jax.Array], jax.Array], dim: int, rank: int,
                          key: jax.Array, dtype=jnp.float32) -> NystromState:
    """The randomized Nystrom approximation of the symmetric ``n x n`` operator
    ``matvec`` (``v -> H v``) of rank ``rank`` (module docstring, step 1):
    ``rank`` products with ``H``, batched with ``jax.vmap``."""
    omega, _ = jnp.linalg.qr(jax.random.normal(key, (dim, rank), dtype))
    y = jax.vmap(matvec, in_axes=1, out_axes=1)(omega)
    core = omega.T @ y
    core = 0.5 * (core + core.T)
    nu = jnp.sqrt(jnp.asarray(dim, dtype)) * jnp.finfo(dtype).eps * jnp.linalg.norm(y)
    # an indefinite H: shift Omega^T H Omega to positive definite (see the module doc)
    nu = nu + 2.0 * jnp.maximum(-jnp.min(jnp.linalg.eigvalsh(core)), 0.0)
    y_nu = y + nu * omega
    chol = jnp.linalg.cholesky(core + nu * jnp.eye(rank, dtype=dtype))
    b = jax.scipy.linalg.solve_triangular(chol, y_nu.T, lower=True).T  # Y_nu C^-T
    u, s, _ = jnp.linalg.svd(b, full_matrices=False)
    return NystromState(u, jnp.maximum(s * s - nu, 0.0))


def nystrom_inverse(nystrom: NystromState, mu) -> Callable[[jax.Array], jax.Array]:
    """``x -> P^-1 x``, the inverse of the Nystrom preconditioner of
    ``H_nys + mu I`` (module docstring, step 2)."""
    u, lam = nystrom
    scale = (lam[-1] + mu) / (lam + mu)

    def apply(x):
        ux = u.T @ x
        return u @ (scale * ux) + (x - u @ ux)

    return apply


def nystrom_pcg(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, x0: jax.Array,
                precondition: Callable[[jax.Array], jax.Array], *, tol, maxiter: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Preconditioned conjugate gradients for ``A x = b`` (``matvec``: ``v -> A
    v``, symmetric positive definite; ``precondition``: ``r -> P^-1 r``) from
    ``x0``, until ``||b - A x|| <= tol`` or ``maxiter`` iterations. Returns
    ``(x, iterations, ||b - A x||)`` (the residual as CG updates it)."""
    r = b - matvec(x0)
    z = precondition(r)
    init = (jnp.zeros((), jnp.int32), x0, r, z, z, jnp.vdot(r, z))

    def cond(c):
        i, _, r, *_ = c
        return (i < maxiter) & (jnp.linalg.norm(r) > tol)

    def body(c):
        i, x, r, z, p, rz = c
        ap = matvec(p)
        alpha = rz / jnp.vdot(p, ap)
        x, r = x + alpha * p, r - alpha * ap
        z = precondition(r)
        rz_new = jnp.vdot(r, z)
        return i + 1, x, r, z, z + (rz_new / rz) * p, rz_new

    i, x, r, *_ = jax.lax.while_loop(cond, body, init)
    return x, i, jnp.linalg.norm(r)


def armijo_step(value_fn: Callable[[jax.Array], jax.Array], w: jax.Array, value: jax.Array,
                slope: jax.Array, d: jax.Array, *, initial, alpha, beta, max_backtracks: int
                ) -> tuple[jax.Array, jax.Array]:
    """Backtracking along ``-d`` from ``w`` (``slope = <g, d> > 0``): the first
    ``t = initial beta^j``, ``j = 0 .. max_backtracks``, with ``value_fn(w -
    t d) <= value - alpha t slope`` (a non-finite value never qualifies).
    Returns ``(t, accepted)``; ``t = 0`` when no ``t`` qualifies."""
    def fails(t):
        new = value_fn(w - t * d)
        return ~(jnp.isfinite(new) & (new <= value - alpha * t * slope))

    def cond(c):
        j, _, failing = c
        return failing & (j < max_backtracks)

    def body(c):
        j, t, _ = c
        t = t * beta
        return j + 1, t, fails(t)

    t0 = jnp.asarray(initial, w.dtype)
    _, t, failing = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), t0, fails(t0)))
    return jnp.where(failing, jnp.zeros_like(t), t), ~failing


def nys_newton_cg(learning_rate: float = 1.0, *, rank: int = 60, mu: float = 1e-2,
                  precondition_every: int = 20, cg_tol: float = 1e-8, cg_maxiter: int = 100,
                  armijo_alpha: float = 0.1, armijo_beta: float = 0.5,
                  max_backtracks: int = 30, seed: int = 0
                  ) -> optax.GradientTransformationExtraArgs:
    """NysNewton-CG (module docstring): damped Newton steps ``(H + mu I)^-1 g``
    by Nystrom-preconditioned CG, sized by an Armijo line search.

    Args:
      learning_rate: ``eta``, the first step size tried (1: the Newton step).
      rank: ``s``, the sketch size of the Nystrom approximation.
      mu: the damping ``mu > 0`` of the Newton system.
      precondition_every: ``F``, calls between Nystrom refreshes (the first
        call always makes one).
      cg_tol: CG stops when ``||r|| <= cg_tol ||g||``.
      cg_maxiter: ``M``, the most CG iterations per call.
      armijo_alpha, armijo_beta: the sufficient-decrease fraction ``alpha``
        in (0, 1) and the backtracking factor ``beta`` in (0, 1).
      max_backtracks: the most step-size halvings (``beta`` reductions).
      seed: the seed of the sketches.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads,
      state, params, *, value_fn, value=None)`` needs ``params`` and the loss
      ``value_fn(params) -> scalar`` (``value``: its value at ``params``, to
      save one evaluation); its update is the whole step ``-t d``. Other
      extra arguments are ignored.
    """
    H.check_scalar("learning_rate", learning_rate, low=0.0, low_open=True, schedule=False)
    H.check_scalar("mu", mu, low=0.0, low_open=True, schedule=False)
    H.check_scalar("cg_tol", cg_tol, low=0.0, schedule=False)
    for name, value in (("armijo_alpha", armijo_alpha), ("armijo_beta", armijo_beta)):
        H.check_scalar(name, value, low=0.0, high=1.0, low_open=True, high_open=True,
                       schedule=False)
    for name, value in (("rank", rank), ("precondition_every", precondition_every),
                        ("cg_maxiter", cg_maxiter)):
        H.check_positive_int(name, value)
    if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, int) \
            or max_backtracks < 0:
        raise ValueError(f"max_backtracks must be an integer >= 0, got {max_backtracks!r}")

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        n = flat.size
        if rank > n:
            raise ValueError(f"rank must be at most the {n} parameters, got {rank}")
        zero, izero = jnp.zeros((), flat.dtype), jnp.zeros((), jnp.int32)
        return NysNewtonCGState(
            count=izero, key=jax.random.PRNGKey(seed),
            nystrom=NystromState(jnp.zeros((n, rank), flat.dtype), jnp.zeros((rank,), flat.dtype)),
            direction=jnp.zeros_like(flat), step_size=zero, cg_iterations=izero,
            cg_residual=zero, num_gradient_steps=izero, num_rejected=izero)

    def update_fn(updates, state, params=None, *, value_fn=None, value=None, **extra_args):
        del extra_args
        if params is None or value_fn is None:
            raise ValueError("nys_newton_cg needs params and the loss: call tx.update(grads, "
                             "state, params, value_fn=loss)")
        w, unravel = ravel_pytree(params)
        g, _ = ravel_pytree(updates)
        flat_fn = lambda v: value_fn(unravel(v))  # noqa: E731
        value = flat_fn(w) if value is None else jnp.asarray(value, w.dtype)
        hvp = lambda v: jax.jvp(jax.grad(flat_fn), (w,), (v,))[1]  # noqa: E731

        key, sub = jax.random.split(state.key)
        nystrom = jax.lax.cond(state.count % precondition_every == 0,
                               lambda: nystrom_approximation(hvp, w.size, rank, sub, w.dtype),
                               lambda: state.nystrom)
        d, iters, resid = nystrom_pcg(lambda v: hvp(v) + mu * v, g, state.direction,
                                      nystrom_inverse(nystrom, mu),
                                      tol=cg_tol * jnp.linalg.norm(g), maxiter=cg_maxiter)
        descends = jnp.vdot(g, d) > 0
        d = jnp.where(descends, d, g)
        t, accepted = armijo_step(flat_fn, w, value, jnp.vdot(g, d), d, initial=learning_rate,
                                  alpha=armijo_alpha, beta=armijo_beta,
                                  max_backtracks=max_backtracks)
        new_state = NysNewtonCGState(
            count=optax.safe_increment(state.count), key=key, nystrom=nystrom, direction=d,
            step_size=t, cg_iterations=iters, cg_residual=resid,
            num_gradient_steps=state.num_gradient_steps + (~descends).astype(jnp.int32),
            num_rejected=state.num_rejected + (~accepted).astype(jnp.int32))
        return unravel(-t * d), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
