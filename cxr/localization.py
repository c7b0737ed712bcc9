"""Heatmap -> boxes, box overlap arithmetic and localization scores (IoBB, IoU, pointing, AFP) for saliency maps.

    boxes = heatmap_to_boxes(heatmap, threshold=0.5, scale=(1024 / 224, 1024 / 224))  # NIH 1024 space
    iobb(pred_box=(100, 100, 50, 50), gt_box=(90, 90, 80, 80))   # 1.0: the detected box lies inside
    scores = localization_scores([
        {"finding": "Mass", "gt_box": (100, 100, 80, 80), "pred_boxes": boxes,
         "heatmap": heatmap, "scale": (1024 / 224, 1024 / 224)},
    ])
    scores["overall"]["iobb"]["0.5"], scores["per_class"]["Mass"]["pointing"]

Boxes are (x, y, w, h) floats, or dicts with those keys (as `heatmap_to_boxes` returns); a box covers
[x, x + w) x [y, y + h) in continuous pixel coordinates, so pixel column i spans [i, i + 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np

from cxr.labels import FINDINGS, canonical_finding

Box = Sequence[float] | Mapping[str, float]

IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
IOU_THRESHOLDS = (0.1, 0.3, 0.5)


def as_xywh(box: Box) -> tuple[float, float, float, float]:
    """A box as an (x, y, w, h) tuple of floats, from a 4-sequence or a dict with x, y, w, h keys."""
    if isinstance(box, Mapping):
        return float(box["x"]), float(box["y"]), float(box["w"]), float(box["h"])
    x, y, w, h = box
    return float(x), float(y), float(w), float(h)


def _intersection(box_a: Box, box_b: Box) -> float:
    ax, ay, aw, ah = as_xywh(box_a)
    bx, by, bw, bh = as_xywh(box_b)
    width = min(ax + aw, bx + bw) - max(ax, bx)
    height = min(ay + ah, by + bh) - max(ay, by)
    return max(width, 0.0) * max(height, 0.0)


def _area(box: Box) -> float:
    _, _, w, h = as_xywh(box)
    return max(w, 0.0) * max(h, 0.0)


def iou(box_a: Box, box_b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes; 0 when both are empty."""
    intersection = _intersection(box_a, box_b)
    union = _area(box_a) + _area(box_b) - intersection
    return intersection / union if union > 0 else 0.0


def iobb(pred_box: Box, gt_box: Box) -> float:
    """Intersection over the PREDICTED box's area (Wang et al. 2017's IoBB); 0 for an empty prediction."""
    area = _area(pred_box)
    return _intersection(pred_box, gt_box) / area if area > 0 else 0.0


def pointing_location(heatmap: np.ndarray) -> tuple[float, float] | None:
    """(x, y) where the map points: the centre of its maximum region, in pixel units; None for an empty map.

    Upsampled low-resolution maps have flat maxima (bilinear upsampling clamps at the borders); the first
    argmax pixel would sit on the plateau's edge, often the image corner, so the plateau's centre is used.
    """
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"pointing expects a 2-D heatmap, got shape {heatmap.shape}")
    if not np.isfinite(heatmap).all() or heatmap.max() <= 0:
        return None  # an empty map points nowhere
    peak = heatmap >= heatmap.max() * (1 - 1e-6)
    _, labels = cv2.connectedComponents(peak.astype(np.uint8), connectivity=8)
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    rows, cols = np.nonzero(labels == labels[row, col])  # the plateau that holds the first argmax
    return float(cols.mean()) + 0.5, float(rows.mean()) + 0.5


def pointing_hit(heatmap: np.ndarray, gt_box: Box) -> bool:
    """True if the heatmap's pointing location lies inside gt_box, given in heatmap pixels."""
    location = pointing_location(heatmap)
    if location is None:
        return False
    x, y, w, h = as_xywh(gt_box)
    return bool(x <= location[0] <= x + w and y <= location[1] <= y + h)


