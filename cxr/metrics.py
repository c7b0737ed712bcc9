"""Evaluation metrics for a multi-label chest X-ray classifier (numpy + scikit-learn, no torch).

Every function takes ``y_true`` [N, C] holding 0/1, with NaN for an unknown label (that cell is
ignored), and ``y_score`` [N, C] probabilities. Confidence intervals resample *patients*, not
images, because NIH ChestX-ray14 has many images per patient.

Example::

    aurocs = auroc_per_class(y_true, y_score)                      # NaN for single-valued classes
    ci = bootstrap_auroc_ci(y_true, y_score, patient_ids, n_resamples=1000, seed=0)
    thresholds = select_thresholds(val_true, val_score, "youden")

`cxr.report` bundles all of them into the JSON-ready summary and the printed table.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse
from sklearn.metrics import average_precision_score


def check_inputs(y_true: Any, y_score: Any, score_name: str = "y_score") -> tuple[np.ndarray, np.ndarray]:
    """Return float64 [N, C] copies of labels and scores after checking shapes and values."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 1:
        y_true = y_true[:, None]
    if y_score.ndim == 1:
        y_score = y_score[:, None]
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(
            f"y_true has shape {y_true.shape} but {score_name} has shape {y_score.shape}; "
            "both must be [images, classes]"
        )
    known = y_true[~np.isnan(y_true)]
    if not np.all((known == 0) | (known == 1)):
        raise ValueError("y_true must hold 0, 1 or NaN (unknown); found other values")
    if not np.all(np.isfinite(y_score)):
        row, col = np.argwhere(~np.isfinite(y_score))[0]
        raise ValueError(f"{score_name} is not finite at row {row}, column {col}; check the model outputs")
    return y_true, y_score


