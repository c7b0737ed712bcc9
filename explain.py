"""Explain predictions with Grad-CAM: heatmaps, boxes, and localization scored against BBox_List_2017.csv.

    python explain.py --checkpoint runs/X/best.pt chest1.png scans/ --classes top3     # any PNG/JPEG/DICOM
    python explain.py --data-dir /data/nih --split test --limit 16 --boxes /data/nih/BBox_List_2017.csv
    python explain.py --data-dir /data/nih --boxes /data/nih/BBox_List_2017.csv --localization-report runs/X/loc

Without --checkpoint the newest runs/*/best.pt is used. Writes one overlay PNG per image and class (heatmap,
predicted boxes in magenta, ground truth in green) and predictions.json with probabilities and boxes. When
evaluate.py has written a calibration.json beside the checkpoint (RUN/eval-*/), probabilities are temperature-scaled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from cxr.calibration import apply_calibration, find_calibration, load_calibration
from cxr.checkpoint import CheckpointError, find_latest_best
from cxr.data import DataError, read_box_list
from cxr.distributed import setup_distributed
from cxr.factory import device_policy, load_data, load_trained_model, resolve_data_dir
from cxr.gradcam import GradCAM, heatmap_to_boxes, localization_scores, overlay
from cxr.labels import FINDINGS
from cxr.localization import iou, pointing_hit
from cxr.transforms import DICOM_SUFFIXES, ImageReadError, preprocess_image, read_xray

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)
BOX_SPACE = 1024.0  # BBox_List_2017.csv coordinates live in the 1024 x 1024 pixel space of the NIH PNGs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="image files or folders (PNG, JPEG; DICOM with pydicom installed)")
    parser.add_argument("--checkpoint", help="a best.pt/last.pt (default: the newest runs/*/best.pt)")
    parser.add_argument("--out", help="output folder (default: <run dir>/explain)")
    parser.add_argument("--classes", default="top3", help="top3 (any topN), all, or names: Effusion,Mass")
    parser.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++"))
    parser.add_argument("--layer", help="Grad-CAM target module, e.g. features.denseblock3 (default: the last feature map)")
    parser.add_argument("--box-threshold", type=float, default=0.5, help="heat >= this fraction of the map's max makes a box")
    parser.add_argument("--boxes", help="BBox_List_2017.csv: draw ground-truth boxes of the images it knows "
                        "(dataset images: the data folder's own box list by default)")
    parser.add_argument("--data-dir", help="explain dataset images (default: the checkpoint's data, with --split)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="explain this split of --data-dir")
    parser.add_argument("--limit", type=int, default=16, help="at most this many dataset images (0: all)")
    parser.add_argument("--localization-report", metavar="OUT", help="score the maps on every box image on disk, write OUT/")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return parser


def collect_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(path for path in item.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return files


def choose_classes(spec: str, probabilities: np.ndarray) -> list[int]:
    """Class indices to explain for one image: the top N, all, or the named findings."""
    if spec == "all":
        return list(range(len(FINDINGS)))
    if spec.startswith("top") and spec[3:].isdigit():
        return [int(i) for i in np.argsort(-probabilities)[: int(spec[3:])]]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in FINDINGS]
    if unknown or not names:
        raise ValueError(f"--classes {spec!r}: unknown finding(s) {unknown}; use top3, all, or names from {', '.join(FINDINGS)}")
    return [FINDINGS.index(name) for name in names]


class Explainer:
    """Grad-CAM of all 14 classes for batches of gray images, with the checkpoint's preprocessing."""

    def __init__(self, model, config, policy, method: str, box_threshold: float, layer: str | None = None,
                 calibration: dict | None = None):
        self.calibration = calibration
        self.cam = GradCAM(model, target_layer=find_layer(model, layer) if layer else None, method=method)
        self.config, self.policy, self.box_threshold = config, policy, box_threshold
        self.layer = layer or "last feature map"

    def __call__(self, grays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """maps [B, 14, S, S] in [0, 1] and probabilities [B, 14]."""
        size = self.config.image_size
        batch = np.stack([preprocess_image(gray, size, self.config.preprocess, self.config.clahe_clip, self.config.clahe_grid)
                          for gray in grays])
        inputs = self.policy.inputs(torch.from_numpy(batch).unsqueeze(1))
        maps, logits = self.cam(inputs, list(range(len(FINDINGS))))
        logits = logits.float().cpu().numpy()
        return maps.float().cpu().numpy(), apply_calibration(logits, self.calibration, FINDINGS, logits=True)

    def boxes(self, heatmap: np.ndarray, scale: tuple[float, float]) -> list[dict]:
        return heatmap_to_boxes(heatmap, self.box_threshold, scale=scale)


def find_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called `name` (dotted, as in model.named_modules()); the error lists the likely choices."""
    modules = dict(model.named_modules())
    if name not in modules:
        choices = [n for n in modules if n.count(".") == 1 and n.startswith("features.")]
        raise ValueError(f"--layer {name!r}: the model has no such module; try one of {', '.join(choices)}")
    return modules[name]


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def explain_images(explainer: Explainer, items: list[tuple[str, str]], truth: dict, out: Path, classes: str,
                   batch_size: int) -> dict:
    """Overlays and predictions for (name, path) items; returns the predictions.json content."""
    results = {}
    for chunk in batches(items, batch_size):
        grays = [read_xray(path) for _, path in chunk]
        maps, probabilities = explainer(grays)
        for (name, path), gray, image_maps, probs in zip(chunk, grays, maps, probabilities):
            height, width = gray.shape
            scale = (width / image_maps.shape[-1], height / image_maps.shape[-2])
            to_pixels = (width / BOX_SPACE, height / BOX_SPACE)
            known = truth.get(Path(name).name, [])
            entry = {"path": str(path), "size": [width, height],
                     "probabilities": {finding: round(float(p), 6) for finding, p in zip(FINDINGS, probs)},
                     "ground_truth": [{"finding": f, "box": list(box)} for f, box in known], "explained": {}}
            for column in choose_classes(classes, probs):
                finding = FINDINGS[column]
                boxes = explainer.boxes(image_maps[column], scale)
                gt = [tuple(v * to_pixels[i % 2] for i, v in enumerate(box)) for f, box in known if f == finding]
                picture = overlay(gray, image_maps[column], boxes, gt, title=f"{name}  {finding} p={probs[column]:.3f}")
                file = out / f"{Path(name).stem}_{finding}.png"
                cv2.imwrite(str(file), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                entry["explained"][finding] = {"probability": round(float(probs[column]), 6), "boxes": boxes, "overlay": file.name}
            results[name] = entry
            top = sorted(entry["probabilities"].items(), key=lambda item: -item[1])[:3]
            print(f"{name}: " + ", ".join(f"{finding} {p:.3f}" for finding, p in top))
    return results


def localization_report(explainer: Explainer, data, truth: dict, out: Path, batch_size: int) -> dict:
    """Score every box image on disk: IoBB/IoU accuracy and pointing game, per class and overall."""
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
    scores["layer"], scores["output_stride"] = explainer.layer, explainer.config.output_stride
    out.mkdir(parents=True, exist_ok=True)
    (out / "localization.json").write_text(json.dumps(scores, indent=2))
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
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DataError, CheckpointError, ImageReadError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    ctx = setup_distributed(args.device)
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else find_latest_best()
    model, config, _ = load_trained_model(checkpoint_path, ctx.device)
    print(f"checkpoint: {checkpoint_path}")
    policy = device_policy(config, ctx)
    if policy.channels_last:
        model.to(memory_format=torch.channels_last)
    calibration_path = find_calibration(checkpoint_path)
    if calibration_path is not None:
        print(f"calibration: {calibration_path} (temperature-scaled probabilities)")
    explainer = Explainer(model, config, policy, args.method, args.box_threshold, args.layer,
                          calibration=load_calibration(calibration_path) if calibration_path else None)
    truth = read_box_list(args.boxes) if args.boxes else {}
    if args.data_dir:
        config.data_dir = args.data_dir
    if args.localization_report:
        data = load_data(config, resolve_data_dir(config, ctx))
        if not args.boxes:
            own = data.data_dir / "BBox_List_2017.csv"
            if not own.is_file():
                raise ValueError(f"--localization-report needs --boxes BBox_List_2017.csv ({data.data_dir} has none)")
            truth = read_box_list(own)
            print(f"ground-truth boxes: {own}")
        localization_report(explainer, data, truth, Path(args.localization_report), args.batch_size)
        print(f"wrote localization.json and contact_sheet.png to {args.localization_report}")
        return 0
    out = Path(args.out) if args.out else checkpoint_path.parent / "explain"
    out.mkdir(parents=True, exist_ok=True)
    if args.inputs:
        items = [(path.name, str(path)) for path in collect_files(args.inputs)]
    else:
        data = load_data(config, resolve_data_dir(config, ctx))
        if not args.boxes and (data.data_dir / "BBox_List_2017.csv").is_file():
            truth = read_box_list(data.data_dir / "BBox_List_2017.csv")
            print(f"ground-truth boxes: {data.data_dir / 'BBox_List_2017.csv'}")
        rows = data.splits[args.split or "test"]
        rows = rows[: args.limit] if args.limit else rows
        items = [(data.index.image_names[row], data.index.image_path(row)) for row in rows]
    results = explain_images(explainer, items, truth, out, args.classes, args.batch_size)
    (out / "predictions.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {len(results)} image(s): overlays and predictions.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
