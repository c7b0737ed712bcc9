"""The evaluation summary: every metric of cxr.metrics in one JSON-ready dict, and the printed table.

    summary = summarize(y_true, y_score, patient_ids, FINDINGS, thresholds, n_resamples=1000, seed=0)
    print(format_table(summary, FINDINGS))
    json.dump(summary, open("metrics.json", "w"), indent=2)       # NaN became None
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxr.metrics import (
    auprc_per_class,
    auroc_per_class,
    bootstrap_auroc_ci,
    check_inputs,
    expected_calibration_error,
    mean_auroc,
    mean_over_classes,
    operating_point_metrics,
    safe_ratio,
)

# Rajpurkar et al. 2017 (CheXNet), Table 1; measured on a random patient split of ChestX-ray14.
CHEXNET_AUROC: dict[str, float] = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}
CHEXNET_MEAN_AUROC = 0.841
CHEXNET_FOOTNOTE = (
    "CheXNet figures come from a random patient split (Rajpurkar et al. 2017) and are not "
    "directly comparable to other splits such as the official test_list.txt."
)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy values, arrays and containers to plain Python, with NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def summarize(
    y_true: Any,
    y_score: Any,
    patient_ids: Any,
    class_names: Sequence[str],
    thresholds: Any = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics as a JSON-ready dict; fields without thresholds (or resamples) are None."""
    y_true, y_score = check_inputs(y_true, y_score)
    if len(class_names) != y_true.shape[1]:
        raise ValueError(f"got {len(class_names)} class names for {y_true.shape[1]} columns")
    n_classes = y_true.shape[1]
    aurocs = auroc_per_class(y_true, y_score)
    nothing = np.full(n_classes, np.nan)
    ci = (
        bootstrap_auroc_ci(y_true, y_score, patient_ids, n_resamples, seed)
        if n_resamples > 0
        else {"low": nothing, "high": nothing, "mean_low": np.nan, "mean_high": np.nan}
    )
    operating = {} if thresholds is None else operating_point_metrics(y_true, y_score, thresholds)
    known = ~np.isnan(y_true)
    n_known = known.sum(axis=0)
    positives = (y_true == 1).sum(axis=0)
    columns = {
        "auroc": aurocs,
        "ci_low": ci["low"],
        "ci_high": ci["high"],
        "auprc": auprc_per_class(y_true, y_score),
        "threshold": nothing if thresholds is None else np.asarray(thresholds, dtype=np.float64),
        **{key: operating.get(key, nothing) for key in ("sensitivity", "specificity", "ppv", "npv", "f1")},
        "ece": expected_calibration_error(y_true, y_score),
        "prevalence": safe_ratio(positives.astype(np.float64), n_known),
        "n": n_known,
        "positives": positives,
    }
    classes = {name: {key: values[c] for key, values in columns.items()} for c, name in enumerate(class_names)}
    return to_jsonable(
        {
            "classes": classes,
            "mean_auroc": mean_auroc(aurocs),
            "mean_auroc_ci": [ci["mean_low"], ci["mean_high"]],
            "n_images": len(y_true),
            "n_patients": len(np.unique(np.asarray(patient_ids))),
            "n_resamples": n_resamples,
            "seed": seed,
        }
    )


def _fmt(value: Any, digits: int = 3) -> str:
    """A number to `digits` decimals, or 'n/a' for None/NaN."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_table(summary: dict[str, Any], class_names: Sequence[str]) -> str:
    """Fixed-width table: class, positives, AUROC [95% CI], AUPRC, metadata-baseline AUROC (when present), CheXNet."""
    name_width = max([len("Class"), len("Mean"), *map(len, class_names)])
    with_meta = all("metadata_auroc" in summary["classes"][name] for name in class_names)
    meta_header = f"  {'Meta':>6}" if with_meta else ""
    header = f"{'Class':<{name_width}}  {'Pos':>6}  {'AUROC [95% CI]':<22}  {'AUPRC':>6}{meta_header}  {'CheXNet':>7}"
    lines = [header, "-" * len(header)]

    def row(name: str, positives: str, auroc: Any, low: Any, high: Any, auprc: Any, meta: Any, chexnet: Any) -> str:
        interval = f"{_fmt(auroc)} [{_fmt(low)}, {_fmt(high)}]"
        published = _fmt(chexnet, digits=4)  # the paper reports four decimals
        meta_cell = f"  {_fmt(meta):>6}" if with_meta else ""
        return f"{name:<{name_width}}  {positives:>6}  {interval:<22}  {_fmt(auprc):>6}{meta_cell}  {published:>7}"

    auprcs = []
    for name in class_names:
        entry = summary["classes"][name]
        auprcs.append(np.nan if entry["auprc"] is None else entry["auprc"])
        lines.append(
            row(name, str(entry["positives"]), entry["auroc"], entry["ci_low"], entry["ci_high"],
                entry["auprc"], entry.get("metadata_auroc"), CHEXNET_AUROC.get(name))
        )
    lines.append("-" * len(header))
    low, high = summary["mean_auroc_ci"]
    mean_auprc = float(mean_over_classes(np.asarray(auprcs, dtype=np.float64)))
    meta_mean = summary.get("metadata_baseline", {}).get("mean_auroc")
    lines.append(row("Mean", "", summary["mean_auroc"], low, high, mean_auprc, meta_mean, CHEXNET_MEAN_AUROC))
    if with_meta:
        lines.append("Meta: AUROC of a logistic regression on age, sex, view and follow-up number alone (no image).")
    lines.append(f"Note: {CHEXNET_FOOTNOTE}")
    return "\n".join(lines)
