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


@pytest.mark.parametrize("dtype,big", [("float16", 300.0), ("bfloat16", 1e30),
                                       ("float32", 2.6e34), ("float32", 1e38)])
def test_clip_norm_cannot_overflow(dtype, big):
    """The sum of squares overflows the leaf dtype (float16 above a norm of
    256, float32 above ~1.8e19 per entry); the clip must still bound the step.
    1e38: the reciprocal of the largest entry is subnormal (XLA divides by
    multiplying with it, flushed to zero, which once let this update through
    unclipped)."""
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


@pytest.mark.parametrize("big", [1e30, 1e38])
def test_fisher_norm_clip_cannot_overflow(big):
    u = {"w": jnp.full((4,), big, jnp.float32)}  # <u, g> = 4e60: inf in float32
    out, state = kp.clip_by_fisher_norm(1.0).update(u, kp.clip_by_fisher_norm(1.0).init(u),
                                                    grads=u)
    # sqrt(1 / <u, g>) u = u / (2 big); at 1e38 the factor 5e-39 is subnormal
    np.testing.assert_allclose(np.asarray(out["w"]), np.full(4, 0.5), rtol=1e-5)
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


def _lora_tree(scale_head=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(3)
    mk = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    return {"encoder": {"layer_0": {"query": {"lora_A": {"kernel": mk(6, 2)},
                                              "lora_B": {"kernel": mk(2, 6)}},
                                    "value": {"lora_A": {"kernel": mk(6, 2)},
                                              "lora_B": {"kernel": mk(2, 6)}}}},
            "classifier": {"dense": {"kernel": mk(6, 6) * scale_head, "bias": mk(6) * scale_head},
                           "out_proj": {"kernel": mk(6, 2), "bias": mk(2)}}}


def _numpy_group_clip(tree, tau, group):
    """Per-group clip by hand: the group's flat vector times min(1, tau / norm)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [group(kp.clipping.path_names(p)) for p, _ in flat]
    norms = {n: np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                            for m, (_, x) in zip(names, flat) if m == n)) for n in set(names)}
    out = [np.asarray(x, np.float64) * min(1.0, tau / norms[n]) for n, (_, x) in zip(names, flat)]
    return out, norms


@pytest.mark.parametrize("group", ["module", "layer"])
def test_clip_by_group_clips_each_group_on_its_own(group):
    """Each group scaled to norm tau on its own (against a float64 loop by
    hand); the state keeps the global norm before clipping."""
    fn = kp.clipping.CLIP_SCOPES[group]
    tree = _lora_tree(scale_head=10.0)
    tau = 2.0
    tx = kp.clip_by_update_norm(tau, group=fn)
    out, state = tx.update(tree, tx.init(tree))
    want, norms = _numpy_group_clip(tree, tau, fn)
    for got, w in zip(jax.tree_util.tree_leaves(out), want, strict=True):
        np.testing.assert_allclose(np.asarray(got), w, rtol=2e-6, atol=1e-7)
    if group == "module":
        assert set(norms) == {"lora_A", "lora_B", "classifier"}
    else:  # one group per layer: a kernel with its bias
        assert "classifier/dense" in norms and len(norms) == 6
    total = np.sqrt(sum(v ** 2 for v in norms.values()))
    np.testing.assert_allclose(float(state.norm), total, rtol=1e-6)
    assert bool(state.clipped) and int(state.num_clipped) == 1
    # a group below the threshold is untouched: here every group but the head's
    big = max(norms.values())
    tx = kp.clip_by_update_norm(big * 0.5, group=fn)
    out = tx.update(tree, tx.init(tree))[0]
    for got, (path, x) in zip(jax.tree_util.tree_leaves(out),
                              jax.tree_util.tree_flatten_with_path(tree)[0], strict=True):
        if norms[fn(kp.clipping.path_names(path))] <= big * 0.5:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(x))


def test_clip_by_group_with_one_group_is_the_global_clip():
    tree = _lora_tree()
    a = kp.clip_by_update_norm(1.5)
    b = kp.clip_by_update_norm(1.5, group=lambda path: "all")
    (ua, sa), (ub, sb) = a.update(tree, a.init(tree)), b.update(tree, b.init(tree))
    for x, y in zip(jax.tree_util.tree_leaves(ua), jax.tree_util.tree_leaves(ub), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(sa.norm) == float(sb.norm)


def test_clip_by_group_cannot_overflow_and_skips_a_nonfinite_update():
    """A group of norm far above the float32 maximum is still cut to tau
    exactly, the others are untouched; a non-finite entry in any group zeroes
    the whole update and is counted as skipped."""
    tree = _lora_tree()
    tree["classifier"]["dense"]["kernel"] = jnp.full((6, 6), 1e38, jnp.float32)  # norm 6e38
    tx = kp.clip_by_update_norm(1.0, group=kp.clipping.module_group)
    out, state = tx.update(tree, tx.init(tree))
    head = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(out["classifier"])])
    assert np.all(np.isfinite(head))
    np.testing.assert_allclose(np.linalg.norm(head.astype(np.float64)), 1.0, rtol=1e-5)
    _, want = _numpy_group_clip(_lora_tree(), 1.0, kp.clipping.module_group)
    got_a = np.concatenate([np.ravel(out["encoder"]["layer_0"][m]["lora_A"]["kernel"])
                            for m in ("query", "value")])
    np.testing.assert_allclose(np.linalg.norm(got_a), min(1.0, want["lora_A"]), rtol=1e-6)
    assert float(state.norm) == pytest.approx(float(jnp.finfo(jnp.float32).max))
    tree["encoder"]["layer_0"]["query"]["lora_B"]["kernel"] = \
        tree["encoder"]["layer_0"]["query"]["lora_B"]["kernel"].at[0, 0].set(jnp.nan)
    out, state = tx.update(tree, state)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(out))
    assert int(state.num_skipped) == 1 and int(state.num_clipped) == 2
