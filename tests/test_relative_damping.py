"""Damping relative to the factors: the absolute value it maps to, and invariance to the
scale of the loss, against dense ``np.kron`` solves in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_precondition_dense import _loss, _setup
from test_stages import SPECS, _factors, _spd

import kfac_jax_peft as kp
from kfac_jax_peft.kfac import inverse as I
from kfac_jax_peft.kfac import stages as S


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _scale(A, G):
    return (np.trace(A) / A.shape[0]) * (np.trace(G) / G.shape[0])


def _one_layer(scale_loss=1.0):
    x, W, b, y_t, mask = _setup(jax.random.key(0), (4, 7, 5), 3, True, True)
    params = {"kernel": W.astype(jnp.float64), "bias": b.astype(jnp.float64)}
    probes = {"kernel": kp.zeros_stats(5, 3, True, jnp.float64)}

    def loss(p, pr, x, y_t, mask):
        return scale_loss * _loss(p, pr, x, y_t, mask)

    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, x.astype(jnp.float64),
                                                   y_t.astype(jnp.float64), mask)
    return params, grads, stats, (x, y_t, mask)


def _direction(tx, params, grads, stats):
    upd, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    return np.concatenate([np.asarray(upd["kernel"]), np.asarray(upd["bias"])[None]])


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_relative_equals_absolute_with_the_value_it_maps_to(mode):
    params, grads, stats, _ = _one_layer()
    s = stats["kernel"]  # the factors themselves are checked in test_precondition_dense
    A = np.asarray(s.A, np.float64) / float(s.num_tokens)
    G = np.asarray(s.G, np.float64) / float(s.num_examples)
    r = 0.03
    lam = r * _scale(A, G)
    kw = dict(decay=0.0, damping_mode=mode, factor_dtype="float64", inverse_method="cholesky")
    rel = _direction(kp.kfac_precondition(r, damping_scale="relative", **kw), params, grads,
                     stats)
    ab = _direction(kp.kfac_precondition(lam, **kw), params, grads, stats)
    V = np.concatenate([np.asarray(grads["kernel"]), np.asarray(grads["bias"])[None]])
    if mode == "exact":
        want = np.linalg.solve(np.kron(A, G) + lam * np.eye(V.size), V.ravel())
    else:  # (A + sqrt(r) tr(A)/d_a I) kron (G + sqrt(r) tr(G)/d_g I), the pi-adjusted pair
        Ad = A + np.sqrt(r) * np.trace(A) / A.shape[0] * np.eye(A.shape[0])
        Gd = G + np.sqrt(r) * np.trace(G) / G.shape[0] * np.eye(G.shape[0])
        want = np.linalg.solve(np.kron(Ad, Gd), V.ravel())
    want = want.reshape(V.shape)
    np.testing.assert_allclose(rel, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(ab, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_each_layer_gets_its_own_scale_shared_input_factor_included():
    rng = np.random.default_rng(5)
    factors = _factors()
    # layers of very different curvature scales: one relative value fits all
    est = {k: _spd(rng, f.average.shape[0], scale=10.0 ** rng.integers(-4, 4))
           for k, f in factors.items()}
    factors, _ = S.accumulate(factors, {k: (jnp.asarray(v), jnp.asarray(True))
                                        for k, v in est.items()}, 0.0)
    factors = S.commit_eigen(factors, *S.decompose(factors, factors))
    layers = S.exact_flags(SPECS, factors, {p: S.init_layer(s, jnp.float64, exact=True,
                                                            method="eigh")
                                            for p, s in SPECS.items()})
    grads = jax.tree_util.tree_map(jnp.asarray, {
        "x": {"kernel": rng.normal(size=(4, 3))},
        "y": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)},
        "z": {"kernel": rng.normal(size=(4, 5))}})
    r = 1e-2
    out = S.precondition(grads, SPECS, factors, layers, r, exact=True, damping_scale="relative")
    for path, spec in SPECS.items():
        name = path.split("/")[0]
        v = np.asarray(grads[name]["kernel"])
        if spec.bias is not None:
            v = np.concatenate([v, np.asarray(grads[name]["bias"])[None]], 0)
        A, G = est[spec.a_key], est[spec.g_key]
        lam = r * _scale(A, G)
        u = np.linalg.solve(np.kron(A, G) + lam * np.eye(v.size), v.ravel()).reshape(v.shape)
        got = np.asarray(out[name]["kernel"])
        if spec.bias is not None:
            got = np.concatenate([got, np.asarray(out[name]["bias"])[None]], 0)
        np.testing.assert_allclose(got, u, rtol=1e-9, atol=1e-12 * np.abs(u).max())


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_relative_direction_is_invariant_to_the_scale_of_the_loss(mode):
    c = 50.0
    kw = dict(decay=0.0, damping_mode=mode, factor_dtype="float64", inverse_method="cholesky")
    st = _pick(1.0)[2]["kernel"]
    # the same damping, relative 1 or the absolute value it maps to at c = 1
    values = {"relative": 1.0, "absolute": float(I.relative_scale(st.A / st.num_tokens,
                                                                  st.G / st.num_examples))}
    out = {}
    for scale, lam in values.items():
        u1 = _direction(kp.kfac_precondition(lam, damping_scale=scale, **kw), *_pick(1.0))
        uc = _direction(kp.kfac_precondition(lam, damping_scale=scale, **kw), *_pick(c))
        out[scale] = (u1, uc)
    u1, uc = out["relative"]
    # G scales by c^2 and the gradient by c: the relative step is the same direction, 1/c long
    np.testing.assert_allclose(c * uc, u1, rtol=1e-9, atol=1e-12 * np.abs(u1).max())
    u1, uc = out["absolute"]
    cos = np.sum(u1 * uc) / (np.linalg.norm(u1) * np.linalg.norm(uc))
    assert 1 - cos > 1e-2, cos  # absolute damping turns the direction


def _pick(c):
    params, grads, stats, _ = _one_layer(c)
    return params, grads, stats


def test_a_vanishing_factor_reads_the_value_as_absolute():
    A = jnp.asarray(_spd(np.random.default_rng(0), 4))
    assert float(I.relative_scale(A, jnp.zeros((3, 3)))) == 1.0
    assert float(I.relative_scale(A, jnp.full((3, 3), jnp.nan))) == 1.0
    np.testing.assert_allclose(float(I.relative_scale(A, 2 * jnp.eye(3))),
                               2 * np.trace(A) / 4, rtol=1e-12)


def test_damping_extra_argument_replaces_the_configured_value():
    params, grads, stats, _ = _one_layer()
    kw = dict(decay=0.0, factor_dtype="float64", damping_scale="relative")
    tx = kp.kfac_precondition(1.0, **kw)
    got, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats, damping=0.02)
    want = _direction(kp.kfac_precondition(0.02, **kw), params, grads, stats)
    np.testing.assert_allclose(np.concatenate([got["kernel"], got["bias"][None]]), want,
                               rtol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        tx.update(grads, tx.init(params), params, kfac_stats=stats, damping=-1.0)


def test_unknown_damping_scale_is_refused_by_name():
    with pytest.raises(ValueError, match="damping_scale"):
        kp.kfac_precondition(1e-3, damping_scale="trace")
