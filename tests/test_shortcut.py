"""The metadata shortcut baseline finds a planted shortcut (Effusion far more frequent in AP films) and nothing else."""

from __future__ import annotations

import numpy as np

from cxr.audit import metadata_baseline
from cxr.data import read_nih_table, table_to_index
from cxr.labels import FINDINGS
from cxr.shortcut import fit_metadata_baseline, metadata_features, score_metadata_baseline


def planted_table(write_table, nih_row, n_patients: int = 300, seed: int = 0):
    """A small NIH-format table: every patient has an AP and a PA film (random order); Effusion is in 60% of AP films
    and 5% of PA films (the best possible AUROC from the view alone is about 0.81)."""
    rng = np.random.default_rng(seed)
    lines = []
    for patient in range(1, n_patients + 1):
        age, gender = str(rng.integers(20, 90)), "MF"[patient % 2]
        for follow_up, view in enumerate(rng.permutation(["AP", "PA"])):
            findings = [name for name in ("Mass", "Nodule") if rng.random() < 0.1]
            if rng.random() < (0.6 if view == "AP" else 0.05):
                findings.append("Effusion")
            lines.append(nih_row(f"{patient:08d}_{follow_up:03d}.png", "|".join(findings) or "No Finding", patient=patient,
                                 follow_up=follow_up, view=view, age=age, gender=gender))
    return table_to_index(read_nih_table(write_table(lines)))


def meta(index, rows):
    return {"ages": index.ages[rows], "genders": index.genders[rows], "views": index.views[rows],
            "follow_ups": index.follow_ups[rows]}


def test_baseline_finds_the_planted_view_shortcut(write_table, nih_row):
    index = planted_table(write_table, nih_row)
    train = np.flatnonzero(index.patient_ids <= 200)
    test = np.flatnonzero(index.patient_ids > 200)
    result = metadata_baseline({**meta(index, train), "labels": index.labels[train]}, meta(index, test),
                               index.labels[test], FINDINGS)
    assert result["auroc"]["Effusion"] > 0.75 and result["fitted_on"] == "train"
    assert abs(result["auroc"]["Mass"] - 0.5) < 0.15 and abs(result["auroc"]["Nodule"] - 0.5) < 0.15
    coefficients = result["coefficients"]["Effusion"]
    assert max(coefficients, key=lambda name: abs(coefficients[name])) == "AP view" and coefficients["AP view"] > 0.5
    assert result["auroc"]["Hernia"] is None  # no Hernia anywhere: no model, no AUROC
    assert result["coefficients"]["Hernia"] is None


def test_features_and_constant_scores_without_a_model():
    features = metadata_features([40, 200, np.nan], ["M", "F", "M"], ["AP", "PA", "ap"], [0, 3, 1], age_fill=55.0)
    np.testing.assert_allclose(features, [[40, 1, 1, 0, 1], [55, 0, 0, np.log1p(3), 0], [55, 1, 1, np.log1p(1), 0]])
    labels = np.zeros((3, 2))
    labels[0, 0] = 1
    baseline = fit_metadata_baseline(features, labels)
    scores = score_metadata_baseline(baseline, features)
    assert baseline["models"][1] is None and np.all(scores[:, 1] == 0.5)
    assert scores[0, 0] > scores[1, 0]
