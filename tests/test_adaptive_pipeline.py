"""Relative damping, adaptive damping, the quadratic-model step and the clip by group in
the pipeline, on the tiny random BERT: end to end, logged, and resumed bit-identically."""

from __future__ import annotations

import math
import pathlib
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")

from kfac_jax_peft.finetune import TrainConfig, load_data, read_log, train  # noqa: E402
from kfac_jax_peft.finetune.config import ConfigError  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    return (make_tiny_bert(str(root / "tiny-bert"), num_layers=1),
            make_rte_folder(str(root / "glue")))


def _cfg(folders, out, **kw) -> TrainConfig:
    model, data = folders
    base = dict(task="rte", model=model, data_dir=data, output_dir=str(out), max_length=32,
                batch_size=8, steps=6, eval_every=3, log_every=1, invert_every=2,
                learning_rate=1.0, damping=1.0,
                adaptive_damping=True, adaptive_step=True, adaptive_every=2, dropout=0.1,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_adaptive_options_train_log_and_resume_bit_identically(folders, tmp_path):
    data = load_data(_cfg(folders, tmp_path))
    # the Newton-step clip of each layer on its own, inside the adaptive chain
    full = train(_cfg(folders, tmp_path / "full", clip_scope="layer"), data=data)
    part = train(_cfg(folders, tmp_path / "resumed", clip_scope="layer"), data=data,
                 stop_after=3)
    assert part.steps == 3
    resumed = train(_cfg(folders, tmp_path / "resumed", clip_scope="layer"), data=data,
                    resume=True)
    for a, b in zip(jax.tree_util.tree_leaves(full.trainable),
                    jax.tree_util.tree_leaves(resumed.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    recs = [r for r in read_log(full.output_dir) if r["kind"] == "train"]
    assert len(recs) == 6 and all(math.isfinite(r["loss"]) for r in recs)
    # the rules ran on steps 1, 3, 5 (every 2 calls): the damping moved by 19/20 or 20/19
    # squared each time, and the quadratic model chose a descent step (alpha < 0 for d ~ g)
    ratios = [recs[i]["damping"] / recs[i - 1]["damping"] for i in (2, 4)]
    assert all(min(abs(r - 0.95 ** 2), abs(r - 1.0), abs(r - 0.95 ** -2)) < 1e-5
               for r in ratios), ratios
    assert all(r["alpha"] < 0 for r in recs)
    strip = lambda rs: [(r["kind"], r["step"], r.get("loss"), r.get("damping"))  # noqa: E731
                        for r in rs if r["kind"] in ("train", "eval")]
    assert strip(read_log(full.output_dir)) == strip(read_log(resumed.output_dir))


def test_each_option_alone(folders, tmp_path):
    data = load_data(_cfg(folders, tmp_path))
    for i, kw in enumerate((dict(adaptive_step=False, learning_rate=0.05,
                                 damping_scale="relative", damping=1e-2, clip_scope="module"),
                            dict(adaptive_damping=False))):
        res = train(_cfg(folders, tmp_path / str(i), steps=3, eval_every=3, **kw), data=data)
        recs = [r for r in read_log(res.output_dir) if r["kind"] == "train"]
        assert all(math.isfinite(r["loss"]) for r in recs)
        assert ("damping" in recs[0]) == kw.get("adaptive_damping", True)
        assert all(0 <= r["clip_rate"] <= 1 for r in recs)
        assert ("alpha" in recs[0]) == kw.get("adaptive_step", True)


def test_adaptive_options_are_refused_where_they_cannot_run(folders, tmp_path):
    with pytest.raises(ConfigError, match="needs optimizer .kfac."):
        _cfg(folders, tmp_path, optimizer="adamw", clip="pre")
    with pytest.raises(ConfigError, match="devices"):
        _cfg(folders, tmp_path, devices=2, batch_size=8)
    with pytest.raises(ConfigError, match="damping_scale"):
        _cfg(folders, tmp_path, damping_scale="trace")
    with pytest.raises(ConfigError, match="clip_scope must be one of"):
        _cfg(folders, tmp_path, clip_scope="leaf")
    with pytest.raises(ConfigError, match="clip_scope must be 'global' with clip 'none'"):
        _cfg(folders, tmp_path, clip="none", clip_scope="module")
    with pytest.raises(ConfigError, match="damping_scale"):  # the step's model is absolute
        _cfg(folders, tmp_path, damping_scale="relative")