def heatmap_to_boxes(
    heatmap: np.ndarray,
    threshold: float = 0.5,
    min_area_fraction: float = 0.001,
    scale: tuple[float, float] | float = (1.0, 1.0),
) -> list[dict[str, float]]:
    """Boxes around the 8-connected regions where heat >= threshold * max, scaled to image pixels, best first.

    Each box is dict(x, y, w, h, score), with score the peak heat inside its region; regions smaller than
    min_area_fraction of the heatmap are dropped. `scale` = (sx, sy) multiplies heatmap pixel coordinates,
    e.g. 1024 / 224 to land in NIH's 1024 x 1024 box space.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap_to_boxes expects a 2-D heatmap, got shape {heatmap.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a fraction of the map's max and must be in (0, 1], got {threshold}")
    scale_x, scale_y = (scale, scale) if isinstance(scale, (int, float)) else scale
    heatmap = np.nan_to_num(heatmap, nan=0.0)
    peak = float(heatmap.max()) if heatmap.size else 0.0
    if peak <= 0:
        return []
    mask = (heatmap >= threshold * peak).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = min_area_fraction * heatmap.size
    boxes = []
    for label in range(1, count):  # label 0 is the background
        left, top, width, height, area = (int(value) for value in stats[label])
        if area < min_area:
            continue
        boxes.append({
            "x": left * scale_x,
            "y": top * scale_y,
            "w": width * scale_x,
            "h": height * scale_y,
            "score": float(heatmap[labels == label].max()),
        })
    return sorted(boxes, key=lambda box: -box["score"])


def _empty_tally() -> dict[str, object]:
    return {"boxes": 0, "iobb": dict.fromkeys(IOBB_THRESHOLDS, 0), "iou": dict.fromkeys(IOU_THRESHOLDS, 0),
            "pointing_boxes": 0, "pointing_hits": 0}


def _rates(tally: dict) -> dict[str, object]:
    boxes = tally["boxes"]
    return {
        "boxes": boxes,
        "iobb": {str(t): tally["iobb"][t] / boxes for t in IOBB_THRESHOLDS},
        "iou": {str(t): tally["iou"][t] / boxes for t in IOU_THRESHOLDS},
        "pointing": tally["pointing_hits"] / tally["pointing_boxes"] if tally["pointing_boxes"] else None,
        "pointing_boxes": tally["pointing_boxes"],
        "pointing_hits": tally["pointing_hits"],
    }


def localization_scores(records: Iterable[Mapping]) -> dict[str, object]:
    """Box-level localization accuracy at IoBB/IoU thresholds and the pointing-game rate, per class and overall.

    One record per ground-truth box: {"finding": name, "gt_box": box, "pred_boxes": [boxes predicted for that
    image and finding], optional "heatmap": 2-D array, optional "scale": (sx, sy) from heatmap pixels to box
    coordinates}. A ground-truth box counts as localized at threshold T if ANY predicted box has IoBB > T
    (resp. IoU > T), strictly, as in Wang et al. 2017. Pointing uses only records with a heatmap. Returns
    plain dicts/floats (thresholds as string keys), classes in FINDINGS order, then any others sorted.
    """
    tallies: dict[str, dict] = {}
    overall = _empty_tally()
    for position, record in enumerate(records):
        try:
            name = canonical_finding(str(record["finding"]))
        except KeyError:
            name = str(record["finding"]).strip()
        if "gt_box" not in record:
            raise ValueError(f"localization record {position} ({name}) has no 'gt_box'")
        gt_box = as_xywh(record["gt_box"])
        pred_boxes = [as_xywh(box) for box in record.get("pred_boxes", [])]
        best_iobb = max((iobb(box, gt_box) for box in pred_boxes), default=0.0)
        best_iou = max((iou(box, gt_box) for box in pred_boxes), default=0.0)
        heatmap = record.get("heatmap")
        hit = None
        if heatmap is not None:
            scale = record.get("scale", (1.0, 1.0))
            scale_x, scale_y = (scale, scale) if isinstance(scale, (int, float)) else scale
            x, y, w, h = gt_box
            hit = pointing_hit(heatmap, (x / scale_x, y / scale_y, w / scale_x, h / scale_y))
        for tally in (tallies.setdefault(name, _empty_tally()), overall):
            tally["boxes"] += 1
            for threshold in IOBB_THRESHOLDS:
                tally["iobb"][threshold] += best_iobb > threshold
            for threshold in IOU_THRESHOLDS:
                tally["iou"][threshold] += best_iou > threshold
            if hit is not None:
                tally["pointing_boxes"] += 1
                tally["pointing_hits"] += hit
    if not overall["boxes"]:
        raise ValueError("localization_scores got no records: pass one record per ground-truth box")
    order = [name for name in FINDINGS if name in tallies] + sorted(set(tallies) - set(FINDINGS))
    return {
        "thresholds": {"iobb": list(IOBB_THRESHOLDS), "iou": list(IOU_THRESHOLDS)},
        "overall": _rates(overall),
        "per_class": {name: _rates(tallies[name]) for name in order},
    }


def average_false_positives(groups: Iterable[Mapping]) -> dict[str, object]:
    """Wang et al. 2017's AFP at each IoBB threshold: predicted boxes that hit no ground-truth box, per image.

    One group per (image, finding): {"image": name, "finding": name, "gt_boxes": [boxes of that finding in
    that image], "pred_boxes": [boxes predicted for it]}. A predicted box is a false positive at T when its
    IoBB with every ground-truth box of its finding is <= T. Per class the count is divided by the images
    that hold that finding, overall by the distinct images. Returns {"per_class": {name: {T: afp}},
    "overall": {T: afp}} with thresholds as string keys.
    """
    per_class: dict[str, dict] = {}
    total = dict.fromkeys(IOBB_THRESHOLDS, 0)
    images: set[str] = set()
    for group in groups:
        finding = str(group["finding"])
        gt_boxes = [as_xywh(box) for box in group["gt_boxes"]]
        tally = per_class.setdefault(finding, {"images": set(), "fp": dict.fromkeys(IOBB_THRESHOLDS, 0)})
        tally["images"].add(group["image"])
        images.add(group["image"])
        for box in group["pred_boxes"]:
            best = max((iobb(box, gt) for gt in gt_boxes), default=0.0)
            for threshold in IOBB_THRESHOLDS:
                miss = best <= threshold
                tally["fp"][threshold] += miss
                total[threshold] += miss
    order = [name for name in FINDINGS if name in per_class] + sorted(set(per_class) - set(FINDINGS))
    return {
        "per_class": {name: {str(t): per_class[name]["fp"][t] / len(per_class[name]["images"]) for t in IOBB_THRESHOLDS}
                      for name in order},
        "overall": {str(t): total[t] / len(images) if images else 0.0 for t in IOBB_THRESHOLDS},
    }
