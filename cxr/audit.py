"""The evaluation report after prediction: calibration, thresholds, summary, metadata baseline, subgroups, headline.

    groups = subgroup_columns("sex,age,view", data, rows)
    report = evaluation_report(validation, result, patient_ids, groups, train_meta, eval_meta, FINDINGS)
    write_report_files(out, report); print(format_report_notes(report))

One function computes everything from prediction arrays, so that evaluate.py stays wiring and the benchmark
times exactly what a user runs. Thresholds are chosen on temperature-scaled validation probabilities; scaling
keeps each class's order, so AUROC is the same before and after.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np

import cxr
from cxr.calibration import apply_calibration, calibration_report, fit_temperatures, save_calibration
from cxr.data import DataError, NihData, read_table_columns
from cxr.metrics import auroc_per_class, mean_auroc, select_thresholds
from cxr.plots import plot_subgroups
from cxr.report import summarize, to_jsonable
from cxr.shortcut import (
    FEATURE_NAMES,
    MAX_PLAUSIBLE_AGE,
    baseline_coefficients,
    fit_metadata_baseline,
    metadata_features,
    score_metadata_baseline,
)
from cxr.subgroups import (
    age_groups,
    audit_subgroups,
    column_groups,
    format_subgroup_summary,
    impossible_ages,
    sex_groups,
    view_groups,
    write_subgroups,
)

BUILT_IN_GROUPS = {"sex": "Patient Gender", "age": "Patient Age", "view": "View Position", "follow-up": "Follow-up #"}


def metadata_of(data: NihData, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The table's age, sex, view and follow-up number for `rows`."""
    index = data.index
    return {"ages": index.ages[rows], "genders": index.genders[rows], "views": index.views[rows],
            "follow_ups": index.follow_ups[rows]}


def subgroup_columns(spec: str, data: NihData, rows: np.ndarray) -> dict[str, np.ndarray]:
    """--subgroups 'sex,age,view,<table column>' -> attribute -> group name per row ('' = none); 'none' -> {}."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["none"]:
        return {}
    meta = metadata_of(data, rows)
    groups: dict[str, np.ndarray] = {}
    others = [name for name in names if name not in BUILT_IN_GROUPS]
    if others:
        try:
            table = read_table_columns(data.table_path, others)
        except DataError as error:
            raise DataError(f"--subgroups {spec}: {error}; built-in groups are {', '.join(BUILT_IN_GROUPS)}") from None
        position = {name: row for row, name in enumerate(table["Image Index"].str.strip())}
        order = np.array([position[name] for name in data.index.image_names[rows]], dtype=np.int64)
    for name in names:
        if name == "sex":
            groups[name] = sex_groups(meta["genders"])
        elif name == "age":
            groups[name] = age_groups(meta["ages"])
        elif name == "view":
            groups[name] = view_groups(meta["views"])
        elif name == "follow-up":
            groups[name] = column_groups(meta["follow_ups"])
        else:
            values = table[name].to_numpy(dtype=str)[order]
            numeric = np.char.strip(values)
            groups[name] = column_groups(_maybe_numeric(numeric))
    return groups


def _maybe_numeric(values: np.ndarray) -> np.ndarray:
    """Float values when every non-empty cell is a number, else the strings."""
    try:
        return np.where(values == "", "nan", values).astype(np.float64)
    except ValueError:
        return values


def evaluation_report(validation: dict, result: dict, patient_ids: np.ndarray, groups: dict[str, np.ndarray],
                      train_meta: dict | None, eval_meta: dict | None, class_names: list[str] | tuple[str, ...],
                      threshold_method: str = "youden", n_resamples: int = 1000, seed: int = 0,
                      calibrate: bool = True, same_split: bool = False) -> dict[str, Any]:
    """Everything evaluate.py reports from val and evaluated-split predictions ({'labels', 'probabilities'})."""
    raw = np.asarray(result["probabilities"], dtype=np.float64)
    calibration = fit_temperatures(validation["labels"], validation["probabilities"], class_names) if calibrate else None
    val_calibrated = apply_calibration(validation["probabilities"], calibration, class_names) if calibrate else validation["probabilities"]
    calibrated = apply_calibration(raw, calibration, class_names) if calibrate else raw
    thresholds = select_thresholds(validation["labels"], val_calibrated, threshold_method)
    summary = summarize(result["labels"], calibrated, patient_ids, class_names, thresholds, n_resamples=n_resamples, seed=seed)
    summary["calibration"] = to_jsonable(calibration_report(result["labels"], raw, calibrated, class_names, calibration))
    if calibrate:
        summary["calibration"]["note"] += "; thresholds were chosen on calibrated validation probabilities"
    val_mean = mean_auroc(auroc_per_class(validation["labels"], validation["probabilities"]))
    test_mean = summary["mean_auroc"]
    summary["headline"] = to_jsonable({
        "val_mean_auroc": val_mean, "mean_auroc": test_mean,
        "val_minus_evaluated": None if same_split or test_mean is None else val_mean - test_mean,
        "note": "validation patients come from train_val; on the official split it tends to overstate test AUROC "
                "(by about 0.03 in published model cards): quote the test figure"})
    if train_meta is not None and eval_meta is not None:
        summary["metadata_baseline"] = metadata_baseline(train_meta, eval_meta, result["labels"], class_names, seed)
        for name in class_names:
            summary["classes"][name]["metadata_auroc"] = summary["metadata_baseline"]["auroc"][name]
    audit = audit_subgroups(result["labels"], calibrated, patient_ids, groups, thresholds, class_names, n_resamples,
                            seed) if groups else None
    if audit is not None and eval_meta is not None and "age" in groups:
        audit["attributes"]["age"]["impossible_ages"] = impossible_ages(eval_meta["ages"])
    return {"summary": summary, "thresholds": thresholds, "calibration": calibration, "probabilities": calibrated,
            "raw_probabilities": raw, "subgroups": audit, "class_names": list(class_names)}


def metadata_baseline(train_meta: dict, eval_meta: dict, eval_labels: np.ndarray, class_names, seed: int = 0) -> dict:
    """Fit the logistic regression on the training split's metadata (and its 'labels'); AUROC on the evaluated split."""
    train_ages = np.asarray(train_meta["ages"], dtype=np.float64)
    plausible = train_ages[np.isfinite(train_ages) & (train_ages >= 0) & (train_ages <= MAX_PLAUSIBLE_AGE)]
    fill = float(np.median(plausible)) if len(plausible) else 0.0

    def features(meta: dict) -> np.ndarray:
        return metadata_features(meta["ages"], meta["genders"], meta["views"], meta["follow_ups"], age_fill=fill)

    baseline = fit_metadata_baseline(features(train_meta), train_meta["labels"], seed)
    aurocs = auroc_per_class(eval_labels, score_metadata_baseline(baseline, features(eval_meta)))
    return to_jsonable({"features": list(FEATURE_NAMES), "fitted_on": "train", "model": "logistic regression per finding",
                        "auroc": dict(zip(class_names, aurocs)), "mean_auroc": mean_auroc(aurocs),
                        "coefficients": baseline_coefficients(baseline, class_names)})


