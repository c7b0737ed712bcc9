"""The subgroup audit: per-class AUROC, TPR and FPR by sex, age band, view and any other table column.

    groups = {"sex": sex_groups(genders), "age": age_groups(ages), "view": view_groups(views)}
    audit = audit_subgroups(y_true, y_score, patient_ids, groups, thresholds, FINDINGS, n_resamples=1000)
    print(format_subgroup_summary(audit)); write_subgroups(audit, out)     # subgroups.json, subgroups.csv

Each attribute maps every image to a group name, or to "" when it belongs to none (an impossible age: counted
in `excluded`). TPR and FPR are taken at the validation-chosen thresholds; the largest gap between the groups
of an attribute is the underdiagnosis measure of Seyyed-Kalantari et al. 2021 (a lower TPR in one group means
more of its sick patients are missed). A group too small to define AUROC is kept with the reason, never dropped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr.metrics import auroc_per_class, bootstrap_auroc_ci, check_inputs, operating_point_metrics
from cxr.report import to_jsonable

MAX_PLAUSIBLE_AGE = 120  # the 2017 table had a few ages above 140 (data entry errors)
AGE_BANDS = ((0, 19, "0-19"), (20, 39, "20-39"), (40, 59, "40-59"), (60, 79, "60-79"), (80, MAX_PLAUSIBLE_AGE, "80+"))
MIN_POSITIVES_FOR_CI = 10  # below this a CI is reported but flagged as unstable
MAX_CATEGORIES = 8  # a numeric column with more distinct values is cut into quartiles


def age_groups(ages: Any) -> np.ndarray:
    """Age band per image ('0-19' ... '80+'); '' for an unknown age or one above MAX_PLAUSIBLE_AGE."""
    ages = np.asarray(ages, dtype=np.float64)
    bands = np.full(len(ages), "", dtype="<U8")
    for low, high, name in AGE_BANDS:
        bands[(ages >= low) & (ages < high + 1)] = name  # integer ages; 19.5 is still a teenager
    return bands


def impossible_ages(ages: Any) -> int:
    """How many ages are above MAX_PLAUSIBLE_AGE or negative (excluded from the age bands)."""
    ages = np.asarray(ages, dtype=np.float64)
    return int(np.sum((ages > MAX_PLAUSIBLE_AGE) | (ages < 0)))


def sex_groups(genders: Any) -> np.ndarray:
    """'female' / 'male' per image; '' for anything else."""
    genders = np.char.upper(np.asarray(genders, dtype=str))
    return np.where(genders == "F", "female", np.where(genders == "M", "male", ""))


def view_groups(views: Any) -> np.ndarray:
    """'PA' / 'AP' per image; '' for any other view."""
    views = np.char.upper(np.asarray(views, dtype=str))
    return np.where(np.isin(views, ["PA", "AP"]), views, "")


def column_groups(values: Any) -> np.ndarray:
    """Groups of another table column: its values, or quartile ranges of a numeric column with many values."""
    values = np.asarray(values)
    try:
        numbers = values.astype(np.float64)
    except ValueError:
        return np.where(values.astype(str) == "nan", "", values.astype(str))
    finite = np.isfinite(numbers)
    distinct = np.unique(numbers[finite])
    if len(distinct) <= MAX_CATEGORIES:
        return np.where(finite, np.char.mod("%g", np.nan_to_num(numbers)), "")
    edges = np.unique(np.quantile(numbers[finite], [0, 0.25, 0.5, 0.75, 1.0]))
    bins = np.clip(np.searchsorted(edges, numbers, side="right") - 1, 0, len(edges) - 2)
    names = np.array([f"[{edges[i]:g}, {edges[i + 1]:g}{']' if i == len(edges) - 2 else ')'}" for i in range(len(edges) - 1)])
    return np.where(finite, names[bins], "")


def _group_order(attribute: str, names: np.ndarray) -> list[str]:
    """Groups in a reading order: the age bands in age order, everything else sorted."""
    present = set(names.tolist()) - {""}
    if attribute == "age":
        return [name for _, _, name in AGE_BANDS if name in present]
    return sorted(present)


def audit_subgroups(y_true: Any, y_score: Any, patient_ids: Any, groups: dict[str, np.ndarray], thresholds: Any,
                    class_names: Sequence[str], n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per attribute and group: n, positives, AUROC with patient-bootstrap CI, TPR/FPR; the largest gaps."""
    y_true, y_score = check_inputs(y_true, y_score)
    patient_ids = np.asarray(patient_ids)
    attributes: dict[str, Any] = {}
    for attribute, names in groups.items():
        names = np.asarray(names, dtype=str)
        if len(names) != len(y_true):
            raise ValueError(f"subgroup {attribute!r} has {len(names)} entries for {len(y_true)} images")
        entries = {}
        for group in _group_order(attribute, names):
            rows = np.flatnonzero(names == group)
            entries[group] = _group_metrics(y_true[rows], y_score[rows], patient_ids[rows], thresholds, class_names,
                                            n_resamples, seed)
        attributes[attribute] = {"groups": entries, "excluded": int(np.sum(names == "")),
                                 "gaps": _largest_gaps(entries, class_names)}
    return {"attributes": attributes, "n_images": len(y_true), "n_resamples": n_resamples, "seed": seed,
            "thresholds_from": "val", "min_positives_for_ci": MIN_POSITIVES_FOR_CI}


