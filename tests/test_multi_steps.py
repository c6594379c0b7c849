"""Gradient accumulation: k micro-batches give the factors and the update of
one step on the concatenated batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_peft as kp


def _problem(n=16, t=5, d_in=6, d_out=3, seed=0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32),
                        "bias": jnp.zeros(d_out)}}
    probes = {"dense": {"kernel": kp.zeros_stats(d_in, d_out, True)}}
    X = jnp.asarray(rng.normal(size=(n, t, d_in)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=(n, t, d_out)), jnp.float32)
    mask = np.ones((n, t), np.float32)
    mask[1::3, 2:] = 0  # micro-batches with different numbers of real tokens
    return params, probes, X, Y, jnp.asarray(mask)


def loss(p, pr, X, Y, m):
    out = kp.dense(X, p["dense"]["kernel"], p["dense"]["bias"],
                   probe=None if pr is None else pr["dense"]["kernel"], mask=m)
    per_example = jnp.sum(jnp.sum((out - Y) ** 2, -1) * m, -1) / jnp.sum(m, -1)
    return 0.5 * jnp.mean(per_example)


def test_four_micro_batches_equal_the_full_batch():
    params, probes, X, Y, mask = _problem()
    grad_fn = kp.kfac_value_and_grad(loss)

    def chain():
        return optax.chain(kp.kfac_precondition(1e-2, decay=0.0), optax.sgd(0.1))

    full = chain()
    _, g, st = grad_fn(params, probes, X, Y, mask)
    u_full, s_full = full.update(g, full.init(params), params, kfac_stats=st)

    acc = kp.multi_steps(chain(), 4, probes)
    state = acc.init(params)
    @jax.jit
    def step(s, X, Y, m):
        _, g, st = grad_fn(params, probes, X, Y, m)
        return acc.update(g, s, params, kfac_stats=st)

    for i in range(4):
        sl = slice(4 * i, 4 * i + 4)
        u, state = step(state, X[sl], Y[sl], mask[sl])
        if i < 3:  # nothing is applied before the last micro-batch
            np.testing.assert_array_equal(u["dense"]["kernel"], 0.0)
    k_full = kp.kfac_state(s_full)
    k_acc = kp.kfac_state(state.multi_steps.inner_opt_state)
    for key in ("dense/kernel/A", "dense/kernel/G"):
        a, b = k_full.factors[key], k_acc.factors[key]
        np.testing.assert_allclose(b.average / b.weight, a.average / a.weight, rtol=1e-5)
    # float32 sums in another order: 1e-5 of the update's largest entry
    for name in ("kernel", "bias"):
        want = np.asarray(u_full["dense"][name])
        np.testing.assert_allclose(u["dense"][name], want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())
    # the accumulator starts again from zero
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(state.stats))


def test_plain_optax_multisteps_sees_the_last_micro_batch_only():
    """Why the wrapper exists (documented in kfac_jax_peft.kfac.multi_steps)."""
    params, probes, X, Y, mask = _problem()
    grad_fn = kp.kfac_value_and_grad(loss)
    tx = optax.MultiSteps(kp.kfac_precondition(1e-2, decay=0.0), 2)
    state = tx.init(params)
    for i in range(2):
        sl = slice(8 * i, 8 * i + 8)
        _, g, st = grad_fn(params, probes, X[sl], Y[sl], mask[sl])
        _, state = tx.update(g, state, params, kfac_stats=st)
    tokens_last = float(jnp.sum(mask[8:]))
    a = kp.kfac_state(state.inner_opt_state).factors["dense/kernel/A"]
    # decay 0: the factor is the last micro-batch's statistics alone
    np.testing.assert_allclose(a.average / a.weight, st["dense"]["kernel"].A / tokens_last,
                               rtol=1e-6)
