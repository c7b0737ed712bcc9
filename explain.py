"""Explain predictions with Grad-CAM: heatmaps, boxes, and localization scored against BBox_List_2017.csv.

    python explain.py --checkpoint runs/X/best.pt chest1.png scans/ --classes top3     # any PNG/JPEG/DICOM
    python explain.py --data-dir /data/nih --split test --limit 16 --boxes /data/nih/BBox_List_2017.csv
    python explain.py --data-dir /data/nih --boxes /data/nih/BBox_List_2017.csv --localization-report runs/X/loc

Without --checkpoint the newest runs/*/best.pt is used. Writes one overlay PNG per image and class (heatmap,
predicted boxes in magenta, ground truth in green) and predictions.json with probabilities and boxes. Overlays
are named <image stem>_<Finding>.png; when two inputs share a stem (a/x.png, b/x.png, a/x.jpg) the names
carry the path relative to the inputs' common folder instead (a__x_png_<Finding>.png), and predictions.json
is keyed the same way. Unreadable images are listed, the rest explained, and the exit status is then 1. When
evaluate.py has written a calibration.json beside the checkpoint (RUN/eval-*/), probabilities are temperature-scaled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxr.calibration import find_calibration, load_calibration
from cxr.checkpoint import find_latest_best
from cxr.data import read_box_list
from cxr.device import device_policy
from cxr.distributed import setup_distributed
from cxr.errors import ConfigError, run_main
from cxr.explainer import Explainer, collect_files, explain_images, unique_names
from cxr.factory import load_data, load_trained_model, resolve_data_dir
from cxr.gradcam import METHODS
from cxr.localization_report import localization_report, write_json
from cxr.rundir import writable_folder
from cxr.transforms import Preprocessing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="image files or folders (PNG, JPEG; DICOM with pydicom installed)")
    parser.add_argument("--checkpoint", help="a best.pt/last.pt (default: the newest runs/*/best.pt)")
    parser.add_argument("--out", help="output folder (default: <run dir>/explain)")
    parser.add_argument("--classes", default="top3", help="top3 (any topN), all, or names: Effusion,Mass")
    parser.add_argument("--method", default="gradcam", choices=METHODS)
    parser.add_argument("--layer", help="Grad-CAM target module, e.g. features.denseblock3 (default: the last feature map)")
    parser.add_argument("--box-threshold", type=float, default=0.5, help="heat >= this fraction of the map's max makes a box")
    parser.add_argument("--boxes", help="BBox_List_2017.csv: draw ground-truth boxes of the images it knows "
                        "(dataset images: the data folder's own box list by default)")
    parser.add_argument("--data-dir", help="explain dataset images (default: the checkpoint's data, with --split)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="explain this split of --data-dir")
    parser.add_argument("--skip-missing", action="store_true", help="dataset modes: leave out table rows whose image is not on disk")
    parser.add_argument("--limit", type=int, default=16, help="at most this many dataset images (0: all)")
    parser.add_argument("--localization-report", metavar="OUT", help="score the maps on every box image on disk, write OUT/")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0 (0: all), got {args.limit}")


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    check_args(args)
    ctx = setup_distributed(args.device)
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else find_latest_best()
    model, config, checkpoint = load_trained_model(checkpoint_path, ctx.device)
    print(f"checkpoint: {checkpoint_path}")
    policy = device_policy(config, ctx.device)
    policy.prepare_model(model)
    calibration_path = find_calibration(checkpoint_path)
    if calibration_path is not None:
        print(f"calibration: {calibration_path} (temperature-scaled probabilities)")
    explainer = Explainer(model, Preprocessing.from_checkpoint(checkpoint), policy, args.method, args.box_threshold, args.layer,
                          calibration=load_calibration(calibration_path) if calibration_path else None)
    truth = read_box_list(args.boxes) if args.boxes else {}
    if args.data_dir:
        config.data_dir = args.data_dir
    config.skip_missing = config.skip_missing or args.skip_missing

    def dataset_truth(data) -> dict:
        own = data.data_dir / "BBox_List_2017.csv"
        if args.boxes or not own.is_file():
            return truth
        print(f"ground-truth boxes: {own}")
        return read_box_list(own)

    if args.localization_report:
        out = writable_folder(Path(args.localization_report))
        data = load_data(config, resolve_data_dir(config, ctx))
        report_truth = dataset_truth(data)
        if not report_truth:
            raise ConfigError(f"--localization-report needs --boxes BBox_List_2017.csv ({data.data_dir} has none)")
        localization_report(explainer, data, report_truth, out, args.batch_size)
        print(f"wrote localization.json and contact_sheet.png to {out}")
        return 0

    out = writable_folder(Path(args.out) if args.out else checkpoint_path.parent / "explain")
    if args.inputs:
        files = collect_files(args.inputs)
        names = unique_names(files)
        items = list(zip(names, map(str, files)))
    else:
        data = load_data(config, resolve_data_dir(config, ctx))
        truth = dataset_truth(data)
        rows = data.splits[args.split or "test"]
        rows = rows[: args.limit] if args.limit else rows
        items = [(data.index.image_names[row], data.index.image_path(row)) for row in rows]
        names = [name for name, _ in items]
    disambiguate = any("/" in name for name in names)
    results, failures = explain_images(explainer, items, truth, out, args.classes, args.batch_size, disambiguate)
    write_json(out / "predictions.json", results)
    if failures:
        write_json(out / "failed.json", failures)
    print(f"wrote {len(results)} image(s): overlays and predictions.json in {out}")
    if failures:
        print(f"error: {len(failures)} image(s) could not be read (listed in {out / 'failed.json'}):", file=sys.stderr)
        for entry in failures:
            print(f"  {entry['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
