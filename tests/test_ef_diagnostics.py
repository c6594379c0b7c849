"""The gamma indicator, Fisher-vector products, the sampled Fisher's
convergence and the gradient-norm imbalance, against dense computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_ef import _flat, _mlp_problem

from kfac_jax_peft import fisher


def _dense_fisher(params, model, args):
    """(1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n from full per-example Jacobians."""
    flat, unravel = ravel_pytree(params)
    fwd = jax.jit(lambda th: model(unravel(th), *args))
    Jz = np.asarray(jax.jit(jax.jacobian(fwd))(flat))  # [N, C, P]
    z = np.asarray(fwd(flat))
    p = np.exp(z - z.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    H = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    return np.einsum("ncp,ncd,ndq->pq", Jz, H, Jz) / Jz.shape[0], unravel


@pytest.fixture(scope="module")
def problem():
    """A small classifier (N=6, C=3, P=38): F has rank N(C-1) = 12."""
    with jax.enable_x64(True):
        params, model, loss, args = _mlp_problem(n=6)
        Fd, unravel = _dense_fisher(params, model, args)
        g = jax.jit(jax.grad(lambda p: jnp.mean(loss(model(p, *args), *args))))(params)
    return params, model, loss, args, Fd, unravel, g


def test_fisher_and_ggn_vector_products_equal_the_dense_fisher(problem):
    """Exact through the logits: agreement to rounding (1e-12 in float64)."""
    params, model, loss, args, Fd, unravel, _ = problem
    with jax.enable_x64(True):
        for kw in ({}, {"loss_fn": loss}):  # categorical Fisher; GGN of the cross-entropy
            fvp = jax.jit(fisher.fisher_vector_product(model, params, *args, **kw))
            F = np.stack([_flat(fvp(unravel(e))) for e in np.eye(Fd.shape[0])], 1)
            np.testing.assert_allclose(F, Fd, rtol=0, atol=1e-12 * np.abs(Fd).max())


def test_gamma_of_sgd_equals_dense_and_natural_gradient_is_the_optimum(problem):
    """gamma(g) = sqrt(g^T F g) / g^T g; the natural gradient F^+ g attains the
    documented minimum 1 / sqrt(g^T F^+ g) (g is in the range of F: its
    per-example logit gradients p - e_y sum to zero, like the range of
    diag(p) - p p^T); random directions and the gradient do not beat it."""
    params, model, loss, args, Fd, unravel, g = problem
    with jax.enable_x64(True):
        fvp = jax.jit(fisher.fisher_vector_product(model, params, *args))
        gf = _flat(g)
        want_sgd = np.sqrt(gf @ Fd @ gf) / (gf @ gf)
        np.testing.assert_allclose(fisher.gamma(g, g, fvp), want_sgd, rtol=1e-10)
        Fp = np.linalg.pinv(Fd, rcond=1e-10, hermitian=True)
        ng = Fp @ gf
        gamma_star = 1.0 / np.sqrt(gf @ Fp @ gf)
        np.testing.assert_allclose(fisher.gamma(unravel(ng), g, fvp), gamma_star, rtol=1e-8)
        # scale, sign and a null-space component of F do not change it
        null = np.linalg.eigh(Fd)[1][:, 0]  # an eigenvector of eigenvalue ~0
        np.testing.assert_allclose(fisher.gamma(unravel(-3.0 * ng + 5.0 * null), g, fvp),
                                   gamma_star, rtol=1e-6)
        rel = fisher.gamma_relative_to_sgd(unravel(ng), g, fvp)
        np.testing.assert_allclose(rel, gamma_star / want_sgd, rtol=1e-8)
        assert rel < 1.0
        rng = np.random.default_rng(0)
        for _ in range(10):
            u = ng + 0.3 * np.linalg.norm(ng) * rng.normal(size=ng.shape) / np.sqrt(ng.size)
            assert fisher.gamma(unravel(u), g, fvp) >= gamma_star * (1 - 1e-10)
        ratios = fisher.gamma_ratios({"ngd": unravel(ng), "sgd": g}, g, fvp)
        np.testing.assert_allclose(ratios["sgd"], 1.0, rtol=1e-12)
        np.testing.assert_allclose(ratios["ngd"], rel, rtol=1e-12)


def test_ief_attains_the_optimum_on_least_squares_and_ef_does_not():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        n, p = 10, 3
        X = jnp.asarray(rng.normal(size=(n, p)) + 1.0)
        y = jnp.asarray(rng.normal(size=n))
        theta = jnp.asarray(rng.normal(size=p))
        model = lambda t, X, y: (X @ t)[:, None]  # noqa: E731
        loss = lambda z, X, y: 0.5 * (z[:, 0] - y) ** 2  # noqa: E731
        vg = jax.jit(fisher.per_sample_value_and_grad(model, loss, fisher_type="ief"))
        _, g, ex = vg(theta, X, y)
        fvp = fisher.fisher_vector_product(model, theta, X, y, likelihood="gaussian")
        Xn = np.asarray(X)
        F = Xn.T @ Xn / n
        gamma_star = 1.0 / np.sqrt(np.asarray(g) @ np.linalg.solve(F, np.asarray(g)))
        ief, ef = fisher.ief_precondition(1e-12), fisher.ef_precondition(1e-12)
        u_ief = ief.update(g, ief.init(theta), **ex)[0]
        u_ef = ef.update(g, ef.init(theta), **ex)[0]
        np.testing.assert_allclose(fisher.gamma(u_ief, g, fvp), gamma_star, rtol=1e-8)
        assert fisher.gamma(u_ef, g, fvp) > 1.01 * gamma_star


def test_sampled_fisher_converges_to_the_exact_fisher(problem):
    """F(k) = (1/N)(1/k) sum_{n,m} j_nm j_nm^T from per_sample_value_and_grad
    (fisher_type="sampled") against the dense exact Fisher. A Monte-Carlo mean: the
    relative Frobenius error shrinks like 1/sqrt(k). With this seed it is
    0.27 at k=16 and 0.013 at k=4000 (expected ~0.27 * sqrt(16/4000) =
    0.017); asserted: below 0.03 at k=4000, and at least 8 times smaller
    than at k=16 (sqrt(250) = 15.8 expected)."""
    params, model, loss, args, Fd, _, _ = problem
    errs = {}
    with jax.enable_x64(True):
        for k in (16, 4000):
            vg = jax.jit(fisher.per_sample_value_and_grad(model, loss, fisher_type="sampled",
                                                          num_samples=k))
            _, _, ex = vg(params, *args, rng=jax.random.key(0))
            Js = ex["sampled_grads"]
            R = np.asarray(jax.vmap(jax.vmap(lambda t: ravel_pytree(t)[0]))(Js))
            n = R.shape[0]
            R = R.reshape(n * k, -1)
            Fs = R.T @ R / (k * n)
            errs[k] = np.linalg.norm(Fs - Fd) / np.linalg.norm(Fd)
    assert errs[4000] < 0.03, errs
    assert errs[16] > 8 * errs[4000], errs


def test_gradient_norm_imbalance_equals_numpy():
    rng = np.random.default_rng(0)
    J = {"a": jnp.asarray(rng.normal(size=(5, 3, 2)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
    norms = np.sqrt(np.sum(np.asarray(J["a"]).reshape(5, -1) ** 2, 1)
                    + np.sum(np.asarray(J["b"]) ** 2, 1))
    np.testing.assert_allclose(fisher.per_sample_grad_norms(J), norms, rtol=1e-6)
    np.testing.assert_allclose(fisher.gradient_norm_imbalance(J), norms.max() / norms.min(),
                               rtol=1e-6)


def test_curvature_along_a_step_is_the_dense_rayleigh_quotient(problem):
    """u^T F u / u^T u against the dense F, for the gradient and a random
    direction; invariant to the direction's scale and sign."""
    params, model, loss, args, Fd, unravel, g = problem
    with jax.enable_x64(True):
        fvp = jax.jit(fisher.fisher_vector_product(model, params, *args, loss_fn=loss))
        u = np.random.default_rng(1).normal(size=Fd.shape[0])
        for v in (_flat(g), u):
            want = v @ Fd @ v / (v @ v)
            np.testing.assert_allclose(fisher.curvature_along(unravel(v), fvp), want,
                                       rtol=1e-10)
            np.testing.assert_allclose(fisher.curvature_along(unravel(-3.0 * v), fvp), want,
                                       rtol=1e-10)


def test_squared_norm_shares_by_group():
    """Groups named from the path; each share is the group's sum of squares
    over the total (by hand: 1+4 = 5, 9, 16+0 = 16 of 30)."""
    tree = {"layer": {"lora_A": {"kernel": jnp.array([1.0, 2.0])},
                      "lora_B": {"kernel": jnp.array([[3.0]])}},
            "classifier": {"kernel": jnp.array([4.0]), "bias": jnp.array([0.0])}}
    shares = fisher.squared_norm_shares(tree, lambda path: path[-2])
    assert set(shares) == {"lora_A", "lora_B", "classifier"}
    np.testing.assert_allclose([shares["lora_A"], shares["lora_B"], shares["classifier"]],
                               [5 / 30, 9 / 30, 16 / 30], rtol=1e-6)
    merged = fisher.squared_norm_shares(tree, lambda path: "all")
    np.testing.assert_allclose(merged["all"], 1.0, rtol=1e-6)


def test_gamma_and_curvature_from_one_product_equal_the_separate_indicators(problem):
    params, model, loss, args, Fd, unravel, g = problem
    with jax.enable_x64(True):
        fvp = jax.jit(fisher.fisher_vector_product(model, params, *args, loss_fn=loss))
        u = unravel(np.random.default_rng(2).normal(size=Fd.shape[0]))
        gamma, curvature = fisher.gamma_and_curvature(u, g, fvp)
        np.testing.assert_allclose(gamma, fisher.gamma_relative_to_sgd(u, g, fvp), rtol=1e-12)
        np.testing.assert_allclose(curvature, fisher.curvature_along(u, fvp), rtol=1e-12)
