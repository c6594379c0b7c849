"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from kfac_jax_peft.data import TASKS, get_task
from kfac_jax_peft.finetune import metrics


def test_accuracy():
    # matches at positions 0, 1, 3 -> 3 / 4
    assert metrics.accuracy(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])) == 0.75


def test_f1_binary_positive_class_one():
    p = np.array([1, 1, 1, 0, 0, 1])
    y = np.array([1, 0, 1, 1, 0, 0])
    # TP = {0, 2} = 2, FP = {1, 5} = 2, FN = {3} = 1
    # F1 = 2 TP / (2 TP + FP + FN) = 4 / 7
    assert metrics.f1(p, y) == pytest.approx(4 / 7)
    # class 0 is not the positive class: swapping the roles changes the value
    # TP0 = {4} = 1, FP0 = {3} = 1, FN0 = {1, 5} = 2 -> 2 / 5
    assert metrics.f1(1 - p, 1 - y) == pytest.approx(2 / 5)


def test_f1_macro_three_classes():
    p = np.array([0, 1, 2, 2, 1, 0])
    y = np.array([0, 1, 2, 1, 1, 2])
    # class 0: TP {0}, FP {5}, FN {}     -> 2/(2+1+0) = 2/3
    # class 1: TP {1,4}, FP {}, FN {3}   -> 4/(4+0+1) = 4/5
    # class 2: TP {2}, FP {3}, FN {5}    -> 2/(2+1+1) = 1/2
    # mean = (2/3 + 4/5 + 1/2) / 3 = 59/90
    assert metrics.f1_macro(p, y) == pytest.approx(59 / 90)


def test_f1_macro_counts_only_classes_that_occur():
    # class 0: TP {0}, FN {1} -> 2/3; class 2 (predicted, never true): F1 0;
    # class 1 occurs nowhere and is not averaged in: (2/3 + 0) / 2 = 1/3
    assert metrics.f1_macro(np.array([0, 2]), np.array([0, 0])) == pytest.approx(1 / 3)


def test_matthews_from_confusion_matrix():
    p = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    y = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    # TP = {0,1,6} = 3, FP = {2} = 1, TN = {3,4,7} = 3, FN = {5} = 1
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #     = (9 - 1) / sqrt(4 * 4 * 4 * 4) = 8 / 16
    assert metrics.matthews(p, y) == pytest.approx(0.5)
    # perfect and inverted predictions
    assert metrics.matthews(y, y) == pytest.approx(1.0)
    assert metrics.matthews(1 - y, y) == pytest.approx(-1.0)


def test_pearson():
    # deviations from the means (2, 2): p (-1, 0, 1), y (-1, 1, 0)
    # r = sum(dp*dy) / sqrt(sum dp^2 * sum dy^2) = 1 / sqrt(2 * 2) = 1/2
    assert metrics.pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == (
        pytest.approx(0.5))


def test_spearman():
    # ranks p (1,2,3,4), y (1,3,2,4): d = (0,-1,1,0), sum d^2 = 2
    # rho = 1 - 6 * 2 / (4 * (16 - 1)) = 1 - 12/60 = 0.8
    p = np.array([10.0, 20.0, 30.0, 40.0])
    assert metrics.spearman(p, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)
    # monotone but non-linear: Spearman 1, Pearson below 1
    y = np.array([1.0, 4.0, 9.0, 100.0])
    assert metrics.spearman(p, y) == pytest.approx(1.0)
    assert metrics.pearson(p, y) < 0.9