def known_subset(y_true_col: np.ndarray, y_score_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels (bool) and scores of one class where the label is known."""
    known = ~np.isnan(y_true_col)
    return y_true_col[known] == 1, y_score_col[known]


class _RankLayout(NamedTuple):
    """One class's images arranged once so that any weighting gives its AUROC by gathers and a cumsum."""

    pos_images: np.ndarray  # indices of positive images
    neg_images: np.ndarray  # indices of negative images, by ascending score
    below: np.ndarray  # per positive: number of negatives with a strictly lower score
    below_or_tied: np.ndarray  # per positive: number of negatives with a lower or equal score


def _rank_layout(y_true_col: np.ndarray, y_score_col: np.ndarray) -> _RankLayout | None:
    """Sort one class once; None when its known labels have a single value (AUROC undefined)."""
    known = ~np.isnan(y_true_col)
    pos_images = np.flatnonzero(known & (y_true_col == 1))
    neg_images = np.flatnonzero(known & (y_true_col == 0))
    if len(pos_images) == 0 or len(neg_images) == 0:
        return None
    neg_images = neg_images[np.argsort(y_score_col[neg_images], kind="stable")]
    neg_sorted = y_score_col[neg_images]
    pos_scores = y_score_col[pos_images]
    below = np.searchsorted(neg_sorted, pos_scores, side="left")
    below_or_tied = np.searchsorted(neg_sorted, pos_scores, side="right")
    return _RankLayout(pos_images, neg_images, below, below_or_tied)


def _auroc_from_weights(layout: _RankLayout, pos_weights: np.ndarray, neg_weights: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC for each row of [B, n_pos] / [B, n_neg] (negatives in layout order)."""
    batch = neg_weights.shape[0]
    # Exclusive cumulative negative weight: column k = weight of the k lowest-scored negatives.
    neg_cumulative = np.zeros((batch, neg_weights.shape[1] + 1), dtype=neg_weights.dtype)
    np.cumsum(neg_weights, axis=1, out=neg_cumulative[:, 1:])
    # A tied negative counts one half: (below + below_or_tied) / 2.
    beaten = neg_cumulative[:, layout.below] + neg_cumulative[:, layout.below_or_tied]
    numerator = 0.5 * np.einsum("bi,bi->b", pos_weights, beaten, dtype=np.float64)
    denominator = pos_weights.sum(axis=1, dtype=np.float64) * neg_cumulative[:, -1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


class _PatientPlan(NamedTuple):
    """One class's AUROC as a function of per-patient weights, through two sparse [segments, patients] maps."""

    negatives_by_segment: Any  # csr [K, P]: negatives of patient p scored between the (k-1)th and kth query point
    positives_by_point: Any  # csr [K, P]: half-counts of patient p's positives that query point k
    positives_per_patient: np.ndarray  # [P]
    negatives_per_patient: np.ndarray  # [P]


def _patient_plan(layout: _RankLayout, patient_index: np.ndarray, n_patients: int) -> _PatientPlan:
    """Group one class's images by patient and score segment once, so that each resample costs sparse products."""
    # Only the cumulative negative weight at the positives' positions is needed: cut the sorted negatives there.
    points = np.unique(np.r_[layout.below, layout.below_or_tied])
    points = points[points > 0]
    segment = np.searchsorted(points, np.arange(len(layout.neg_images)), side="right")
    inside = segment < len(points)
    neg_patients, pos_patients = patient_index[layout.neg_images], patient_index[layout.pos_images]
    shape = (len(points), n_patients)
    negatives = scipy.sparse.csr_matrix((np.ones(inside.sum()), (segment[inside], neg_patients[inside])), shape=shape)
    rows, columns = [], []
    for position in (layout.below, layout.below_or_tied):  # a tied negative counts one half
        hit = position > 0
        rows.append(np.searchsorted(points, position[hit]))
        columns.append(pos_patients[hit])
    rows, columns = np.concatenate(rows), np.concatenate(columns)
    positives = scipy.sparse.csr_matrix((np.full(len(rows), 0.5), (rows, columns)), shape=shape)
    return _PatientPlan(negatives, positives, np.bincount(pos_patients, minlength=n_patients).astype(np.float64),
                        np.bincount(neg_patients, minlength=n_patients).astype(np.float64))


def _auroc_from_patient_weights(plan: _PatientPlan, weights_t: np.ndarray) -> np.ndarray:
    """Weighted AUROC for each column of patient weights [P, B] (the same number as _auroc_from_weights)."""
    cumulative = np.cumsum(plan.negatives_by_segment @ weights_t, axis=0)  # [K, B]
    numerator = np.einsum("kb,kb->b", cumulative, plan.positives_by_point @ weights_t)
    denominator = (plan.positives_per_patient @ weights_t) * (plan.negatives_per_patient @ weights_t)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def weighted_auroc(y_true_col: Any, y_score_col: Any, weights: Any) -> np.ndarray:
    """AUROC of one class under each row of `weights` ([n] or [B, n] image weights); NaN where degenerate."""
    y_true_col, y_score_col = check_inputs(y_true_col, y_score_col)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if weights.shape[1] != len(y_true_col):
        raise ValueError(f"weights has {weights.shape[1]} columns but there are {len(y_true_col)} images")
    layout = _rank_layout(y_true_col[:, 0], y_score_col[:, 0])
    if layout is None:
        return np.full(weights.shape[0], np.nan)
    return _auroc_from_weights(layout, weights[:, layout.pos_images], weights[:, layout.neg_images])


def auroc_per_class(y_true: Any, y_score: Any) -> np.ndarray:
    """Per-class AUROC over known labels; NaN for a class whose known labels have a single value."""
    y_true, y_score = check_inputs(y_true, y_score)
    ones = np.ones((1, len(y_true)))
    return np.array([weighted_auroc(y_true[:, c], y_score[:, c], ones)[0] for c in range(y_true.shape[1])])


def mean_over_classes(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN, NaN (without a warning) where a row has no value."""
    valid = ~np.isnan(values)
    counts = valid.sum(axis=-1)
    totals = np.where(valid, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def mean_auroc(aurocs: Any) -> float:
    """Mean over the non-NaN classes; NaN if every class is NaN."""
    return float(mean_over_classes(np.asarray(aurocs, dtype=np.float64)))


def patient_bootstrap_counts(n_patients: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n_patients] float32 draw counts: each row draws n_patients patients with replacement."""
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    flat = draws + (np.arange(n_resamples) * n_patients)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_resamples * n_patients)
    return counts.reshape(n_resamples, n_patients).astype(np.float32)


def bootstrap_auroc_ci(
    y_true: Any,
    y_score: Any,
    patient_ids: Any,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk_size: int = 200,
) -> dict[str, Any]:
    """Percentile CIs of per-class and mean AUROC from a bootstrap over patients (all resamples vectorized)."""
    y_true, y_score = check_inputs(y_true, y_score)
    patient_ids = np.asarray(patient_ids).ravel()
    if len(patient_ids) != len(y_true):
        raise ValueError(f"patient_ids has {len(patient_ids)} entries but y_true has {len(y_true)} rows")
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < level < 1, got {n_resamples} and {level}")
    _, patient_index = np.unique(patient_ids, return_inverse=True)
    n_patients = int(patient_index.max()) + 1 if len(patient_index) else 0
    layouts = [_rank_layout(y_true[:, c], y_score[:, c]) for c in range(y_true.shape[1])]
    # Each resample's weights live in the small [patients, B] count table; no image-level copy is ever made.
    plans = [None if layout is None else _patient_plan(layout, patient_index, n_patients) for layout in layouts]
    rng = np.random.default_rng(seed)
    per_resample = np.full((n_resamples, y_true.shape[1]), np.nan)
    for start in range(0, n_resamples, chunk_size):
        stop = min(start + chunk_size, n_resamples)
        counts_t = np.ascontiguousarray(patient_bootstrap_counts(n_patients, stop - start, rng).T, dtype=np.float64)
        for c, plan in enumerate(plans):
            if plan is not None:
                per_resample[start:stop, c] = _auroc_from_patient_weights(plan, counts_t)
    tail = 100 * (1 - level) / 2
    mean_per_resample = mean_over_classes(per_resample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are degenerate classes
        low, high = np.nanpercentile(per_resample, [tail, 100 - tail], axis=0)
        mean_low, mean_high = np.nanpercentile(mean_per_resample, [tail, 100 - tail])
    return {
        "low": low,
        "high": high,
        "mean_low": float(mean_low),
        "mean_high": float(mean_high),
        "n_valid": (~np.isnan(per_resample)).sum(axis=0),
        "n_resamples": n_resamples,
        "level": level,
    }


def auprc_per_class(y_true: Any, y_score: Any) -> np.ndarray:
    """Per-class average precision over known labels; NaN where the known labels have a single value."""
    y_true, y_score = check_inputs(y_true, y_score)
    result = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        labels, scores = known_subset(y_true[:, c], y_score[:, c])
        if 0 < labels.sum() < len(labels):
            result[c] = average_precision_score(labels, scores)
    return result


def _threshold_sweep(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) with the tp and fp of predicting positive when score >= that score."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    true_positives = np.cumsum(sorted_labels)
    false_positives = np.cumsum(~sorted_labels)
    group_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    return sorted_scores[group_ends], true_positives[group_ends], false_positives[group_ends]


def select_thresholds(y_true: Any, y_score: Any, method: str = "youden") -> np.ndarray:
    """Per-class threshold maximising Youden's J ("youden") or F1 ("f1"); ties go to the highest threshold."""
    if method not in ("youden", "f1"):
        raise ValueError(f"unknown threshold method {method!r}; use 'youden' or 'f1'")
    y_true, y_score = check_inputs(y_true, y_score)
    thresholds = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        labels, scores = known_subset(y_true[:, c], y_score[:, c])
        positives, negatives = labels.sum(), (~labels).sum()
        if positives == 0 or negatives == 0:
            continue
        candidates, tp, fp = _threshold_sweep(labels, scores)
        if method == "youden":
            objective = tp / positives - fp / negatives
        else:
            objective = 2 * tp / (2 * tp + fp + (positives - tp))
        thresholds[c] = candidates[np.argmax(objective)]  # argmax keeps the first, i.e. highest, tie
    return thresholds


def safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio that is NaN where the denominator is 0 (an undefined rate, not an error)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def operating_point_metrics(y_true: Any, y_score: Any, thresholds: Any) -> dict[str, np.ndarray]:
    """Per-class confusion counts and rates, predicting positive when score >= threshold (NaN threshold -> NaN)."""
    y_true, y_score = check_inputs(y_true, y_score)
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if len(thresholds) != y_true.shape[1]:
        raise ValueError(f"got {len(thresholds)} thresholds for {y_true.shape[1]} classes")
    counts = {name: np.full(y_true.shape[1], np.nan) for name in ("tp", "fp", "tn", "fn")}
    for c, threshold in enumerate(thresholds):
        if np.isnan(threshold):
            continue
        labels, scores = known_subset(y_true[:, c], y_score[:, c])
        predicted = scores >= threshold
        counts["tp"][c] = np.sum(predicted & labels)
        counts["fp"][c] = np.sum(predicted & ~labels)
        counts["tn"][c] = np.sum(~predicted & ~labels)
        counts["fn"][c] = np.sum(~predicted & labels)
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    return {
        "sensitivity": safe_ratio(tp, tp + fn),
        "specificity": safe_ratio(tn, tn + fp),
        "ppv": safe_ratio(tp, tp + fp),
        "npv": safe_ratio(tn, tn + fn),
        "f1": safe_ratio(2 * tp, 2 * tp + fp + fn),
        **counts,
    }


def reliability_curve(y_true_col: Any, y_prob_col: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins on [0, 1]: bin centres, mean predicted, observed frequency (NaN if empty), count."""
    y_true_col, y_prob_col = check_inputs(y_true_col, y_prob_col, score_name="y_prob")
    labels, probs = known_subset(y_true_col[:, 0], y_prob_col[:, 0])
    if len(probs) and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(
            f"y_prob ranges over [{probs.min():.3g}, {probs.max():.3g}]; pass probabilities "
            "(sigmoid of the logits), not logits"
        )
    bins = np.clip((probs * n_bins).astype(np.int64), 0, n_bins - 1)  # p == 1 joins the last bin
    count = np.bincount(bins, minlength=n_bins)
    sum_prob = np.bincount(bins, weights=probs, minlength=n_bins)
    sum_label = np.bincount(bins, weights=labels.astype(np.float64), minlength=n_bins)
    return {
        "bin_centers": (np.arange(n_bins) + 0.5) / n_bins,
        "mean_predicted": safe_ratio(sum_prob, count),
        "observed_frequency": safe_ratio(sum_label, count),
        "count": count,
    }


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 10) -> np.ndarray:
    """Per-class ECE: bin-count-weighted |mean predicted - observed frequency|; NaN with no known label."""
    y_true, y_prob = check_inputs(y_true, y_prob, score_name="y_prob")
    result = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        curve = reliability_curve(y_true[:, c], y_prob[:, c], n_bins)
        count = curve["count"]
        if count.sum() > 0:
            gaps = np.abs(curve["mean_predicted"] - curve["observed_frequency"])
            result[c] = np.sum(np.where(count > 0, gaps, 0.0) * count) / count.sum()
    return result
