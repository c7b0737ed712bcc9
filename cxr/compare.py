"""Paired comparison of two models scored on the same images: DeLong, paired patient bootstrap, Holm.

    result = compare_predictions(y_true, score_a, score_b, patient_ids, FINDINGS, n_resamples=1000, seed=0)
    result["classes"]["Mass"]["delta"], result["classes"]["Mass"]["delong_p"], result["classes"]["Mass"]["holm_p"]
    delong = delong_paired(labels, scores_a, scores_b)        # one class: AUROCs, covariance, z, p

DeLong et al. 1988 compare correlated AUROCs through the structural components (placement values) of each
positive and negative image; Sun & Xu 2014 compute those from three midrank vectors in O(N log N) instead of
the O(m n) pair table. DeLong treats images as independent, so it ignores that one patient has many images;
the paired *patient* bootstrap (the same resampled patients for both models) does not, and is the one whose
CI is reported. Holm's step-down adjustment controls the family-wise error over the findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import ndtr

from cxr.metrics import (
    _auroc_from_patient_weights,
    _patient_plan,
    _rank_layout,
    auroc_per_class,
    check_inputs,
    mean_over_classes,
    patient_bootstrap_counts,
)


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (Sun & Xu 2014, Algorithm 1), in O(N log N)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Each run of equal values [start, end) gets the mean of ranks start+1 ... end.
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    run_ranks = 0.5 * (starts + 1 + ends)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def structural_components(positive_scores: np.ndarray, negative_scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC, V10 (per positive: share of negatives it beats) and V01 (per negative: share of positives above it)."""
    m, n = len(positive_scores), len(negative_scores)
    combined = midranks(np.r_[positive_scores, negative_scores])
    within_positive = midranks(positive_scores)
    within_negative = midranks(negative_scores)
    v10 = (combined[:m] - within_positive) / n
    v01 = 1.0 - (combined[m:] - within_negative) / m
    auroc = (combined[:m].sum() - m * (m + 1) / 2) / (m * n)
    return float(auroc), v10, v01


def delong_paired(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, float]:
    """DeLong's test of AUROC(a) = AUROC(b) on one class (labels bool); NaN when a class has one label value."""
    labels = np.asarray(labels, dtype=bool)
    m, n = int(labels.sum()), int((~labels).sum())
    if m < 2 or n < 2:  # a covariance needs two of each
        return {"auroc_a": np.nan, "auroc_b": np.nan, "delta": np.nan, "variance": np.nan, "z": np.nan, "p": np.nan}
    aurocs, v10s, v01s = [], [], []
    for scores in (np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)):
        auroc, v10, v01 = structural_components(scores[labels], scores[~labels])
        aurocs.append(auroc)
        v10s.append(v10)
        v01s.append(v01)
    s10 = np.cov(np.vstack(v10s))  # 2 x 2, denominator m - 1
    s01 = np.cov(np.vstack(v01s))
    covariance = s10 / m + s01 / n
    delta = aurocs[0] - aurocs[1]
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    if variance <= 1e-14 * max(covariance[0, 0] + covariance[1, 1], 1e-300):
        # Identical rankings: no difference and no variance, nothing to reject. Otherwise the test is undefined.
        z, p = (0.0, 1.0) if abs(delta) < 1e-12 else (np.nan, np.nan)
    else:
        z = delta / np.sqrt(variance)
        p = float(2 * ndtr(-abs(z)))
    return {"auroc_a": aurocs[0], "auroc_b": aurocs[1], "delta": delta, "variance": variance,
            "variance_a": float(covariance[0, 0]), "variance_b": float(covariance[1, 1]),
            "covariance": float(covariance[0, 1]), "z": float(z), "p": float(p)}


