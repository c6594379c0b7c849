"""Pre- vs post-clipping and the Fisher-norm clip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_peft as kp


def _ill_conditioned_problem():
    """One layer whose input covariance has a tiny eigenvalue along which the
    gradient is small: K-FAC amplifies that component enormously."""
    n, d_in, d_out = 64, 4, 2
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d_in)) * np.array([1.0, 1.0, 1.0, 1e-3])
    Y = rng.normal(size=(n, d_out))
    params = {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)}
    probes = {"kernel": kp.zeros_stats(d_in, d_out, False)}

    def loss(p, pr, X, Y):
        out = kp.dense(X, p["kernel"], probe=pr["kernel"])
        return 0.5 * jnp.mean(jnp.sum((out - Y) ** 2, -1))

    return params, probes, loss, jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)


def _update(tx, params, probes, loss, X, Y):
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    upd, state = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    return upd, state, grads


def test_post_clip_bounds_the_update_and_pre_clip_does_not():
    params, probes, loss, X, Y = _ill_conditioned_problem()
    tau = 1.0
    post = optax.chain(kp.kfac_precondition(1e-6, decay=0.0), kp.clip_by_update_norm(tau))
    pre = optax.chain(kp.clip_by_update_norm(tau), kp.kfac_precondition(1e-6, decay=0.0))
    none = kp.kfac_precondition(1e-6, decay=0.0)
    u_post, s_post, grads = _update(post, params, probes, loss, X, Y)
    u_pre, s_pre, _ = _update(pre, params, probes, loss, X, Y)
    u_none, _, _ = _update(none, params, probes, loss, X, Y)
    n_post, n_pre, n_none = (float(optax.tree.norm(u)) for u in (u_post, u_pre, u_none))
    assert n_post <= tau * (1 + 1e-6)
    assert n_pre > 10 * tau  # the gradient was clipped, the Newton step was not bounded
    assert float(optax.tree.norm(grads)) > tau  # so pre-clipping did act ...
    assert bool(s_pre[0].clipped) and bool(s_post[1].clipped)
    assert n_pre < n_none  # ... and shrank the step, by the gradient's clip factor
    np.testing.assert_allclose(n_pre / n_none, tau / float(optax.tree.norm(grads)), rtol=1e-4)
    # clipping after preconditioning keeps the Newton direction
    np.testing.assert_allclose(u_post["kernel"] / n_post, u_none["kernel"] / n_none, atol=1e-6)
    # the three settings give three different updates
    assert not np.allclose(u_post["kernel"], u_pre["kernel"])
    assert not np.allclose(u_none["kernel"], u_pre["kernel"])


def test_clip_state_counts_clips():
    tx = kp.clip_by_update_norm(1.0)
    state = tx.init({"w": jnp.zeros(3)})
    for v, clipped in [(0.5, False), (3.0, True), (2.0, True), (0.1, False)]:
        u, state = tx.update({"w": jnp.array([v, 0.0, 0.0])}, state)
        assert bool(state.clipped) == clipped
        np.testing.assert_allclose(float(state.norm), v, rtol=1e-6)
        np.testing.assert_allclose(float(optax.tree.norm(u)), min(v, 1.0), rtol=1e-6)
    assert int(state.num_clipped) == 2 and int(state.count) == 4
    assert kp.clip_stats(((), state)) is state


def test_clip_threshold_schedule_and_nonfinite_norm():
    tx = kp.clip_by_update_norm(lambda count: 1.0 + count)
    state = tx.init({"w": jnp.zeros(2)})
    u, state = tx.update({"w": jnp.array([4.0, 0.0])}, state)
    np.testing.assert_allclose(u["w"], [1.0, 0.0])
    u, state = tx.update({"w": jnp.array([4.0, 0.0])}, state)
    np.testing.assert_allclose(u["w"], [2.0, 0.0])
    for bad in (jnp.inf, jnp.nan):  # cannot be bounded: the step is skipped, never applied
        u, state = tx.update({"w": jnp.array([bad, 0.0])}, state)
        np.testing.assert_array_equal(u["w"], [0.0, 0.0])
    assert int(state.num_skipped) == 2 and int(state.num_clipped) == 4
    assert float(state.norm) == 4.0  # the last finite norm; nothing non-finite is stored


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_clip_norm_cannot_overflow(dtype):
    """The sum of squares overflows the leaf dtype (float16 above a norm of
    256, float32 above ~1.8e19 per entry); the clip must still bound the step."""
    big = {"float16": 300.0, "bfloat16": 1e30, "float32": 2.6e34}[dtype]
    tx = kp.clip_by_update_norm(1.0)
    u = {"w": jnp.full((4,), big, dtype), "b": jnp.full((2, 3), -big / 2, dtype)}
    out, state = jax.jit(tx.update)(u, tx.init(u))
    assert out["w"].dtype == jnp.dtype(dtype)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in (out["w"], out["b"])])
    ref = np.concatenate([np.asarray(x, np.float64).ravel() for x in (u["w"], u["b"])])
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.linalg.norm(flat), 1.0, rtol=4 * eps)
    np.testing.assert_allclose(flat, ref / np.linalg.norm(ref), rtol=2 * eps, atol=eps)
    assert bool(state.clipped) and int(state.num_skipped) == 0
    np.testing.assert_allclose(float(state.norm), min(np.linalg.norm(ref), 3.4028235e38),
                               rtol=1e-6)


def test_fisher_norm_clip_cannot_overflow():
    u = {"w": jnp.full((4,), 1e30, jnp.float32)}  # <u, g> = 4e60: inf in float32
    out, state = kp.clip_by_fisher_norm(1.0).update(u, kp.clip_by_fisher_norm(1.0).init(u),
                                                    grads=u)
    np.testing.assert_allclose(np.asarray(out["w"]), np.full(4, 0.5), rtol=1e-5)  # sqrt(1/4)
    assert bool(state.clipped) and np.isfinite(float(state.norm))
    bad = {"w": jnp.array([jnp.nan, 1.0])}
    out, state = kp.clip_by_fisher_norm(1.0).update(bad, state, grads=bad)
    np.testing.assert_array_equal(out["w"], 0.0)
    assert int(state.num_skipped) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_norm=-1.0), r"max_norm must be in \(0, inf\), got -1"),
    (dict(max_norm=0.0), r"max_norm must be in \(0, inf\), got 0"),
    (dict(max_norm=float("nan")), "max_norm must be finite"),
    (dict(max_norm=float("inf")), "max_norm must be finite"),
    (dict(max_norm="1"), "max_norm must be a real number"),
])
def test_clip_refuses_nonsense(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kp.clip_by_update_norm(**kwargs)


def test_clip_schedule_checked_at_init():
    with pytest.raises(ValueError, match=r"max_norm \(its schedule's value at count 0\)"):
        kp.clip_by_update_norm(lambda c: -1.0 + 0 * c).init({"w": jnp.zeros(2)})


def test_fisher_norm_clip_matches_definition():
    params, probes, loss, X, Y = _ill_conditioned_problem()
    kappa, eta = 1e-3, 0.5
    tx = optax.chain(kp.kfac_precondition(1e-4, decay=0.0), kp.clip_by_fisher_norm(kappa, eta))
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    state = tx.init(params)
    u, state = tx.update(grads, state, params, kfac_stats=stats, grads=grads)
    u0, _ = kp.kfac_precondition(1e-4, decay=0.0).update(
        grads, kp.kfac_precondition(1e-4, decay=0.0).init(params), params, kfac_stats=stats)
    sq = eta**2 * abs(float(jnp.sum(u0["kernel"] * grads["kernel"])))
    nu = min(1.0, np.sqrt(kappa / sq))
    assert nu < 1
    np.testing.assert_allclose(u["kernel"], nu * u0["kernel"], rtol=1e-5)
    # the clipped step's squared Fisher norm, eta^2 (nu u)^T F (nu u) = nu^2 sq, is kappa
    np.testing.assert_allclose(nu**2 * sq, kappa, rtol=1e-6)
    np.testing.assert_allclose(float(state[1].norm), np.sqrt(sq), rtol=1e-5)
    with pytest.raises(ValueError, match="raw gradient"):
        tx.update(grads, tx.init(params), params, kfac_stats=stats)


def test_convenience_optimizer_orders():
    params, probes, loss, X, Y = _ill_conditioned_problem()
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    for clip in ("post", "pre", "none"):
        tx = kp.kfac(0.1, damping=1e-6, max_update_norm=1.0, clip=clip, decay=0.0,
                     weight_decay=0.0)
        u, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
        n = float(optax.tree.norm(u))
        if clip == "post":
            assert n <= 0.1 * (1 + 1e-6)
        else:
            assert n > 0.1
    with pytest.raises(ValueError, match="unknown clip 'middle'"):
        kp.kfac(0.1, clip="middle")
