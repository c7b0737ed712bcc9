"""Temperature scaling: recovers a planted temperature, lowers ECE, keeps AUROC, and reads/writes calibration.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr.calibration import (
    CalibrationError,
    apply_calibration,
    brier_score,
    calibration_report,
    find_calibration,
    fit_temperatures,
    load_calibration,
    save_calibration,
    to_logits,
)
from cxr.metrics import auroc_per_class, expected_calibration_error, select_thresholds

NAMES = ("Effusion", "Mass", "Hernia")


def overconfident(n: int = 4000, factor: float = 3.0, seed: int = 0):
    """Labels drawn from well-calibrated probabilities; the model reports logits `factor` times too large."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(-1.0, 1.2, (n, len(NAMES)))
    labels = (rng.random((n, len(NAMES))) < 1 / (1 + np.exp(-true_logits))).astype(np.float64)
    return labels, 1 / (1 + np.exp(-factor * true_logits))


def test_temperature_scaling_fixes_an_overconfident_model():
    val_labels, val_probabilities = overconfident(seed=0)
    test_labels, test_probabilities = overconfident(seed=1)
    calibration = fit_temperatures(val_labels, val_probabilities, NAMES)
    for name in NAMES:
        assert calibration["temperatures"][name] == pytest.approx(3.0, rel=0.12)
    calibrated = apply_calibration(test_probabilities, calibration, NAMES)
    before = expected_calibration_error(test_labels, test_probabilities)
    after = expected_calibration_error(test_labels, calibrated)
    assert np.all(before > 0.08) and np.all(after < 0.035) and np.all(after < before / 3)
    assert np.all(brier_score(test_labels, calibrated) < brier_score(test_labels, test_probabilities))
    # The order of the scores is kept: AUROC does not move.
    np.testing.assert_allclose(auroc_per_class(test_labels, calibrated), auroc_per_class(test_labels, test_probabilities))
    report = calibration_report(test_labels, test_probabilities, calibrated, NAMES, calibration)
    assert report["mean_ece_after"] < report["mean_ece_before"] and report["classes"]["Mass"]["temperature"] > 2.5


def test_an_underconfident_model_gets_a_temperature_below_one():
    rng = np.random.default_rng(3)
    true_logits = rng.normal(-1.0, 1.2, (4000, len(NAMES)))
    labels = (rng.random(true_logits.shape) < 1 / (1 + np.exp(-true_logits))).astype(np.float64)
    calibration = fit_temperatures(labels, 1 / (1 + np.exp(-0.5 * true_logits)), NAMES)
    assert all(value == pytest.approx(0.5, rel=0.15) for value in calibration["temperatures"].values())


def test_thresholds_on_calibrated_probabilities_pick_the_same_images():
    labels, probabilities = overconfident(n=1000)
    calibration = fit_temperatures(labels, probabilities, NAMES)
    calibrated = apply_calibration(probabilities, calibration, NAMES)
    raw_thresholds = select_thresholds(labels, probabilities)
    calibrated_thresholds = select_thresholds(labels, calibrated)
    np.testing.assert_array_equal(probabilities >= raw_thresholds, calibrated >= calibrated_thresholds)


def test_logits_and_probabilities_give_the_same_result_and_unknown_labels_are_ignored():
    labels, probabilities = overconfident(n=500)
    calibration = fit_temperatures(labels, probabilities, NAMES)
    from_logits = apply_calibration(to_logits(probabilities), calibration, NAMES, logits=True)
    np.testing.assert_allclose(from_logits, apply_calibration(probabilities, calibration, NAMES))
    masked = labels.copy()
    masked[:100, 0] = np.nan
    partial = fit_temperatures(masked, probabilities, NAMES)
    alone = fit_temperatures(labels[100:, :1], probabilities[100:, :1], NAMES[:1])
    assert partial["temperatures"]["Effusion"] == pytest.approx(alone["temperatures"]["Effusion"], rel=1e-4)
    single = np.zeros_like(labels)  # one label value only: nothing to fit, T stays 1
    assert fit_temperatures(single, probabilities, NAMES)["temperatures"]["Hernia"] == 1.0


def test_calibration_file_round_trip_and_errors(tmp_path):
    labels, probabilities = overconfident(n=300)
    calibration = fit_temperatures(labels, probabilities, NAMES)
    path = save_calibration(calibration, tmp_path / "calibration.json")
    loaded = load_calibration(path)
    assert loaded["temperatures"] == calibration["temperatures"] and loaded["fitted_on"] == "val"
    with pytest.raises(CalibrationError, match="missing \\['Hernia'\\]"):
        apply_calibration(probabilities[:, :2], {"temperatures": {"Effusion": 1.0, "Mass": 1.0}}, NAMES[:2] + ("Hernia",))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"temperatures": {"Mass": -1}}))
    with pytest.raises(CalibrationError, match=f"{broken}: temperatures must be positive"):
        load_calibration(broken)
    (tmp_path / "not.json").write_text("{")
    with pytest.raises(CalibrationError, match="not a calibration file"):
        load_calibration(tmp_path / "not.json")


def test_brier_score_by_hand():
    labels = np.array([[1.0, np.nan], [0.0, 1.0]])
    probabilities = np.array([[0.8, 0.3], [0.4, 0.9]])
    np.testing.assert_allclose(brier_score(labels, probabilities), [(0.04 + 0.16) / 2, 0.01])


def test_find_calibration_beside_a_checkpoint(tmp_path):
    import os

    checkpoint = tmp_path / "run" / "best.pt"
    assert find_calibration(checkpoint) is None
    older, newer = tmp_path / "run" / "eval-val" / "calibration.json", tmp_path / "run" / "eval-test" / "calibration.json"
    for path, stamp in ((older, 1_000_000), (newer, 2_000_000)):
        path.parent.mkdir(parents=True)
        save_calibration({"method": "temperature", "fitted_on": "val", "temperatures": {"Mass": 2.0}}, path)
        os.utime(path, (stamp, stamp))
    assert find_calibration(checkpoint) == newer
