"""Every hyperparameter that makes no sense is refused when the transformation
is built, by a named error; the ones that make sense work as traced values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transform import _problem

import kfac_jax_peft as kp
from kfac_jax_peft import fisher

NAN, INF = float("nan"), float("inf")

KFAC_CASES = [
    (dict(damping=-1e-3), ValueError, r"damping must be in \[0, inf\), got -0.001"),
    (dict(damping=NAN), ValueError, "damping must be finite"),
    (dict(damping=INF), ValueError, "damping must be finite"),
    (dict(damping="1e-3"), TypeError, "damping must be a real number"),
    (dict(damping=jnp.ones(2)), TypeError, "damping must be a real scalar"),
    (dict(decay=1.0), ValueError, r"decay must be in \[0, 1\), got 1"),
    (dict(decay=1.5), ValueError, r"decay must be in \[0, 1\)"),
    (dict(decay=2.0), ValueError, r"decay must be in \[0, 1\)"),
    (dict(decay=-0.5), ValueError, r"decay must be in \[0, 1\), got -0.5"),
    (dict(decay=NAN), ValueError, "decay must be finite"),
    (dict(invert_every=0), ValueError, "invert_every must be a positive integer, got 0"),
    (dict(invert_every=-3), ValueError, "invert_every must be a positive integer"),
    (dict(invert_every=2.5), TypeError, "invert_every must be a positive integer, got 2.5"),
    (dict(invert_every="5"), TypeError, "invert_every must be a positive integer, got '5'"),
    (dict(invert_every=True), TypeError, "invert_every must be a positive integer"),
    (dict(damping_mode="approx"), ValueError, "unknown damping_mode 'approx'"),
    (dict(inverse_method="lu"), ValueError, "unknown inverse_method 'lu'"),
    (dict(factor_dtype="bfloat16"), ValueError, "factor_dtype must be one of"),
    (dict(factor_dtype="float16"), ValueError, "factor_dtype must be one of"),
    (dict(factor_dtype="int32"), ValueError, "factor_dtype must be one of"),
    (dict(factor_dtype="float64"), ValueError, "needs jax_enable_x64"),
    (dict(factor_dtype="nonsense"), TypeError, "factor_dtype must be one of"),
    (dict(ns_tolerance=0.0), ValueError, r"ns_tolerance must be in \(0, inf\)"),
    (dict(inverse_method="newton_schulz", ns_iterations=0), ValueError, "ns_iterations"),
    (dict(store_factors=False, invert_every=2), ValueError, "store_factors=False needs"),
]


@pytest.mark.parametrize("kwargs,error,match", KFAC_CASES)
def test_kfac_precondition_refuses(kwargs, error, match):
    with pytest.raises(error, match=match):
        kp.kfac_precondition(**kwargs)


OPTIMIZER_CASES = [
    (lambda: kp.kfac(-0.1), ValueError, r"learning_rate must be in \[0, inf\), got -0.1"),
    (lambda: kp.kfac(NAN), ValueError, "learning_rate must be finite"),
    (lambda: kp.kfac(0.1, weight_decay=-1e-4), ValueError, "weight_decay must be in"),
    (lambda: kp.kfac(0.1, max_update_norm=-1.0), ValueError, "max_norm must be in"),
    (lambda: kp.kfac(0.1, max_update_norm=0.0), ValueError, "max_norm must be in"),
    (lambda: kp.kfac(0.1, max_update_norm=None), ValueError, "clip='post' needs max_norm"),
    (lambda: kp.kfac(0.1, clip="middle"), ValueError, "unknown clip 'middle'"),
    (lambda: kp.clip_by_fisher_norm(0.0), ValueError, "max_sq_norm must be in"),
    (lambda: kp.clip_by_fisher_norm(1.0, learning_rate=-1.0), ValueError,
     "learning_rate must be in"),
    (lambda: kp.clipped(optax.identity(), "pre", NAN), ValueError, "max_norm must be finite"),
    (lambda: fisher.ef_precondition(-1.0), ValueError, r"damping must be in \[0, inf\)"),
    (lambda: fisher.ief_precondition(NAN), ValueError, "damping must be finite"),
    (lambda: fisher.sampled_fisher_precondition(1e-3, damping_scale="huge"), ValueError,
     "unknown damping_scale 'huge'"),
]


@pytest.mark.parametrize("build,error,match", OPTIMIZER_CASES)
def test_optimizers_and_clips_refuse(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_schedules_are_checked_at_init():
    params, *_ = _problem()
    with pytest.raises(ValueError, match=r"damping \(its schedule's value at count 0\)"):
        kp.kfac_precondition(lambda c: -1.0 + 0.0 * c).init(params)
    with pytest.raises(ValueError, match=r"decay \(its schedule's value at count 0\)"):
        kp.kfac_precondition(decay=lambda c: 1.0 + 0.0 * c).init(params)
    kp.kfac_precondition(optax.linear_schedule(1e-2, 1e-4, 10)).init(params)  # fine


def test_layers_must_be_2d_floating():
    params, *_ = _problem()
    with pytest.raises(ValueError, match="'scale' of shape \\(3,\\) with 1 input axes"):
        kp.kfac_precondition(layer_filter=lambda p, x: p == "scale").init(params)
    ints = dict(params, dense=dict(params["dense"], kernel=jnp.ones((5, 3), jnp.int32)))
    with pytest.raises(ValueError, match="'dense/kernel'.*dtype int32 is not floating"):
        kp.kfac_precondition(layer_filter=lambda p, x: p == "dense/kernel").init(ints)
    # the default filter leaves integer leaves alone: nothing registered, nothing touched
    assert kp.kfac_precondition().init(ints).layers == {}


def test_inject_hyperparams_of_the_whole_optimizer_needs_no_static_args():
    """The usual way to log or change a learning rate: every numeric argument
    of ``kp.kfac`` is a traced hyperparameter, and the step compiles once."""
    params, probes, loss, X, Y = _problem()
    tx = optax.inject_hyperparams(kp.kfac)(learning_rate=0.1, damping=1e-2, invert_every=2,
                                           weight_decay=1e-4, max_update_norm=1.0)
    grad_fn = kp.kfac_value_and_grad(loss)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        _, g, st = grad_fn(p, probes, X, Y)
        u, s = tx.update(g, s, p, kfac_stats=st)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    ref = kp.kfac(0.1, damping=1e-2, invert_every=2, weight_decay=1e-4)
    ref_state, p_ref = ref.init(params), params
    for _ in range(3):
        params, state = step(params, state)
        _, g, st = grad_fn(p_ref, probes, X, Y)
        u, ref_state = ref.update(g, ref_state, p_ref, kfac_stats=st)
        p_ref = optax.apply_updates(p_ref, u)
        lr = state.hyperparams["learning_rate"]
        state.hyperparams["learning_rate"] = jnp.full_like(lr, 0.1)  # set between steps
    assert len(traces) == 1
    np.testing.assert_allclose(params["dense"]["kernel"], p_ref["dense"]["kernel"], rtol=1e-5)
    assert int(kp.kfac_state(state).num_inversions) == 2  # invert_every=2, traced
