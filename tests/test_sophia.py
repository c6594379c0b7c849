"""The Sophia arm of the pipeline: it is optax.contrib.sophia, its clip fraction,
its refusals, the Gauss-Newton-Bartlett estimator against exact expectations,
and runs on the tiny checkpoint (one that resumes bit for bit, one with GNB)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

from kfac_jax_peft.clipping import clip_by_update_norm
from kfac_jax_peft.finetune import TrainConfig, build_optimizer, learning_rate_schedule
from kfac_jax_peft.finetune.config import ConfigError
from kfac_jax_peft.finetune.optim import decay_mask
from kfac_jax_peft.finetune.sophia import clip_fraction, gnb_estimator_diag_hessian, hutchinson_key

STEPS = 12


def _problem():
    """A two-layer tanh regression: a non-quadratic loss whose Hessian
    diagonal has both signs, so that some coordinates are clipped and some
    are not."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {"w1": 0.5 * jax.random.normal(k1, (4, 6)), "b1": jnp.zeros(6),
              "w2": 0.5 * jax.random.normal(k2, (6, 2))}
    x = jax.random.normal(k3, (16, 4))
    y = jax.random.normal(k4, (16, 2))

    def loss(p):
        return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

    return params, loss


def _run(tx, params, loss, steps=STEPS):
    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p, obj_fn=loss)
        return optax.apply_updates(p, u), s, u

    state, updates, states = tx.init(params), [], []
    for _ in range(steps):
        params, state, u = step(params, state)
        updates.append(u)
        states.append(state)
    return updates, states


def _cfg(**kw):
    base = dict(optimizer="sophia", clip="none", learning_rate=0.02, warmup_ratio=0.0,
                steps=STEPS, weight_decay=0.1, sophia_hessian_every=3, sophia_gamma=0.05,
                sophia_b2=0.9, seed=7)
    return TrainConfig(**{**base, **kw})


def _optax_sophia(cfg):
    return contrib.sophia(learning_rate_schedule(cfg), b1=cfg.sophia_b1, b2=cfg.sophia_b2,
                          eps=cfg.sophia_eps, weight_decay=cfg.weight_decay,
                          weight_decay_mask=decay_mask, gamma=cfg.sophia_gamma,
                          clip_threshold=1.0, update_interval=cfg.sophia_hessian_every,
                          hessian_diagonal_fn=contrib.hutchinson_estimator_diag_hessian(
                              hutchinson_key(cfg.seed)))


@pytest.mark.parametrize("clip", ["none", "pre"])
def test_the_arm_is_optax_contrib_sophia(clip):
    params, loss = _problem()
    cfg = _cfg(clip=clip, max_norm=0.05)  # a norm the gradients exceed: "pre" clips
    ours, _ = _run(build_optimizer(cfg), params, loss)
    reference = _optax_sophia(cfg)
    if clip == "pre":
        reference = optax.chain(clip_by_update_norm(cfg.max_norm), reference)
    theirs, _ = _run(reference, params, loss)
    for a, b in zip(ours, theirs):  # the same operations: bit for bit
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_clip_fraction_counts_the_coordinates_at_the_threshold():
    # without weight decay a coordinate's update is -lr_t * clip(r, 1): clipped
    # where |u| == lr_t (to float32 rounding: lr_t is computed inside jit there
    # and outside here; an unclipped |r| within 1e-6 of 1 is not expected)
    params, loss = _problem()
    cfg = _cfg(weight_decay=0.0)
    updates, states = _run(build_optimizer(cfg), params, loss)
    lr = learning_rate_schedule(cfg)
    fractions = []
    for t, (u, s) in enumerate(zip(updates, states)):
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(u)]
        at = sum(int(np.sum(np.isclose(np.abs(x), float(lr(t)), rtol=1e-6, atol=0)))
                 for x in leaves)
        expected = at / sum(x.size for x in leaves)
        assert float(clip_fraction(s)) == pytest.approx(expected, abs=1e-7), t
        fractions.append(expected)
    assert fractions[0] == 1.0  # h = 0 before the first estimate: every step is clipped
    assert any(0.0 < f < 1.0 for f in fractions[1:]), fractions  # then a mix


def test_refusals_name_the_key():
    with pytest.raises(ConfigError, match="clip") as e:
        TrainConfig(optimizer="sophia", clip="post")
    assert e.value.key == "clip"
    for key, bad in (("sophia_b1", 1.0), ("sophia_b2", -0.1), ("sophia_gamma", 0.0),
                     ("sophia_eps", 0.0), ("sophia_hessian_every", 0)):
        with pytest.raises(ConfigError) as e:
            TrainConfig(optimizer="sophia", clip="none", **{key: bad})
        assert e.value.key == key
    with pytest.raises(ValueError, match="obj_fn"):  # the step must pass the loss
        params, _ = _problem()
        tx = build_optimizer(_cfg())
        tx.update(params, tx.init(params), params)


