"""Evaluation figures: per-class ROC curves and reliability diagrams as PNG grids (matplotlib, Agg).

Example::

    from cxr.labels import FINDINGS
    from cxr.plots import plot_reliability, plot_roc_curves

    plot_roc_curves(y_true, y_score, FINDINGS, "runs/exp1/roc.png")
    plot_reliability(y_true, y_score, FINDINGS, "runs/exp1/reliability.png")
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
    y_true: Any, y_score: Any, class_names: Sequence[str], path: str | Path, n_bins: int = 10
) -> Path:
    """Grid of per-class reliability diagrams with the ECE in each title; classes without labels show 'n/a'."""
    y_true, y_score = check_inputs(y_true, y_score, score_name="y_prob")
    errors = expected_calibration_error(y_true, y_score, n_bins)
    figure, axes = _panel_grid(len(class_names))
    for c, (axis, name) in enumerate(zip(axes, class_names)):
        _style_unit_square(axis, "mean predicted", "observed frequency")
        if np.isnan(errors[c]):
            axis.set_title(f"{name}\nECE n/a", fontsize=9)
            _mark_not_available(axis, "no known labels")
            continue
        curve = reliability_curve(y_true[:, c], y_score[:, c], n_bins)
        filled = curve["count"] > 0
        axis.plot(curve["mean_predicted"][filled], curve["observed_frequency"][filled], marker="o", markersize=3)
        axis.set_title(f"{name}\nECE {errors[c]:.3f}", fontsize=9)
    return _save(figure, path)