@pytest.mark.parametrize("name,p,y", [
    ("matthews", [1, 1, 1, 1], [0, 1, 0, 1]),   # constant predictions
    ("matthews", [0, 1, 0, 1], [1, 1, 1, 1]),   # constant labels
    ("pearson", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),
    ("pearson", [1.0, 2.0, 3.0], [4.0, 4.0, 4.0]),
    ("spearman", [3.0, 3.0, 3.0], [1.0, 2.0, 3.0]),
    ("pearson", [1.0], [2.0]),                  # a single pair
    ("f1", [0, 0, 0], [0, 0, 0]),               # no positives anywhere: 0/0
])
def test_degenerate_inputs_give_zero_without_warnings(name, p, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = metrics.METRICS[name](np.array(p), np.array(y))
    assert value == 0.0 and math.isfinite(value)


@pytest.mark.parametrize("p,y", [([1, 0], [1]), ([], []), ([[0.1, 0.9]], [1])])
def test_bad_shapes_raise(p, y):
    with pytest.raises(ValueError):
        metrics.accuracy(np.array(p), np.array(y))


def test_compute_metrics_classification_tasks():
    p = np.array([1, 1, 1, 0, 0, 1])
    y = np.array([1, 0, 1, 1, 0, 0])
    # accuracy: matches {0, 2, 4} -> 1/2; F1 from test_f1_binary: 4/7
    m = metrics.compute_metrics("mrpc", p, y)
    assert m == pytest.approx({"accuracy": 0.5, "f1": 4 / 7})
    assert metrics.main_metric("mrpc", m) == pytest.approx((0.5 + 4 / 7) / 2)
    assert metrics.compute_metrics("rte", p, y) == {"accuracy": 0.5}
    assert metrics.main_metric("rte", {"accuracy": 0.5}) == 0.5

    cola = metrics.compute_metrics("cola", np.array([1, 1, 1, 0, 0, 0, 1, 0]),
                                   np.array([1, 1, 0, 0, 0, 1, 1, 0]))
    assert cola == pytest.approx({"matthews": 0.5})
    assert metrics.main_metric("cola", cola) == pytest.approx(0.5)


def test_compute_metrics_cb_and_copa():
    p = np.array([0, 1, 2, 2, 1, 0])
    y = np.array([0, 1, 2, 1, 1, 2])
    # accuracy 4/6; macro F1 59/90 (test_f1_macro_three_classes)
    cb = metrics.compute_metrics("cb", p, y)
    assert cb == pytest.approx({"accuracy": 4 / 6, "f1_macro": 59 / 90})
    assert metrics.main_metric("cb", cb) == pytest.approx((4 / 6 + 59 / 90) / 2)
    # multiple choice: predictions are the chosen alternative's index
    assert metrics.compute_metrics("copa", np.array([0, 1, 1]), np.array([0, 1, 0])) == (
        pytest.approx({"accuracy": 2 / 3}))


def test_compute_metrics_regression():
    m = metrics.compute_metrics("sts-b", np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))
    # Pearson 1/2 (test_pearson); ranks equal the values, so Spearman is also 1/2
    assert m == pytest.approx({"pearson": 0.5, "spearman": 0.5})
    assert metrics.main_metric("stsb", m) == pytest.approx(0.5)
    constant = metrics.compute_metrics("stsb", np.full(3, 2.5), np.array([1.0, 3.0, 2.0]))
    assert constant == {"pearson": 0.0, "spearman": 0.0}


def test_compute_metrics_class_ids_as_floats():
    # integral floats are accepted as class ids; fractional values are not
    assert metrics.compute_metrics("sst2", np.array([1.0, 0.0]), np.array([1, 1])) == {
        "accuracy": 0.5}
    with pytest.raises(ValueError, match="class ids"):
        metrics.compute_metrics("sst2", np.array([0.7, 0.2]), np.array([1, 1]))


def test_every_task_has_known_metrics_and_a_main_metric():
    for spec in TASKS.values():
        assert set(spec.metrics) <= set(metrics.METRICS), spec.name
        values = {name: 0.25 * (i + 1) for i, name in enumerate(spec.metrics)}
        expected = float(np.mean(list(values.values())))
        assert metrics.main_metric(spec, values) == pytest.approx(expected), spec.name
    assert get_task("cola").main_metric == "matthews"
    assert {name for name, s in TASKS.items() if s.main_metric == "mean"} == {
        "mrpc", "stsb", "cb"}