# --------------------------------------------------------------------------- GNB

#: Draws of the Monte-Carlo tests of the GNB estimator. Their tolerance is
#: statistical: every coordinate's mean over the draws must lie within
#: MC_SIGMAS standard errors (the draws' own standard deviation / sqrt(N))
#: of the exact expectation; for a few dozen coordinates a 5-sigma miss has
#: probability ~1e-5 under the CLT, and the keys are fixed, so the test is
#: deterministic.
DRAWS = 20000
MC_SIGMAS = 5.0


def _gnb_draws(estimator, params, n=DRAWS, **extra):
    """``n`` successive estimates (the estimator's key split each time)."""
    def body(state, _):
        diag, state = estimator.update(params, state, params, **extra)
        return state, diag

    _, diags = jax.jit(lambda s: jax.lax.scan(body, s, None, length=n))(
        estimator.init(params))
    return diags


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                           for x in jax.tree_util.tree_leaves(tree)], axis=1)


def _assert_mc_mean(draws, expected):
    draws = _flat(draws)
    mean, se = draws.mean(0), draws.std(0) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(mean - expected) <= MC_SIGMAS * se + 1e-7), (
        np.max(np.abs(mean - expected) / np.maximum(se, 1e-12)))
    assert np.all(draws >= 0)  # B g * g: never negative, unlike Hutchinson's u * Hu


def _flat_leaves(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel()
                           for x in jax.tree_util.tree_leaves(tree)])


def test_gnb_mean_is_batch_size_times_expected_outer_product_of_sampled_gradients():
    # a tanh MLP with 3 classes on 6 rows, the last 2 padding (masked out of
    # the loss, B = 4): the expectation is computed by enumerating each valid
    # row's labels, without Bartlett's identities (mean and covariance of g_hat)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    params = {"w1": jax.random.normal(k1, (3, 4)), "b1": 0.1 * jnp.ones(4),
              "w2": jax.random.normal(k2, (4, 3))}
    x = jax.random.normal(k3, (6, 3))
    valid = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)

    def logits_fn(p, x=x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def gnb_loss_fn(z, y):
        losses = optax.softmax_cross_entropy_with_integer_labels(z, y)
        return jnp.sum(losses * valid) / jnp.sum(valid)

    draws = _gnb_draws(gnb_estimator_diag_hessian(jax.random.PRNGKey(5)), params,
                       logits_fn=logits_fn, gnb_loss_fn=gnb_loss_fn, gnb_batch_size=4)
    # per valid row b and class c: g_bc = grad of l(f(x_b), c) / B, p_bc its probability
    b_valid = 4
    probs = np.asarray(jax.nn.softmax(logits_fn(params)))
    mean, var = 0.0, 0.0
    for b in range(b_valid):
        g = [_flat_leaves(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                 logits_fn(p, x[b:b + 1]), jnp.array([c]))[0] / b_valid)(params))
             for c in range(3)]
        m_b = sum(probs[b, c] * g[c] for c in range(3))
        mean = mean + m_b
        var = var + sum(probs[b, c] * g[c] ** 2 for c in range(3)) - m_b ** 2
    _assert_mc_mean(draws, b_valid * (var + mean ** 2))  # B diag E[g_hat g_hat^T]


def test_gnb_mean_is_the_gauss_newton_diagonal_of_a_linear_softmax_model():
    # batch size 1: E[g g^T] = J^T (diag(p) - p p^T) J, J the dense Jacobian
    # of the logits in the parameters
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    params = {"w": jax.random.normal(k1, (5, 4)), "b": jnp.array([0.3, -0.2, 0.0, 0.5])}
    x = jax.random.normal(k2, (1, 5))

    def logits_fn(p):
        return x @ p["w"] + p["b"]

    def gnb_loss_fn(z, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))

    draws = _gnb_draws(gnb_estimator_diag_hessian(jax.random.PRNGKey(9)), params,
                       logits_fn=logits_fn, gnb_loss_fn=gnb_loss_fn)
    jac = jax.jacobian(lambda p: logits_fn(p)[0])(params)
    j = np.concatenate([np.asarray(jac[k], np.float64).reshape(4, -1)
                        for k in sorted(params)], axis=1)  # tree_leaves order: b, w
    p = np.asarray(jax.nn.softmax(logits_fn(params)[0]), np.float64)
    gauss_newton = j.T @ (np.diag(p) - np.outer(p, p)) @ j
    _assert_mc_mean(draws, np.diag(gauss_newton))


