"""NysNewton-CG: the Nystrom approximation, Nystrom-preconditioned CG, the
Armijo line search, the optax transformation, and the PINN example."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_peft as kp
from kfac_jax_peft.nncg import armijo_step, nystrom_approximation, nystrom_inverse, nystrom_pcg

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pinn_nncg.py"


def _low_rank(n=40, r=5, seed=0):
    """A PSD matrix of rank r with eigenvalues spread over 1 .. 1e4."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    lam = np.logspace(4, 0, r)
    return (q * lam) @ q.T, lam


def test_nystrom_of_a_rank_s_matrix_is_exact():
    with jax.enable_x64(True):
        a, lam = _low_rank()
        ny = nystrom_approximation(lambda v: jnp.asarray(a) @ v, a.shape[0], len(lam),
                                   jax.random.PRNGKey(1), jnp.float64)
        u, got = np.asarray(ny.u), np.asarray(ny.lam)
        np.testing.assert_allclose(got, lam, rtol=1e-9)
        np.testing.assert_allclose((u * got) @ u.T, a, atol=1e-9 * lam[0])
        np.testing.assert_allclose(u.T @ u, np.eye(len(lam)), atol=1e-12)


def test_pcg_with_the_exact_nystrom_preconditioner_takes_at_most_rank_plus_one_steps():
    # (A + mu I) d = g with A of rank r: P^-1 (A + mu I) has the two eigenvalues
    # lam_r + mu and mu, so CG needs 2 iterations in exact arithmetic (<= r + 1,
    # the bound; one more here, for rounding at a 1e-10 relative residual
    # with a condition number of 1e6); plain CG needs r + 1 (r + 1 distinct eigenvalues)
    with jax.enable_x64(True):
        a, lam = _low_rank()
        n, r, mu = a.shape[0], len(lam), 1e-2
        g = jnp.asarray(np.random.default_rng(2).standard_normal(n))
        matvec = lambda v: jnp.asarray(a) @ v + mu * v  # noqa: E731
        ny = nystrom_approximation(lambda v: jnp.asarray(a) @ v, n, r, jax.random.PRNGKey(3),
                                   jnp.float64)
        tol = 1e-10 * float(jnp.linalg.norm(g))
        x, iters, resid = nystrom_pcg(matvec, g, jnp.zeros(n), nystrom_inverse(ny, mu),
                                      tol=tol, maxiter=100)
        np.testing.assert_allclose(x, np.linalg.solve(a + mu * np.eye(n), g), rtol=1e-8)
        assert int(iters) <= min(r + 1, 3) and float(resid) <= tol
        _, plain, _ = nystrom_pcg(matvec, g, jnp.zeros(n), lambda v: v, tol=tol, maxiter=100)
        assert int(plain) > int(iters)


def test_armijo_backtracks_to_the_first_sufficient_decrease():
    # f(w) = w^2 at w = 1 (g = 2), d = 8: t = 1, 1/2, 1/4 fail
    # (f = 49, 9, 1 > 1 - 0.1 t 16), t = 1/8 gives f(0) = 0 <= 0.8
    f = lambda w: jnp.sum(w ** 2)  # noqa: E731
    w, d = jnp.array([1.0]), jnp.array([8.0])
    t, ok = armijo_step(f, w, f(w), 16.0, d, initial=1.0, alpha=0.1, beta=0.5,
                        max_backtracks=10)
    assert float(t) == 0.125 and bool(ok)
    t, ok = armijo_step(f, w, f(w), 16.0, d, initial=1.0, alpha=0.1, beta=0.5,
                        max_backtracks=2)  # 1, 1/2, 1/4 only: no step
    assert float(t) == 0.0 and not bool(ok)


def _rosenbrock(p):
    x = p["x"]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def test_every_accepted_step_satisfies_armijo_and_the_loss_falls():
    # a non-convex problem (indefinite Hessians on the way), float64
    alpha = 0.1
    with jax.enable_x64(True):
        params = {"x": jnp.asarray(np.linspace(-1.2, 1.0, 8))}
        tx = kp.nys_newton_cg(rank=4, mu=1e-3, precondition_every=3, armijo_alpha=alpha)

        @jax.jit
        def step(p, s):
            v, g = jax.value_and_grad(_rosenbrock)(p)
            u, s = tx.update(g, s, p, value=v, value_fn=_rosenbrock, unused_extra=1)
            return optax.apply_updates(p, u), s, v, g, u

        state, sizes, start = tx.init(params), [], float(_rosenbrock(params))
        for _ in range(40):
            new, state, v, g, u = step(params, state)
            t = float(state.step_size)
            sizes.append(t)
            if t > 0:  # L(w - t d) <= L(w) - alpha t <g, d>, with u = -t d
                slope = sum(float(jnp.vdot(a, b)) for a, b in zip(
                    jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(u)))
                assert float(_rosenbrock(new)) <= float(v) + alpha * slope, len(sizes)
                assert slope < 0
            params = new
        assert any(0 < t < 1 for t in sizes)  # the line search did shorten some steps
        assert int(state.num_rejected) == sum(t == 0 for t in sizes)
        assert float(_rosenbrock(params)) < 1e-6 * start


def test_refusals():
    with pytest.raises(ValueError, match="mu"):
        kp.nys_newton_cg(mu=0.0)
    with pytest.raises(ValueError, match="armijo_beta"):
        kp.nys_newton_cg(armijo_beta=1.0)
    with pytest.raises(ValueError, match="max_backtracks"):
        kp.nys_newton_cg(max_backtracks=-1)
    params = {"x": jnp.zeros(3)}
    with pytest.raises(ValueError, match="rank"):
        kp.nys_newton_cg(rank=4).init(params)
    tx = kp.nys_newton_cg(rank=2)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(params, tx.init(params), params)


def test_pinn_example_nncg_goes_below_adam_lbfgs():
    spec = importlib.util.spec_from_file_location("pinn_nncg", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--smoke"])
    assert out["adam+lbfgs"]["loss"] < out["adam"]["loss"]
    assert out["adam+lbfgs+nncg"]["loss"] < out["adam+lbfgs"]["loss"]
