"""Flax NNX: nnx.Linear and nnx.LoRA(Linear) record K-FAC statistics without
being rewritten, and nnx.Optimizer trains with them."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import kfac_jax_peft as kp
from kfac_jax_peft.kfac.layers import path_str

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "nnx_lora.py"
spec = importlib.util.spec_from_file_location("nnx_lora", EXAMPLE)
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)

TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))


def _functional_stats(model, x, mask, y):
    """The same model written with the library's functional capture (kp.dense)."""
    p = {"q": model.query, "v": model.value}
    w = {k: (m.kernel[...], m.bias[...], m.lora.lora_a[...], m.lora.lora_b[...])
         for k, m in p.items()}
    head = (model.head.kernel[...], model.head.bias[...])
    probes = {k: {"lora_a": kp.zeros_stats(ex.WIDTH, ex.RANK, False),
                  "lora_b": kp.zeros_stats(ex.RANK, ex.WIDTH, False)} for k in p}
    probes["head"] = kp.zeros_stats(ex.WIDTH, ex.CLASSES, True)

    def loss(lora, pr):
        def proj(k, inp):
            base, bias, _, _ = w[k]
            h = kp.dense(inp, lora[k][0], probe=pr[k]["lora_a"], mask=mask)
            return inp @ base + bias + kp.dense(h, lora[k][1], probe=pr[k]["lora_b"], mask=mask)

        q, v = proj("q", x), proj("v", x)
        scores = jnp.einsum("btd,bsd->bts", q, x) / ex.WIDTH**0.5
        scores = jnp.where(mask[:, None, :] > 0, scores, -1e9)
        h = x + jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1), v)
        pooled = jnp.sum(h * mask[..., None], 1) / jnp.sum(mask, 1, keepdims=True)
        logits = kp.dense(pooled, *head, probe=pr["head"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    lora = {k: (w[k][2], w[k][3]) for k in p}
    return kp.kfac_value_and_grad(loss)(lora, probes)


def test_statistics_equal_the_functional_capture():
    model = ex.Encoder(nnx.Rngs(0))
    # a nonzero B so that every statistic is nontrivial
    for m in (model.query, model.value):
        m.lora.lora_b[...] = 0.1 * jnp.ones_like(m.lora.lora_b[...])
    probes = kp.add_probes(model, wrt=TRAINABLE)
    assert sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        probes, is_leaf=lambda s: isinstance(s, kp.LayerStats))[0]) == [
        "head/kernel", "query/lora/lora_a", "query/lora/lora_b", "value/lora/lora_a",
        "value/lora/lora_b"]
    x, mask, y = ex.make_data(8)
    loss, grads, stats = kp.nnx_value_and_grad(ex.loss_fn, TRAINABLE)(model, x, mask, y)
    ref_loss, ref_grads, ref = _functional_stats(model, x, mask, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    pairs = [(stats["head"]["kernel"], ref["head"])]
    for k, name in (("query", "q"), ("value", "v")):
        for part in ("lora_a", "lora_b"):
            pairs.append((stats[k]["lora"][part], ref[name][part]))
    for got, want in pairs:
        assert got.ekfac is None and want.ekfac is None  # plain probes: no EKFAC part
        for a, b in zip(got[:4], want[:4]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
    np.testing.assert_allclose(nnx.to_pure_dict(grads)["query"]["lora"]["lora_a"],
                               ref_grads["q"][0], rtol=1e-5, atol=1e-7)


def test_nnx_optimizer_trains_with_kfac_statistics():
    model = ex.Encoder(nnx.Rngs(0))
    probes = kp.add_probes(model, wrt=TRAINABLE)
    tx = optax.chain(kp.kfac_precondition(1e-2, layer_filter=kp.captured_layers(probes),
                                          strict=True),
                     kp.clip_by_update_norm(1.0), optax.scale_by_learning_rate(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)
    grad_fn = kp.nnx_value_and_grad(ex.loss_fn, TRAINABLE)
    x, mask, y = ex.make_data(16)

    @nnx.jit
    def step(model, optimizer):
        loss, grads, stats = grad_fn(model, x, mask, y)
        optimizer.update(model, grads, kfac_stats=stats)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(3)]
    state = kp.kfac_state(nnx.as_pure(optimizer.opt_state))
    assert sorted(state.layers) == ["head/kernel", "query/lora/lora_a", "query/lora/lora_b",
                                    "value/lora/lora_a", "value/lora/lora_b"]
    assert all(bool(ls.has_curvature) for ls in state.layers.values())
    assert int(state.num_inversions) == 3 and losses[-1] < losses[0]


def test_example_runs():
    sgd = ex.train(steps=5, use_kfac=False)
    kfac = ex.train(steps=5, use_kfac=True)
    assert len(sgd) == len(kfac) == 5 and all(np.isfinite(kfac))


def test_linear_general_is_the_flattened_matrix():
    """nnx.LinearGeneral (4 -> (2, 3)) then (2, 3) -> 4 over two axes, with a
    token mask: statistics equal kp.dense on the flattened kernels."""
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.LinearGeneral((4,), (2, 3), rngs=rngs)
            self.down = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)

        def __call__(self, x):
            return self.down(jnp.tanh(self.up(x)))

    model = Model(nnx.Rngs(0))
    probes = kp.add_probes(model)
    x = jax.random.normal(jax.random.key(1), (3, 5, 4))
    mask = jnp.ones((3, 5)).at[0, 3:].set(0.0)

    def loss_fn(model, x):
        with kp.intercept_nnx(mask=mask):
            return jnp.sum(model(x) ** 2 * mask[..., None]) / 3

    _, _, stats = kp.nnx_value_and_grad(loss_fn)(model, x)
    up, down = (model.up.kernel[...], model.up.bias[...]), (model.down.kernel[...],
                                                             model.down.bias[...])

    def ref_loss(w, pr):
        h = kp.dense(x, w[0][0].reshape(4, 6), w[0][1].reshape(6), probe=pr["up"], mask=mask)
        h = jnp.tanh(h.reshape(3, 5, 2, 3)).reshape(3, 5, 6)
        out = kp.dense(h, w[1][0].reshape(6, 4), w[1][1], probe=pr["down"], mask=mask)
        return jnp.sum(out**2 * mask[..., None]) / 3

    ref = kp.kfac_value_and_grad(ref_loss)(
        (up, down), {"up": kp.zeros_stats(4, 6, True), "down": kp.zeros_stats(6, 4, True)})[2]
    for name in ("up", "down"):
        for a, b in zip(stats[name]["kernel"][:4], ref[name][:4]):  # A, G, counts
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
    layer_filter = kp.captured_layers(probes)
    assert layer_filter("up/kernel", model.up.kernel[...]).inputs == 1
    assert layer_filter("down/kernel", model.down.kernel[...]).inputs == 2
