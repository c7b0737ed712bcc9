"""Explain predictions: saliency maps (Grad-CAM family, occlusion), boxes, localization scores, sanity checks.

    python explain.py --checkpoint runs/X/best.pt chest1.png scans/ --classes top3 --panel   # any PNG/JPEG/DICOM
    python explain.py --data-dir /data/nih --split test --limit 16 --boxes /data/nih/BBox_List_2017.csv
    python explain.py --data-dir /data/nih --boxes /data/nih/BBox_List_2017.csv --localization-report runs/X/loc \
        --methods layercam@features.denseblock2,gradcam,occlusion
    python explain.py --sanity-check runs/X/sanity          # Adebayo et al. 2018 cascading randomization

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

import numpy as np
import torch

from cxr.calibration import find_calibration, load_calibration
from cxr.checkpoint import find_latest_best
from cxr.data import read_box_list
from cxr.device import device_policy
from cxr.distributed import setup_distributed
from cxr.errors import ConfigError, run_main
from cxr.explainer import (
    ALL_METHODS,
    DEFAULT_CAM,
    DEFAULT_METHOD,
    OCCLUSION_AUTO_MAX,
    Explainer,
    collect_files,
    explain_images,
    find_layer,
    method_label,
    parse_methods,
    resolve_method,
    unique_names,
)
from cxr.factory import load_data, load_trained_model, resolve_data_dir
from cxr.localization_report import localization_report, write_json
from cxr.rundir import writable_folder
from cxr.transforms import Preprocessing, read_xray


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="image files or folders (PNG, JPEG; DICOM with pydicom installed)")
    parser.add_argument("--checkpoint", help="a best.pt/last.pt (default: the newest runs/*/best.pt)")
    parser.add_argument("--out", help="output folder (default: <run dir>/explain)")
    parser.add_argument("--classes", default="top3", help="top3 (any topN), all, or names: Effusion,Mass")
    parser.add_argument("--method", default=DEFAULT_METHOD, help=f"one of {', '.join(ALL_METHODS)}, optionally with its "
                        f"layer (layercam@features.denseblock2), or auto: occlusion for inputs up to {OCCLUSION_AUTO_MAX} px, "
                        f"else {DEFAULT_CAM} (default: auto)")
    parser.add_argument("--methods", help="localization report / sanity check: comma-separated methods, the first is "
                        "the default (default: --method, then every other method)")
    parser.add_argument("--layer", help="CAM target module, e.g. features.denseblock3 (default: the last feature map)")
    parser.add_argument("--occlusion-patch", type=int, default=0, help="occlusion patch side in input pixels (0: input/8)")
    parser.add_argument("--occlusion-stride", type=int, default=0, help="occlusion step in input pixels (0: input/16)")
    parser.add_argument("--panel", action="store_true", help="also one panel per image: all explained findings side by side")
    parser.add_argument("--sanity-check", metavar="OUT", help="cascading randomization of the weights; write OUT/sanity.json")
    parser.add_argument("--sanity-images", type=int, default=8, help="test images for --sanity-check")
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
    if args.occlusion_patch < 0 or args.occlusion_stride < 0 or args.sanity_images < 1:
        raise ConfigError("--occlusion-patch and --occlusion-stride must be >= 0 (0: automatic), --sanity-images >= 1")
    if args.localization_report and args.sanity_check:
        raise ConfigError("--localization-report and --sanity-check are separate runs: give one of them")


def method_specs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(method, layer) pairs: --methods as given, or for reports --method first and then every other method."""
    first = parse_methods(args.method, args.layer)
    if args.methods:
        return parse_methods(args.methods, args.layer)
    if not (args.localization_report or args.sanity_check):
        return first
    others = [spec for spec in parse_methods(",".join([DEFAULT_CAM, *ALL_METHODS]), args.layer) if spec != first[0]]
    return first + others


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
    preprocessing = Preprocessing.from_checkpoint(checkpoint)
    patch = args.occlusion_patch or max(1, preprocessing.size // 8)
    stride = args.occlusion_stride or max(1, preprocessing.size // 16)
    if args.layer:
        find_layer(model, args.layer)  # a wrong name is an error whatever the method
        if args.method == "auto":
            args.method = DEFAULT_CAM.split("@")[0]  # naming a layer asks for a CAM method at that layer
    args.method = resolve_method(args.method, preprocessing.size)
    specs = method_specs(args)
    calibration_path = find_calibration(checkpoint_path)
    calibration = load_calibration(calibration_path) if calibration_path else None
    if calibration_path is not None:
        print(f"calibration: {calibration_path} (temperature-scaled probabilities)")

    def explainer_for(method: str, layer: str | None) -> Explainer:
        return Explainer(model, preprocessing, policy, method, args.box_threshold, layer, patch, stride, calibration)

    explainer = explainer_for(*specs[0])
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
        explainers = {method_label(*spec): explainer_for(*spec) for spec in specs}
        localization_report(explainers, data, report_truth, out, args.batch_size)
        print(f"wrote localization.json and contact_sheet.png to {out}")
        return 0

    if args.sanity_check:
        from cxr.sanity import sanity_check

        out = writable_folder(Path(args.sanity_check))
        data = load_data(config, resolve_data_dir(config, ctx))
        rows = data.splits[args.split or "test"][: args.sanity_images]
        grays = np.stack([preprocessing(read_xray(data.index.image_path(row))) for row in rows])
        images = policy.inputs(torch.from_numpy(grays).unsqueeze(1))
        sanity_check(model, images, [method_label(*spec) for spec in specs], out, (patch, stride))
        print(f"wrote sanity.json and sanity_*.png to {out}")
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
    results, failures = explain_images(explainer, items, truth, out, args.classes, args.batch_size, disambiguate, args.panel)
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