def holm_adjust(p_values: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values; NaN entries stay NaN and do not count towards the family size."""
    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p_values.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p_values))
    if len(valid) == 0:
        return adjusted
    order = valid[np.argsort(p_values[valid], kind="stable")]
    family = len(order)
    stepped = np.minimum(1.0, (family - np.arange(family)) * p_values[order])
    adjusted[order] = np.maximum.accumulate(stepped)  # adjusted p-values never decrease down the order
    return adjusted


def paired_bootstrap_delta(y_true: Any, score_a: Any, score_b: Any, patient_ids: Any, n_resamples: int = 1000,
                           seed: int = 0, level: float = 0.95, chunk_size: int = 200) -> dict[str, Any]:
    """ΔAUROC (a - b) per class and for the mean: percentile CI and two-sided p over the same resampled patients."""
    y_true, score_a = check_inputs(y_true, score_a, "score_a")
    _, score_b = check_inputs(y_true, score_b, "score_b")
    patient_ids = np.asarray(patient_ids).ravel()
    if len(patient_ids) != len(y_true):
        raise ValueError(f"patient_ids has {len(patient_ids)} entries but y_true has {len(y_true)} rows")
    if n_resamples < 1:
        raise ValueError(f"need n_resamples >= 1, got {n_resamples}")
    _, patient_index = np.unique(patient_ids, return_inverse=True)
    n_patients = int(patient_index.max()) + 1
    n_classes = y_true.shape[1]
    plans = []
    for c in range(n_classes):
        layouts = (_rank_layout(y_true[:, c], score_a[:, c]), _rank_layout(y_true[:, c], score_b[:, c]))
        plans.append([None if layout is None else _patient_plan(layout, patient_index, n_patients) for layout in layouts])
    rng = np.random.default_rng(seed)
    aurocs = np.full((2, n_resamples, n_classes), np.nan)
    for start in range(0, n_resamples, chunk_size):
        stop = min(start + chunk_size, n_resamples)
        # One draw of patients for both models: the pairing.
        counts_t = np.ascontiguousarray(patient_bootstrap_counts(n_patients, stop - start, rng).T, dtype=np.float64)
        for c, pair in enumerate(plans):
            for model, plan in enumerate(pair):
                if plan is not None:
                    aurocs[model, start:stop, c] = _auroc_from_patient_weights(plan, counts_t)
    deltas = aurocs[0] - aurocs[1]
    # The mean of each model over the classes defined in that resample, then their difference.
    mean_deltas = mean_over_classes(aurocs[0]) - mean_over_classes(aurocs[1])
    per_class = [_delta_interval(deltas[:, c], level) for c in range(n_classes)]
    return {"low": np.array([item[0] for item in per_class]), "high": np.array([item[1] for item in per_class]),
            "p": np.array([item[2] for item in per_class]), "mean": _delta_interval(mean_deltas, level),
            "n_resamples": n_resamples, "level": level}


def _delta_interval(deltas: np.ndarray, level: float) -> tuple[float, float, float]:
    """(low, high, two-sided p) of bootstrap differences; p = twice the smaller tail share at 0, at most 1."""
    deltas = deltas[~np.isnan(deltas)]
    if len(deltas) == 0:
        return np.nan, np.nan, np.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    # +1 in numerator and denominator: the observed sample counts as one resample, so p is never 0.
    below = (np.sum(deltas <= 0) + 1) / (len(deltas) + 1)
    above = (np.sum(deltas >= 0) + 1) / (len(deltas) + 1)
    return float(low), float(high), float(min(1.0, 2 * min(below, above)))


def compare_predictions(y_true: Any, score_a: Any, score_b: Any, patient_ids: Any, class_names: Sequence[str],
                        n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything compare_models.py reports, per class and for the mean, as a dict of plain numbers (NaN kept)."""
    y_true, score_a = check_inputs(y_true, score_a, "score_a")
    _, score_b = check_inputs(y_true, score_b, "score_b")
    if len(class_names) != y_true.shape[1]:
        raise ValueError(f"got {len(class_names)} class names for {y_true.shape[1]} columns")
    aurocs_a, aurocs_b = auroc_per_class(y_true, score_a), auroc_per_class(y_true, score_b)
    delong = []
    for c in range(y_true.shape[1]):
        known = ~np.isnan(y_true[:, c])
        delong.append(delong_paired(y_true[known, c] == 1, score_a[known, c], score_b[known, c]))
    delong_p = np.array([entry["p"] for entry in delong])
    boot = paired_bootstrap_delta(y_true, score_a, score_b, patient_ids, n_resamples, seed)
    holm_delong, holm_bootstrap = holm_adjust(delong_p), holm_adjust(boot["p"])
    classes = {}
    for c, name in enumerate(class_names):
        classes[name] = {
            "auroc_a": aurocs_a[c], "auroc_b": aurocs_b[c], "delta": aurocs_a[c] - aurocs_b[c],
            "ci_low": boot["low"][c], "ci_high": boot["high"][c], "bootstrap_p": boot["p"][c],
            "bootstrap_holm_p": holm_bootstrap[c], "delong_z": delong[c]["z"], "delong_p": delong_p[c],
            "delong_holm_p": holm_delong[c],
            "n": int((~np.isnan(y_true[:, c])).sum()), "positives": int((y_true[:, c] == 1).sum()),
        }
    mean_a, mean_b = float(mean_over_classes(aurocs_a)), float(mean_over_classes(aurocs_b))
    low, high, p = boot["mean"]
    return {
        "classes": classes,
        "mean": {"auroc_a": mean_a, "auroc_b": mean_b, "delta": mean_a - mean_b, "ci_low": low, "ci_high": high,
                 "bootstrap_p": p},
        "n_images": len(y_true), "n_patients": int(len(np.unique(np.asarray(patient_ids)))),
        "n_resamples": n_resamples, "seed": seed,
        "notes": ["delta = AUROC(A) - AUROC(B); CI and bootstrap p from a paired bootstrap over patients",
                  "DeLong (Sun & Xu 2014 algorithm) treats images as independent; Holm adjusts over the findings"],
    }
