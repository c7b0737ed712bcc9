"""Paired model comparison: DeLong against a worked example and the bootstrap, identity, Holm, file errors, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cxr.compare import compare_predictions, delong_paired, holm_adjust, midranks, paired_bootstrap_delta, structural_components
from cxr.comparison_io import PredictionsError, pair_predictions, read_predictions
from cxr.labels import FINDINGS
from tests.test_train import run_cli


def planted(n_patients: int = 600, images_per_patient: int = 3, signal: float = 1.5, seed: int = 0):
    """Labels of 14 findings, a 'trained' model's scores (signal + noise) and an untrained one's (near-constant)."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), images_per_patient)
    prevalence = np.linspace(0.05, 0.3, len(FINDINGS))
    labels = (rng.random((len(patients), len(FINDINGS))) < prevalence).astype(np.float64)
    trained = 1 / (1 + np.exp(-(signal * labels + rng.normal(0, 1, labels.shape) - 1.5)))
    untrained = 0.5 + 0.001 * rng.normal(0, 1, labels.shape)  # a fresh head: tiny logits, about 0.5 everywhere
    return labels, trained, untrained, patients


def test_midranks_average_ties():
    np.testing.assert_array_equal(midranks([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])


def test_delong_worked_example():
    # Model A: positives (0.9, 0.6, 0.4), negatives (0.7, 0.3). Model B: positives (0.8, 0.5, 0.5), negatives (0.5, 0.1).
    # Structural components (psi = 1 if x > y, 1/2 if tied):
    #   A: V10 = (1, 1/2, 1/2), V01 = (1/3, 1), AUROC 2/3;  B: V10 = (1, 3/4, 3/4), V01 = (2/3, 1), AUROC 5/6.
    # S10 (denominator m - 1 = 2): var_A 1/12, var_B 1/48, cov 1/24.  S01 (n - 1 = 1): 2/9, 1/18, 1/9.
    # S = S10 / 3 + S01 / 2: var_A 5/36, var_B 5/144, cov 5/72; var(A - B) = 5/36 + 5/144 - 10/72 = 5/144.
    # z = (2/3 - 5/6) / sqrt(5/144) = -2 / sqrt(5).
    labels = np.array([1, 1, 1, 0, 0], dtype=bool)
    a = np.array([0.9, 0.6, 0.4, 0.7, 0.3])
    b = np.array([0.8, 0.5, 0.5, 0.5, 0.1])
    auroc, v10, v01 = structural_components(b[labels], b[~labels])
    np.testing.assert_allclose(v10, [1, 0.75, 0.75])
    np.testing.assert_allclose(v01, [2 / 3, 1])
    assert auroc == pytest.approx(5 / 6)
    result = delong_paired(labels, a, b)
    assert result["auroc_a"] == pytest.approx(2 / 3) and result["auroc_b"] == pytest.approx(5 / 6)
    assert result["variance_a"] == pytest.approx(5 / 36)
    assert result["variance_b"] == pytest.approx(5 / 144)
    assert result["covariance"] == pytest.approx(5 / 72)
    assert result["variance"] == pytest.approx(5 / 144)
    assert result["z"] == pytest.approx(-2 / math.sqrt(5))
    assert result["p"] == pytest.approx(math.erfc(2 / math.sqrt(5) / math.sqrt(2)))  # 0.3711


def test_structural_components_match_the_pair_table():
    rng = np.random.default_rng(1)
    positives, negatives = np.round(rng.normal(1, 1, 40), 1), np.round(rng.normal(0, 1, 55), 1)  # many ties
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    auroc, v10, v01 = structural_components(positives, negatives)
    np.testing.assert_allclose(v10, psi.mean(axis=1))
    np.testing.assert_allclose(v01, psi.mean(axis=0))
    assert auroc == pytest.approx(psi.mean())


def test_delong_agrees_with_the_paired_bootstrap_on_a_large_case():
    # One image per patient: the bootstrap's spread of ΔAUROC estimates the variance DeLong computes.
    rng = np.random.default_rng(2)
    labels = (rng.random(3000) < 0.3).astype(np.float64)
    shared = rng.normal(0, 1, 3000)
    a = labels * 1.2 + shared + 0.7 * rng.normal(0, 1, 3000)
    b = labels * 0.9 + shared + 0.7 * rng.normal(0, 1, 3000)
    delong = delong_paired(labels == 1, a, b)
    boot = paired_bootstrap_delta(labels, a, b, np.arange(3000), n_resamples=2000, seed=0)
    bootstrap_sd = (boot["high"][0] - boot["low"][0]) / (2 * 1.959964)
    assert bootstrap_sd == pytest.approx(math.sqrt(delong["variance"]), rel=0.1)
    assert delong["p"] < 0.01 and boot["p"][0] < 0.01


def test_a_model_against_itself():
    labels, trained, _, patients = planted(n_patients=200)
    result = compare_predictions(labels, trained, trained.copy(), patients, FINDINGS, n_resamples=200, seed=0)
    for entry in result["classes"].values():
        assert entry["delta"] == 0.0 and entry["ci_low"] == 0.0 and entry["ci_high"] == 0.0
        assert entry["bootstrap_p"] == 1.0 and entry["delong_p"] == 1.0 and entry["delong_holm_p"] == 1.0
    assert result["mean"]["delta"] == 0.0 and result["mean"]["bootstrap_p"] == 1.0


def test_trained_against_untrained_initialization_is_significant():
    labels, trained, untrained, patients = planted()
    result = compare_predictions(labels, trained, untrained, patients, FINDINGS, n_resamples=300, seed=0)
    significant = [name for name, entry in result["classes"].items() if entry["delong_holm_p"] < 0.001]
    assert len(significant) >= 12, result["classes"]
    assert all(entry["delta"] > 0.15 for entry in result["classes"].values())
    assert result["mean"]["ci_low"] > 0.15 and result["mean"]["bootstrap_p"] < 0.01
    # The paired bootstrap is tighter than two independent CIs: the shared patients cancel.
    assert result["mean"]["ci_high"] - result["mean"]["ci_low"] < 0.1


def test_paired_bootstrap_is_seeded_and_patient_level():
    labels, trained, untrained, patients = planted(n_patients=100)
    first = paired_bootstrap_delta(labels, trained, untrained, patients, n_resamples=100, seed=3)
    second = paired_bootstrap_delta(labels, trained, untrained, patients, n_resamples=100, seed=3)
    np.testing.assert_array_equal(first["low"], second["low"])
    # Three images per patient: resampling images instead would give a narrower interval.
    by_image = paired_bootstrap_delta(labels, trained, untrained, np.arange(len(patients)), n_resamples=100, seed=3)
    assert np.mean(first["high"] - first["low"]) > np.mean(by_image["high"] - by_image["low"])


def test_holm_step_down():
    adjusted = holm_adjust([0.01, 0.04, 0.03, np.nan, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.09, max(0.09, 0.08), max(0.09, 0.5)
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, np.nan, 0.5])
    assert holm_adjust([0.5, 0.9]).tolist() == [1.0, 1.0]


def write_predictions(path: Path, names, patients, probabilities, labels, drop: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    findings = [name for name in FINDINGS if name != drop]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Patient ID", *findings, *(f"label_{name}" for name in FINDINGS)])
        for name, patient, probs, label in zip(names, patients, probabilities, labels):
            kept = [p for finding, p in zip(FINDINGS, probs) if finding != drop]
            writer.writerow([name, int(patient), *(f"{p:.6f}" for p in kept), *(f"{v:g}" for v in label)])
    return path


@pytest.fixture
def two_evaluations(tmp_path):
    labels, trained, untrained, patients = planted(n_patients=150)
    names = [f"{i:08d}_000.png" for i in range(len(labels))]
    a = write_predictions(tmp_path / "A" / "predictions.csv", names, patients, trained, labels)
    order = np.random.default_rng(0).permutation(len(labels))  # another row order must not matter
    b = write_predictions(tmp_path / "B" / "predictions.csv", [names[i] for i in order], patients[order], untrained[order],
                          labels[order])
    return a.parent, b.parent, (names, patients, trained, untrained, labels)


def test_pairing_reorders_and_refuses_other_images(two_evaluations, tmp_path):
    a_dir, b_dir, (names, patients, trained, untrained, labels) = two_evaluations
    paired_labels, score_a, score_b, paired_patients = pair_predictions(read_predictions(a_dir), read_predictions(b_dir))
    np.testing.assert_allclose(score_b, untrained, atol=1e-6)
    np.testing.assert_array_equal(paired_labels, labels)
    other = write_predictions(tmp_path / "C" / "predictions.csv", names[:-1] + ["99999999_000.png"], patients, untrained, labels)
    with pytest.raises(PredictionsError, match=r"do not cover the same images: 1 only in the first .*99999999_000.png"):
        pair_predictions(read_predictions(a_dir), read_predictions(other))
    with pytest.raises(PredictionsError, match=str(other)):
        pair_predictions(read_predictions(a_dir), read_predictions(other))


def test_a_predictions_file_missing_a_finding_is_named(tmp_path):
    labels, trained, _, patients = planted(n_patients=5)
    path = write_predictions(tmp_path / "p.csv", [f"{i}.png" for i in range(len(labels))], patients, trained, labels, drop="Hernia")
    with pytest.raises(PredictionsError, match=f"{path}: missing column\\(s\\) Hernia"):
        read_predictions(path)
    with pytest.raises(PredictionsError, match="no such file"):
        read_predictions(tmp_path / "absent")


@pytest.mark.slow
def test_cli_compares_two_evaluation_folders(two_evaluations, tmp_path):
    a_dir, b_dir, _ = two_evaluations
    out = tmp_path / "comparison"
    result = run_cli(["scripts/compare_models.py", str(a_dir), str(b_dir), "--out", str(out), "--bootstrap", "200"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("comparison.json", "comparison.csv", "forest.png"):
        assert (out / name).stat().st_size > 0, name
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["classes"]) == list(FINDINGS) and comparison["mean"]["delta"] > 0.15
    assert all(entry["delong_p"] < 0.001 for entry in comparison["classes"].values())
    with open(out / "comparison.csv", newline="") as handle:
        assert [row["finding"] for row in csv.DictReader(handle)] == [*FINDINGS, "mean"]
    assert "Holm p" in result.stdout and "Effusion" in result.stdout
    missing = run_cli(["scripts/compare_models.py", str(a_dir), str(tmp_path / "nowhere"), "--out", str(out)])
    assert missing.returncode == 1 and f"{tmp_path / 'nowhere'}" in missing.stderr and "Traceback" not in missing.stderr
