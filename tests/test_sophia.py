"""The Sophia arm of the pipeline: it is optax.contrib.sophia, its clip fraction,
its refusals, and a run on the tiny checkpoint that resumes bit for bit."""

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
from kfac_jax_peft.finetune.sophia import clip_fraction, hutchinson_key

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


# --------------------------------------------------------------------------- pipeline

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_checkpoint import make_rte_folder, make_tiny_bert

    root = tmp_path_factory.mktemp("sophia")
    return make_tiny_bert(str(root / "tiny-bert")), make_rte_folder(str(root / "glue"))


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
