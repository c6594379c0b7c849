"""Adaptive damping (Levenberg-Marquardt) and the quadratic-model step, on constructed
quadratics against their closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_peft as kp
from kfac_jax_peft.adaptive import (
    adaptive_damping,
    adaptive_state,
    scale_by_quadratic_model,
)


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _quadratic(d=6, seed=0):
    """``h(theta) = 1/2 theta^T H theta - b^T theta`` on a tree of two leaves."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(d, d))
    H = m @ m.T / d + 0.5 * np.eye(d)
    b = rng.normal(size=d)
    split = lambda v: {"w": jnp.asarray(v[:4]), "u": jnp.asarray(v[4:])}  # noqa: E731
    flat = lambda t: jnp.concatenate([t["w"], t["u"]])  # noqa: E731

    def h(theta):
        x = flat(theta)
        return 0.5 * x @ jnp.asarray(H) @ x - jnp.asarray(b) @ x

    def fvp(v):
        return split(jnp.asarray(H) @ flat(v))

    return H, b, h, fvp, split, flat


def _extras(h, fvp, theta, bump=0.0):
    """``value_fn`` is the quadratic, plus ``bump * ||theta - theta0||^4`` (a loss the
    model does not see)."""
    x0 = jax.tree_util.tree_map(jnp.copy, theta)

    def value_fn(p):
        dx = sum(jnp.sum((a - c) ** 2) for a, c in zip(jax.tree_util.tree_leaves(p),
                                                       jax.tree_util.tree_leaves(x0)))
        return h(p) + bump * dx ** 2

    return dict(loss=h(theta), value_fn=value_fn, fvp_fn=fvp)


@pytest.mark.parametrize("bump,direction", [(0.0, "down"), (100.0, "up")])
def test_lm_lowers_damping_after_a_good_step_and_raises_it_after_a_bad_one(bump, direction):
    H, b, h, fvp, split, flat = _quadratic()
    theta = split(np.linspace(-1, 1, 6))
    lam0 = 1e-2
    tx = adaptive_damping(optax.scale(-0.5), lam0, every=1)  # half a gradient step
    state = tx.init(theta)
    g = jax.grad(h)(theta)
    step, state = jax.jit(lambda g, s, t: tx.update(g, s, t, **_extras(h, fvp, t, bump)))(
        g, state, theta)
    # rho against its closed form: the model is exact for the quadratic
    gv, dv = np.asarray(flat(g)), np.asarray(flat(step))
    predicted = gv @ dv + 0.5 * dv @ H @ dv
    actual = float(_extras(h, fvp, theta, bump)["value_fn"](optax.apply_updates(theta, step))
                   - h(theta))
    np.testing.assert_allclose(float(state.rho), actual / predicted, rtol=1e-5)
    omega = 19 / 20
    if direction == "down":  # actual = predicted: rho = 1 > 3/4
        np.testing.assert_allclose(float(state.rho), 1.0, rtol=1e-6)
        np.testing.assert_allclose(float(state.damping), lam0 * omega, rtol=1e-6)
    else:  # the loss rose far beyond the model: rho < 1/4
        assert float(state.rho) < 0.25
        np.testing.assert_allclose(float(state.damping), lam0 / omega, rtol=1e-6)


def test_lm_raises_damping_when_the_model_predicts_no_decrease_or_the_loss_is_nan():
    H, b, h, fvp, split, flat = _quadratic()
    theta = split(np.linspace(-1, 1, 6))
    g = jax.grad(h)(theta)
    for inner, bad in ((optax.scale(+1.0), None), (optax.scale(-0.5), jnp.nan)):
        tx = adaptive_damping(inner, 1.0, every=1)
        ex = _extras(h, fvp, theta)
        if bad is not None:
            ex["value_fn"] = lambda p, bad=bad: bad
        _, state = tx.update(g, tx.init(theta), theta, **ex)
        assert np.isnan(float(state.rho))
        np.testing.assert_allclose(float(state.damping), 20 / 19, rtol=1e-6)


def test_lm_runs_every_k_calls_and_stays_in_range():
    H, b, h, fvp, split, flat = _quadratic()
    theta = split(np.linspace(-1, 1, 6))
    tx = adaptive_damping(optax.scale(-0.5), 1e-3, every=3, min_damping=1e-3)
    state = tx.init(theta)
    for _ in range(4):  # good steps: would lower, but 1e-3 is the floor
        _, state = tx.update(jax.grad(h)(theta), state, theta, **_extras(h, fvp, theta))
    assert int(state.num_adjusted) == 2 and int(state.count) == 4
    assert float(state.damping) == pytest.approx(1e-3)