def _group_metrics(y_true: np.ndarray, y_score: np.ndarray, patient_ids: np.ndarray, thresholds: Any,
                   class_names: Sequence[str], n_resamples: int, seed: int) -> dict[str, Any]:
    """One group's numbers per class, with the reason wherever AUROC is undefined."""
    aurocs = auroc_per_class(y_true, y_score)
    nothing = np.full(len(class_names), np.nan)
    ci = {"low": nothing, "high": nothing}
    if n_resamples > 0 and not np.all(np.isnan(aurocs)):
        ci = bootstrap_auroc_ci(y_true, y_score, patient_ids, n_resamples, seed)
    operating = operating_point_metrics(y_true, y_score, thresholds)
    classes = {}
    for c, name in enumerate(class_names):
        known = ~np.isnan(y_true[:, c])
        positives, n = int(np.sum(y_true[known, c] == 1)), int(known.sum())
        if np.isnan(aurocs[c]):
            status = f"AUROC undefined: {positives} positive(s), {n - positives} negative(s)"
        elif positives < MIN_POSITIVES_FOR_CI or n - positives < MIN_POSITIVES_FOR_CI:
            status = f"small: {positives} positive(s), {n - positives} negative(s); CI unstable"
        else:
            status = "ok"
        classes[name] = {"n": n, "positives": positives, "auroc": aurocs[c], "ci_low": ci["low"][c],
                         "ci_high": ci["high"][c], "tpr": operating["sensitivity"][c],
                         "fpr": 1.0 - operating["specificity"][c], "status": status}
    return {"n_images": len(y_true), "n_patients": int(len(np.unique(patient_ids))), "classes": classes}


def _largest_gaps(entries: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """Per class: the largest difference between two groups in AUROC, TPR and FPR, and which groups."""
    gaps = {}
    for name in class_names:
        gaps[name] = {}
        for metric in ("auroc", "tpr", "fpr"):
            values = {group: entry["classes"][name][metric] for group, entry in entries.items()}
            values = {group: value for group, value in values.items() if not np.isnan(value)}
            if len(values) < 2:
                gaps[name][metric] = {"gap": np.nan, "lowest": None, "highest": None}
                continue
            lowest, highest = min(values, key=values.get), max(values, key=values.get)
            gaps[name][metric] = {"gap": values[highest] - values[lowest], "lowest": lowest, "highest": highest}
    return gaps


def largest_gaps(audit: dict[str, Any], metric: str = "tpr", top: int = 5) -> list[tuple[float, str, str, str, str]]:
    """The `top` largest gaps over attributes and findings: (gap, finding, attribute, lowest, highest)."""
    found = []
    for attribute, entry in audit["attributes"].items():
        for finding, gaps in entry["gaps"].items():
            gap = gaps[metric]
            if not np.isnan(gap["gap"]):
                found.append((float(gap["gap"]), finding, attribute, gap["lowest"], gap["highest"]))
    return sorted(found, reverse=True)[:top]


def format_subgroup_summary(audit: dict[str, Any], top: int = 5) -> str:
    """A few lines: the groups with their sizes, and the largest TPR (underdiagnosis) and AUROC gaps."""
    lines = ["Subgroups (thresholds from the validation split):"]
    for attribute, entry in audit["attributes"].items():
        sizes = ", ".join(f"{group} {group_entry['n_images']}" for group, group_entry in entry["groups"].items())
        excluded = f"; {entry['excluded']} image(s) in no group" if entry["excluded"] else ""
        lines.append(f"  {attribute}: {sizes or 'no groups'}{excluded}")
        undefined = sum(value["status"].startswith("AUROC undefined") for group_entry in entry["groups"].values()
                        for value in group_entry["classes"].values())
        if undefined:
            lines.append(f"    {undefined} group x finding cell(s) too small for an AUROC (reported as n/a)")
    for metric, label in (("tpr", "TPR (underdiagnosis)"), ("auroc", "AUROC")):
        gaps = largest_gaps(audit, metric, top)
        if gaps:
            lines.append(f"  largest {label} gaps:")
            lines += [f"    {finding:<18} {attribute:<6} {gap:.3f} ({lowest} lowest, {highest} highest)"
                      for gap, finding, attribute, lowest, highest in gaps]
    return "\n".join(lines)


def write_subgroups(audit: dict[str, Any], out: str | Path) -> list[Path]:
    """subgroups.json (everything) and subgroups.csv (one row per attribute, group and finding)."""
    out = Path(out)
    json_path, csv_path = out / "subgroups.json", out / "subgroups.csv"
    json_path.write_text(json.dumps(to_jsonable(audit), indent=2))
    fields = ("n", "positives", "auroc", "ci_low", "ci_high", "tpr", "fpr", "status")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["attribute", "group", "finding", *fields])
        for attribute, entry in audit["attributes"].items():
            for group, group_entry in entry["groups"].items():
                for finding, values in group_entry["classes"].items():
                    writer.writerow([attribute, group, finding,
                                     *("" if _missing(values[key]) else values[key] for key in fields)])
    return [json_path, csv_path]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
