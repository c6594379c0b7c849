"""Exact EF, iEF and sampled-Fisher updates against dense linear algebra.

Dense references flatten the per-sample gradients into an ``N x P`` matrix
and solve in float64 numpy; the library runs under ``jax.enable_x64`` in
those tests (the global default stays float32, see ``conftest.py``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfac_jax_peft as kp
from kfac_jax_peft import fisher


def _mlp_problem(n=6, d=4, h=5, c=3, seed=0, dtype=np.float64):
    """A tanh MLP classifier; P = d*h + h + h*c + c."""
    rng = np.random.default_rng(seed)
    params = {"l1": {"kernel": jnp.asarray(rng.normal(size=(d, h)), dtype),
                     "bias": jnp.asarray(0.1 * rng.normal(size=h), dtype)},
              "l2": {"kernel": jnp.asarray(rng.normal(size=(h, c)), dtype),
                     "bias": jnp.asarray(0.1 * rng.normal(size=c), dtype)}}
    X = jnp.asarray(rng.normal(size=(n, d)), dtype)
    y = jnp.asarray(rng.integers(0, c, n))

    def model(p, X, y):
        hid = jnp.tanh(X @ p["l1"]["kernel"] + p["l1"]["bias"])
        return hid @ p["l2"]["kernel"] + p["l2"]["bias"]

    def loss(z, X, y):
        return optax.softmax_cross_entropy_with_integer_labels(z, y)

    return params, model, loss, (X, y)


def _flat_rows(tree):
    """``[K, P]`` float64 from a tree of leaves ``[K, ...]``."""
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree), np.float64)


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# --- per-sample gradients -------------------------------------------------------------


def test_per_sample_grads_scales_and_loss_equal_per_example_loop():
    params, model, loss, args = _mlp_problem(dtype=np.float32)
    X, y = args
    vg = fisher.per_sample_value_and_grad(model, loss, fisher_type="ief")
    loss_v, grads, extras = jax.jit(vg)(params, X, y)
    J = _flat_rows(extras["per_sample_grads"])
    one = jax.jit(jax.grad(lambda p, Xi, yi: loss(model(p, Xi, yi), Xi, yi)[0]))
    for i in range(X.shape[0]):
        gi = one(params, X[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(J[i], _flat(gi), rtol=1e-5, atol=1e-6)
    z = np.asarray(model(params, X, y), np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    dz = p / p.sum(1, keepdims=True) - np.eye(z.shape[1])[np.asarray(y)]  # grad_z of CE
    np.testing.assert_allclose(extras["scales"], np.sum(dz**2, -1), rtol=1e-5)
    full_loss = lambda p: jnp.mean(loss(model(p, X, y), X, y))  # noqa: E731
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(full_loss))(params)
    np.testing.assert_allclose(loss_v, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(_flat(grads), _flat(ref_grads), rtol=1e-5, atol=1e-6)


def test_per_sample_unbatched_args_and_sequence_outputs():
    """A frozen weight passed with in_axes=None; outputs [N, T, C] with a token
    mask: s_n sums ||dl_n/dz_t||^2 over the example's positions."""
    rng = np.random.default_rng(1)
    n, t, d, c = 4, 3, 5, 2
    W0 = jnp.asarray(rng.normal(size=(d, d)), jnp.float32)
    params = {"kernel": jnp.asarray(rng.normal(size=(d, c)), jnp.float32)}
    X = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, (n, t)))
    mask = jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], jnp.float32)

    def model(p, W0, X, y, mask):
        return jnp.tanh(X @ W0) @ p["kernel"]

    def loss(z, W0, X, y, mask):  # per example: sum over its real tokens
        ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
        return jnp.sum(ce * mask, -1)

    vg = fisher.per_sample_value_and_grad(model, loss, fisher_type="ief", in_axes=(None, 0, 0, 0))
    _, grads, extras = jax.jit(vg)(params, W0, X, y, mask)
    z = np.asarray(model(params, W0, X, y, mask), np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    dz = (p / p.sum(-1, keepdims=True) - np.eye(c)[np.asarray(y)]) * np.asarray(mask)[..., None]
    np.testing.assert_allclose(extras["scales"], np.sum(dz**2, (1, 2)), rtol=1e-5)
    ref = jax.jit(jax.grad(
        lambda p: jnp.mean(loss(model(p, W0, X, y, mask), W0, X, y, mask))))(params)
    np.testing.assert_allclose(grads["kernel"], ref["kernel"], rtol=1e-5, atol=1e-6)


# --- Woodbury against dense solves -----------------------------------------------------


def _dense_rows(kind, extras):
    if kind == "ef":
        return _flat_rows(extras["per_sample_grads"])
    if kind == "ief":
        J = _flat_rows(extras["per_sample_grads"])
        return J / np.sqrt(np.asarray(extras["scales"], np.float64))[:, None]
    Js = extras["sampled_grads"]
    n, k = jax.tree_util.tree_leaves(Js)[0].shape[:2]
    flat = _flat_rows(jax.tree_util.tree_map(lambda j: j.reshape((n * k,) + j.shape[2:]), Js))
    return flat / np.sqrt(k)


TX = {"ef": fisher.ef_precondition, "ief": fisher.ief_precondition,
      "sf": fisher.sampled_fisher_precondition}
FISHER_TYPE = {"ef": "empirical", "ief": "ief", "sf": "sampled"}


@functools.partial(jax.jit, static_argnames=("kind", "mode", "span_only"))
def _apply(kind, lam, u, extras, mode="absolute", span_only=None):
    """One transformation's update, jitted once per kind/mode/shape (the
    damping is traced), returning ``(direction, state)``."""
    kw = {} if span_only is None else {"span_only": span_only}
    tx = TX[kind](lam, damping_scale=mode, **kw)
    return tx.update(u, tx.init(u), **extras)


@pytest.mark.parametrize("kind,n", [("ef", 6), ("ief", 6), ("sf", 6), ("ef", 40),
                                    ("ief", 40)])  # P = 38: N < P and N > P
def test_woodbury_update_equals_dense_solve(kind, n):
    """C^-1 g = (R^T R + lambda I)^-1 (N g), with N g = J^T 1 the sum-loss
    gradient: the paper's eq. 17 (EF), 24 (SF) and the damped iEF matrix.
    float64 throughout; the dense solve has condition number up to ~1e9 at
    lambda = 1e-7, so agreement to 1e-6 leaves a margin of 1e3 over its
    rounding (~1e-16 * 1e9)."""
    with jax.enable_x64(True):
        params, model, loss, args = _mlp_problem(n=n)
        vg = fisher.per_sample_value_and_grad(model, loss, fisher_type=FISHER_TYPE[kind],
                                              num_samples=3)
        _, g, extras = jax.jit(vg)(params, *args, rng=jax.random.key(0))
        R = _dense_rows(kind, extras)
        P = R.shape[1]
        for damping, mode in ((1e-7, "absolute"), (1e-2, "absolute"), (1e-3, "relative")):
            u, state = _apply(kind, damping, g, extras, mode=mode)
            lam = damping * (np.max(np.sum(R**2, 1)) if mode == "relative" else 1.0)
            want = np.linalg.solve(R.T @ R + lam * np.eye(P), n * _flat(g))
            assert _rel(_flat(u), want) < 1e-6, (damping, mode)
            np.testing.assert_allclose(state.damping, lam, rtol=1e-6)
            assert int(state.count) == 1
            if kind == "ef":  # the paper's formula itself
                J = _flat_rows(extras["per_sample_grads"])
                assert _rel(_flat(u), np.linalg.solve(J.T @ J + lam * np.eye(P),
                                                      J.T @ np.ones(n))) < 1e-6


def test_span_only_and_full_inverse_on_an_arbitrary_vector():
    """For u outside the span of the rows: span_only=False is the damped
    inverse on the whole space, span_only=True the damped inverse of the
    projection onto the span."""
    with jax.enable_x64(True):
        params, model, loss, args = _mlp_problem(n=6)
        _, g, extras = jax.jit(fisher.per_sample_value_and_grad(model, loss))(params, *args)
        rng = np.random.default_rng(3)
        u = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), g)
        J = _flat_rows(extras["per_sample_grads"])
        n, P = J.shape
        lam = 1e-2
        M = J.T @ J + lam * np.eye(P)
        out_full = _apply("ef", lam, u, extras, span_only=False)[0]
        out_span = _apply("ef", lam, u, extras)[0]
        proj = J.T @ np.linalg.solve(J @ J.T, J @ _flat(u))
        assert _rel(_flat(out_full), np.linalg.solve(M, n * _flat(u))) < 1e-9
        assert _rel(_flat(out_span), np.linalg.solve(M, n * proj)) < 1e-9


