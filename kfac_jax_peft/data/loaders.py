"""Reading GLUE and SuperGLUE task data into :class:`Example` lists.

Two sources, both giving the same labels (see :mod:`kfac_jax_peft.data.tasks`):

* the Hugging Face hub, through ``datasets.load_dataset(*spec.hub)``
  (:func:`load_raw` without ``data_dir``; rows converted by
  :func:`examples_from_rows`);
* local files (:func:`load_raw` with ``data_dir``), in these layouts:

  - GLUE tasks: tab-separated ``train.tsv`` and ``dev.tsv`` with the headers
    GLUE ships (RTE ``index sentence1 sentence2 label``, QNLI ``index question
    sentence label``, SST-2 ``sentence label``, MRPC ``Quality #1 ID #2 ID
    #1 String #2 String``, STS-B ``... sentence1 sentence2 score``) or the
    hub's column names re-exported as TSV (``sentence1 sentence2 label idx``).
    Columns are found by header name. Two headerless layouts are recognised:
    CoLA (``source label original_mark sentence``, also as the CoLA release's
    ``in_domain_train.tsv`` with ``in_domain_dev.tsv`` + ``out_of_domain_dev.tsv``
    together forming GLUE's dev set) and the SentEval SST-2 files (``label
    sentence``, with a labelled ``test.tsv`` and no dev file). A ``test.tsv``
    is returned as the ``"test"`` split only when it carries labels (GLUE's own
    test files do not and are ignored).
  - SuperGLUE tasks: ``train.jsonl`` and ``val.jsonl`` (SuperGLUE's
    ``test.jsonl`` is unlabelled and ignored).

Fields are split on tab characters only and quote characters are kept
literally (the ``csv.QUOTE_NONE`` convention GLUE's files need); a UTF-8 byte
order mark is dropped and empty lines are skipped. Lines end in LF or CRLF;
a carriage return anywhere else (old Mac CR-only line endings) is an error,
since the whole file would otherwise read as one line. Every malformed input
raises :class:`DataError` naming the file and, for a row, its 1-based line
number (the header is line 1).

Text conventions for the SuperGLUE tasks:

* COPA: ``text_a`` is the premise followed by the question's connective,
  ``"<premise> What was the cause?"`` or ``"<premise> What happened as a
  result?"``; ``choices`` holds the two alternatives; the label is the index of
  the correct one.
* WSC: ``text_a`` is the passage and ``text_b`` the claim
  ``'In the passage above, the pronoun "<span2>" refers to "<span1>".'``;
  label 1 when the claim holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kfac_jax_peft.data.tasks import TaskSpec, get_task

__all__ = ["DataError", "Example", "examples_from_rows", "load_raw", "parse_label"]


class DataError(ValueError):
    """Malformed, missing or unreachable task data."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled example.

    ``text_b`` is the second sentence of a pair task (``None`` for single
    sentences); ``choices`` holds the alternatives of a multiple-choice task
    (COPA), in which case ``label`` is the index of the correct alternative.
    ``label`` is an ``int`` class id, or a ``float`` for regression (STS-B).
    """

    text_a: str
    text_b: str | None = None
    label: int | float = 0
    choices: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------
# labels


def parse_label(spec: TaskSpec, value: Any, where: str) -> int | float:
    """Convert a raw label to the task's integer class id (or float target).

    Accepted for classification and multiple choice: an integer, an integral
    float or the decimal string of either (``1``, ``1.0``, ``"1"``,
    ``"1.0"``) in ``[0, n)``, a label name from
    ``spec.label_names`` (case-insensitive), or a bool where the label names
    are ``("False", "True")`` (WSC). For regression: a finite number inside
    ``spec.label_range``. ``where`` prefixes the error message.
    """
    if spec.kind == "regression":
        try:
            if isinstance(value, bool):
                raise TypeError
            target = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {value!r} is not a number") from None
        low, high = spec.label_range or (-math.inf, math.inf)
        if not math.isfinite(target) or not low <= target <= high:
            raise DataError(f"{where}: label {value!r} is outside [{low}, {high}]")
        return target

    n = spec.num_choices if spec.kind == "multiple_choice" else spec.num_labels
    names = [name.lower() for name in spec.label_names]
    expected = f"one of {list(spec.label_names)} or an integer in [0, {n})"
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in names:
            return names.index(text.lower())
        try:
            value = int(text)
        except ValueError:
            value = _integral_float(text)
            if value is None:
                raise DataError(f"{where}: label {text!r} is not {expected}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, numbers.Integral):
        value = int(value)  # numpy integer scalars
    if not isinstance(value, int) or not 0 <= value < n:
        raise DataError(f"{where}: label {value!r} is not {expected}")
    return value


def _integral_float(text: str) -> int | None:
    """``"1.0"`` -> 1 (some exports write class ids as floats); None otherwise."""
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


# ---------------------------------------------------------------------------
# dict rows: the hub and SuperGLUE JSONL

# (first text field, second text field) of the hub versions and of the JSONL files
_ROW_FIELDS: dict[str, tuple[str, str | None]] = {
    "sst2": ("sentence", None),
    "cola": ("sentence", None),
    "rte": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "cb": ("premise", "hypothesis"),
    "superglue-rte": ("premise", "hypothesis"),
}

COPA_CONNECTIVES = {"cause": "What was the cause?", "effect": "What happened as a result?"}


def _field(row: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
    return row[key]


def _text(row: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(row, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, expected a string")
    return value


def wsc_claim(span1: str, span2: str) -> str:
    """The WSC hypothesis sentence paired with the passage."""
    return f'In the passage above, the pronoun "{span2}" refers to "{span1}".'


def _example_from_row(spec: TaskSpec, row: Any, where: str) -> Example:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    label = parse_label(spec, _field(row, "label", where), where)
    if spec.name == "copa":
        question = _text(row, "question", where)
        if question not in COPA_CONNECTIVES:
            raise DataError(f"{where}: question {question!r} is not 'cause' or 'effect'")
        premise = _text(row, "premise", where)
        choices = (_text(row, "choice1", where), _text(row, "choice2", where))
        return Example(f"{premise} {COPA_CONNECTIVES[question]}", None, label, choices)
    if spec.name == "wsc":
        # SuperGLUE's JSONL nests the spans under "target"; the hub has them at top level.
        target = row.get("target", row)
        if not isinstance(target, Mapping):
            raise DataError(f"{where}: field 'target' is not an object")
        claim = wsc_claim(_text(target, "span1_text", where), _text(target, "span2_text", where))
        return Example(_text(row, "text", where), claim, label)
    first, second = _ROW_FIELDS[spec.name]
    text_b = None if second is None else _text(row, second, where)
    return Example(_text(row, first, where), text_b, label)


def examples_from_rows(spec: TaskSpec | str, rows: Iterable[Any],
                       source: str = "rows") -> list[Example]:
    """Convert dict rows (a ``datasets.Dataset`` split, or parsed JSONL) to examples.

    Field names are those of the hub versions (``nyu-mll/glue``,
    ``aps/super_glue``); SuperGLUE's JSONL files use the same names except
    WSC's nested ``target``, which is also accepted. Errors name ``source``
    and the 1-based row number.
    """
    spec = get_task(spec)
    return [_example_from_row(spec, row, f"{source}, row {i}") for i, row in enumerate(rows, 1)]


# ---------------------------------------------------------------------------
# files


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines of a UTF-8 file with their 1-based line numbers."""
    try:
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            lines = [(i, line.rstrip("\n").removesuffix("\r")) for i, line in enumerate(f, 1)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from None
    for i, line in lines:
        if "\r" in line:  # split on "\n" only: a lone CR would hide inside a field
            raise DataError(f"{path}, line {i}: carriage return (CR) inside a line; the file "
                            "has old Mac (CR-only) line endings or stray CRs: convert it to "
                            "LF or CRLF line endings")
    lines = [(i, line) for i, line in lines if line]
    if not lines:
        raise DataError(f"{path}: empty file")
    return lines


def _read_jsonl(spec: TaskSpec, path: Path) -> list[Example]:
    examples = []
    for lineno, line in _read_lines(path):
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        examples.append(_example_from_row(spec, row, where))
    return examples


@dataclasses.dataclass(frozen=True)
class _TsvFormat:
    """Header names (alternatives, first found wins) and an optional headerless layout."""

    text_a: tuple[str, ...]
    text_b: tuple[str, ...] | None
    label: tuple[str, ...]
    # (number of fields, label index, text_a index) of a headerless file
    headerless: tuple[int, int, int] | None = None

    def names(self) -> set[str]:
        return {*self.text_a, *(self.text_b or ()), *self.label, "index", "idx"}


_TSV_FORMATS: dict[str, _TsvFormat] = {
    "sst2": _TsvFormat(("sentence",), None, ("label",), headerless=(2, 0, 1)),
    "cola": _TsvFormat(("sentence",), None, ("label",), headerless=(4, 1, 3)),
    "rte": _TsvFormat(("sentence1",), ("sentence2",), ("label",)),
    "qnli": _TsvFormat(("question",), ("sentence",), ("label",)),
    "mrpc": _TsvFormat(("#1 String", "sentence1"), ("#2 String", "sentence2"),
                       ("Quality", "label")),
    "stsb": _TsvFormat(("sentence1",), ("sentence2",), ("score", "label")),
}


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _read_tsv(spec: TaskSpec, path: Path, *, require_label: bool = True) -> list[Example] | None:
    """Parse one GLUE TSV file; ``None`` if it is unlabelled and ``require_label`` is false."""
    fmt = _TSV_FORMATS[spec.name]
    lines = _read_lines(path)
    first_no, first = lines[0]
    header = first.split("\t")
    if fmt.names() & set(header):
        rows = lines[1:]
        where = f"{path}, line {first_no} (header)"
        label_col = _column(header, fmt.label)
        if label_col is None and not require_label:
            return None
        needed = [("text", fmt.text_a), ("label", fmt.label)]
        if fmt.text_b is not None:
            needed.insert(1, ("second text", fmt.text_b))
        for role, names in needed:
            if _column(header, names) is None:
                raise DataError(f"{where}: missing {role} column; expected one of {list(names)}, "
                                f"found {header}")
        a_col = _column(header, fmt.text_a)
        b_col = None if fmt.text_b is None else _column(header, fmt.text_b)
        n_fields = len(header)
        if not rows:
            raise DataError(f"{path}: header but no data rows")
    elif fmt.headerless is not None:
        rows = lines
        n_fields, label_col, a_col = fmt.headerless
        b_col = None
    else:
        expected = [fmt.text_a[0], *(fmt.text_b or ())[:1], fmt.label[0]]
        raise DataError(f"{path}, line {first_no}: missing header; expected a header naming the "
                        f"columns {expected}")

    examples = []
    for lineno, line in rows:
        where = f"{path}, line {lineno}"
        fields = line.split("\t")
        if len(fields) != n_fields:
            raise DataError(f"{where}: expected {n_fields} tab-separated fields, "
                            f"found {len(fields)}")
        label = parse_label(spec, fields[label_col], where)
        text_b = None if b_col is None else fields[b_col]
        examples.append(Example(fields[a_col], text_b, label))
    return examples


def _missing(folder: Path, expected: str) -> DataError:
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return DataError(f"{folder}: missing split file; expected {expected} (found {present})")


def _load_glue_folder(spec: TaskSpec, folder: Path) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    # CoLA's own release names its files in_domain_*/out_of_domain_*.
    cola_release = spec.name == "cola" and not (folder / "train.tsv").exists()
    train = folder / ("in_domain_train.tsv" if cola_release else "train.tsv")
    if not train.exists():
        raise _missing(folder, "train.tsv" + (" or in_domain_train.tsv" if spec.name == "cola"
                                              else ""))
    out["train"] = _read_tsv(spec, train)

    cola_dev = [folder / "in_domain_dev.tsv", folder / "out_of_domain_dev.tsv"]
    if (folder / "dev.tsv").exists():
        out["validation"] = _read_tsv(spec, folder / "dev.tsv")
    elif spec.name == "cola" and any(p.exists() for p in cola_dev):
        if not all(p.exists() for p in cola_dev):
            raise _missing(folder, "both in_domain_dev.tsv and out_of_domain_dev.tsv "
                                   "(together GLUE's CoLA dev set)")
        out["validation"] = [ex for p in cola_dev for ex in _read_tsv(spec, p)]

    if (folder / "test.tsv").exists():
        test = _read_tsv(spec, folder / "test.tsv", require_label=False)
        if test is not None:
            out["test"] = test
    if "validation" not in out and "test" not in out:
        raise _missing(folder, "dev.tsv (or a labelled test.tsv)")
    return out


def _load_superglue_folder(spec: TaskSpec, folder: Path) -> dict[str, list[Example]]:
    files = {"train": folder / "train.jsonl", "validation": folder / "val.jsonl"}
    if not all(p.exists() for p in files.values()):
        raise _missing(folder, "train.jsonl and val.jsonl")
    return {split: _read_jsonl(spec, path) for split, path in files.items()}


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _is_task_folder(spec: TaskSpec, folder: Path) -> bool:
    if spec.benchmark == "superglue":
        candidates = ["train.jsonl", "val.jsonl"]
    else:
        candidates = ["train.tsv", "dev.tsv", "in_domain_train.tsv"]
    return any((folder / name).exists() for name in candidates)


def find_task_folder(spec: TaskSpec | str, data_dir: str | os.PathLike) -> Path:
    """The folder holding a task's files: ``data_dir`` itself or a child of it.

    ``data_dir`` is the task folder when it contains the task's files;
    otherwise the child named ``spec.folder`` is used, or failing that the one
    child whose name matches ``spec.folder`` or ``spec.name`` ignoring case,
    ``-`` and ``_`` (``sst2``, ``SST2``, ``STSB``).
    """
    spec = get_task(spec)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a folder")
    if _is_task_folder(spec, root):
        return root
    if (root / spec.folder).is_dir():
        return root / spec.folder
    wanted = {_normalize(spec.folder), _normalize(spec.name)}
    matches = [p for p in sorted(root.iterdir()) if p.is_dir() and _normalize(p.name) in wanted]
    if len(matches) > 1:
        raise DataError(f"{root}: several folders match task {spec.name!r}: "
                        f"{[p.name for p in matches]}")
    if not matches:
        raise DataError(f"{root}: no folder for task {spec.name!r}; expected {root / spec.folder} "
                        "(or a case variant), or the task's files in data_dir itself")
    return matches[0]


def _load_hub(spec: TaskSpec) -> dict[str, list[Example]]:
    path, config = spec.hub
    try:
        import datasets
    except ImportError as e:
        raise DataError("loading from the Hugging Face hub needs the `datasets` package; "
                        "install it or pass data_dir") from e
    try:
        dataset = datasets.load_dataset(path, config)
    except Exception as e:  # network, cache and hub errors alike
        raise DataError(f"could not load {path!r} (config {config!r}) from the Hugging Face "
                        f"hub: the hub could not be reached or the dataset is unavailable "
                        f"({type(e).__name__}: {e}); pass data_dir to read local task files "
                        "instead") from e
    return {split: examples_from_rows(spec, dataset[split], f"{path}/{config} {split}")
            for split in ("train", "validation")}


def load_raw(task: str | TaskSpec,
             data_dir: str | os.PathLike | None = None) -> dict[str, list[Example]]:
    """Load a task's labelled splits as ``{"train", "validation"[, "test"]}``.

    Without ``data_dir`` the hub version is downloaded (``"train"`` and
    ``"validation"``). With ``data_dir`` local files are read (see the module
    docstring for the layouts); the result has ``"train"`` and whichever of
    ``"validation"`` (GLUE ``dev.tsv``, SuperGLUE ``val.jsonl``) and a
    labelled ``"test"`` exist. The SentEval SST-2 layout therefore gives
    ``"train"`` and ``"test"`` only; :func:`paper_splits` handles that case.
    """
    spec = get_task(task)
    if data_dir is None:
        return _load_hub(spec)
    folder = find_task_folder(spec, data_dir)
    if spec.benchmark == "superglue":
        return _load_superglue_folder(spec, folder)
    return _load_glue_folder(spec, folder)
