"""Sweeps that compile once: the traced hyperparameters, ``sweep``, and the
compile count of a grid (a listener on JAX's backend-compile event)."""

from __future__ import annotations

import collections
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402

from kfac_jax_peft.finetune import trainer  # noqa: E402
from kfac_jax_peft.finetune.config import ConfigError, TrainConfig  # noqa: E402
from kfac_jax_peft.finetune.optim import build_optimizer  # noqa: E402
from kfac_jax_peft.finetune.sweep import format_sweep, grid_points, sweep  # noqa: E402
from kfac_jax_peft.finetune.tasks import padded_lengths  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return (make_tiny_bert(str(root / "tiny-bert"), num_layers=1),
            make_rte_folder(str(root / "glue")))


def _cfg(folders, out, **kw) -> TrainConfig:
    model, data_dir = folders
    base = dict(task="rte", model=model, data_dir=data_dir, output_dir=str(out), max_length=32,
                batch_size=8, steps=2, eval_every=2, log_every=1, invert_every=2,
                damping=1e-2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


class _CompileCounter:
    """Counts XLA compilations by function name (JAX's backend-compile event)."""

    def __init__(self):
        self.counts = collections.Counter()

    def __call__(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.counts[str(kw.get("fun_name")).removeprefix("jit(").rstrip(")")] += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_traced_chain_equals_constant_chain():
    """The same update whether the hyperparameters are traced or constants."""
    params = {"dense": {"kernel": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3),
                        "bias": np.ones((3,), np.float32)}}
    grads = jax.tree_util.tree_map(lambda x: 0.3 * x + 0.1, params)
    for optimizer, clip in (("sgd", "pre"), ("adamw", "pre"), ("kfac", "post")):
        cfg = TrainConfig(optimizer=optimizer, clip=clip, learning_rate=0.1, max_norm=0.5,
                          weight_decay=0.01, steps=10, warmup_ratio=0.0)
        out = []
        for traced in (True, False):
            tx = build_optimizer(cfg, traced=traced)
            out.append(jax.jit(tx.update)(grads, tx.init(params), params)[0])
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                               *out)


def test_grid_points_refuses_untraced_keys_and_repeats():
    assert grid_points({"learning_rate": [1, 2], "damping": [3]}) == [
        {"learning_rate": 1, "damping": 3}, {"learning_rate": 2, "damping": 3}]
    with pytest.raises(ConfigError, match="lora_rank cannot be swept"):
        grid_points({"lora_rank": [4, 8]})
    with pytest.raises(ConfigError, match="must not repeat"):
        grid_points({"learning_rate": [0.1, 0.1]})


def test_a_diverged_point_is_recorded_not_chosen():
    from kfac_jax_peft.finetune.sweep import _row

    ok = {"validation": {"main": 0.75}, "test": {"main": 0.5}, "final_loss": 0.3,
          "wall_clock": 2.0}
    half = _row({"learning_rate": 0.1}, [ok, {"diverged": "loss became nan"}])
    assert half["validation_mean"] == 0.75 and half["diverged"] == 1
    none = _row({"learning_rate": 10.0}, [{"diverged": "loss became nan"}])
    assert none["validation_mean"] is None and none["diverged"] == 1
    table = format_sweep([half, none], half)
    assert "learning_rate=0.1 (best)" in table and "| learning_rate=10 | - |" in table


def test_grid_of_three_learning_rates_compiles_each_step_kind_once(folders, tmp_path, capsys):
    trainer._COMPILED.clear()  # nothing compiled by an earlier test is reused
    cfg = _cfg(folders, tmp_path / "sweep", progress=True)
    with _CompileCounter() as counter:
        out = sweep(cfg, {"learning_rate": [0.01, 0.03, 0.1]}, seeds=[0], plot=True)
    lengths = padded_lengths(cfg, trainer.load_data(cfg))
    # every step kind once per padded length, for the whole grid of 3 runs
    assert counter.counts["stats_step"] == len(lengths), counter.counts
    assert counter.counts["plain_step"] == len(lengths)
    assert counter.counts["eval_step"] >= 1
    # the count-down is shown once, for the first run: the others compile nothing
    err = capsys.readouterr().err
    assert f"compiling {2 * len(lengths)} step variants: {2 * len(lengths)} left" in err
    assert err.count("step variants: done in") == 1
    rows = out["rows"]
    assert [r["learning_rate"] for r in rows] == [0.01, 0.03, 0.1]
    assert out["best"]["validation_mean"] == max(r["validation_mean"] for r in rows)
    # the runs differ: the learning rate really is the one of each point
    losses = {r["final_loss"] for r in rows}
    assert len(losses) == 3
    for r in rows:
        stored = json.load(open(tmp_path / "sweep" / r["point"] / "seed0" / "config.json"))
        assert stored["learning_rate"] == r["learning_rate"]
    assert os.path.isfile(tmp_path / "sweep" / "sweep.png")
    assert "(best)" in format_sweep(rows, out["best"])
    # run again: every run is read back, nothing is trained or compiled
    with _CompileCounter() as again:
        assert sweep(cfg, {"learning_rate": [0.01, 0.03, 0.1]}, seeds=[0],
                     plot=False)["rows"] == rows
    assert again.counts["stats_step"] == again.counts["plain_step"] == 0
