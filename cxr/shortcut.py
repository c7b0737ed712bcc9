"""The metadata shortcut baseline: per finding, a logistic regression on age, sex, view and follow-up number.

    features = metadata_features(ages, genders, views, follow_ups)          # [N, 5] float64
    baseline = fit_metadata_baseline(features[train_rows], labels[train_rows])
    scores = score_metadata_baseline(baseline, features[test_rows])         # [N, 14] probabilities
    aurocs = auroc_per_class(labels[test_rows], scores)

Fitted on the training split, scored on the evaluated one. Its AUROC says how much of a number needs no image at
all: a finding far more common in AP (bedside) films, or in the elderly, is partly predictable from the table.
Impossible ages (above MAX_PLAUSIBLE_AGE) and unknown ones take the training median.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from cxr.subgroups import MAX_PLAUSIBLE_AGE

FEATURE_NAMES = ("age", "male", "AP view", "log1p(follow-up #)", "first visit")


def metadata_features(ages: Any, genders: Any, views: Any, follow_ups: Any, age_fill: float | None = None) -> np.ndarray:
    """[N, 5] features: age (years), male (0/1), AP view (0/1), log1p(follow-up #), first visit (0/1)."""
    ages = np.asarray(ages, dtype=np.float64).copy()
    implausible = ~np.isfinite(ages) | (ages < 0) | (ages > MAX_PLAUSIBLE_AGE)
    fill = float(np.median(ages[~implausible])) if age_fill is None and (~implausible).any() else (age_fill or 0.0)
    ages[implausible] = fill
    follow_ups = np.asarray(follow_ups, dtype=np.float64)
    return np.column_stack([
        ages,
        (np.char.upper(np.asarray(genders, dtype=str)) == "M").astype(np.float64),
        (np.char.upper(np.asarray(views, dtype=str)) == "AP").astype(np.float64),
        np.log1p(np.maximum(follow_ups, 0)),
        (follow_ups == 0).astype(np.float64),
    ])


def fit_metadata_baseline(features: np.ndarray, labels: Any, seed: int = 0) -> dict[str, Any]:
    """Standardize the features and fit one logistic regression per class on known labels (None: one label value)."""
    labels = np.asarray(labels, dtype=np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    standardized = (features - mean) / std
    models = []
    for c in range(labels.shape[1]):
        known = ~np.isnan(labels[:, c])
        target = labels[known, c]
        if len(target) == 0 or target.min() == target.max():
            models.append(None)
            continue
        model = LogisticRegression(max_iter=1000, random_state=seed)
        model.fit(standardized[known], target.astype(int))
        models.append(model)
    return {"mean": mean, "std": std, "models": models}


def score_metadata_baseline(baseline: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """Baseline probabilities [N, C]; a class without a model scores a constant 0.5 (AUROC 0.5)."""
    standardized = (features - baseline["mean"]) / baseline["std"]
    scores = np.full((len(features), len(baseline["models"])), 0.5)
    for c, model in enumerate(baseline["models"]):
        if model is not None:
            scores[:, c] = model.predict_proba(standardized)[:, 1]
    return scores


def baseline_coefficients(baseline: dict[str, Any], class_names: Any) -> dict[str, dict[str, float] | None]:
    """Standardized coefficients per class and feature: which column the shortcut leans on."""
    return {name: (None if model is None else dict(zip(FEATURE_NAMES, map(float, model.coef_[0]))))
            for name, model in zip(class_names, baseline["models"])}
