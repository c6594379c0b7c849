"""The K-FAC direction against dense linear algebra on explicit per-token data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_peft as kp


def _setup(key, shape_in, d_out, use_bias, pad):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, shape_in)
    d_in = shape_in[-1]
    W = jax.random.normal(k2, (d_in, d_out)) / np.sqrt(d_in)
    b = jax.random.normal(k3, (d_out,)) if use_bias else None
    y_t = jax.random.normal(k4, shape_in[:-1] + (d_out,))
    mask = np.ones(shape_in[:-1], np.float32)
    if pad:
        if len(shape_in) == 3:
            mask[0, 3:] = 0
            mask[2, 5:] = 0
        else:
            mask[-1] = 0
    return x, W, b, y_t, jnp.asarray(mask)


def _loss(params, probes, x, y_t, mask):
    y = kp.dense(x, params["kernel"], params.get("bias"), probe=probes["kernel"], mask=mask)
    per_tok = jnp.sum(jnp.tanh(y) * y_t + 0.5 * y**2, -1) * mask
    if x.ndim == 3:
        per_ex = jnp.sum(per_tok, 1)
        n = jnp.sum(jnp.any(mask > 0, 1))
    else:
        per_ex = per_tok
        n = jnp.sum(mask)
    return jnp.sum(per_ex) / n


def _independent_AG(params, x, y_t, mask, use_bias):
    """A, G from per-token inputs and jax.vjp cotangents, in float64 numpy."""
    def out(y):
        return _loss_from_y(y, y_t, mask, x.ndim)

    y = x @ params["kernel"] + (params["bias"] if use_bias else 0)
    _, vjp = jax.vjp(out, y)
    (g,) = vjp(jnp.ones(()))
    xa = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    if use_bias:
        xa = np.concatenate([xa, np.ones((xa.shape[0], 1))], 1)
    ga = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    m = np.asarray(mask, np.float64).reshape(-1)
    n_tok = m.sum()
    n_ex = (np.asarray(mask).reshape(x.shape[0], -1).max(1) > 0).sum()
    A = sum(m[t] * np.outer(xa[t], xa[t]) for t in range(len(m))) / n_tok
    G = sum(m[t] * np.outer(ga[t], ga[t]) for t in range(len(m))) * n_ex**2 / n_ex
    return A, G


def _loss_from_y(y, y_t, mask, ndim):
    per_tok = jnp.sum(jnp.tanh(y) * y_t + 0.5 * y**2, -1) * mask
    if ndim == 3:
        return jnp.sum(per_tok) / jnp.sum(jnp.any(mask > 0, 1))
    return jnp.sum(per_tok) / jnp.sum(mask)


CASES = [((6, 5), True, False), ((6, 5), False, True), ((4, 7, 5), True, True),
         ((4, 7, 5), False, False)]


@pytest.mark.parametrize("shape_in,use_bias,pad", CASES)
@pytest.mark.parametrize("mode,method", [("exact", "cholesky"), ("factored", "cholesky"),
                                         ("factored", "cholesky_solve"), ("factored", "eigh"),
                                         ("factored", "newton_schulz")])
def test_one_layer_matches_dense(shape_in, use_bias, pad, mode, method):
    d_out, lam = 3, 0.05
    x, W, b, y_t, mask = _setup(jax.random.key(0), shape_in, d_out, use_bias, pad)
    params = {"kernel": W} | ({"bias": b} if use_bias else {})
    probes = {"kernel": kp.zeros_stats(shape_in[-1], d_out, use_bias)}
    loss, grads, stats = kp.kfac_value_and_grad(_loss)(params, probes, x, y_t, mask)

    A, G = _independent_AG(params, x, y_t, mask, use_bias)
    s = stats["kernel"]
    np.testing.assert_allclose(s.A / s.num_tokens, A, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.G / s.num_examples, G, rtol=1e-5, atol=1e-7)

    tx = kp.kfac_precondition(lam, decay=0.0, damping_mode=mode, inverse_method=method)
    state = tx.init(params)
    upd, _ = tx.update(grads, state, params, kfac_stats=stats)

    gW = np.asarray(grads["kernel"], np.float64)
    V = np.concatenate([gW, np.asarray(grads["bias"], np.float64)[None]]) if use_bias else gW
    if mode == "exact":
        M = np.kron(A, G) + lam * np.eye(A.shape[0] * G.shape[0])
        U = np.linalg.solve(M, V.reshape(-1)).reshape(V.shape)
    else:
        pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
        Ad = A + pi * np.sqrt(lam) * np.eye(A.shape[0])
        Gd = G + np.sqrt(lam) / pi * np.eye(G.shape[0])
        U = np.linalg.solve(np.kron(Ad, Gd), V.reshape(-1)).reshape(V.shape)
    got = np.asarray(upd["kernel"], np.float64)
    if use_bias:
        got = np.concatenate([got, np.asarray(upd["bias"], np.float64)[None]])
    rel = np.linalg.norm(got - U) / np.linalg.norm(U)
    assert rel <= 1e-5, rel


def test_gauss_newton_step_on_least_squares():
    """decay 0, one batch, exact Fisher of a unit Gaussian: K-FAC = Gauss-Newton."""
    n, d_in, d_out = 32, 4, 3
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    X = jax.random.normal(k1, (n, d_in))
    Y = jax.random.normal(k2, (n, d_out))
    params = {"kernel": jax.random.normal(k3, (d_in, d_out)), "bias": jnp.zeros(d_out)}
    probes = {"kernel": kp.zeros_stats(d_in, d_out, True)}

    def model(p, pr, X, Y):
        return kp.dense(X, p["kernel"], p["bias"], probe=pr["kernel"])

    def loss(out, X, Y):
        return 0.5 * jnp.mean(jnp.sum((out - Y) ** 2, -1))

    _, grads, stats = kp.kfac_value_and_grad(model, loss, fisher_type="exact",
                                             likelihood="gaussian")(params, probes, X, Y)
    lam = 1e-8
    tx = kp.kfac_precondition(lam, decay=0.0)
    upd, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)

    Xb = np.concatenate([np.asarray(X, np.float64), np.ones((n, 1))], 1)
    H = np.kron(Xb.T @ Xb / n, np.eye(d_out))  # Gauss-Newton of the mean loss
    gvec = np.concatenate([np.asarray(grads["kernel"]), np.asarray(grads["bias"])[None]])
    step = np.linalg.solve(H + lam * np.eye(H.shape[0]), gvec.reshape(-1)).reshape(gvec.shape)
    got = np.concatenate([np.asarray(upd["kernel"]), np.asarray(upd["bias"])[None]])
    np.testing.assert_allclose(got, step, rtol=1e-4, atol=1e-6)
    # the step solves the least-squares problem exactly
    new = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: -u, upd))
    W_ls = np.linalg.lstsq(Xb, np.asarray(Y, np.float64), rcond=None)[0]
    np.testing.assert_allclose(np.concatenate([new["kernel"], new["bias"][None]]), W_ls,
                               atol=1e-4)
