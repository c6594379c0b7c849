"""Zeroth-order gradient sources: SPSA (MeZO), HiZOO, LoHO.

Statistical checks use many independent draws and tolerances derived from
the estimator's own variance (stated at each test); they are seeded, so
they are deterministic.
"""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kfac_jax_peft import zeroth_order as zo

D = 5


def _quadratic():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(D, D))
    h = jnp.asarray(m @ m.T / D + np.eye(D), jnp.float32)
    b = jnp.asarray(rng.normal(size=D), jnp.float32)
    theta = jnp.asarray(rng.normal(size=D), jnp.float32)
    loss = lambda p: 0.5 * p["w"] @ h @ p["w"] - b @ p["w"]
    return loss, {"w": theta}, np.asarray(h @ theta - b)


def _draws(estimate, params, n, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: estimate(params, k)[1]["w"]))(keys), np.float64)


def test_spsa_mean_is_the_gradient_on_a_quadratic():
    loss, params, grad = _quadratic()
    n = 20000
    g = _draws(zo.spsa_value_and_grad(loss, eps=1e-2), params, n)
    # One draw has covariance grad grad^T + |grad|^2 I (Isserlis); the mean of
    # n draws has standard error sqrt((grad_i^2 + |grad|^2) / n). 4.5 of them.
    stderr = np.sqrt((grad ** 2 + grad @ grad) / n)
    np.testing.assert_array_less(np.abs(g.mean(0) - grad), 4.5 * stderr)
    # and the measured variance is the predicted one (total over coordinates)
    assert g.var(0).sum() == pytest.approx((D + 1) * grad @ grad, rel=0.1)


def test_n_spsa_variance_falls_like_one_over_n():
    loss, params, grad = _quadratic()
    var = {n: _draws(zo.spsa_value_and_grad(loss, eps=1e-2, num_directions=n),
                     params, 4000, seed=n).var(0).sum() for n in (1, 8)}
    # Predicted ratio 8; the variance estimates of 4000 heavy-tailed draws
    # are each good to about 5% (one standard deviation), so a 20% band.
    assert var[1] / var[8] == pytest.approx(8.0, rel=0.2)
    assert var[8] == pytest.approx((D + 1) * grad @ grad / 8, rel=0.15)


def test_spsa_loss_is_the_mean_of_the_two_evaluations():
    loss, params, _ = _quadratic()
    key = jax.random.PRNGKey(3)
    value, _ = zo.spsa_value_and_grad(loss, eps=0.1)(params, key)
    # direction i is drawn from fold_in(rng, i), one key per leaf
    z = jax.random.normal(zo.directions.leaf_keys(jax.random.fold_in(key, 0), params)[0], (D,))
    expected = 0.5 * (loss({"w": params["w"] + 0.1 * z}) + loss({"w": params["w"] - 0.1 * z}))
    assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_mezo_adam_trains_a_quadratic():
    loss, params, _ = _quadratic()
    est = zo.spsa_value_and_grad(lambda p, s: s * loss(p), eps=1e-3, num_directions=2)
    tx = optax.adam(0.05)

    @jax.jit
    def step(carry, key):
        p, state = carry
        value, g = est(p, 1.0, key)
        updates, state = tx.update(g, state, p)
        return (optax.apply_updates(p, updates), state), value

    (final, _), values = jax.lax.scan(step, (params, tx.init(params)),
                                      jax.random.split(jax.random.PRNGKey(0), 400))
    optimum = float(loss({"w": jnp.linalg.solve(*_hb())}))
    assert float(loss(final)) - optimum < 0.05 * (float(values[0]) - optimum)


def _hb():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(D, D))
    return (jnp.asarray(m @ m.T / D + np.eye(D), jnp.float32),
            jnp.asarray(rng.normal(size=D), jnp.float32))


def test_hizoo_gradient_mean_is_sigma_times_gradient():
    loss, params, grad = _quadratic()
    sigma = jnp.linspace(0.5, 2.0, D)
    state = zo.HiZOOState(count=jnp.zeros((), jnp.int32), sigma={"w": sigma})
    est = zo.hizoo_value_and_grad(loss, eps=1e-2, hessian_smooth=0.0)
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    g = np.asarray(jax.jit(jax.vmap(lambda k: est(params, state, k)[1]["w"]))(keys), np.float64)
    # g = (u . grad) u with u = Sigma^{1/2} z: covariance
    # S grad grad^T S + (grad^T S grad) S, S = diag(sigma).
    s = np.asarray(sigma, np.float64)
    stderr = np.sqrt(((s * grad) ** 2 + (grad * s) @ grad * s) / n)
    np.testing.assert_array_less(np.abs(g.mean(0) - s * grad), 4.5 * stderr)
    value, _, new = est(params, state, keys[0])
    assert float(value) == pytest.approx(float(loss(params)))
    assert int(new.count) == 1 and np.array_equal(new.sigma["w"], sigma)  # alpha = 0


