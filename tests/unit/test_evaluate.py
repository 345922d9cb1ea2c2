"""The figures `radscan evaluate` gives at a threshold, on scores made up here."""

from __future__ import annotations

import numpy as np
import pytest

from radscan.evaluate import bootstrap_auc, metrics_at


def test_metrics_at_a_threshold():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.6, 0.7, 0.3])
    m = metrics_at(labels, scores, 0.5)
    assert (m["sensitivity"], m["specificity"], m["accuracy"]) == (0.5, pytest.approx(2 / 3), 0.6)
    assert m["f1"] == pytest.approx(0.5)
    low, high = bootstrap_auc(labels, scores, rounds=200)
    assert 0.0 <= low <= high <= 1.0