def test_ief_is_equation_19_undamped_and_solves_j_delta_equals_s():
    """Undamped (N < P), the iEF update is J^T (J J^T)^-1 s (eq. 19 at
    lambda = 0) and every per-sample loss moves by -s_n to first order (eq.
    13); with lambda = 1e-7 it stays within 1e-5 of it."""
    with jax.enable_x64(True):
        params, model, loss, args = _mlp_problem(n=6)
        _, g, extras = jax.jit(fisher.per_sample_value_and_grad(model, loss, fisher_type="ief"))(
            params, *args)
        J = _flat_rows(extras["per_sample_grads"])
        s = np.asarray(extras["scales"])
        eq19 = J.T @ np.linalg.solve(J @ J.T, s)
        for lam, tol in ((0.0, 1e-9), (1e-7, 1e-5)):
            u = _flat(_apply("ief", lam, g, extras)[0])
            assert _rel(u, eq19) < tol
        np.testing.assert_allclose(J @ eq19, s, rtol=1e-9)


@pytest.mark.parametrize("n,p", [(12, 3), (4, 9)])
def test_least_squares_ief_equals_gauss_newton_and_ef_differs_by_the_scaling(n, p):
    """Linear least squares, l_n = (x_n^T theta - y_n)^2 / 2: the iEF update is
    the Gauss-Newton (= natural-gradient, = Newton) update (X^T X)^+ X^T r,
    both for N > P and N < P (supporting material, Section 2.2); EF is
    (X^T diag(r^2) X)^+ X^T r, which is iEF's update once the per-sample
    gradients are divided by |r_n|, and differs from Gauss-Newton."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(n)
        X = jnp.asarray(rng.normal(size=(n, p)))
        yv = jnp.asarray(rng.normal(size=n))
        theta = jnp.asarray(rng.normal(size=p))
        model = lambda t, X, y: (X @ t)[:, None]  # noqa: E731
        loss = lambda z, X, y: 0.5 * (z[:, 0] - y) ** 2  # noqa: E731
        vg = fisher.per_sample_value_and_grad(model, loss, fisher_type="ief")
        _, g, extras = vg(theta, X, yv)
        Xn = np.asarray(X)
        r = Xn @ np.asarray(theta) - np.asarray(yv)
        gn = np.linalg.pinv(Xn) @ r  # Gauss-Newton, minimum norm when N < P
        lam = 1e-12
        u_ief = np.asarray(_apply("ief", lam, g, extras)[0])
        assert _rel(u_ief, gn) < 1e-7
        np.testing.assert_allclose(extras["scales"], r**2, rtol=1e-12)
        u_ef = np.asarray(_apply("ef", lam, g, extras)[0])
        ef_dense = np.linalg.pinv(Xn.T @ np.diag(r**2) @ Xn) @ Xn.T @ r
        assert _rel(u_ef, ef_dense) < 1e-7
        rescaled = {"per_sample_grads": extras["per_sample_grads"] / np.abs(r)[:, None]}
        u_resc = np.asarray(_apply("ef", lam, g, rescaled)[0])
        # the rescaled rows are sign(r_n) x_n; N g = X^T r is the same vector
        assert _rel(u_resc, gn) < 1e-7
        if n > p:  # N < P: both solve X delta = r exactly, EF and GN coincide
            assert _rel(u_ef, gn) > 0.05


# --- the optax contract ----------------------------------------------------------------


def _f32_setup():
    params, model, loss, args = _mlp_problem(n=8, dtype=np.float32)
    vg = jax.jit(fisher.per_sample_value_and_grad(model, loss, fisher_type="ief"))
    _, g, extras = vg(params, *args)
    return params, g, extras


@pytest.mark.parametrize("make", [fisher.ef_precondition, fisher.ief_precondition])
def test_pre_clipping_scales_the_update_and_post_clipping_bounds_it(make):
    params, g, extras = _f32_setup()
    base = make(1e-3)
    u0 = jax.jit(base.update)(g, base.init(params), params, **extras)[0]
    gnorm = float(np.linalg.norm(_flat(g)))
    tau = 0.25 * gnorm
    pre = optax.chain(kp.clip_by_update_norm(tau), make(1e-3))
    u_pre = jax.jit(pre.update)(g, pre.init(params), params, **extras)[0]
    np.testing.assert_allclose(_flat(u_pre), (tau / gnorm) * _flat(u0), rtol=1e-4, atol=1e-7)
    tau2 = 0.1 * float(np.linalg.norm(_flat(u0)))
    post = optax.chain(make(1e-3), kp.clip_by_update_norm(tau2))
    u_post = jax.jit(post.update)(g, post.init(params), params, **extras)[0]
    np.testing.assert_allclose(np.linalg.norm(_flat(u_post)), tau2, rtol=1e-5)
    np.testing.assert_allclose(_flat(u_post), 0.1 * _flat(u0), rtol=1e-4, atol=1e-7)


def test_full_chain_jits_and_other_transformations_ignore_the_extras():
    params, g, extras = _f32_setup()
    tx = optax.chain(fisher.ief_precondition(1e-7, damping_scale="relative"),
                     kp.clip_by_update_norm(1.0),
                     optax.add_decayed_weights(1e-4), optax.scale_by_learning_rate(0.1))
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(g, state, params, **extras)
    updates, state = step(g, state, params, **extras)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(updates))
    assert isinstance(state[0], fisher.WoodburyState) and int(state[0].count) == 2
    assert int(state[0].rank) == 8
    adamw = optax.adamw(1e-3)  # the same call for every optimizer of a training loop
    adamw.update(g, adamw.init(params), params, **extras)


def test_float32_under_gradient_norm_imbalance():
    """Per-sample gradient norms spread over 10^3 (the paper's imbalance
    indicator reaches such values), iEF rows over ~10^4: the float32 updates
    at lambda = 1e-7 against float64 (measured: EF 1.8e-4, iEF 1.2e-3). The
    floor is the float32 rounding of ``R u``, relative error ~eps times the
    spread of row norms; the Gram matrix is scaled to unit diagonal first,
    without which the small-gradient directions are lost (~90% error)."""
    rng = np.random.default_rng(0)
    n, p = 32, 2000
    J = rng.normal(size=(n, p))
    J *= (np.logspace(0, 3, n) / np.linalg.norm(J, axis=1))[:, None]
    s = rng.uniform(0.01, 2.0, n)
    ex = {"per_sample_grads": {"w": jnp.asarray(J, jnp.float32)},
          "scales": jnp.asarray(s, jnp.float32)}
    g32 = {"w": jnp.asarray(J.mean(0), jnp.float32)}
    for kind, R, tol in (("ef", J, 1e-3), ("ief", J / np.sqrt(s)[:, None], 5e-3)):
        want = np.linalg.solve(R.T @ R + 1e-7 * np.eye(p), J.sum(0))
        u = _apply(kind, 1e-7, g32, ex)[0]
        assert _rel(np.asarray(u["w"], np.float64), want) < tol, kind


def test_zero_rows_and_zero_damping():
    """An example with zero gradient (and s_n = 0) drops out without NaN;
    lambda = 0 with dependent rows (N > P) is the pseudo-inverse limit
    (R^T R)^+ R^T 1."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        J = rng.normal(size=(6, 4))
        J[2] = 0.0
        s = rng.uniform(0.5, 2.0, 6)
        s[2] = 0.0
        g = {"w": jnp.asarray(J.mean(0))}
        ex = {"per_sample_grads": {"w": jnp.asarray(J)}, "scales": jnp.asarray(s)}
        keep = np.arange(6) != 2
        Rk = J[keep] / np.sqrt(s[keep])[:, None]
        for lam in (1e-3, 0.0):
            u = _apply("ief", lam, g, ex)[0]["w"]
            want = np.linalg.pinv(Rk.T @ Rk + lam * np.eye(4)) @ J.sum(0)
            assert _rel(np.asarray(u), want) < 1e-9, lam


