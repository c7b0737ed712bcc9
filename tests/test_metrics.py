"""Tests for cxr.metrics, cxr.report and cxr.plots: values checked against scikit-learn and hand-computed cases."""

from __future__ import annotations

import json
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr import metrics, report
from cxr.labels import FINDINGS
from cxr.plots import plot_reliability, plot_roc_curves


def _separable_data(n_images: int = 400, n_classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ~30% prevalence and noisy scores that rank positives higher on average."""
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n_images, n_classes)) < 0.3).astype(float)
    logits = rng.normal(size=(n_images, n_classes)) + 1.5 * y_true - 1.0
    return y_true, 1.0 / (1.0 + np.exp(-logits))


def test_perfect_separation_gives_one_and_random_scores_about_half():
    y_true = np.array([[0], [0], [1], [1]], dtype=float)
    assert metrics.auroc_per_class(y_true, np.array([[0.1], [0.2], [0.8], [0.9]]))[0] == 1.0
    assert metrics.auroc_per_class(y_true, np.array([[0.9], [0.8], [0.2], [0.1]]))[0] == 0.0
    rng = np.random.default_rng(3)
    big_labels = (rng.random((20000, 1)) < 0.5).astype(float)
    assert abs(metrics.auroc_per_class(big_labels, rng.random((20000, 1)))[0] - 0.5) < 0.02


def test_degenerate_class_is_nan_and_left_out_of_the_mean():
    y_true, y_score = _separable_data()
    y_true[:, 1] = 0.0
    aurocs = metrics.auroc_per_class(y_true, y_score)
    assert np.isnan(aurocs[1])
    assert metrics.mean_auroc(aurocs) == pytest.approx((aurocs[0] + aurocs[2]) / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(metrics.mean_auroc([np.nan, np.nan]))
    assert np.isnan(metrics.auprc_per_class(y_true, y_score)[1])


def test_nan_labels_are_ignored():
    y_true, y_score = _separable_data(seed=1)
    rng = np.random.default_rng(1)
    y_true[rng.random(y_true.shape) < 0.25] = np.nan
    aurocs = metrics.auroc_per_class(y_true, y_score)
    auprcs = metrics.auprc_per_class(y_true, y_score)
    for c in range(y_true.shape[1]):
        known = ~np.isnan(y_true[:, c])
        assert aurocs[c] == pytest.approx(roc_auc_score(y_true[known, c], y_score[known, c]), abs=1e-12)
        assert auprcs[c] == pytest.approx(average_precision_score(y_true[known, c], y_score[known, c]))


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    y_true = (rng.random((300, 4)) < 0.4).astype(float)
    y_score = np.round(rng.random((300, 4)) + 0.3 * y_true, 1)  # rounding makes many ties
    expected = [roc_auc_score(y_true[:, c], y_score[:, c]) for c in range(4)]
    np.testing.assert_allclose(metrics.auroc_per_class(y_true, y_score), expected, atol=1e-12)


def test_weighted_auroc_matches_sklearn_sample_weight():
    rng = np.random.default_rng(4)
    n_images = 250
    patient_ids = rng.integers(0, 60, n_images)
    _, patient_index = np.unique(patient_ids, return_inverse=True)
    y_true = (rng.random(n_images) < 0.35).astype(float)
    y_score = np.round(rng.random(n_images) + 0.4 * y_true, 2)
    counts = metrics.patient_bootstrap_counts(patient_index.max() + 1, 5, rng)[:, patient_index]
    result = metrics.weighted_auroc(y_true, y_score, counts)
    for row in range(5):
        assert result[row] == pytest.approx(roc_auc_score(y_true, y_score, sample_weight=counts[row]), abs=1e-9)


def test_bootstrap_single_resample_equals_sklearn_on_the_drawn_counts():
    y_true, y_score = _separable_data(n_images=200, seed=5)
    patient_ids = np.repeat(np.arange(50), 4) + 1000  # ids need not start at 0
    ci = metrics.bootstrap_auroc_ci(y_true, y_score, patient_ids, n_resamples=1, seed=11)
    patient_counts = metrics.patient_bootstrap_counts(50, 1, np.random.default_rng(11))[0]
    weights = np.repeat(patient_counts, 4)
    expected = [roc_auc_score(y_true[:, c], y_score[:, c], sample_weight=weights) for c in range(3)]
    np.testing.assert_allclose(ci["low"], expected, atol=1e-9)
    np.testing.assert_allclose(ci["high"], expected, atol=1e-9)
    assert ci["mean_low"] == pytest.approx(np.mean(expected))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    y_true, y_score = _separable_data(n_images=300, seed=6)
    patient_ids = np.arange(300) // 3
    first = metrics.bootstrap_auroc_ci(y_true, y_score, patient_ids, n_resamples=200, seed=7)
    again = metrics.bootstrap_auroc_ci(y_true, y_score, patient_ids, n_resamples=200, seed=7)
    other = metrics.bootstrap_auroc_ci(y_true, y_score, patient_ids, n_resamples=200, seed=8)
    np.testing.assert_array_equal(first["low"], again["low"])
    np.testing.assert_array_equal(first["high"], again["high"])
    assert first["mean_low"] == again["mean_low"]
    assert not np.array_equal(first["low"], other["low"])
    aurocs = metrics.auroc_per_class(y_true, y_score)
    assert np.all(first["low"] < aurocs) and np.all(aurocs < first["high"])
    assert first["mean_low"] < metrics.mean_auroc(aurocs) < first["mean_high"]
    assert first["n_resamples"] == 200


def test_bootstrap_resamples_patients_not_images():
    # 40 patients with 25 identical images each: a patient bootstrap must behave like one image per patient.
    rng = np.random.default_rng(9)
    labels = (np.arange(40) % 2).astype(float)[:, None]
    scores = rng.random((40, 1)) + 0.5 * labels
    duplicated_labels, duplicated_scores = np.repeat(labels, 25, axis=0), np.repeat(scores, 25, axis=0)
    duplicated_ids = np.repeat(np.arange(40), 25)
    by_patient = metrics.bootstrap_auroc_ci(duplicated_labels, duplicated_scores, duplicated_ids, 400, seed=1)
    one_per_patient = metrics.bootstrap_auroc_ci(labels, scores, np.arange(40), 400, seed=1)
    np.testing.assert_allclose(by_patient["low"], one_per_patient["low"], atol=1e-9)
    np.testing.assert_allclose(by_patient["high"], one_per_patient["high"], atol=1e-9)
    by_image = metrics.bootstrap_auroc_ci(duplicated_labels, duplicated_scores, np.arange(1000), 400, seed=1)
    patient_width = by_patient["high"][0] - by_patient["low"][0]
    image_width = by_image["high"][0] - by_image["low"][0]
    assert patient_width > 3 * image_width  # ~5x expected: 25 copies shrink the image-level CI by sqrt(25)


def test_bootstrap_degenerate_class_gives_nan_interval():
    y_true, y_score = _separable_data(n_images=120, seed=10)
    y_true[:, 0] = 1.0
    ci = metrics.bootstrap_auroc_ci(y_true, y_score, np.arange(120), n_resamples=50, seed=0)
    assert np.isnan(ci["low"][0]) and np.isnan(ci["high"][0])
    assert ci["n_valid"][0] == 0 and ci["n_valid"][1] == 50
    assert np.all(np.isfinite(ci["low"][1:]))


def test_operating_point_counts_on_a_hand_case():
    y_true = np.array(
        [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0], [np.nan, 1, 1]], dtype=float
    )
    scores = np.array([0.9, 0.4, 0.6, 0.2, 0.7, 0.1, 0.95])
    y_score = np.repeat(scores[:, None], 3, axis=1)
    result = metrics.operating_point_metrics(y_true, y_score, [0.4, 1.0, np.nan])
    # Class 0 at 0.4 (inclusive, the NaN-label row ignored): predicted positive = 0.9, 0.4, 0.6, 0.7.
    assert (result["tp"][0], result["fp"][0], result["tn"][0], result["fn"][0]) == (3, 1, 2, 0)
    assert result["sensitivity"][0] == 1.0 and result["specificity"][0] == pytest.approx(2 / 3)
    assert result["ppv"][0] == 0.75 and result["npv"][0] == 1.0 and result["f1"][0] == pytest.approx(6 / 7)
    # Class 1 at 1.0 predicts nothing positive: PPV is 0/0 -> NaN, F1 is 0.
    assert (result["tp"][1], result["fp"][1], result["tn"][1], result["fn"][1]) == (0, 0, 3, 4)
    assert np.isnan(result["ppv"][1]) and result["f1"][1] == 0.0 and result["npv"][1] == pytest.approx(3 / 7)
    assert all(np.isnan(values[2]) for values in result.values())


def test_youden_and_f1_pick_the_expected_thresholds():
    # Descending scores; labels 1,1,0,0,0,0,1 then 16 negatives (3 positives, 20 negatives).
    scores = np.r_[[0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65], np.linspace(0.6, 0.05, 16)]
    labels = np.r_[[1, 1, 0, 0, 0, 0, 1], np.zeros(16)]
    # At 0.9: J = 2/3 - 0 = 0.667, F1 = 4/5 = 0.8.  At 0.65: J = 1 - 4/20 = 0.8, F1 = 6/10 = 0.6.
    y_true = np.c_[labels, np.zeros(23)]
    y_score = np.c_[scores, scores]
    youden = metrics.select_thresholds(y_true, y_score, "youden")
    f1 = metrics.select_thresholds(y_true, y_score, "f1")
    assert youden[0] == 0.65 and f1[0] == 0.9
    assert np.isnan(youden[1]) and np.isnan(f1[1])
    at_youden = metrics.operating_point_metrics(y_true, y_score, youden)
    assert at_youden["sensitivity"][0] == 1.0 and at_youden["specificity"][0] == 0.8
    # Equal J (0.5 at 0.8 and at 0.4): the tie goes to the higher, more specific threshold.
    tied = metrics.select_thresholds(np.array([1, 0, 1, 0.0]), np.array([0.8, 0.6, 0.4, 0.2]), "youden")
    assert tied[0] == 0.8
    with pytest.raises(ValueError, match="'precision'"):
        metrics.select_thresholds(y_true, y_score, "precision")


def test_expected_calibration_error_hand_cases():
    calibrated_probs = np.array([0.25] * 4 + [0.75] * 4)
    calibrated_labels = np.array([1, 0, 0, 0, 1, 1, 1, 0], dtype=float)
    assert metrics.expected_calibration_error(calibrated_labels, calibrated_probs)[0] == pytest.approx(0.0)
    # Bin [0.2, 0.3): predicted 0.2, observed 0/5. Bin [0.9, 1.0]: predicted 0.9 and 1.0 (mean 0.92), observed 4/5.
    probs = np.array([0.2] * 5 + [0.9] * 4 + [1.0])
    labels = np.array([0] * 5 + [1, 1, 1, 0, 1], dtype=float)
    assert metrics.expected_calibration_error(labels, probs)[0] == pytest.approx((5 * 0.2 + 5 * 0.12) / 10)
    curve = metrics.reliability_curve(labels, probs)
    assert curve["count"].tolist() == [0, 0, 5, 0, 0, 0, 0, 0, 0, 5]
    assert curve["mean_predicted"][9] == pytest.approx(0.92) and curve["observed_frequency"][9] == 0.8
    assert np.isnan(curve["mean_predicted"][0]) and curve["bin_centers"][0] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="not logits"):
        metrics.expected_calibration_error(labels, probs * 4 - 2)


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"y_true has shape \(4, 2\) but y_score has shape \(4, 3\)"):
        metrics.auroc_per_class(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="row 1, column 0"):
        metrics.auroc_per_class(np.zeros((3, 1)), np.array([[0.1], [np.nan], [0.3]]))
    with pytest.raises(ValueError, match="patient_ids has 2 entries"):
        metrics.bootstrap_auroc_ci(np.zeros((3, 1)), np.zeros((3, 1)), [1, 2], n_resamples=5)


def _summary_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """14-class data with Hernia all negative, a few unknown labels, and 3 images per patient."""
    y_true, y_score = _separable_data(n_images=300, n_classes=len(FINDINGS), seed=12)
    y_true[:, FINDINGS.index("Hernia")] = 0.0
    y_true[:10, 0] = np.nan
    return y_true, y_score, np.arange(300) // 3


def test_summarize_is_json_ready_and_consistent():
    y_true, y_score, patient_ids = _summary_data()
    summary = report.summarize(y_true, y_score, patient_ids, FINDINGS, n_resamples=100, seed=0)
    restored = json.loads(json.dumps(summary, allow_nan=False))
    assert restored == summary
    assert summary["n_images"] == 300 and summary["n_patients"] == 100
    hernia, first = summary["classes"]["Hernia"], summary["classes"]["Atelectasis"]
    assert hernia["auroc"] is None and hernia["ci_low"] is None and hernia["positives"] == 0
    assert first["n"] == 290 and first["positives"] == int(np.nansum(y_true[:, 0]))
    assert first["prevalence"] == pytest.approx(first["positives"] / 290)
    assert first["ci_low"] < first["auroc"] < first["ci_high"]
    assert first["sensitivity"] is None and first["threshold"] is None
    assert summary["mean_auroc"] == pytest.approx(metrics.mean_auroc(metrics.auroc_per_class(y_true, y_score)))
    thresholds = metrics.select_thresholds(y_true, y_score)
    with_thresholds = report.summarize(y_true, y_score, patient_ids, FINDINGS, thresholds, n_resamples=20)
    operating = metrics.operating_point_metrics(y_true, y_score, thresholds)
    assert with_thresholds["classes"]["Atelectasis"]["sensitivity"] == pytest.approx(operating["sensitivity"][0])
    assert with_thresholds["classes"]["Hernia"]["threshold"] is None


def test_format_table_shows_classes_na_and_chexnet():
    y_true, y_score, patient_ids = _summary_data()
    summary = report.summarize(y_true, y_score, patient_ids, FINDINGS, n_resamples=50)
    table = report.format_table(summary, FINDINGS)
    lines = table.splitlines()
    assert all(any(line.startswith(name) for line in lines) for name in FINDINGS)
    hernia_line = next(line for line in lines if line.startswith("Hernia"))
    assert "n/a [n/a, n/a]" in hernia_line and "0.9164" in hernia_line
    mean_line = next(line for line in lines if line.startswith("Mean"))
    assert f"{summary['mean_auroc']:.3f}" in mean_line and "0.841" in mean_line
    assert "Rajpurkar et al. 2017" in lines[-1] and "not directly comparable" in lines[-1]


def test_chexnet_reference_covers_the_findings():
    assert set(report.CHEXNET_AUROC) == set(FINDINGS)
    assert report.CHEXNET_AUROC["Cardiomegaly"] == 0.9248
    assert np.mean(list(report.CHEXNET_AUROC.values())) == pytest.approx(report.CHEXNET_MEAN_AUROC, abs=1e-3)


@pytest.mark.parametrize("plot", [plot_roc_curves, plot_reliability])
def test_plots_write_png_and_close_figures(tmp_path, plot):
    y_true, y_score, _ = _summary_data()
    y_true[:, FINDINGS.index("Edema")] = np.nan  # no known label: reliability panel is n/a too
    path = plot(y_true, y_score, FINDINGS, tmp_path / "figures" / "grid.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert plt.get_fignums() == []
