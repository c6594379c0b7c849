"""Memory options of kfac_precondition: shared input factors and curvature-only state.

Both keep the updates of the plain transformation: shared input factors bit
for bit, the curvature-only state up to the float32 round-off of the
eigensolver.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_peft as kp

D, R, OUT = 6, 3, 8  # input width, "LoRA rank" of the projections, output width (> D:
# full-rank G factors; a singular G with small damping makes any float32 K-FAC
# direction round-off dominated, with or without these options)
RULES = [(r"(blk\d)/[qkv]/kernel", r"\1")]


def _problem(seed=0, n=5, t=7, blocks=2, bias=False, d=D):
    """Blocks of three projections ``q, k, v`` that read one input (as in
    self-attention), then a head; token mask with padding."""
    D = d  # noqa: N806
    OUT = d + 2  # noqa: N806
    rng = np.random.default_rng(seed)
    params, probes = {}, {}
    for b in range(blocks):
        params[f"blk{b}"] = {}
        probes[f"blk{b}"] = {}
        for name in "qkv":
            p = {"kernel": jnp.asarray(rng.normal(size=(D, R)) / np.sqrt(D), jnp.float32)}
            if bias:
                p["bias"] = jnp.asarray(0.1 * rng.normal(size=R), jnp.float32)
            params[f"blk{b}"][name] = p
            probes[f"blk{b}"][name] = {"kernel": kp.zeros_stats(D, R, bias)}
        params[f"blk{b}"]["o"] = {"kernel": jnp.asarray(rng.normal(size=(R, D)) / np.sqrt(R),
                                                        jnp.float32)}
        probes[f"blk{b}"]["o"] = {"kernel": kp.zeros_stats(R, D, False)}
    params["head"] = {"kernel": jnp.asarray(rng.normal(size=(D, OUT)), jnp.float32),
                      "bias": jnp.zeros(OUT)}
    probes["head"] = {"kernel": kp.zeros_stats(D, OUT, True)}

    def loss(p, pr, x, y, mask):
        def lin(h, path):
            node, probe = p, pr
            for k in path:
                node = node[k]
                probe = None if probe is None else probe[k]
            return kp.dense(h, node["kernel"], node.get("bias"),
                            probe=None if probe is None else probe["kernel"], mask=mask)

        h = x
        for b in range(blocks):
            q, k, v = (lin(h, (f"blk{b}", name)) for name in "qkv")
            h = h + lin(jnp.tanh(q) * k + v, (f"blk{b}", "o"))
        out = lin(h, ("head",))
        per_tok = jnp.sum((out - y) ** 2, -1) * mask
        return jnp.sum(per_tok) / jnp.sum(jnp.any(mask > 0, 1))

    def batch(i):
        r = np.random.default_rng(100 + i)
        mask = np.ones((n, t), np.float32)
        mask[0, 4:] = 0
        mask[2, 2:] = 0
        return (jnp.asarray(r.normal(size=(n, t, D)), jnp.float32),
                jnp.asarray(r.normal(size=(n, t, OUT)), jnp.float32), jnp.asarray(mask))

    return params, probes, loss, batch


def _run(tx, steps=5, **kw):
    """Updates and states of ``steps`` statistics steps, then one plain step."""
    params, probes, loss, batch = _problem(**kw)
    grad_fn = kp.kfac_value_and_grad(loss)
    update = jax.jit(tx.update)
    state = tx.init(params)
    ups = []
    for i in range(steps):
        _, grads, stats = grad_fn(params, probes, *batch(i))
        u, state = update(grads, state, params, kfac_stats=stats)
        ups.append(u)
    u, state = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, state, params)
    ups.append(u)
    return ups, state


def _input_keys(state):
    return {k for k in state.factors if not k.endswith("/G")}


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def _max_rel(ups_a, ups_b):
    out = 0.0
    for ua, ub in zip(ups_a, ups_b):
        for a, b in zip(jax.tree_util.tree_leaves(ua), jax.tree_util.tree_leaves(ub)):
            out = max(out, float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)))
    return out


@pytest.mark.parametrize("mode,method", [("exact", "cholesky_solve"),
                                         ("factored", "cholesky_solve"),
                                         ("factored", "newton_schulz")])
def test_shared_input_factors_give_the_same_updates(mode, method):
    kw = dict(damping=1e-2, decay=0.9, damping_mode=mode, inverse_method=method)
    ref, s_ref = _run(kp.kfac_precondition(**kw))
    got, s_got = _run(kp.kfac_precondition(**kw, input_groups=RULES))
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)
    assert _input_keys(s_got) == {"blk0", "blk1", "blk0/o/kernel/A", "blk1/o/kernel/A",
                                  "head/kernel/A"}
    g = s_got.factors["blk0"]
    assert int(g.num_stats) == 5
    for name in "qkv":
        assert bool(s_got.layers[f"blk0/{name}/kernel"].has_curvature)
        np.testing.assert_array_equal(g.average, s_ref.factors[f"blk0/{name}/kernel/A"].average)
    if mode == "exact":  # one eigendecomposition per group
        assert bool(g.decomposed) and g.eigen.q.shape == (D, D)
    else:  # each member keeps its own damped inverse (pi depends on its G)
        assert g.eigen is None
    # two groups of three: two input factors per group are no longer kept
    assert _nbytes(s_ref) - _nbytes(s_got) == 2 * 2 * _nbytes(g)


def test_groups_of_two():
    rules = [(r"(blk\d)/[qv]/kernel", r"\1")]
    ref, _ = _run(kp.kfac_precondition(1e-3))
    got, state = _run(kp.kfac_precondition(1e-3, input_groups=rules))
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)
    assert "blk0/k/kernel/A" in state.factors  # k is not in a group


def test_group_declared_by_function_and_with_biases():
    def groups(path):
        return path.split("/")[0] if path.startswith("blk") and "/o/" not in path else None

    kw = dict(damping=1e-2, decay=0.5)
    ref, _ = _run(kp.kfac_precondition(**kw), bias=True)
    got, state = _run(kp.kfac_precondition(**kw, input_groups=groups), bias=True)
    assert {"blk0", "blk1"} <= set(state.factors)
    assert state.factors["blk0"].average.shape == (D + 1, D + 1)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_singleton_groups_and_bad_groups():
    params, *_ = _problem()
    # every layer its own group: nothing is shared, the state is the plain one
    tx = kp.kfac_precondition(input_groups=lambda path: path)
    s, s_ref = tx.init(params), kp.kfac_precondition().init(params)
    assert set(s.factors) == set(s_ref.factors)
    assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(s_ref)
    with pytest.raises(ValueError, match="input group 'all' has layers with input factors "
                                         "of different sizes"):
        kp.kfac_precondition(input_groups=[(r".*", "all")]).init(params)


def test_curvature_only_state_matches_the_stored_averages():
    kw = dict(damping=1e-3, decay=0.9)
    ref, s_ref = _run(kp.kfac_precondition(**kw), steps=6)
    got, s_got = _run(kp.kfac_precondition(**kw, store_factors=False), steps=6)
    # float32 eigensolver round-off only (relative to the update)
    assert _max_rel(ref, got) <= 2e-4
    assert all(bool(ls.has_curvature) for ls in s_got.layers.values())
    for key, f in s_got.factors.items():
        ref_f = s_ref.factors[key]
        assert f.average is None
        np.testing.assert_array_equal(f.weight, ref_f.weight)
        assert int(f.num_stats) == 6
        # the recovered average is the stored one
        E = (f.eigen.q * f.eigen.vals) @ f.eigen.q.T
        np.testing.assert_allclose(E, ref_f.average / ref_f.weight,
                                   rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(E))))
    assert int(s_got.num_inversions) == 6 and int(s_got.count) == 7
    # the state loses exactly the moving averages
    averages = sum(f.average.nbytes for f in s_ref.factors.values())
    assert _nbytes(s_ref) - _nbytes(s_got) == averages


def test_curvature_only_is_exact_in_float64():
    """In float64 the recovered averages are the stored ones to ~1e-15: the
    only difference is round-off, not the math."""
    jax.config.update("jax_enable_x64", True)
    try:
        kw = dict(damping=1e-3, decay=0.9, factor_dtype="float64")
        _, s_ref = _run(kp.kfac_precondition(**kw), steps=6)
        _, s_got = _run(kp.kfac_precondition(**kw, store_factors=False), steps=6)
        for key, f in s_got.factors.items():
            ref_f = s_ref.factors[key]
            E = np.asarray(ref_f.average / ref_f.weight)
            R = np.asarray((f.eigen.q * f.eigen.vals) @ f.eigen.q.T)
            assert R.dtype == np.float64
            assert np.linalg.norm(R - E) <= 1e-13 * np.linalg.norm(E), key
    finally:
        jax.config.update("jax_enable_x64", False)


def test_curvature_only_with_shared_inputs():
    kw = dict(damping=1e-3, decay=0.9)
    ref, s_ref = _run(kp.kfac_precondition(**kw))
    got, s_got = _run(kp.kfac_precondition(**kw, store_factors=False, input_groups=RULES))
    assert _max_rel(ref, got) <= 2e-4
    g = s_got.factors["blk1"]
    assert g.average is None and g.eigen.q.shape == (D, D) and int(g.num_stats) == 5
    assert _nbytes(s_got) < 0.5 * _nbytes(s_ref)


def test_curvature_only_rejects_nonfinite_statistics_and_bad_settings():
    params, probes, loss, batch = _problem()
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, *batch(0))
    tx = kp.kfac_precondition(1e-2, store_factors=False, input_groups=RULES)
    u_good, state = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    # a group reads the A statistics of its first member (k): a NaN there
    # rejects the group and its members, as it would reject each layer unshared
    s = stats["blk0"]["k"]["kernel"]
    bad = jax.tree_util.tree_map(lambda x: x, stats)
    bad["blk0"]["k"]["kernel"] = s._replace(A=s.A.at[0, 0].set(jnp.nan))
    u_nan, state2 = tx.update(grads, state, params, kfac_stats=bad)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state2))
    for name in "kqv":
        assert int(state2.factors[f"blk0/{name}/kernel/G"].num_rejected) == 1
    assert int(state2.factors["blk1/q/kernel/G"].num_rejected) == 0
    assert int(state2.factors["blk0"].num_rejected) == 1
    for a, b in zip(jax.tree_util.tree_leaves(state.factors["blk0"].eigen),
                    jax.tree_util.tree_leaves(state2.factors["blk0"].eigen)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(u_nan["blk0"]["q"]["kernel"], u_good["blk0"]["q"]["kernel"],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="store_factors=False needs"):
        kp.kfac_precondition(store_factors=False, invert_every=2)
    with pytest.raises(ValueError, match="store_factors=False needs"):
        kp.kfac_precondition(store_factors=False, damping_mode="factored")


def test_options_are_static_under_inject_hyperparams():
    params, probes, loss, batch = _problem()
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, *batch(0))
    inj = optax.inject_hyperparams(kp.kfac_precondition, static_args=("invert_every",))(
        damping=1e-2, store_factors=False, input_groups=RULES)
    u_inj, _ = inj.update(grads, inj.init(params), params, kfac_stats=stats)
    ref = kp.kfac_precondition(1e-2)
    u_ref, _ = ref.update(grads, ref.init(params), params, kfac_stats=stats)
    assert _max_rel([u_ref], [u_inj]) <= 2e-4


def _step_memory(tx, d, blocks=3, n=8, t=32):
    """XLA's memory analysis of a donated statistics step."""
    params, probes, loss, batch = _problem(blocks=blocks, n=n, t=t, d=d)
    grad_fn = kp.kfac_value_and_grad(loss)

    def step(p, s, x, y, mask):
        _, g, st = grad_fn(p, probes, x, y, mask)
        u, s = tx.update(g, s, p, kfac_stats=st)
        return optax.apply_updates(p, u), s

    ma = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), *batch(0)).compile().memory_analysis()
    return ma.argument_size_in_bytes, ma.temp_size_in_bytes


def test_smaller_state_without_more_scratch():
    """The options shrink the arguments (the state) and do not add scratch
    memory (e.g. the recovered averages must not be scheduled early)."""
    d = 48
    args, temp = _step_memory(kp.kfac_precondition(1e-3), d)
    for kw in (dict(input_groups=RULES), dict(store_factors=False),
               dict(store_factors=False, input_groups=RULES)):
        a, t = _step_memory(kp.kfac_precondition(1e-3, **kw), d)
        assert a < args, kw
        assert t <= temp + 2 * d * d * 4, (kw, t, temp)  # two factors' worth