def test_gnb_gaussian_with_the_losses_variance_is_the_gauss_newton_diagonal():
    # squared error (z - y)^2 is the NLL of N(z, 1/2): with variance 1/2 the
    # mean estimate is diag of the Gauss-Newton matrix (1/B) sum_b 2 J_b^T J_b
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    params = {"w": jax.random.normal(k1, (3, 2)), "v": jnp.array([0.7, -1.1])}
    x = jax.random.normal(k2, (5, 3))

    def logits_fn(p):
        return jnp.tanh(x @ p["w"]) @ p["v"]  # [B] predictions

    def gnb_loss_fn(z, y):
        return jnp.mean(jnp.square(z - y))

    draws = _gnb_draws(gnb_estimator_diag_hessian(jax.random.PRNGKey(1),
                                                  likelihood="gaussian", variance=0.5),
                       params, logits_fn=logits_fn, gnb_loss_fn=gnb_loss_fn)
    jac = jax.jacobian(logits_fn)(params)
    j = np.concatenate([np.asarray(jac[k], np.float64).reshape(5, -1)
                        for k in sorted(params)], axis=1)
    _assert_mc_mean(draws, np.diag(2.0 * j.T @ j / 5))


def test_gnb_refusals():
    params = {"w": jnp.ones(2)}
    est = gnb_estimator_diag_hessian()
    with pytest.raises(ValueError, match="logits_fn"):
        est.update(params, est.init(params), params, obj_fn=lambda p: 0.0)
    with pytest.raises(ValueError, match="likelihood"):
        gnb_estimator_diag_hessian(likelihood="poisson")
    with pytest.raises(ValueError, match="variance"):
        gnb_estimator_diag_hessian(likelihood="gaussian", variance=0.0)
    with pytest.raises(ConfigError) as e:
        TrainConfig(optimizer="sophia", clip="none", sophia_estimator="fisher")
    assert e.value.key == "sophia_estimator"


# --------------------------------------------------------------------------- pipeline

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_checkpoint import make_rte_folder, make_tiny_bert

    root = tmp_path_factory.mktemp("sophia")
    return (make_tiny_bert(str(root / "tiny-bert"), num_layers=1),
            make_rte_folder(str(root / "glue")))


def test_pipeline_trains_logs_clip_fraction_and_resumes_bit_for_bit(folders, tmp_path):
    from kfac_jax_peft.finetune import load_data, read_log, train
    from kfac_jax_peft.finetune.plots import run_curves

    model, data_dir = folders

    def cfg(out):  # dropout on: the obj_fn's dropout key must resume exactly too;
        # one padded length: one compiled step
        return TrainConfig(task="rte", model=model, data_dir=data_dir, output_dir=str(out),
                           max_length=32, pad_to_multiple_of=32, batch_size=8, steps=8,
                           eval_every=4, log_every=2,
                           optimizer="sophia", clip="none", learning_rate=1e-2,
                           sophia_hessian_every=2, dropout=0.1, progress=False)

    data = load_data(cfg(tmp_path))
    full = train(cfg(tmp_path / "full"), data=data)
    train(cfg(tmp_path / "resumed"), data=data, stop_after=4)
    resumed = train(cfg(tmp_path / "resumed"), data=data, resume=True)
    for a, b in zip(jax.tree_util.tree_leaves(full.trainable),
                    jax.tree_util.tree_leaves(resumed.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = [r for r in read_log(str(tmp_path / "full")) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(0.0 <= r["clip_fraction"] <= 1.0 for r in records)
    assert records[0]["clip_rate"] is None  # clip="none": no norm clip in the chain
    strip = lambda recs: [(r["kind"], r["step"], r.get("loss"), r.get("clip_fraction"))
                          for r in recs if r["kind"] in ("train", "eval")]
    assert strip(read_log(str(tmp_path / "full"))) == strip(read_log(str(tmp_path / "resumed")))
    assert run_curves(str(tmp_path / "full"))["clip_fraction"] == [
        r["clip_fraction"] for r in records]


def test_pipeline_trains_with_the_gnb_estimator(folders, tmp_path):
    from kfac_jax_peft.finetune import read_log, train

    model, data_dir = folders
    cfg = TrainConfig(task="rte", model=model, data_dir=data_dir, output_dir=str(tmp_path),
                      max_length=32, pad_to_multiple_of=32, batch_size=8, steps=4,
                      eval_every=4, log_every=2, optimizer="sophia", clip="none",
                      learning_rate=1e-2, sophia_hessian_every=1, sophia_estimator="gnb",
                      progress=False)
    train(cfg)
    records = [r for r in read_log(str(tmp_path)) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    # h > 0 after the first estimate: not every coordinate is clipped any more
    assert all(0.0 <= r["clip_fraction"] < 1.0 for r in records), records
