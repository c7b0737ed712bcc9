"""The localization report: Grad-CAM maps scored against ground-truth boxes (Wang et al. 2017's protocol).

    scores = localization_report(explainer, data, read_box_list(path), Path("runs/X/localization"), batch_size=16)
    print(format_localization(scores))

Every box image on disk is scored: accuracy at IoBB > T and IoU > T of the best predicted box, and the
pointing game, per class and overall, with the split each box image belongs to and a contact sheet of the
worst and best cases. Box coordinates are in NIH's 1024 x 1024 space (cxr.data.BOX_SPACE).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from cxr.data import BOX_SPACE, DataError, NihData
from cxr.explainer import Explainer, batches, write_image
from cxr.labels import FINDINGS
from cxr.localization import iou, localization_scores, overlay, pointing_hit
from cxr.rundir import OutputWriteError
from cxr.transforms import read_xray


def write_json(path: Path, content: object) -> None:
    """Write JSON; a failed write is an OutputWriteError naming the file."""
    try:
        path.write_text(json.dumps(content, indent=2))
    except OSError as error:
        raise OutputWriteError(f"cannot write {path}: {error.strerror or error}") from error


def localization_report(explainer: Explainer, data: NihData, truth: dict, out: Path, batch_size: int) -> dict:
    """Score every box image on disk: IoBB/IoU accuracy and pointing game, per class and overall."""
    out.mkdir(parents=True, exist_ok=True)
    position = {name: row for row, name in enumerate(data.index.image_names)}
    split_of = {int(row): split for split, rows in data.splits.items() for row in rows}
    names = [name for name in truth if name in position]
    if not names:
        raise DataError(f"none of the {len(truth)} images in the box list is in {data.data_dir}")
    records, cases = [], []
    for chunk in batches(names, batch_size):
        grays = [read_xray(data.index.image_path(position[name])) for name in chunk]
        maps, probabilities = explainer(grays)
        scale = BOX_SPACE / maps.shape[-1]
        for name, gray, image_maps in zip(chunk, grays, maps):
            for finding, box in truth[name]:
                heatmap = image_maps[FINDINGS.index(finding)]
                predicted = explainer.boxes(heatmap, (scale, scale))
                records.append({"finding": finding, "gt_box": box, "pred_boxes": predicted, "heatmap": heatmap, "scale": scale})
                best = max((iou(p, box) for p in predicted), default=0.0)
                hit = pointing_hit(heatmap, tuple(v / scale for v in box))
                cases.append((best + hit, name, finding, gray, heatmap, predicted, box, split_of.get(position[name], "none")))
    scores = localization_scores(records)
    membership: dict[str, int] = {}
    for case in cases:
        membership[case[-1]] = membership.get(case[-1], 0) + 1
    scores["boxes_by_split"] = membership
    scores["images"] = len(names)
    scores["images_in_box_list"] = len(truth)
    scores["layer"], scores["output_stride"] = explainer.layer, explainer.output_stride
    write_json(out / "localization.json", scores)
    contact_sheet(cases, out / "contact_sheet.png")
    print(format_localization(scores))
    return scores


def contact_sheet(cases: list, path: Path, per_row: int = 4, tile: int = 256) -> None:
    """The worst and best cases (by best IoU plus pointing hit), one row of each at least."""
    cases = sorted(cases, key=lambda case: case[0])
    count = min(per_row * 2, len(cases))
    chosen = cases[: count // 2 + count % 2] + cases[len(cases) - count // 2:] if len(cases) > count else cases
    tiles = []
    for score, name, finding, gray, heatmap, predicted, box, split in chosen:
        scale = gray.shape[1] / BOX_SPACE
        pixels = [dict(b, x=b["x"] * scale, y=b["y"] * scale, w=b["w"] * scale, h=b["h"] * scale) for b in predicted]
        picture = overlay(gray, heatmap, pixels, [tuple(v * scale for v in box)], title=f"{finding} ({split})")
        tiles.append(cv2.resize(picture, (tile, tile), interpolation=cv2.INTER_AREA))
    while len(tiles) % per_row:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    write_image(path, np.concatenate(rows, axis=0))


def format_localization(scores: dict) -> str:
    iobb_keys = list(scores["overall"]["iobb"])
    iou_keys = list(scores["overall"]["iou"])
    header = f"{'Finding':20s} {'boxes':>5s} " + " ".join(f"IoBB>{k:<4s}" for k in iobb_keys) + " " + \
             " ".join(f"IoU>{k:<4s}" for k in iou_keys) + "  pointing"
    lines = [header, "-" * len(header)]
    rows = list(scores["per_class"].items()) + [("Overall", scores["overall"])]
    for name, row in rows:
        pointing = row.get("pointing")
        lines.append(f"{name:20s} {row['boxes']:5d} " + " ".join(f"{row['iobb'][k]:9.3f}" for k in iobb_keys) + " "
                     + " ".join(f"{row['iou'][k]:8.3f}" for k in iou_keys) + f"  {'n/a' if pointing is None else f'{pointing:.3f}'}")
    lines.append(f"boxes by split: {scores['boxes_by_split']} (a box image in 'train' was seen during training)")
    return "\n".join(lines)
