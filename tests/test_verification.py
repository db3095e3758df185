"""measurement/verification.py's verdict rules: which bounds a row misses, and how greedy runs are compared."""

import pytest
import torch

from conftest import import_module

verification = import_module("measurement.verification")


def test_judge_never_passes_nan_and_names_the_failing_metric():
    metrics = {
        "hidden": {"cosine_min": float("nan"), "rel_error": 0.0}, "stop": {"agree": 1.0},
        "audio": {"cosine_min": 1.0, "top1": 1.0, "top5": 1.0}, "greedy": {"match": 1.0},
        "codec": {"codes_match": 1.0, "decode_snr_db": float("inf"), "stream_vs_offline_snr_db": 90.0},
        "nonfinite": ["audio"],
    }
    bounds = verification.Tolerance(0.9999999, 1e-5, 0.9999999, 0.99, 0.99, 1.0, 0.99)
    failures = verification.judge(metrics, bounds)
    assert failures == ["nan/inf in audio", "hidden_cos=nan (>= 0.9999999)"]


def test_greedy_metrics_report_the_first_differing_frame():
    reference = torch.zeros(4, 16, dtype=torch.long)
    other = reference.clone()
    other[2, 5] = 1
    result = verification.greedy_metrics(reference, other)
    assert result["first_divergence"] == 2 and result["match"] == pytest.approx(63 / 64)
    assert verification.greedy_metrics(reference, reference[:3])["first_divergence"] == 3
