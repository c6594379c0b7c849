"""iEF-rescaled K-FAC statistics (fisher_type="ief") against a per-example
dense computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_peft as kp

N, T, D, C = 5, 3, 4, 3
MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], np.float32)


def _setup(sequence_outputs: bool, pad_last: bool = False):
    """Token inputs [N, T, D] through a masked tanh layer "h"; then either a
    pooled classifier "out" ([N, C] logits) or per-token logits [N, T, C]
    whose per-example loss sums the real tokens. With ``pad_last`` the last
    example has no real token (and no loss)."""
    rng = np.random.default_rng(0)
    params = {"h": {"kernel": jnp.asarray(rng.normal(size=(D, D)), jnp.float32)},
              "out": {"kernel": jnp.asarray(rng.normal(size=(D, C)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=C), jnp.float32)}}
    probes = {"h": {"kernel": kp.zeros_stats(D, D, False)},
              "out": {"kernel": kp.zeros_stats(D, C, True)}}
    X = jnp.asarray(rng.normal(size=(N, T, D)), jnp.float32)
    mask = MASK.copy()
    if pad_last:
        mask[-1] = 0
    mask = jnp.asarray(mask)
    labels = jnp.asarray(rng.integers(0, C, (N, T) if sequence_outputs else N))

    def forward(p, X, mask, dh=0.0, dout=0.0, pr=None):
        h = jnp.tanh(kp.dense(X, p["h"]["kernel"], probe=pr and pr["h"]["kernel"],
                              mask=mask) + dh)
        if sequence_outputs:
            inp, m = h, mask
        else:
            inp = jnp.sum(h * mask[..., None], 1) / jnp.sum(mask, 1, keepdims=True)
            m = None
        return kp.dense(inp, p["out"]["kernel"], p["out"]["bias"],
                        probe=pr and pr["out"]["kernel"], mask=m) + dout

    def per_example(logits, mask, labels):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce * mask, -1) if sequence_outputs else ce

    real = jnp.asarray(np.asarray(mask).max(1))

    def model(p, pr, X, mask, labels):
        return forward(p, X, mask, pr=pr)

    def loss(logits, X, mask, labels):
        return jnp.sum(per_example(logits, mask, labels) * real) / jnp.sum(real)

    return params, probes, model, loss, forward, per_example, (X, mask, labels), real


def _dense_ief_G(params, forward, per_example, args, real, layer):
    """(1/N') sum_n sum_{t in n} m_t ghat_t ghat_t^T / ||grad_z l_n||^2, with
    ghat = d l_n / d y (layer outputs) of example n's own loss, one gradient
    per example (vmapped over n), summed in float64 numpy."""
    X, mask, labels = args
    n_out = D if layer == "h" else C
    shape = (N, T, D) if layer == "h" else forward(params, X, mask).shape

    @jax.jit
    def per_n(n):
        def l_n(delta):
            kw = {"dh": delta} if layer == "h" else {"dout": delta}
            return per_example(forward(params, X, mask, **kw), mask, labels)[n]

        z = forward(params, X, mask)
        gz = jax.grad(lambda z: per_example(z, mask, labels)[n])(z)
        return jax.grad(l_n)(jnp.zeros(shape))[n], jnp.sum(gz**2)

    ghat, scale = jax.vmap(per_n)(jnp.arange(N))
    ghat, scale = np.asarray(ghat, np.float64), np.asarray(scale, np.float64)
    G = np.zeros((n_out, n_out))
    for n in np.nonzero(real)[0]:
        gf = ghat[n].reshape(-1, n_out)
        m = np.asarray(mask)[n] if gf.shape[0] == T else np.ones(1)
        G += (gf * m[:, None]).T @ gf / scale[n]
    return G / np.sum(real > 0)


@pytest.mark.parametrize("sequence_outputs,pad_last", [(False, False), (True, True)])
def test_ief_statistics_equal_per_example_dense(sequence_outputs, pad_last):
    """G / num_examples is the iEF-weighted average of per-example output
    gradient outer products (the norm over all of an example's outputs); A
    and the gradient are those of the empirical Fisher. Tolerance: float32
    statistics against float64 sums of the same float32 cotangents."""
    params, probes, model, loss, forward, per_example, args, real = _setup(
        sequence_outputs, pad_last)
    vg_ief = jax.jit(kp.kfac_value_and_grad(model, loss, fisher_type="ief"))
    loss_i, grads_i, stats = vg_ief(params, probes, *args)
    loss_e, grads_e, emp = jax.jit(kp.kfac_value_and_grad(model, loss))(params, probes, *args)
    np.testing.assert_allclose(loss_i, loss_e, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_i), jax.tree_util.tree_leaves(grads_e)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # jit vs eager
    for layer in ("h", "out"):
        s, e = stats[layer]["kernel"], emp[layer]["kernel"]
        np.testing.assert_allclose(s.A, e.A, rtol=1e-5, atol=1e-7)  # jit vs eager sums
        np.testing.assert_allclose(s.num_examples, e.num_examples)
        want = _dense_ief_G(params, forward, per_example, args, np.asarray(real), layer)
        np.testing.assert_allclose(s.G / s.num_examples, want, rtol=2e-5,
                                   atol=1e-6 * np.abs(want).max())


def test_ief_statistics_do_not_depend_on_the_loss_weighting_and_precondition():
    """Sum instead of mean loss: the same statistics (the weight cancels in
    the per-example normalisation); and kfac_precondition accepts them."""
    params, probes, model, loss, *_, args, _ = _setup(False)
    s_mean = jax.jit(kp.kfac_value_and_grad(model, loss, fisher_type="ief"))(
        params, probes, *args)[2]
    s_sum = jax.jit(kp.kfac_value_and_grad(model, lambda *a: 7.0 * loss(*a), fisher_type="ief"))(
        params, probes, *args)[2]
    for a, b in zip(jax.tree_util.tree_leaves(s_mean), jax.tree_util.tree_leaves(s_sum)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    tx = optax.chain(kp.kfac_precondition(1e-3), kp.clip_by_update_norm(1.0))
    _, grads, _ = jax.jit(kp.kfac_value_and_grad(model, loss))(params, probes, *args)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=s_mean)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    assert bool(kp.kfac_state(state).layers["h/kernel"].has_curvature)
