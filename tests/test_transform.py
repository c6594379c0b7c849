"""The optax contract of kfac_precondition: state, jit, interop, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_peft as kp


def _problem(seed=0, n=16, d_in=5, d_out=3):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32),
                        "bias": jnp.zeros(d_out)},
              "scale": jnp.ones(d_out)}
    probes = {"dense": {"kernel": kp.zeros_stats(d_in, d_out, True)}}
    X = jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=(n, d_out)), jnp.float32)

    def loss(p, pr, X, Y):
        out = kp.dense(X, p["dense"]["kernel"], p["dense"]["bias"],
                       probe=None if pr is None else pr["dense"]["kernel"]) * p["scale"]
        return 0.5 * jnp.mean(jnp.sum((out - Y) ** 2, -1))

    return params, probes, loss, X, Y


def test_state_is_namedtuple_with_count_first_and_float32_factors():
    params, *_ = _problem()
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    state = kp.kfac_precondition().init(params)
    assert state._fields[0] == "count"
    fa = state.factors["dense/kernel/A"]
    assert fa.average.shape == (6, 6) and fa.average.dtype == jnp.float32
    assert set(state.layers) == {"dense/kernel"}
    assert set(state.factors) == {"dense/kernel/A", "dense/kernel/G"}


def test_init_on_shape_dtype_structs():
    params, *_ = _problem()
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    s1 = kp.kfac_precondition().init(shapes)
    s2 = kp.kfac_precondition().init(params)
    assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s2)


def test_unregistered_leaves_pass_through_and_none_stats_reuse_inverse():
    params, probes, loss, X, Y = _problem()
    tx = kp.kfac_precondition(1e-2, invert_every=100)
    state = tx.init(params)
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    # before any statistics: pass-through, documented
    u0, s0 = tx.update(grads, state, params)
    np.testing.assert_array_equal(u0["dense"]["kernel"], grads["dense"]["kernel"])
    assert not bool(s0.layers["dense/kernel"].has_curvature)
    u1, s1 = tx.update(grads, state, params, kfac_stats=stats)
    np.testing.assert_array_equal(u1["scale"], grads["scale"])
    assert int(s1.num_inversions) == 1
    u2, s2 = tx.update(grads, s1, params)  # no new statistics: same inverse
    np.testing.assert_allclose(u2["dense"]["kernel"], u1["dense"]["kernel"], rtol=1e-6)
    assert int(s2.num_inversions) == 1 and int(s2.count) == 2
    np.testing.assert_array_equal(s2.factors["dense/kernel/A"].average,
                                  s1.factors["dense/kernel/A"].average)


def test_inversion_interval():
    params, probes, loss, X, Y = _problem()
    tx = kp.kfac_precondition(1e-2, invert_every=3)
    state = tx.init(params)
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    inv = []
    for _ in range(7):
        _, state = tx.update(grads, state, params, kfac_stats=stats)
        inv.append(int(state.num_inversions))
    assert inv == [1, 1, 1, 2, 2, 2, 3]


def test_ema_bias_correction_and_decay_zero():
    params, probes, loss, X, Y = _problem()
    _, grads, s1 = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    _, _, s2 = kp.kfac_value_and_grad(loss)(params, probes, 2 * X, Y)
    A1 = s1["dense"]["kernel"].A / s1["dense"]["kernel"].num_tokens
    A2 = s2["dense"]["kernel"].A / s2["dense"]["kernel"].num_tokens
    for decay, want in [(0.0, A2), (0.9, (0.9 * 0.1 * A1 + 0.1 * A2) / (0.9 * 0.1 + 0.1))]:
        tx = kp.kfac_precondition(decay=decay)
        state = tx.init(params)
        _, state = tx.update(grads, state, params, kfac_stats=s1)
        f = state.factors["dense/kernel/A"]
        np.testing.assert_allclose(f.average / f.weight, A1, rtol=1e-6)  # unbiased from step one
        _, state = tx.update(grads, state, params, kfac_stats=s2)
        f = state.factors["dense/kernel/A"]
        np.testing.assert_allclose(f.average / f.weight, want, rtol=1e-5)


def test_jit_compiles_each_trace_once():
    params, probes, loss, X, Y = _problem()
    tx = optax.chain(kp.kfac_precondition(1e-3), kp.clip_by_update_norm(1.0), optax.sgd(0.1))
    grad_fn = kp.kfac_value_and_grad(loss)
    traces = {"stats": 0, "plain": 0}

    @jax.jit
    def stats_step(p, s, X, Y):
        traces["stats"] += 1
        _, g, st = grad_fn(p, probes, X, Y)
        u, s = tx.update(g, s, p, kfac_stats=st)
        return optax.apply_updates(p, u), s

    @jax.jit
    def plain_step(p, s, X, Y):
        traces["plain"] += 1
        g = jax.grad(loss)(p, None, X, Y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for i in range(4):
        params, state = (stats_step if i % 2 == 0 else plain_step)(params, state, X, Y)
    assert traces == {"stats": 1, "plain": 1}
    assert stats_step._cache_size() == 1 and plain_step._cache_size() == 1


def test_inject_hyperparams_masked_partition():
    params, probes, loss, X, Y = _problem()
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    static = ("invert_every", "ns_iterations")
    inj = optax.inject_hyperparams(kp.kfac_precondition, static_args=static)(
        damping=1e-2, decay=0.0)
    state = inj.init(params)
    u_inj, state = inj.update(grads, state, params, kfac_stats=stats)
    ref = kp.kfac_precondition(1e-2, decay=0.0)
    u_ref, _ = ref.update(grads, ref.init(params), params, kfac_stats=stats)
    np.testing.assert_allclose(u_inj["dense"]["kernel"], u_ref["dense"]["kernel"], rtol=1e-6)
    state.hyperparams["damping"] = jnp.asarray(1.0)
    u_big, _ = inj.update(grads, state, params, kfac_stats=stats)
    assert float(optax.tree.norm(u_big)) < float(optax.tree.norm(u_inj))

    mask = {"dense": {"kernel": True, "bias": True}, "scale": False}
    masked = optax.masked(kp.kfac_precondition(1e-2, decay=0.0), mask)
    u_m, _ = masked.update(grads, masked.init(params), params, kfac_stats=stats)
    np.testing.assert_allclose(u_m["dense"]["kernel"], u_ref["dense"]["kernel"], rtol=1e-6)

    labels = {"dense": {"kernel": "kfac", "bias": "kfac"}, "scale": "sgd"}
    part = optax.partition({"kfac": kp.kfac_precondition(1e-2, decay=0.0),
                            "sgd": optax.scale(-3.0)}, labels)
    u_p, _ = part.update(grads, part.init(params), params, kfac_stats=stats)
    np.testing.assert_allclose(u_p["dense"]["bias"], u_ref["dense"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(u_p["scale"], -3.0 * grads["scale"], rtol=1e-6)

    # statistics of a layer that this masked copy does not own are ignored
    other = optax.masked(kp.kfac_precondition(), {"dense": {"kernel": False, "bias": False},
                                                  "scale": True})
    u_o, _ = other.update(grads, other.init(params), params, kfac_stats=stats)
    np.testing.assert_array_equal(u_o["dense"]["kernel"], grads["dense"]["kernel"])


def test_bad_input_errors_name_the_leaf():
    params, probes, loss, X, Y = _problem()
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    tx = kp.kfac_precondition()
    state = tx.init(params)
    with pytest.raises(ValueError, match="'other/kernel'.*not a leaf"):
        tx.update(grads, state, params, kfac_stats={"other": {"kernel": stats["dense"]["kernel"]}})
    bad = {"dense": {"kernel": kp.zeros_stats(4, 3, True)}}
    with pytest.raises(ValueError, match="shape mismatch for layer 'dense/kernel'"):
        tx.update(grads, state, params, kfac_stats=bad)
    with pytest.raises(ValueError, match="'scale'.*not a registered"):
        tx.update(grads, state, params, kfac_stats={"scale": kp.zeros_stats(2, 2, False)})
    with pytest.raises(TypeError, match="expected LayerStats"):
        tx.update(grads, state, params, kfac_stats={"dense": {"kernel": jnp.zeros(3)}})
    with pytest.raises(ValueError, match="damping_mode"):
        kp.kfac_precondition(damping_mode="approx")
    with pytest.raises(ValueError, match="invert_every"):
        kp.kfac_precondition(invert_every=0)


def test_nonfinite_statistics_never_enter_the_state():
    params, probes, loss, X, Y = _problem()
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    tx = kp.kfac_precondition(1e-2, decay=0.5)
    state = tx.init(params)
    u_good, state = tx.update(grads, state, params, kfac_stats=stats)
    s = stats["dense"]["kernel"]
    nan_stats = {"dense": {"kernel": s._replace(G=s.G.at[0, 0].set(jnp.nan))}}
    u_nan, state2 = tx.update(grads, state, params, kfac_stats=nan_stats)
    for key in ("dense/kernel/A", "dense/kernel/G"):  # a layer's factors go together
        f, f2 = state.factors[key], state2.factors[key]
        assert int(f2.num_rejected) == 1 and int(f2.num_stats) == 1
        for a, b in zip(jax.tree_util.tree_leaves(f[:4]), jax.tree_util.tree_leaves(f2[:4])):
            np.testing.assert_array_equal(a, b)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state2))
    np.testing.assert_allclose(u_nan["dense"]["kernel"], u_good["dense"]["kernel"], rtol=1e-5)
    empty = {"dense": {"kernel": s._replace(num_tokens=0.0 * s.num_tokens)}}
    _, state3 = tx.update(grads, state, params, kfac_stats=empty)
    assert int(state3.factors["dense/kernel/G"].num_rejected) == 1


def test_zero_initialised_lora_b_gives_finite_updates():
    """LoRA's B = 0 makes A's output gradient, and its G factor, zero."""
    d, r, n = 6, 2, 8
    rng = np.random.default_rng(0)
    params = {"lora_A": {"kernel": jnp.asarray(rng.normal(size=(d, r)), jnp.float32)},
              "lora_B": {"kernel": jnp.zeros((r, d))}}
    probes = {"lora_A": {"kernel": kp.zeros_stats(d, r, False)},
              "lora_B": {"kernel": kp.zeros_stats(r, d, False)}}
    X = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)

    def loss(p, pr, X, Y):
        h = kp.dense(X, p["lora_A"]["kernel"], probe=pr["lora_A"]["kernel"])
        out = X + kp.dense(h, p["lora_B"]["kernel"], probe=pr["lora_B"]["kernel"])
        return 0.5 * jnp.mean(jnp.sum((out - Y) ** 2, -1))

    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
    assert float(jnp.abs(stats["lora_A"]["kernel"].G).max()) == 0.0
    for mode in ("exact", "factored"):
        for method in ("cholesky", "cholesky_solve", "eigh", "newton_schulz"):
            tx = kp.kfac_precondition(1e-3, damping_mode=mode, inverse_method=method)
            u, state = tx.update(grads, tx.init(params), params, kfac_stats=stats)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(u))
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state))
            np.testing.assert_array_equal(u["lora_A"]["kernel"], 0.0)
            assert float(jnp.abs(u["lora_B"]["kernel"]).max()) > 0
