"""EKFAC: the captured diagonal and the preconditioned direction against
per-example gradients and dense matrices in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import kfac_jax_peft as kp
from kfac_jax_peft.kfac.inverse import DAMPING_MODES


def _orthogonal(rng, d):
    return np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)


def _loss(params, probes, x, y_t):
    """Mean over examples of a per-example loss; tokens (if any) summed."""
    y = kp.dense(x, params["kernel"], params["bias"], probe=probes["kernel"])
    per_tok = jnp.sum(jnp.tanh(y) * y_t + 0.5 * y**2, -1)
    per_ex = per_tok if x.ndim == 2 else jnp.sum(per_tok, 1)
    return jnp.mean(per_ex)


def _params(rng, d_in, d_out):
    return {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(d_out,)), jnp.float32)}


def _probe_with_basis(qa, qg):
    probe = kp.zeros_stats(qa.shape[0] - 1, qg.shape[0], True)
    return probe._replace(ekfac=kp.EKFACProbe(jnp.asarray(qa), jnp.asarray(qg),
                                              jnp.zeros((qa.shape[0], qg.shape[0]))))


@pytest.mark.parametrize("tokens", [None, 5])
def test_captured_diagonal_is_second_moment_of_projected_gradients(tokens):
    """diag / N = (1/N) sum of the squared projected per-example gradients (no
    token axis) or per-token gradients (expand), from an independent per-unit
    jax.grad of the unit's own loss."""
    rng = np.random.default_rng(0)
    n, d_in, d_out = 6, 4, 3
    shape = (n, d_in) if tokens is None else (n, tokens, d_in)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y_t = jnp.asarray(rng.normal(size=shape[:-1] + (d_out,)), jnp.float32)
    params = _params(rng, d_in, d_out)
    qa, qg = _orthogonal(rng, d_in + 1), _orthogonal(rng, d_out)
    probes = {"kernel": _probe_with_basis(qa, qg)}
    _, stats = jax.grad(_loss, argnums=(0, 1))(params, probes, x, y_t)
    got = np.asarray(stats["kernel"].ekfac.diag) / float(stats["kernel"].num_examples)

    # one unit = one example (no token axis) or one token, with its own loss
    xu, yu = x.reshape(-1, d_in), y_t.reshape(-1, d_out)

    def unit_loss(p, xi, yi):
        y = xi @ p["kernel"] + p["bias"]
        return jnp.sum(jnp.tanh(y) * yi + 0.5 * y**2)

    g = jax.vmap(jax.grad(unit_loss), in_axes=(None, 0, 0))(params, xu, yu)
    dw = np.concatenate([np.asarray(g["kernel"], np.float64),
                         np.asarray(g["bias"], np.float64)[:, None, :]], 1)  # [units, d_a, d_g]
    proj = np.einsum("ai,uab,bj->uij", qa.astype(np.float64), dw, qg.astype(np.float64))
    want = np.sum(proj**2, 0) / n
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    # the reduced K-FAC statistics are unchanged by the EKFAC part
    _, plain = jax.grad(_loss, argnums=(0, 1))(
        params, {"kernel": kp.zeros_stats(d_in, d_out, True)}, x, y_t)
    np.testing.assert_array_equal(np.asarray(stats["kernel"].A), np.asarray(plain["kernel"].A))
    assert plain["kernel"].ekfac is None


def _step(tx, params, state, x, y_t):
    probes = kp.ekfac_probes({"kernel": kp.zeros_stats(x.shape[-1], y_t.shape[-1], True)},
                             state)
    grads, stats = jax.grad(_loss, argnums=(0, 1))(params, probes, x, y_t)
    updates, state = tx.update(grads, state, params, kfac_stats=stats)
    return grads, updates, state


