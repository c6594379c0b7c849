"""Task registry for the GLUE and SuperGLUE tasks of the fine-tuning pipeline.

Label conventions (identical to the Hugging Face ``datasets`` hub versions, so
hub data and local files give the same integers):

==============  =====================================================
task            labels
==============  =====================================================
sst2            0 = negative, 1 = positive
mrpc            0 = not_equivalent, 1 = equivalent (paraphrase)
cola            0 = unacceptable, 1 = acceptable
rte, qnli       0 = entailment, 1 = not_entailment
stsb            float similarity score in [0, 5] (regression)
cb              0 = entailment, 1 = contradiction, 2 = neutral
copa            index of the correct alternative: 0 = choice1, 1 = choice2
wsc             0 = False, 1 = True (the pronoun refers to the span)
superglue-rte   0 = entailment, 1 = not_entailment
==============  =====================================================

``num_labels`` is the width of the model head's output *per encoded
sequence*: the number of classes for classification, 1 for regression, and
1 for multiple choice (COPA), where each (context, alternative) pair gets one
score and the ``num_choices`` scores of an example are soft-maxed together.

``main_metric`` is either one of ``metrics`` or the literal ``"mean"``, the
unweighted mean of all of ``metrics`` (MRPC: accuracy and F1; STS-B: Pearson
and Spearman; CB: accuracy and macro F1).
"""

from __future__ import annotations

import dataclasses

__all__ = ["TASKS", "TaskSpec", "get_task"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static description of one task.

    Attributes:
      name: registry key (``"sst2"``, ``"superglue-rte"``, ...).
      benchmark: ``"glue"`` or ``"superglue"``; selects the local file layout
        (GLUE: tab-separated ``.tsv``; SuperGLUE: ``train.jsonl``/``val.jsonl``).
      kind: ``"classification"``, ``"regression"`` or ``"multiple_choice"``.
      num_labels: head outputs per encoded sequence (see the module docstring).
      metrics: metric names understood by :mod:`kfac_jax_peft.finetune.metrics`.
      main_metric: one of ``metrics`` or ``"mean"`` (mean of all ``metrics``).
      hub: ``(path, config)`` for ``datasets.load_dataset``.
      folder: the conventional local folder name (``"SST-2"``, ``"RTE"``).
      label_names: names of the integer labels, in order; empty for regression.
      num_choices: alternatives per example for multiple choice, else ``None``.
      label_range: inclusive ``(low, high)`` bounds of a regression target.
    """

    name: str
    benchmark: str
    kind: str
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    hub: tuple[str, str]
    folder: str
    label_names: tuple[str, ...] = ()
    num_choices: int | None = None
    label_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.benchmark not in ("glue", "superglue"):
            raise ValueError(f"unknown benchmark {self.benchmark!r}")
        if self.kind not in ("classification", "regression", "multiple_choice"):
            raise ValueError(f"unknown task kind {self.kind!r}")
        if self.main_metric != "mean" and self.main_metric not in self.metrics:
            raise ValueError(f"main_metric {self.main_metric!r} is not in {self.metrics}")
        if self.kind == "multiple_choice" and not self.num_choices:
            raise ValueError("a multiple-choice task needs num_choices")


def _binary(name, benchmark, hub, folder, label_names, metrics=("accuracy",), main=None):
    return TaskSpec(name=name, benchmark=benchmark, kind="classification", num_labels=2,
                    metrics=metrics, main_metric=main or metrics[0], hub=hub,
                    folder=folder, label_names=label_names)


_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _binary("sst2", "glue", ("nyu-mll/glue", "sst2"), "SST-2", ("negative", "positive")),
        _binary("mrpc", "glue", ("nyu-mll/glue", "mrpc"), "MRPC",
                ("not_equivalent", "equivalent"), metrics=("accuracy", "f1"), main="mean"),
        _binary("cola", "glue", ("nyu-mll/glue", "cola"), "CoLA",
                ("unacceptable", "acceptable"), metrics=("matthews",)),
        _binary("rte", "glue", ("nyu-mll/glue", "rte"), "RTE", _ENTAILMENT),
        _binary("qnli", "glue", ("nyu-mll/glue", "qnli"), "QNLI", _ENTAILMENT),
        TaskSpec(name="stsb", benchmark="glue", kind="regression", num_labels=1,
                 metrics=("pearson", "spearman"), main_metric="mean",
                 hub=("nyu-mll/glue", "stsb"), folder="STS-B", label_range=(0.0, 5.0)),
        TaskSpec(name="cb", benchmark="superglue", kind="classification", num_labels=3,
                 metrics=("accuracy", "f1_macro"), main_metric="mean",
                 hub=("aps/super_glue", "cb"), folder="CB",
                 label_names=("entailment", "contradiction", "neutral")),
        TaskSpec(name="copa", benchmark="superglue", kind="multiple_choice", num_labels=1,
                 metrics=("accuracy",), main_metric="accuracy",
                 hub=("aps/super_glue", "copa"), folder="COPA",
                 label_names=("choice1", "choice2"), num_choices=2),
        # "wsc.fixed" is the hub's corrected WSC (span indices fixed); texts and
        # labels are those of SuperGLUE's WSC.jsonl files.
        _binary("wsc", "superglue", ("aps/super_glue", "wsc.fixed"), "WSC", ("False", "True")),
        _binary("superglue-rte", "superglue", ("aps/super_glue", "rte"), "RTE", _ENTAILMENT),
    )
}


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by name, ignoring case, ``-`` and ``_`` ("SST-2", "sts_b").

    A :class:`TaskSpec` is returned unchanged. Raises ``ValueError`` listing
    the known tasks for an unknown name.
    """
    if isinstance(name, TaskSpec):
        return name
    key = _normalize(name)
    for spec in TASKS.values():
        if key == _normalize(spec.name):
            return spec
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
