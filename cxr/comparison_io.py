"""Files of a model comparison: reading and pairing two predictions.csv, writing comparison.json/csv, the table.

    a, b = read_predictions("runs/A/eval-test"), read_predictions("runs/B/eval-test")
    labels, score_a, score_b, patients = pair_predictions(a, b)     # refuses different image sets
    result = compare_predictions(labels, score_a, score_b, patients, FINDINGS)
    write_comparison(result, "comparison/", names=("A", "B")); print(format_comparison(result, FINDINGS))
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.errors import CxrError
from cxr.labels import FINDINGS
from cxr.plots import plot_forest
from cxr.report import _fmt, to_jsonable


class PredictionsError(CxrError, ValueError):
    """A predictions.csv that cannot be read or paired; the message names the file and says what to do."""


def read_predictions(path: str | Path, class_names: Sequence[str] = FINDINGS) -> dict[str, Any]:
    """predictions.csv (or the evaluation folder holding it) -> names, patient ids, probabilities, labels."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        raise PredictionsError(f"{path}: no such file; pass an evaluation folder (RUN/eval-test/) or a checkpoint")
    try:
        table = pd.read_csv(path, dtype={"Image Index": str})
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise PredictionsError(f"{path}: not a readable predictions file ({error})") from error
    needed = ["Image Index", "Patient ID", *class_names, *(f"label_{name}" for name in class_names)]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise PredictionsError(f"{path}: missing column(s) {', '.join(missing)}; it should be a predictions.csv written "
                               "by evaluate.py with every finding (re-run evaluate.py)")
    if table["Image Index"].duplicated().any():
        name = table["Image Index"][table["Image Index"].duplicated()].iat[0]
        raise PredictionsError(f"{path}: image {name} is listed twice")
    probabilities = table[list(class_names)].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(probabilities)):
        row = int(np.argwhere(~np.isfinite(probabilities))[0, 0])
        raise PredictionsError(f"{path}, line {row + 2}: a probability is empty or not a number")
    return {"path": path, "names": table["Image Index"].to_numpy(dtype=str),
            "patient_ids": table["Patient ID"].to_numpy(), "probabilities": probabilities,
            "labels": table[[f"label_{name}" for name in class_names]].to_numpy(dtype=np.float64)}


def pair_predictions(a: dict[str, Any], b: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores of a, scores of b, patient ids) in a's image order; an error unless both cover the same images."""
    only_a = np.setdiff1d(a["names"], b["names"])
    only_b = np.setdiff1d(b["names"], a["names"])
    if len(only_a) or len(only_b):
        raise PredictionsError(
            f"{a['path']} ({len(a['names'])} images) and {b['path']} ({len(b['names'])} images) do not cover the same "
            f"images: {len(only_a)} only in the first (e.g. {', '.join(only_a[:3])}), {len(only_b)} only in the second "
            f"(e.g. {', '.join(only_b[:3])}). Evaluate both models on the same --data-dir and --split.")
    order = pd.Index(b["names"]).get_indexer(a["names"])
    labels_b = b["labels"][order]
    if not np.array_equal(np.isnan(a["labels"]), np.isnan(labels_b)) or \
            not np.array_equal(np.nan_to_num(a["labels"]), np.nan_to_num(labels_b)):
        raise PredictionsError(f"{a['path']} and {b['path']} hold different labels for the same images; "
                               "were they evaluated on different label tables?")
    if not np.array_equal(a["patient_ids"], b["patient_ids"][order]):
        raise PredictionsError(f"{a['path']} and {b['path']} give the same images different patient ids")
    return a["labels"], a["probabilities"], b["probabilities"][order], a["patient_ids"]


COLUMNS = ("auroc_a", "auroc_b", "delta", "ci_low", "ci_high", "bootstrap_p", "bootstrap_holm_p", "delong_z", "delong_p",
           "delong_holm_p", "n", "positives")


def write_comparison(result: dict[str, Any], out: str | Path, class_names: Sequence[str] = FINDINGS,
                     names: tuple[str, str] = ("A", "B")) -> list[Path]:
    """comparison.json, comparison.csv (one row per finding and the mean) and forest.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(to_jsonable({**result, "models": {"A": names[0], "B": names[1]}}), indent=2))
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["finding", *COLUMNS])
        for name in class_names:
            writer.writerow([name, *(_cell(result["classes"][name][key]) for key in COLUMNS)])
        writer.writerow(["mean", *(_cell(result["mean"].get(key)) for key in COLUMNS)])
    rows = [(name, result["classes"][name]["delta"], result["classes"][name]["ci_low"], result["classes"][name]["ci_high"])
            for name in class_names]
    rows.append(("Mean", result["mean"]["delta"], result["mean"]["ci_low"], result["mean"]["ci_high"]))
    plot_forest(rows, out / "forest.png", title=f"A = {names[0]}, B = {names[1]}")
    return [out / "comparison.json", out / "comparison.csv", out / "forest.png"]


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else value


def _p(value: Any) -> str:
    if value is None or np.isnan(value):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def format_comparison(result: dict[str, Any], class_names: Sequence[str] = FINDINGS, names: tuple[str, str] = ("A", "B")) -> str:
    """The printed table: AUROC of both, ΔAUROC [95% CI], bootstrap p, DeLong p and its Holm adjustment."""
    width = max(len("Finding"), *map(len, class_names))
    header = (f"{'Finding':<{width}}  {'A':>6}  {'B':>6}  {'Δ [95% CI]':<25}  {'boot p':>7}  {'DeLong p':>8}  {'Holm p':>7}")
    lines = [f"A = {names[0]}", f"B = {names[1]}", header, "-" * len(header)]
    for name in class_names:
        entry = result["classes"][name]
        interval = f"{_fmt(entry['delta'], 4)} [{_fmt(entry['ci_low'], 4)}, {_fmt(entry['ci_high'], 4)}]"
        lines.append(f"{name:<{width}}  {_fmt(entry['auroc_a']):>6}  {_fmt(entry['auroc_b']):>6}  {interval:<25}  "
                     f"{_p(entry['bootstrap_p']):>7}  {_p(entry['delong_p']):>8}  {_p(entry['delong_holm_p']):>7}")
    mean = result["mean"]
    lines.append("-" * len(header))
    interval = f"{_fmt(mean['delta'], 4)} [{_fmt(mean['ci_low'], 4)}, {_fmt(mean['ci_high'], 4)}]"
    lines.append(f"{'Mean':<{width}}  {_fmt(mean['auroc_a']):>6}  {_fmt(mean['auroc_b']):>6}  {interval:<25}  "
                 f"{_p(mean['bootstrap_p']):>7}  {'':>8}  {'':>7}")
    lines.append(f"{result['n_images']} images, {result['n_patients']} patients, {result['n_resamples']} paired patient "
                 "resamples; Holm over the findings; DeLong ignores that patients have several images.")
    return "\n".join(lines)
