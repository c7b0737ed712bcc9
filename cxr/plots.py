"""Evaluation figures: ROC curves, reliability diagrams, subgroup AUROCs, a forest plot (matplotlib, Agg).

Example::

    from cxr.labels import FINDINGS
    from cxr.plots import plot_reliability, plot_roc_curves

    plot_roc_curves(y_true, y_score, FINDINGS, "runs/exp1/roc.png")
    plot_reliability(y_true, calibrated, FINDINGS, "runs/exp1/reliability.png", before=y_score)
    plot_forest([("Mass", 0.02, -0.01, 0.05), ("Mean", 0.01, 0.0, 0.02)], "comparison/forest.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless servers and torchrun workers have no display

import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from cxr.metrics import (  # noqa: E402
    auroc_per_class,
    check_inputs,
    expected_calibration_error,
    known_subset,
    reliability_curve,
)


def _panel_grid(n_panels: int) -> tuple[plt.Figure, list[plt.Axes]]:
    """A near-square grid of small panels (4x4 for 14 classes) with the spare panels hidden."""
    n_cols = math.ceil(math.sqrt(n_panels))
    n_rows = math.ceil(n_panels / n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(3.0 * n_cols, 3.0 * n_rows), squeeze=False)
    flat = list(axes.ravel())
    for spare in flat[n_panels:]:
        spare.set_visible(False)
    return figure, flat[:n_panels]


def _style_unit_square(axis: plt.Axes, xlabel: str, ylabel: str) -> None:
    """Limits, the diagonal reference line and small labels shared by both kinds of panel."""
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.set_xlabel(xlabel, fontsize=8)
    axis.set_ylabel(ylabel, fontsize=8)
    axis.tick_params(labelsize=7)


def _mark_not_available(axis: plt.Axes, reason: str) -> None:
    """Panel text for a class with nothing to plot."""
    axis.text(0.5, 0.5, f"n/a\n{reason}", ha="center", va="center", fontsize=9, transform=axis.transAxes)


def _save(figure: plt.Figure, path: str | Path) -> Path:
    """Write the figure as PNG (creating the folder) and close it so repeated calls do not leak memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_roc_curves(y_true: Any, y_score: Any, class_names: Sequence[str], path: str | Path) -> Path:
    """Grid of per-class ROC curves with the AUROC in each title; degenerate classes show 'n/a'."""
    y_true, y_score = check_inputs(y_true, y_score)
    aurocs = auroc_per_class(y_true, y_score)
    figure, axes = _panel_grid(len(class_names))
    for c, (axis, name) in enumerate(zip(axes, class_names)):
        _style_unit_square(axis, "1 - specificity", "sensitivity")
        if np.isnan(aurocs[c]):
            axis.set_title(f"{name}\nAUC n/a", fontsize=9)
            _mark_not_available(axis, "one label value only")
            continue
        labels, scores = known_subset(y_true[:, c], y_score[:, c])
        false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
        axis.plot(false_positive_rate, true_positive_rate, linewidth=1.2)
        axis.set_title(f"{name}\nAUC {aurocs[c]:.3f}", fontsize=9)
    return _save(figure, path)


def plot_reliability(
    y_true: Any, y_score: Any, class_names: Sequence[str], path: str | Path, n_bins: int = 10, before: Any = None
) -> Path:
    """Grid of per-class reliability diagrams with the ECE in each title; `before` adds the uncalibrated curve."""
    y_true, y_score = check_inputs(y_true, y_score, score_name="y_prob")
    errors = expected_calibration_error(y_true, y_score, n_bins)
    errors_before = None if before is None else expected_calibration_error(y_true, before, n_bins)
    figure, axes = _panel_grid(len(class_names))
    for c, (axis, name) in enumerate(zip(axes, class_names)):
        _style_unit_square(axis, "mean predicted", "observed frequency")
        if np.isnan(errors[c]):
            axis.set_title(f"{name}\nECE n/a", fontsize=9)
            _mark_not_available(axis, "no known labels")
            continue
        curves = [("calibrated" if before is not None else None, y_score, "C0")]
        if before is not None:
            curves.insert(0, ("raw", np.asarray(before, dtype=np.float64), "C1"))
        for label, scores, color in curves:
            curve = reliability_curve(y_true[:, c], scores[:, c], n_bins)
            filled = curve["count"] > 0
            axis.plot(curve["mean_predicted"][filled], curve["observed_frequency"][filled], marker="o", markersize=3,
                      color=color, label=label)
        if before is None:
            axis.set_title(f"{name}\nECE {errors[c]:.3f}", fontsize=9)
        else:
            axis.set_title(f"{name}\nECE {errors_before[c]:.3f} -> {errors[c]:.3f}", fontsize=9)
            axis.legend(fontsize=6, loc="upper left")
    return _save(figure, path)


def plot_forest(rows: Sequence[tuple[str, float, float, float]], path: str | Path, title: str = "") -> Path:
    """Forest plot of (name, delta, low, high) rows: a point and its CI per row, a line at zero."""
    figure, axis = plt.subplots(figsize=(6.0, 0.35 * len(rows) + 1.2))
    positions = np.arange(len(rows))[::-1]
    for position, (name, delta, low, high) in zip(positions, rows):
        if np.isnan(delta):
            axis.text(0, position, "n/a", ha="center", va="center", fontsize=8)
            continue
        bold = name.lower() == "mean"
        axis.errorbar(delta, position, xerr=[[delta - low], [high - delta]] if not np.isnan(low) else None,
                      fmt="D" if bold else "o", color="black" if bold else "C0", capsize=3, markersize=5)
    axis.axvline(0, color="grey", linestyle="--", linewidth=0.8)
    axis.set_yticks(positions, [name for name, *_ in rows], fontsize=8)
    axis.set_xlabel("ΔAUROC (A - B) with 95% CI", fontsize=9)
    axis.set_title(title, fontsize=9)
    return _save(figure, path)


def plot_subgroups(audit: dict, class_names: Sequence[str], path: str | Path) -> Path:
    """Per finding, the AUROC of every subgroup with its CI, grouped and coloured by attribute."""
    figure, axes = _panel_grid(len(class_names))
    attributes = list(audit["attributes"].items())
    for axis, name in zip(axes, class_names):
        labels, position = [], 0
        for color, (attribute, entry) in enumerate(attributes):
            for group, group_entry in entry["groups"].items():
                values = group_entry["classes"][name]
                auroc, low, high = (np.nan if values[key] is None else values[key] for key in ("auroc", "ci_low", "ci_high"))
                if np.isnan(auroc):
                    axis.plot(0.5, position, marker="x", color="grey")
                else:
                    error = None if np.isnan(low) else [[auroc - low], [high - auroc]]
                    axis.errorbar(auroc, position, xerr=error, fmt="o", color=f"C{color}", markersize=3, capsize=2)
                labels.append(f"{attribute} {group}")
                position += 1
        axis.set_xlim(0.0, 1.0)
        axis.axvline(0.5, color="grey", linestyle=":", linewidth=0.8)
        axis.set_yticks(range(position), labels, fontsize=5)
        axis.invert_yaxis()
        axis.tick_params(axis="x", labelsize=6)
        axis.set_title(f"{name} AUROC", fontsize=8)
    return _save(figure, path)
