"""What a user of the command line reads: the help of every flag, one-line
errors, the end-of-run summary, the progress bar, the files' modes."""

from __future__ import annotations

import io
import logging
import os
import re

import numpy as np
import pytest

from kfac_jax_peft.__main__ import _parser, main, summary
from kfac_jax_peft.finetune.config import FIELDS, TRACED, choices, field_docs, field_help
from kfac_jax_peft.finetune.trainer import ProgressBar, RunResult


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _flag_help(text: str, flag: str) -> str:
    """The help paragraph of ``flag`` in an argparse listing."""
    m = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  --|^\S|\Z)", text, re.S | re.M)
    assert m, f"{flag} is not in the help"
    return " ".join(m.group(1).split())


def test_every_train_flag_has_its_entry_choices_and_default(capsys):
    text = _help(capsys, "train")
    docs = field_docs()
    assert set(docs) == set(FIELDS)  # every key documented in TrainConfig's docstring
    for key in FIELDS:
        flag = "--" + key.replace("_", "-")
        line = _flag_help(text, flag)
        assert "Default:" in line, flag
        assert docs[key][1].split()[0] in line, flag  # its docstring entry
        for choice in choices(key) or ():
            assert choice in line, (flag, choice)
        if key in TRACED:
            assert "Traced" in line
    assert "Choices: post, pre, none. Default: post." in _flag_help(text, "--clip")
    assert "Default: 0.05." in _flag_help(text, "--learning-rate")


def test_help_has_no_restructuredtext_markup(capsys):
    for argv in ([], ["train"], ["compare"], ["sweep"], ["plot"], ["demo"]):
        text = _help(capsys, *argv)
        assert "``" not in text and ":func:" not in text and ":class:" not in text, argv
    for key in FIELDS:
        assert "`" not in field_help(key)


def test_every_flag_of_every_command_has_help():
    parser = _parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.help != "==SUPPRESS==":
                assert action.help, (name, action.option_strings)


@pytest.mark.parametrize("argv,named", [
    (["train"], "--model is required"),
    (["train", "--model", "m", "--optimizer", "lbfgs"], "--optimizer must be one of"),
    (["train", "--model", "m", "--steps", "0"], "--steps must be"),
    (["sweep", "--model", "m", "--learning-rate", "-1"], "--learning-rate must be"),
])
def test_user_errors_are_one_line_with_status_2(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert "Traceback" not in err


def _result(out) -> RunResult:
    return RunResult(output_dir=str(out), steps=200, final_loss=0.4321, best_step=150,
                     validation={"accuracy": 0.8125, "main": 0.8125},
                     test={"accuracy": 0.79, "main": 0.79}, wall_clock=12.5,
                     trainable_params="3.2K (0.32%)")


def test_train_ends_with_a_summary(monkeypatch, capsys, tmp_path):
    import kfac_jax_peft.finetune as finetune
    from kfac_jax_peft.finetune import config

    monkeypatch.setattr(config, "check_inputs", lambda cfg, resume=False: None)
    monkeypatch.setattr(finetune, "train", lambda cfg, resume=False: _result(cfg.output_dir))
    out = tmp_path / "run"
    assert main(["train", "--model", "m", "--output-dir", str(out),
                 "--no-compilation-cache"]) == 0
    text = capsys.readouterr().out
    assert text == summary(_result(out)) + "\n"
    assert "best validation (step 150): accuracy 0.8125" in text
    assert "test, with those weights: accuracy 0.7900" in text
    assert f"files in {out}: best.safetensors" in text


def test_progress_rate_counts_from_the_first_synchronisation(monkeypatch):
    # as in a plain process: no logging handler (absl's records would reach
    # Python's last-resort handler, which writes into the bar's line)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    class Clock:
        seconds = 0.0

        def read(self):
            return self.seconds

    clock, out = Clock(), io.StringIO()
    bar = ProgressBar("rte kfac/post", 0, 100, clock, file=out)
    clock.seconds = 0.5  # 10 steps dispatched in 0.5 s: not a rate
    bar.sync(10)
    assert "?step/s" in out.getvalue().split("\r")[-1]
    clock.seconds = 10.5  # 20 more steps finished in 10 s: 2 steps/s, 35 s left
    bar.sync(30, loss="0.5")
    last = out.getvalue().split("\r")[-1]
    assert "2.00step/s" in last and "30/100" in last and "<00:35" in last, last
    assert "loss=0.5" in last
    logging.getLogger("absl").warning("an orbax message")
    bar.close()
    lines = re.split(r"[\r\n]", out.getvalue())
    (line,) = [ln for ln in lines if "an orbax message" in ln]
    assert "step" not in line  # on its own line, not in the bar's


def test_written_files_have_the_mode_of_open(tmp_path):
    from kfac_jax_peft.finetune.checkpoint import write_json
    from kfac_jax_peft.peft import save_peft

    old = os.umask(0o022)
    try:
        save_peft(str(tmp_path / "best.safetensors"), {"w": np.ones((2, 2), np.float32)})
        write_json(str(tmp_path / "results.json"), {"a": 1})
        assert os.stat(tmp_path / "best.safetensors").st_mode & 0o777 == 0o644
        assert os.stat(tmp_path / "results.json").st_mode & 0o777 == 0o644
        os.umask(0o077)
        save_peft(str(tmp_path / "private.safetensors"), {"w": np.ones((2, 2), np.float32)})
        assert os.stat(tmp_path / "private.safetensors").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors", "private.safetensors",
                                            "results.json"]  # no temporary file left


def test_sweep_command_passes_its_grid_and_the_cache_folder(monkeypatch, capsys, tmp_path):
    from kfac_jax_peft.finetune import sweep as sweep_module

    seen = {}

    def fake(cfg, grid, seeds, **kw):
        seen.update(cfg=cfg, grid=grid, seeds=seeds, **kw)
        row = {"point": "learning_rate=0.1", "learning_rate": 0.1, "validation_mean": 0.7,
               "validation_std": 0.0, "test_mean": 0.6, "test_std": 0.0, "final_loss": 0.5,
               "wall_clock": 1.0, "diverged": 0}
        return {"rows": [row], "best": row}

    monkeypatch.setattr(sweep_module, "sweep", fake)
    out = tmp_path / "sw"
    assert main(["sweep", "--model", "m", "--output-dir", str(out), "--learning-rate", "0.01",
                 "0.1", "--damping", "1e-3", "--seeds", "0", "1"]) == 0
    assert seen["grid"] == {"learning_rate": [0.01, 0.1], "damping": [1e-3]}
    assert seen["seeds"] == [0, 1]
    assert seen["compilation_cache"] == os.path.join(str(out), ".compilation_cache")
    text = capsys.readouterr().out
    assert "best on validation: learning_rate=0.1" in text and "(best)" in text
    main(["sweep", "--model", "m", "--output-dir", str(out), "--learning-rate", "0.1",
          "--no-compilation-cache"])
    assert seen["compilation_cache"] is None