def test_missing_or_mismatched_extras_raise():
    params, g, extras = _f32_setup()
    with pytest.raises(ValueError, match="per_sample_grads"):
        fisher.ef_precondition().update(g, fisher.ef_precondition().init(params))
    with pytest.raises(ValueError, match="scales"):
        fisher.ief_precondition().update(g, fisher.ief_precondition().init(g),
                                         per_sample_grads=extras["per_sample_grads"])
    with pytest.raises(ValueError, match="sampled_grads"):
        fisher.sampled_fisher_precondition().update(g, fisher.ef_precondition().init(g), **extras)
    bad = {"per_sample_grads": {"l1": extras["per_sample_grads"]["l1"]}}
    with pytest.raises(ValueError, match="tree structure"):
        fisher.ef_precondition().update(g, fisher.ef_precondition().init(g), **bad)
    with pytest.raises(ValueError, match="damping_scale"):
        fisher.ef_precondition(damping_scale="trace")
    with pytest.raises(ValueError, match="fisher_type"):
        fisher.per_sample_value_and_grad(None, None, fisher_type="gn")
    _, model, loss, args = _mlp_problem(dtype=np.float32)
    with pytest.raises(ValueError, match="rng"):
        fisher.per_sample_value_and_grad(model, loss, fisher_type="sampled")(params, *args)


def test_first_release_names_still_work_with_a_warning():
    params, model, loss, args = _mlp_problem(dtype=np.float32)
    with pytest.warns(DeprecationWarning, match="use fisher_type='ief'"):
        old_vg = fisher.per_sample_value_and_grad(model, loss, kind="ief")
    _, g, ex = old_vg(params, *args)
    _, g2, ex2 = fisher.per_sample_value_and_grad(model, loss, fisher_type="ief")(params, *args)
    with pytest.warns(DeprecationWarning, match="use fisher.ief_precondition"):
        old = fisher.ief(1e-3)
    with pytest.warns(DeprecationWarning, match="use damping_scale='relative'"):
        old_rel = fisher.ief_precondition(1e-3, damping_mode="relative")
    for a, b in ((old, fisher.ief_precondition(1e-3)),
                 (old_rel, fisher.ief_precondition(1e-3, damping_scale="relative"))):
        ua, ub = a.update(g, a.init(g), **ex)[0], b.update(g2, b.init(g2), **ex2)[0]
        for x, y in zip(jax.tree_util.tree_leaves(ua), jax.tree_util.tree_leaves(ub)):
            np.testing.assert_array_equal(x, y)
