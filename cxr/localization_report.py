"""The localization report: saliency maps of several methods scored against ground-truth boxes (Wang et al. 2017).

    explainers = {e.label: e for e in (Explainer(model, prep, policy, "gradcam"), Explainer(model, prep, policy, "occlusion"))}
    scores = localization_report(explainers, data, read_box_list(path), Path("runs/X/localization"), batch_size=16)
    scores["methods"]["occlusion"]["overall"]["pointing"], scores["default_method"]

Every box image on disk is scored, by every method on the same images: accuracy at IoBB > T and IoU > T of
the best predicted box, Wang et al.'s average false positives per image (AFP) at each IoBB threshold, and the
pointing game (rate, hits and boxes), per class and overall. The first method is the default: its scores are
also the top-level `overall` / `per_class` of localization.json, and its contact sheet (worst and best cases)
is contact_sheet.png; every method has contact_sheet_<method>.png. Box coordinates are in NIH's 1024 x 1024
space (cxr.data.BOX_SPACE).
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from cxr.data import BOX_SPACE, DataError, NihData
from cxr.explainer import Explainer, batches, write_image, write_json
from cxr.labels import FINDINGS
from cxr.localization import average_false_positives, iou, localization_scores, pointing_hit
from cxr.overlays import overlay

__all__ = ["localization_report", "format_localization", "write_json"]
from cxr.transforms import read_xray


def localization_report(explainers: dict[str, Explainer] | Explainer, data: NihData, truth: dict, out: Path,
                        batch_size: int) -> dict:
    """Score every box image on disk with every method: IoBB/IoU accuracy, AFP and pointing game."""
    if isinstance(explainers, Explainer):
        explainers = {explainers.label: explainers}
    out.mkdir(parents=True, exist_ok=True)
    position = {name: row for row, name in enumerate(data.index.image_names)}
    split_of = {int(row): split for split, rows in data.splits.items() for row in rows}
    names = [name for name in truth if name in position]
    if not names:
        raise DataError(f"none of the {len(truth)} images in the box list is in {data.data_dir}")
    records: dict[str, list] = {label: [] for label in explainers}
    groups: dict[str, list] = {label: [] for label in explainers}
    cases: dict[str, list] = {label: [] for label in explainers}
    for chunk in batches(names, batch_size):
        grays = [read_xray(data.index.image_path(position[name])) for name in chunk]
        for label, explainer in explainers.items():
            maps, _ = explainer(grays)
            scale = BOX_SPACE / maps.shape[-1]
            for name, gray, image_maps in zip(chunk, grays, maps):
                by_finding: dict[str, list] = {}
                for finding, box in truth[name]:
                    by_finding.setdefault(finding, []).append(box)
                for finding, gt_boxes in by_finding.items():
                    heatmap = image_maps[FINDINGS.index(finding)]
                    predicted = explainer.boxes(heatmap, (scale, scale))
                    groups[label].append({"image": name, "finding": finding, "gt_boxes": gt_boxes, "pred_boxes": predicted})
                    for box in gt_boxes:
                        records[label].append({"finding": finding, "gt_box": box, "pred_boxes": predicted,
                                               "heatmap": heatmap, "scale": scale})
                        best = max((iou(p, box) for p in predicted), default=0.0)
                        hit = pointing_hit(heatmap, tuple(v / scale for v in box))
                        cases[label].append((best + hit, name, finding, gray, heatmap, predicted, box,
                                             split_of.get(position[name], "none")))
    methods = {}
    for label, explainer in explainers.items():
        scores = localization_scores(records[label])
        afp = average_false_positives(groups[label])
        scores["overall"]["afp"] = afp["overall"]
        for finding, values in afp["per_class"].items():
            scores["per_class"][finding]["afp"] = values
        scores["layer"], scores["method"] = explainer.layer, explainer.method
        methods[label] = scores
    first = next(iter(explainers))
    membership: dict[str, int] = {}
    for case in cases[first]:
        membership[case[-1]] = membership.get(case[-1], 0) + 1
    report = {**methods[first], "default_method": first, "methods": methods, "boxes_by_split": membership,
              "images": len(names), "images_in_box_list": len(truth),
              "output_stride": explainers[first].output_stride}
    write_json(out / "localization.json", report)
    for label in explainers:
        contact_sheet(cases[label], out / f"contact_sheet_{file_label(label)}.png", label)
    contact_sheet(cases[first], out / "contact_sheet.png", first)
    print(format_localization(report))
    return report


def file_label(label: str) -> str:
    """A method label as a file-name part: `layercam@features.denseblock2` -> `layercam_features_denseblock2`."""
    return re.sub(r"[^A-Za-z0-9+]+", "_", label).strip("_")


def contact_sheet(cases: list, path: Path, method: str, per_row: int = 4, tile: int = 384) -> None:
    """The worst and best cases (by best IoU plus pointing hit), one row of each at least."""
    cases = sorted(cases, key=lambda case: case[0])
    count = min(per_row * 2, len(cases))
    chosen = cases[: count // 2 + count % 2] + cases[len(cases) - count // 2:] if len(cases) > count else cases
    tiles = []
    for _, name, finding, gray, heatmap, predicted, box, split in chosen:
        scale = gray.shape[1] / BOX_SPACE
        pixels = [dict(b, x=b["x"] * scale, y=b["y"] * scale, w=b["w"] * scale, h=b["h"] * scale) for b in predicted]
        picture = overlay(gray, heatmap, pixels, [tuple(v * scale for v in box)], label=finding,
                          title=f"{name} {finding} ({split}) {method}")
        height = int(round(picture.shape[0] * tile / picture.shape[1]))
        tiles.append(cv2.resize(picture, (tile, height), interpolation=cv2.INTER_AREA))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    while len(tiles) % per_row:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    write_image(path, np.concatenate(rows, axis=0))


def format_method(scores: dict) -> str:
    """One method's table: per class and overall IoBB / IoU accuracy, AFP per IoBB threshold, pointing game."""
    iobb_keys = list(scores["overall"]["iobb"])
    iou_keys = list(scores["overall"]["iou"])
    header = f"{'Finding':20s} {'boxes':>5s} " + " ".join(f"IoBB>{k:<4s}" for k in iobb_keys) + " " + \
        " ".join(f"IoU>{k:<4s}" for k in iou_keys) + " " + " ".join(f"AFP@{k:<4s}" for k in iobb_keys) + "  pointing"
    lines = [header, "-" * len(header)]
    rows = list(scores["per_class"].items()) + [("Overall", scores["overall"])]
    for name, row in rows:
        pointing = row.get("pointing")
        shown = "n/a" if pointing is None else f"{pointing:.3f} ({row['pointing_hits']}/{row['pointing_boxes']})"
        lines.append(f"{name:20s} {row['boxes']:5d} " + " ".join(f"{row['iobb'][k]:9.3f}" for k in iobb_keys) + " "
                     + " ".join(f"{row['iou'][k]:8.3f}" for k in iou_keys) + " "
                     + " ".join(f"{row['afp'][k]:8.3f}" for k in iobb_keys) + f"  {shown}")
    return "\n".join(lines)


def format_localization(report: dict) -> str:
    """Every method's table, then the pointing game of all methods side by side, per class and overall."""
    methods = report["methods"]
    parts = []
    for label, scores in methods.items():
        parts += [f"\n{label} (layer: {scores['layer']})", format_method(scores)]
    labels = list(methods)
    width = max(12, *(len(label) for label in labels))
    header = f"{'pointing game':20s} " + " ".join(f"{label:>{width}s}" for label in labels)
    lines = ["", header, "-" * len(header)]
    for name in list(methods[labels[0]]["per_class"]) + ["Overall"]:
        values = [(methods[label]["overall"] if name == "Overall" else methods[label]["per_class"][name]).get("pointing")
                  for label in labels]
        lines.append(f"{name:20s} " + " ".join(f"{'n/a' if v is None else f'{v:.3f}':>{width}s}" for v in values))
    parts += lines
    parts.append(f"boxes by split: {report['boxes_by_split']} (a box image in 'train' was seen during training)")
    return "\n".join(parts)