def test_hizoo_sigma_converges_to_its_fixed_point():
    # Diagonal H in d = 4: the source's update has the fixed point
    # Sigma = 2 / (d + 2) * diag(H)^{-1} (derivation in the module doc).
    h = jnp.array([1.0, 2.0, 5.0, 10.0])
    loss = lambda p: 0.5 * jnp.sum(h * p["w"] ** 2)
    params = {"w": jnp.array([0.3, -0.2, 0.1, 0.5])}
    est = zo.hizoo_value_and_grad(loss, eps=0.1, hessian_smooth=0.002)

    def step(state, key):
        _, _, state = est(params, state, key)
        return state, jnp.log(state.sigma["w"])

    steps = 20000
    _, logs = jax.jit(lambda s, k: jax.lax.scan(step, s, k))(
        zo.hizoo_init(params), jax.random.split(jax.random.PRNGKey(0), steps))
    # Geometric mean over the second half: with alpha = 0.002 the iterates
    # fluctuate by about 15% and the mean over 10^4 correlated steps is good
    # to about 5% (three seeds tried: within 8%); a 15% band.
    sigma = np.exp(np.asarray(logs[steps // 2:]).mean(0))
    np.testing.assert_allclose(sigma * np.asarray(h), 2.0 / (4 + 2), rtol=0.15)


def test_hizoo_state_is_checkpointable():
    params = {"a": jnp.ones((2, 3)), "b": {"c": jnp.zeros(4, jnp.bfloat16)}}
    state = zo.hizoo_init(params, sigma=0.5)
    assert state._fields[0] == "count"
    assert state.sigma["b"]["c"].dtype == jnp.float32
    state = state._replace(count=jnp.asarray(7, jnp.int32))
    blob = flax.serialization.to_bytes(state)
    restored = flax.serialization.from_bytes(zo.hizoo_init(params), blob)
    assert int(restored.count) == 7
    same = jax.tree_util.tree_map(np.array_equal, restored.sigma, state.sigma)
    assert jax.tree_util.tree_all(same)


# ---------------------------------------------------------------- the MLP

def _mlp(width=256, batch=1024):
    k0, k1, kx = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"layer_0": {"b": jnp.zeros(width), "w": jax.random.normal(k0, (64, width)) / 8},
              "layer_1": {"b": jnp.zeros(4), "w": jax.random.normal(k1, (width, 4)) / 16}}
    x = jax.random.normal(kx, (batch, 64))
    y = jnp.ones((batch, 4))

    def loss(p, x, y):
        hidden = jnp.tanh(x @ p["layer_0"]["w"] + p["layer_0"]["b"])
        return jnp.mean((hidden @ p["layer_1"]["w"] + p["layer_1"]["b"] - y) ** 2)

    return loss, params, x, y


def _count(jaxpr, name):
    """Occurrences of primitive ``name`` in a jaxpr and all its sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += _count(inner, name)
    return total


def test_spsa_has_no_backward_pass_and_less_temp_memory_than_value_and_grad():
    loss, params, x, y = _mlp()
    key = jax.random.PRNGKey(0)
    est = zo.spsa_value_and_grad(loss)
    text = jax.make_jaxpr(est)(params, x, y, key).pretty_print()
    for word in ("transpose", "vjp", "linear_transpose", "custom_jvp_call"):
        assert word not in text
    assert _count(jax.make_jaxpr(est)(params, x, y, key).jaxpr, "dot_general") == 4  # 2 passes
    spsa = jax.jit(est).lower(params, x, y, key).compile().memory_analysis()
    backprop = jax.jit(jax.value_and_grad(loss)).lower(params, x, y).compile().memory_analysis()
    # SPSA keeps no activations; value_and_grad keeps the (batch, width) ones.
    assert spsa.temp_size_in_bytes < backprop.temp_size_in_bytes


def _labels_match(labels_fn, params, expected):
    got = labels_fn(params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)
    assert dict(zip(zo.leaf_paths(params), jax.tree_util.tree_leaves(got))) == expected


def test_inter_and_intra_layer_labels():
    _, params, _, _ = _mlp()
    _labels_match(zo.inter_layer_labels(1), params, {
        "layer_0/b": "zo", "layer_0/w": "zo", "layer_1/b": "fo", "layer_1/w": "fo"})
    _labels_match(zo.inter_layer_labels(1, fo_layers="first"), params, {
        "layer_0/b": "fo", "layer_0/w": "fo", "layer_1/b": "zo", "layer_1/w": "zo"})
    _labels_match(zo.inter_layer_labels(5), params, dict.fromkeys(zo.leaf_paths(params), "fo"))
    _labels_match(zo.inter_layer_labels(0), params, dict.fromkeys(zo.leaf_paths(params), "zo"))
    lora = {"encoder": {f"layer_{i}": {m: {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 8))}
                                       for m in ("query", "value")} for i in (0, 1, 2)},
            "head": {"w": jnp.zeros((8, 3))}}
    expected = {p: ("zo" if p.startswith("head") else "fo" if "query" in p else "zo")
                for p in zo.leaf_paths(lora)}
    _labels_match(zo.intra_layer_labels(0.5), lora, expected)
    quarter = {p: ("fo" if "query/lora_a" in p else "zo") for p in zo.leaf_paths(lora)}
    _labels_match(zo.intra_layer_labels(0.25), lora, quarter)
    inter = zo.inter_layer_labels(2, unindexed="fo")(lora)
    assert inter["head"]["w"] == "fo" and inter["encoder"]["layer_0"]["value"]["lora_a"] == "zo"
    assert inter["encoder"]["layer_1"]["query"]["lora_b"] == "fo"


@pytest.mark.parametrize("labels_fn", [zo.inter_layer_labels(1), zo.intra_layer_labels(0.5),
                                       zo.inter_layer_labels(1, fo_layers="first")])
def test_partition_covers_every_leaf_once(labels_fn):
    _, params, _, _ = _mlp()
    fo, zo_part = zo.split_by_label(params, labels_fn)
    n_fo, n_zo = len(jax.tree_util.tree_leaves(fo)), len(jax.tree_util.tree_leaves(zo_part))
    assert n_fo > 0 and n_zo > 0 and n_fo + n_zo == len(jax.tree_util.tree_leaves(params))
    merged = zo.merge_labels(fo, zo_part)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(merged),
                                      jax.tree_util.tree_leaves(params)))


@pytest.mark.parametrize("fo_name", ["sgd", "adam"])
def test_loho_inter_updates_are_first_order_and_spsa_parts(fo_name):
    loss, params, x, y = _mlp(width=16, batch=32)
    labels = zo.inter_layer_labels(1)                    # layer_1 first-order
    fo_tx = getattr(optax, fo_name)(1e-2)
    tx = zo.loho(fo_tx, optax.sgd(1e-3), labels)
    key = jax.random.PRNGKey(4)
    # eps = 0.1: the two programs round the loss difference differently, and
    # float32 roundoff of the loss divided by eps must stay below rtol.
    value, grads = jax.jit(zo.loho_value_and_grad(loss, labels, eps=0.1))(params, x, y, key)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)

    # First-order part: fo_tx alone on layer_1, layer_0 held fixed.
    fo_loss = lambda p1: loss({"layer_0": params["layer_0"], "layer_1": p1["layer_1"]}, x, y)
    fo_params = {"layer_1": params["layer_1"]}
    exact_value, fo_grad = jax.value_and_grad(fo_loss)(fo_params)
    fo_updates, _ = fo_tx.update(fo_grad, fo_tx.init(fo_params), fo_params)
    assert float(value) == pytest.approx(float(exact_value), rel=1e-6)
    for k in ("w", "b"):
        np.testing.assert_allclose(updates["layer_1"][k], fo_updates["layer_1"][k], rtol=1e-6)

    # Zeroth-order part: MeZO's SGD step on layer_0 alone, same key.
    zo_loss = lambda p0, x, y: loss({"layer_0": p0["layer_0"], "layer_1": params["layer_1"]}, x, y)
    zo_params = {"layer_0": params["layer_0"]}
    _, zo_grad = jax.jit(zo.spsa_value_and_grad(zo_loss, eps=0.1))(zo_params, x, y, key)
    for k in ("w", "b"):
        np.testing.assert_allclose(updates["layer_0"][k], -1e-3 * zo_grad["layer_0"][k], rtol=1e-4)


def test_loho_intra_matches_the_parts():
    loss, params, x, y = _mlp(width=16, batch=32)
    labels = zo.intra_layer_labels(0.5)                  # the biases first-order
    key = jax.random.PRNGKey(5)
    _, grads = jax.jit(zo.loho_value_and_grad(loss, labels, eps=0.1))(params, x, y, key)
    exact = jax.grad(loss)(params, x, y)
    for layer in ("layer_0", "layer_1"):
        np.testing.assert_allclose(grads[layer]["b"], exact[layer]["b"], rtol=1e-5, atol=1e-8)
    ws = {name: params[name]["w"] for name in ("layer_0", "layer_1")}
    ws_loss = lambda w, x, y: loss({n: {"b": params[n]["b"], "w": w[n]} for n in w}, x, y)
    _, zo_grad = jax.jit(zo.spsa_value_and_grad(ws_loss, eps=0.1))(ws, x, y, key)
    for layer in ("layer_0", "layer_1"):
        np.testing.assert_allclose(grads[layer]["w"], zo_grad[layer], rtol=1e-4)


def test_loho_differentiates_only_the_first_order_leaves():
    loss, params, x, y = _mlp(width=16, batch=32)
    key = jax.random.PRNGKey(0)

    def dots(labels):
        return _count(jax.make_jaxpr(zo.loho_value_and_grad(loss, labels))(
            params, x, y, key).jaxpr, "dot_general")

    # Forward 2 dots each: FO pass + two SPSA passes = 6. Backward of the last
    # layer alone: dW1 only (no cotangent for the hidden layer) = 1.
    assert dots(zo.inter_layer_labels(1)) == 7
    # First layer first-order: dh and dW0 = 2 (layer_1's dW1 not formed).
    assert dots(zo.inter_layer_labels(1, fo_layers="first")) == 8
    # All first-order: 2 + 3 (dW1, dh, dW0) and no SPSA pass; all
    # zeroth-order: the two SPSA passes and no backward pass.
    assert dots(zo.inter_layer_labels(2)) == 5
    assert dots(zo.inter_layer_labels(0)) == 4


def test_bad_settings_are_refused():
    f = lambda p: jnp.sum(p)
    for bad in (0.0, -1e-3):
        with pytest.raises(ValueError, match="eps"):
            zo.spsa_value_and_grad(f, eps=bad)
        with pytest.raises(ValueError, match="eps"):
            zo.hizoo_value_and_grad(f, eps=bad)
        with pytest.raises(ValueError, match="eps"):
            zo.loho_value_and_grad(f, zo.inter_layer_labels(1), eps=bad)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_directions"):
            zo.spsa_value_and_grad(f, num_directions=bad)
        with pytest.raises(ValueError, match="num_directions"):
            zo.loho_value_and_grad(f, zo.inter_layer_labels(1), num_directions=bad)
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="fo_ratio"):
            zo.intra_layer_labels(bad)
    with pytest.raises(ValueError, match="num_fo_layers"):
        zo.inter_layer_labels(-1)
    with pytest.raises(ValueError, match="fo_layers"):
        zo.inter_layer_labels(1, fo_layers="middle")
    with pytest.raises(ValueError, match="hessian_smooth"):
        zo.hizoo_value_and_grad(f, hessian_smooth=1.0)
    with pytest.raises(ValueError, match="sigma_bounds"):
        zo.hizoo_value_and_grad(f, sigma_bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="sigma"):
        zo.hizoo_init({"w": jnp.ones(2)}, sigma=0.0)
    with pytest.raises(ValueError, match="layer_1/w"):
        zo.split_by_label({"layer_1": {"w": jnp.ones(2)}}, {"layer_1": {"w": "first"}})


def test_estimates_keep_parameter_dtypes_under_jit():
    params = {"a": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.ones(4, jnp.float32)}
    loss = lambda p, s: s * (jnp.sum(p["a"].astype(jnp.float32) ** 2) + jnp.sum(p["b"] ** 2))
    key = jax.random.PRNGKey(0)
    value, g = jax.jit(zo.spsa_value_and_grad(loss, eps=1e-2, num_directions=3))(params, 1.0, key)
    assert g["a"].dtype == jnp.bfloat16 and g["b"].dtype == jnp.float32
    assert np.isfinite(float(value))
    value, g, state = jax.jit(zo.hizoo_value_and_grad(loss, eps=1e-2))(
        params, zo.hizoo_init(params), 1.0, key)
    assert g["a"].dtype == jnp.bfloat16 and state.sigma["a"].dtype == jnp.float32
    assert float(value) == pytest.approx(10.0)
    _, g = jax.jit(zo.loho_value_and_grad(loss, {"a": "zo", "b": "fo"}))(params, 1.0, key)
    np.testing.assert_allclose(g["b"], 2 * np.ones(4))
    assert g["a"].dtype == jnp.bfloat16


def test_loho_with_no_first_order_layer_is_mezo():
    loss, params, x, y = _mlp(width=16, batch=32)
    key = jax.random.PRNGKey(6)
    value, g = jax.jit(zo.loho_value_and_grad(loss, zo.inter_layer_labels(0), eps=0.1))(
        params, x, y, key)
    ref_value, ref = jax.jit(zo.spsa_value_and_grad(loss, eps=0.1))(params, x, y, key)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
