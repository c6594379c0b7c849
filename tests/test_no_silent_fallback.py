"""A layer without statistics is never preconditioned silently: warnings (or,
with strict=True, errors) name it, and describe() shows what each layer got."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transform import _problem

import kfac_jax_peft as kp


class PlainLinen(nn.Module):
    """A user's own model, built from stock nn.Dense (no capture)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.tanh(nn.Dense(4)(x)))


def _plain_setup():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5)), jnp.float32)
    model = PlainLinen()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    grad = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))
    return params, grad


def test_a_model_that_never_sends_statistics_is_reported_from_the_device():
    params, grad = _plain_setup()
    tx = kp.kfac_precondition(invert_every=3)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(grad(p), s, p))
    with pytest.warns(UserWarning, match="3 updates and no K-FAC statistics yet"):
        for _ in range(5):
            u, state = step(params, state)
        jax.effects_barrier()
    # ... and the update is the gradient itself: that is what the warning is about
    np.testing.assert_array_equal(u["Dense_0"]["kernel"], grad(params)["Dense_0"]["kernel"])
    table = kp.describe(state)
    assert "Dense_0/kernel" in table and "Dense_1/kernel" in table and "NO" in table


def test_strict_raises_when_no_statistics_ever_arrive():
    params, grad = _plain_setup()
    tx = kp.kfac_precondition(invert_every=1, strict=True)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(grad(p), s, p))
    _, state = step(params, state)  # count 0: nothing is due yet
    with pytest.raises(Exception, match="no K-FAC statistics yet"):
        jax.block_until_ready(step(params, state))
        jax.effects_barrier()


def test_statistics_missing_for_some_layers_are_named_at_trace_time():
    params, probes, loss, X, Y = _problem()
    params = dict(params, extra={"kernel": jnp.ones((3, 3))})  # registered, never captured
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    tx = kp.kfac_precondition()
    with pytest.warns(UserWarning, match=r"no statistics for the registered layers "
                                         r"\['extra/kernel'\] \(1 of 2\)"):
        _, state = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    assert not bool(state.layers["extra/kernel"].has_curvature)
    assert bool(state.layers["dense/kernel"].has_curvature)
    with pytest.raises(ValueError, match="extra/kernel"):
        strict = kp.kfac_precondition(strict=True)
        strict.update(grads, strict.init(params), params, kfac_stats=stats)


def test_a_filter_that_registers_nothing_is_reported():
    params, *_ = _problem()
    with pytest.warns(UserWarning, match="registered no layer among the 3 leaves"):
        kp.kfac_precondition(layer_filter=lambda p, x: False).init(params)
    with pytest.raises(ValueError, match="registered no layer"):
        kp.kfac_precondition(layer_filter=lambda p, x: False, strict=True).init(params)


def test_describe_lists_layers_and_shared_input_factors():
    params, probes, loss, X, Y = _problem()
    tx = optax.chain(kp.kfac_precondition(1e-2), kp.clip_by_update_norm(1.0))
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    _, state = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    lines = kp.describe(state).splitlines()
    assert lines[0] == "K-FAC: 1 updates, 1 inversions (last at update 0), 1 layers, 2 factors"
    assert lines[2].split() == ["dense/kernel", "6", "3", "1", "0", "yes"]
    assert kp.describe(optax.sgd(0.1).init(params)) == "no K-FAC state in this optimizer state"


def test_flax_train_state_route():
    """flax's TrainState cannot pass kfac_stats; KFACTrainState can, and gives
    the step of the hand-written loop."""
    params, probes, loss, X, Y = _problem()
    tx = kp.kfac(0.1, damping=1e-2)
    grad_fn = kp.kfac_value_and_grad(loss)
    state = kp.KFACTrainState.create(apply_fn=None, params=params, tx=tx)

    @jax.jit
    def train_step(state):
        _, grads, stats = grad_fn(state.params, probes, X, Y)
        return state.apply_gradients(grads=grads, kfac_stats=stats)

    p_ref, s_ref = params, tx.init(params)
    for _ in range(3):
        state = train_step(state)
        _, g, st = grad_fn(p_ref, probes, X, Y)
        u, s_ref = tx.update(g, s_ref, p_ref, kfac_stats=st)
        p_ref = optax.apply_updates(p_ref, u)
    assert int(state.step) == 3
    assert int(kp.kfac_state(state.opt_state).num_inversions) == 3
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