def describe_run(args: Any, config: Any, data: NihData, checkpoint: dict) -> dict[str, Any]:
    """What a reader of metrics.json needs to know to interpret its numbers."""
    split_method = next((note[len("split: "):] for note in data.notes if note.startswith("split: ")), None)
    return {"split": args.split, "split_method": split_method, "views": config.views,
            "skip_missing": bool(config.skip_missing), "skipped_missing_images": int(data.dropped_missing),
            "image_size": config.image_size, "tta": args.tta, "checkpoint_epoch": checkpoint.get("epoch"),
            "calibration": args.calibration, "cxr_version": cxr.__version__, "git_commit": git_commit()}


def git_commit() -> str | None:
    """The commit of the checkout cxr runs from, or None outside a git checkout (an installed package)."""
    try:
        output = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(cxr.__file__).resolve().parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if output.returncode != 0:
        return None
    return output.stdout.strip() or None


def write_report_files(out: Path, report: dict[str, Any]) -> list[Path]:
    """calibration.json, subgroups.json, subgroups.csv and subgroups.png (those that apply)."""
    written = []
    if report["calibration"] is not None:
        written.append(save_calibration(report["calibration"], out / "calibration.json"))
    if report["subgroups"] is not None:
        written += write_subgroups(report["subgroups"], out)
        written.append(plot_subgroups(to_jsonable(report["subgroups"]), report["class_names"], out / "subgroups.png"))
    return written


def format_report_notes(report: dict[str, Any]) -> str:
    """The printed lines after the table: headline gap, metadata baseline, calibration, subgroup summary."""
    summary, lines = report["summary"], []
    headline = summary["headline"]
    if headline["val_minus_evaluated"] is not None:
        lines.append(f"Validation mean AUROC {headline['val_mean_auroc']:.3f} vs this split {headline['mean_auroc']:.3f}: "
                     f"gap {headline['val_minus_evaluated']:+.3f} (quote the held-out figure, not the validation one)")
    if "metadata_baseline" in summary and summary["metadata_baseline"]["mean_auroc"] is not None:
        lines.append(f"Metadata-only baseline (age, sex, view, follow-up; fitted on train): mean AUROC "
                     f"{summary['metadata_baseline']['mean_auroc']:.3f} (column 'Meta')")
    calibration = summary["calibration"]
    if calibration["method"] != "none" and calibration["mean_ece_before"] is not None:
        lines.append(f"Temperature scaling (fitted on val): mean ECE {calibration['mean_ece_before']:.3f} -> "
                     f"{calibration['mean_ece_after']:.3f}, mean Brier {calibration['mean_brier_before']:.4f} -> "
                     f"{calibration['mean_brier_after']:.4f}")
    if report["subgroups"] is not None:
        text = format_subgroup_summary(report["subgroups"])
        age = report["subgroups"]["attributes"].get("age")
        if age is not None and age.get("impossible_ages"):
            text += f"\n  age: {age['impossible_ages']} image(s) with an impossible age (> {MAX_PLAUSIBLE_AGE}) left out"
        lines.append(text)
    return "\n".join(lines)