def test_one_example_decay_zero_is_the_empirical_fisher_diagonal_in_the_basis():
    """Statistics from a batch (decomposed), then one example with decay 0:
    the diagonal is diag(Q^T vec(dW) vec(dW)^T Q) with Q = Q_A kron Q_G, and
    the update is Q diag(1 / (s + lambda)) Q^T vec(V) (dense float64)."""
    rng = np.random.default_rng(1)
    d_in, d_out, lam = 3, 2, 1e-2
    params = _params(rng, d_in, d_out)
    tx = kp.kfac_precondition(lam, decay=0.0, invert_every=10, damping_mode="ekfac")
    state = tx.init(params)
    x0 = jnp.asarray(rng.normal(size=(8, d_in)), jnp.float32)
    _, _, state = _step(tx, params, state, x0, jnp.asarray(rng.normal(size=(8, d_out))))
    assert int(state.num_inversions) == 1
    assert float(state.layers["kernel"].diag.weight) == 0.0  # restarted in the new basis

    x1 = jnp.asarray(rng.normal(size=(1, d_in)), jnp.float32)
    grads, updates, state = _step(tx, params, state, x1, jnp.asarray(rng.normal(size=(1, d_out))))
    assert int(state.num_inversions) == 1  # not due: same basis
    qa = np.asarray(state.factors["kernel/A"].eigen.q, np.float64)
    qg = np.asarray(state.factors["kernel/G"].eigen.q, np.float64)
    v = np.concatenate([np.asarray(grads["kernel"], np.float64),
                        np.asarray(grads["bias"], np.float64)[None]], 0)  # one example: dW
    q = np.kron(qa, qg)
    fisher = np.outer(v.reshape(-1), v.reshape(-1))
    s = np.diag(q.T @ fisher @ q)
    d = state.layers["kernel"].diag
    np.testing.assert_allclose(np.asarray(d.average / d.weight).reshape(-1), s, rtol=1e-4,
                               atol=1e-7)
    want = (q @ ((q.T @ v.reshape(-1)) / (s + lam))).reshape(v.shape)
    got = np.concatenate([np.asarray(updates["kernel"]), np.asarray(updates["bias"])[None]], 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_before_statistics_in_a_basis_ekfac_is_kfac_and_chains_with_the_clip():
    """Right after a decomposition (diagonal restarted) EKFAC's update is
    exact-damping K-FAC's; Newton-step clipping after it bounds the update."""
    rng = np.random.default_rng(2)
    params = _params(rng, 4, 3)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    y_t = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    out = {}
    for mode in ("exact", "ekfac"):
        tx = optax.chain(kp.clipped(kp.kfac_precondition(1e-3, invert_every=5,
                                                         damping_mode=mode), "post", 0.5))
        state = tx.init(params)
        probes = {"kernel": kp.zeros_stats(4, 3, True)}
        if mode == "ekfac":
            probes = kp.ekfac_probes(probes, state)
        grads, stats = jax.grad(_loss, argnums=(0, 1))(params, probes, x, y_t)
        out[mode], _ = tx.update(grads, state, params, kfac_stats=stats)
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(out["ekfac"][k], out["exact"][k], rtol=1e-5, atol=1e-7)
    norm = optax.tree.norm(out["ekfac"])
    assert float(norm) <= 0.5 * (1 + 1e-5)


def test_ekfac_refuses_what_would_make_it_kfac_or_silent():
    assert "ekfac" in DAMPING_MODES
    with pytest.raises(ValueError, match="invert_every >= 2"):
        kp.kfac_precondition(damping_mode="ekfac", invert_every=1)
    rng = np.random.default_rng(3)
    params = _params(rng, 2, 2)
    x, y_t = jnp.ones((2, 2)), jnp.ones((2, 2))
    plain = {"kernel": kp.zeros_stats(2, 2, True)}
    tx = kp.kfac_precondition(damping_mode="ekfac", invert_every=2)
    state = tx.init(params)
    grads, stats = jax.grad(_loss, argnums=(0, 1))(params, plain, x, y_t)
    with pytest.raises(ValueError, match="ekfac_probes"):
        tx.update(grads, state, params, kfac_stats=stats)
    exact = kp.kfac_precondition(damping_mode="exact")
    with pytest.raises(ValueError, match="not damping_mode='ekfac'"):
        kp.ekfac_probes(plain, exact.init(params))
    _, stats = jax.grad(_loss, argnums=(0, 1))(params, kp.ekfac_probes(plain, state), x, y_t)
    with pytest.raises(ValueError, match="carry an EKFAC diagonal"):
        exact.update(grads, exact.init(params), params, kfac_stats=stats)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + jnp.tanh(nn.Dense(4, name="fc")(h)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, _ = nn.scan(_Block, variable_axes={"params": 0, "kfac": 0},
                       split_rngs={"params": True}, length=2)(name="layers")(x, None)
        return nn.Dense(3, name="head")(h)


class _Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = x
        for i in range(2):
            h, _ = _Block(name=f"block{i}")(h, None)
        return nn.Dense(3, name="head")(h)


def test_ekfac_probes_of_an_nn_scan_stack_match_the_unrolled_model():
    """Each layer of a stacked kernel gets its own bases in the probes, and
    after two statistics steps its diagonal and update equal the unrolled
    model's."""
    rng = np.random.default_rng(4)
    xs = [jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) for _ in range(2)]
    y = jnp.asarray(rng.integers(0, 3, 6))
    with kp.intercept_dense():
        v = _Scanned().init(jax.random.PRNGKey(0), xs[0])
    params_u = {"head": v["params"]["head"]}
    for i in range(2):
        params_u[f"block{i}"] = {"fc": jax.tree_util.tree_map(
            lambda a, i=i: a[i], v["params"]["layers"]["fc"])}
    with kp.intercept_dense():
        probes_u = _Unrolled().init(jax.random.PRNGKey(0), xs[0])["kfac"]

    def run(model, params, probes, layer_filter):
        def f(p, pr, x):
            with kp.intercept_dense():
                logits = model.apply({"params": p, "kfac": pr}, x)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        tx = kp.kfac_precondition(1e-2, decay=0.5, invert_every=10, damping_mode="ekfac",
                                  layer_filter=layer_filter)
        state = tx.init(params)
        for x in xs:
            _, g, st = kp.kfac_value_and_grad(f)(params, kp.ekfac_probes(probes, state), x)
            u, state = tx.update(g, state, params, kfac_stats=st)
        return u, state

    u_s, s_s = run(_Scanned(), v["params"], v["kfac"], kp.captured_layers(v["kfac"]))
    u_u, s_u = run(_Unrolled(), params_u, probes_u, None)
    for i in range(2):
        a = s_s.layers[f"layers/fc/kernel[{i}]"].diag
        b = s_u.layers[f"block{i}/fc/kernel"].diag
        assert float(a.weight) > 0
        np.testing.assert_allclose(a.average, b.average, rtol=1e-4,
                                   atol=1e-6 * float(jnp.abs(b.average).max()))
        for leaf in ("kernel", "bias"):
            want = np.asarray(u_u[f"block{i}"]["fc"][leaf])
            np.testing.assert_allclose(u_s["layers"]["fc"][leaf][i], want, rtol=1e-4,
                                       atol=1e-5 * np.abs(want).max())
