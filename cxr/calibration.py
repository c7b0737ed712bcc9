"""Temperature scaling per class (Guo et al. 2017), fitted on the validation split by NLL, and its report.

    calibration = fit_temperatures(val_labels, val_probabilities, FINDINGS)       # JSON-ready dict
    calibrated = apply_calibration(test_probabilities, calibration)               # or logits=...
    save_calibration(calibration, out / "calibration.json"); load_calibration(out / "calibration.json")
    path = find_calibration("runs/X/best.pt")                                     # runs/X/eval-*/calibration.json
    report = calibration_report(test_labels, test_probabilities, calibrated, FINDINGS)  # ECE/Brier before, after

Each class's probability becomes sigmoid(logit / T_c). Dividing a logit by a positive constant keeps the order of
the scores, so AUROC and AUPRC do not change; thresholds chosen on calibrated probabilities select the same images
as the matching thresholds on raw ones. T > 1 softens an overconfident class, T < 1 sharpens an underconfident one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from cxr.errors import CxrError
from cxr.metrics import check_inputs, expected_calibration_error, mean_over_classes

PROBABILITY_CLIP = 1e-7  # float32 sigmoid saturates: keep logit() finite
LOG_TEMPERATURE_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]


class CalibrationError(CxrError, ValueError):
    """A calibration file that does not fit the predictions; the message names the file and what to do."""


def to_logits(probabilities: Any) -> np.ndarray:
    """logit(p) with p clipped to [1e-7, 1 - 1e-7]."""
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return np.log(probabilities) - np.log1p(-probabilities)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T), computed stably."""
    scaled = logits / temperature
    return float(np.mean(np.logaddexp(0.0, scaled) - labels * scaled))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The T > 0 minimizing the NLL of sigmoid(logits / T) on one class (bool labels); 1.0 for one label value."""
    labels = np.asarray(labels, dtype=np.float64)
    if len(labels) == 0 or labels.min() == labels.max():
        return 1.0  # nothing to learn the spread from
    result = minimize_scalar(lambda log_t: _nll(logits, labels, float(np.exp(log_t))), bounds=LOG_TEMPERATURE_BOUNDS,
                             method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def fit_temperatures(y_true: Any, y_prob: Any, class_names: Sequence[str], fitted_on: str = "val") -> dict[str, Any]:
    """Per-class temperatures fitted on (y_true, y_prob) as the dict written to calibration.json."""
    y_true, y_prob = check_inputs(y_true, y_prob, "y_prob")
    logits = to_logits(y_prob)
    temperatures = {}
    for c, name in enumerate(class_names):
        known = ~np.isnan(y_true[:, c])
        temperatures[name] = fit_temperature(y_true[known, c], logits[known, c])
    return {"method": "temperature", "fitted_on": fitted_on, "objective": "binary NLL per class",
            "formula": "p = sigmoid(logit(p_raw) / T)", "temperatures": temperatures,
            "n_images": int(len(y_true))}


def apply_calibration(values: Any, calibration: dict[str, Any] | None, class_names: Sequence[str] | None = None,
                      logits: bool = False) -> np.ndarray:
    """Calibrated probabilities [N, C] from probabilities (or `logits=True`); `calibration` None returns them as is."""
    values = np.asarray(values, dtype=np.float64)
    raw_logits = values if logits else to_logits(values)
    if calibration is None:
        return 1.0 / (1.0 + np.exp(-raw_logits))
    temperatures = calibration.get("temperatures", {})
    if class_names is None:
        class_names = list(temperatures)
    missing = [name for name in class_names if name not in temperatures]
    if missing or raw_logits.shape[-1] != len(class_names):
        raise CalibrationError(f"the calibration has temperatures for {list(temperatures)} but the predictions have "
                               f"{raw_logits.shape[-1]} columns{f' (missing {missing})' if missing else ''}; "
                               "refit it with evaluate.py on this model")
    scale = np.array([float(temperatures[name]) for name in class_names])
    return 1.0 / (1.0 + np.exp(-raw_logits / scale))


def save_calibration(calibration: dict[str, Any], path: str | Path) -> Path:
    """Write calibration.json."""
    path = Path(path)
    path.write_text(json.dumps(calibration, indent=2))
    return path


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read calibration.json; a file without positive temperatures is a CalibrationError naming it."""
    path = Path(path)
    try:
        calibration = json.loads(path.read_text())
        temperatures = {name: float(value) for name, value in calibration["temperatures"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CalibrationError(f"{path}: not a calibration file ({error}); rerun evaluate.py to write it") from error
    bad = [name for name, value in temperatures.items() if not value > 0]
    if bad:
        raise CalibrationError(f"{path}: temperatures must be positive, not for {bad}; rerun evaluate.py")
    calibration["temperatures"] = temperatures
    return calibration


def find_calibration(checkpoint_path: str | Path) -> Path | None:
    """The newest calibration.json in the evaluation folders (eval-*) beside a checkpoint, or None."""
    found = sorted(Path(checkpoint_path).parent.glob("eval-*/calibration.json"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def brier_score(y_true: Any, y_prob: Any) -> np.ndarray:
    """Per-class mean squared error of the probabilities over known labels; NaN for a class without labels."""
    y_true, y_prob = check_inputs(y_true, y_prob, "y_prob")
    squared = (y_prob - np.nan_to_num(y_true)) ** 2
    known = ~np.isnan(y_true)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(known.any(axis=0), np.where(known, squared, 0).sum(axis=0) / known.sum(axis=0), np.nan)


def calibration_report(y_true: Any, raw: Any, calibrated: Any, class_names: Sequence[str],
                       calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """ECE and Brier score per class and averaged, before and after calibration (JSON-ready but for NaN)."""
    before_ece, after_ece = expected_calibration_error(y_true, raw), expected_calibration_error(y_true, calibrated)
    before_brier, after_brier = brier_score(y_true, raw), brier_score(y_true, calibrated)
    classes = {name: {"temperature": None if calibration is None else calibration["temperatures"].get(name),
                      "ece_before": before_ece[c], "ece_after": after_ece[c],
                      "brier_before": before_brier[c], "brier_after": after_brier[c]}
               for c, name in enumerate(class_names)}
    return {"method": "none" if calibration is None else calibration["method"],
            "fitted_on": None if calibration is None else calibration["fitted_on"], "classes": classes,
            "mean_ece_before": float(mean_over_classes(before_ece)), "mean_ece_after": float(mean_over_classes(after_ece)),
            "mean_brier_before": float(mean_over_classes(before_brier)),
            "mean_brier_after": float(mean_over_classes(after_brier)),
            "note": "temperature scaling keeps each class's ranking: AUROC is unchanged"}