def test_the_adapted_damping_reaches_kfac_precondition():
    """The wrapper's damping is what the preconditioner uses, not its configured value."""
    n, d_in, d_out = 16, 3, 2
    k1, k2 = jax.random.split(jax.random.key(0))
    X, Y = jax.random.normal(k1, (n, d_in)), jax.random.normal(k2, (n, d_out))
    params = {"kernel": jnp.zeros((d_in, d_out))}
    probes = {"kernel": kp.zeros_stats(d_in, d_out, False)}

    def loss(p, pr):
        out = kp.dense(X, p["kernel"], probe=None if pr is None else pr["kernel"])
        return 0.5 * jnp.mean(jnp.sum((out - Y) ** 2, -1))

    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes)
    h = lambda p: loss(p, None)  # noqa: E731
    fvp = lambda v: jax.jvp(jax.grad(h), (params,), (v,))[1]  # noqa: E731
    inner = optax.chain(kp.kfac_precondition(5.0, decay=0.0), optax.scale(-1.0))
    tx = adaptive_damping(inner, 0.3)
    got, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats, loss=h(params),
                       value_fn=h, fvp_fn=fvp)
    ref = optax.chain(kp.kfac_precondition(0.3, decay=0.0), optax.scale(-1.0))
    want, _ = ref.update(grads, ref.init(params), params, kfac_stats=stats)
    np.testing.assert_allclose(got["kernel"], want["kernel"], rtol=1e-12)


def test_quadratic_model_step_equals_the_closed_form():
    H, b, h, fvp, split, flat = _quadratic()
    theta = split(np.linspace(-1, 1, 6))
    g = jax.grad(h)(theta)
    gv = np.asarray(flat(g))
    P = np.diag(np.linspace(0.5, 2.0, 6))  # some preconditioner: d = P g
    d = split(P @ gv)
    tx = scale_by_quadratic_model(momentum=False)
    step, state = tx.update(d, tx.init(theta), theta, grads=g, fvp_fn=fvp)
    dv = P @ gv
    alpha = -(gv @ dv) / (dv @ H @ dv)
    np.testing.assert_allclose(np.asarray(flat(step)), alpha * dv, rtol=1e-10)
    np.testing.assert_allclose(float(state.alpha), alpha, rtol=1e-10)
    # the exact Newton direction gets alpha = -1 and lands on the minimum
    newton = split(np.linalg.solve(H, gv))
    step, _ = tx.update(newton, tx.init(theta), theta, grads=g, fvp_fn=fvp)
    np.testing.assert_allclose(np.asarray(flat(optax.apply_updates(theta, step))),
                               np.linalg.solve(H, b), rtol=1e-9)


def test_quadratic_model_momentum_solves_the_two_by_two_system():
    H, b, h, fvp, split, flat = _quadratic()
    eta = 0.1
    tx = scale_by_quadratic_model(0.5, momentum=True, damping=eta)
    theta = split(np.linspace(-1, 1, 6))
    state = tx.init(theta)
    P = np.diag(np.linspace(0.5, 2.0, 6))
    steps = []
    for _ in range(2):
        g = jax.grad(h)(theta)
        p = np.asarray(flat(state.velocity))
        step, state = tx.update(split(P @ np.asarray(flat(g))), state, theta, grads=g,
                                fvp_fn=fvp)
        theta = optax.apply_updates(theta, step)
        steps.append((np.asarray(flat(g)), p, np.asarray(flat(step))))
    gv, p, got = steps[1]
    dv = P @ gv
    C = H + eta * np.eye(6)
    S = np.array([[dv @ C @ dv, dv @ C @ p], [p @ C @ dv, p @ C @ p]])
    alpha, mu = -np.linalg.solve(S, [gv @ dv, gv @ p])
    np.testing.assert_allclose(got, 0.5 * (alpha * dv + mu * p), rtol=1e-9)
    np.testing.assert_allclose([float(state.alpha), float(state.mu)], [alpha, mu], rtol=1e-9)
    # the first step had no velocity: alpha only
    gv0, p0, got0 = steps[0]
    d0 = P @ gv0
    np.testing.assert_allclose(got0, 0.5 * -(gv0 @ d0) / (d0 @ C @ d0) * d0, rtol=1e-10)


def test_chain_with_the_newton_step_clip_under_jit_and_state_lookup():
    H, b, h, fvp, split, flat = _quadratic()
    theta = split(np.linspace(-1, 1, 6))
    tx = adaptive_damping(optax.chain(kp.clip_by_update_norm(0.1), scale_by_quadratic_model()),
                          1e-2, every=2)

    @jax.jit
    def step(theta, state):
        g = jax.grad(h)(theta)
        u, state = tx.update(g, state, theta, **_extras(h, fvp, theta))
        return optax.apply_updates(theta, u), state

    state = tx.init(theta)
    losses = [float(h(theta))]
    for _ in range(6):
        theta, state = step(theta, state)
        losses.append(float(h(theta)))
    assert losses[-1] < losses[0] and all(np.isfinite(losses))
    assert adaptive_state(state) is not None
    assert int(kp.clip_stats(state).count) == 6


def test_missing_extra_arguments_are_named():
    H, b, h, fvp, split, flat = _quadratic()
    theta = split(np.zeros(6))
    tx = adaptive_damping(optax.identity())
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(theta, tx.init(theta), theta, loss=0.0, fvp_fn=fvp)
    q = scale_by_quadratic_model()
    with pytest.raises(ValueError, match="fvp_fn"):
        q.update(theta, q.init(theta), theta, grads=theta)
    with pytest.raises(ValueError, match="omega"):
        adaptive_damping(optax.identity(), omega=1.5)
    with pytest.raises(ValueError, match="damping"):
        adaptive_damping(optax.identity(), -1.0)
