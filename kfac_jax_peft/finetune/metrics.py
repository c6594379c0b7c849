"""Evaluation metrics of the GLUE / SuperGLUE tasks.

Every metric takes numpy ``(predictions, labels)`` of equal length (class ids,
or floats for regression) and returns a Python float.

Degenerate inputs give 0.0 instead of NaN: Matthews correlation when the
predictions or the labels are constant (its denominator is zero),
Pearson and Spearman correlation when either input is constant (or has fewer
than two elements), and F1 when a class has no true and no predicted positive
(scikit-learn's ``zero_division=0``). Empty inputs raise ``ValueError``.

``f1`` is binary with class 1 as the positive class. ``f1_macro`` is the
unweighted mean of the per-class F1 over the classes that occur in the labels
or the predictions (scikit-learn's convention).

:func:`main_metric` is the number used for model selection: the task's single
metric, or the mean of its two metrics for MRPC (accuracy, F1), STS-B
(Pearson, Spearman) and CB (accuracy, macro F1); see
:attr:`~kfac_jax_peft.data.TaskSpec.main_metric`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from kfac_jax_peft.data.tasks import TaskSpec, get_task

__all__ = [
    "METRICS",
    "accuracy",
    "compute_metrics",
    "f1",
    "f1_macro",
    "main_metric",
    "matthews",
    "pearson",
    "spearman",
]


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"expected 1-D predictions and labels, got shapes {p.shape} and "
                         f"{y.shape} (take the argmax of logits first)")
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    if len(p) == 0:
        raise ValueError("no predictions")
    return p, y


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _pair(predictions, labels)
    return float(skm.accuracy_score(y, p))


def f1(predictions, labels) -> float:
    """Binary F1 of class 1: ``2 TP / (2 TP + FP + FN)``; 0.0 if that is 0/0."""
    p, y = _pair(predictions, labels)
    return float(skm.f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def f1_macro(predictions, labels) -> float:
    """Mean per-class F1 over the classes present in labels or predictions."""
    p, y = _pair(predictions, labels)
    return float(skm.f1_score(y, p, average="macro", zero_division=0.0))


def matthews(predictions, labels) -> float:
    """Matthews correlation coefficient; 0.0 when undefined (constant predictions/labels)."""
    p, y = _pair(predictions, labels)
    if len(np.unique(p)) < 2 or len(np.unique(y)) < 2:
        return 0.0
    return _finite(skm.matthews_corrcoef(y, p))


def _correlation(fn: Callable, predictions, labels) -> float:
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    return _finite(fn(p, y).statistic)


def pearson(predictions, labels) -> float:
    """Pearson correlation; 0.0 when either input is constant."""
    return _correlation(stats.pearsonr, predictions, labels)


def spearman(predictions, labels) -> float:
    """Spearman rank correlation; 0.0 when either input is constant."""
    return _correlation(stats.spearmanr, predictions, labels)


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "f1_macro": f1_macro,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(spec: TaskSpec | str, predictions, labels) -> dict[str, float]:
    """``{name: value}`` for every metric in ``spec.metrics``.

    ``predictions`` are class ids (classification; for multiple choice the
    index of the chosen alternative) or predicted scores (regression).
    """
    spec = get_task(spec)
    p, y = _pair(predictions, labels)
    if spec.kind != "regression":
        if not np.issubdtype(p.dtype, np.integer):
            if not np.all(np.equal(np.mod(p, 1), 0)):
                raise ValueError(f"{spec.name} expects class ids as predictions, got {p.dtype} "
                                 "values (take the argmax of logits first)")
            p = p.astype(np.int64)
        y = y.astype(np.int64)
    return {name: METRICS[name](p, y) for name in spec.metrics}


def main_metric(spec: TaskSpec | str, metrics: Mapping[str, float]) -> float:
    """The model-selection number: ``metrics[spec.main_metric]``, or for
    ``main_metric == "mean"`` the mean of ``spec.metrics`` (MRPC, STS-B, CB)."""
    spec = get_task(spec)
    if spec.main_metric == "mean":
        return float(np.mean([metrics[name] for name in spec.metrics]))
    return float(metrics[spec.main_metric])
