"""Export a checkpoint for serving without cxr: ONNX, TorchScript, torch.export (.pt2) or safetensors, verified.

    python scripts/export.py --checkpoint runs/X/best.pt --format onnx --out deploy/
    python scripts/export.py --checkpoint runs/X/best.pt --format all --out deploy/ --verify-images /data/nih/images_001/images

The model takes float32 gray images [B, 1, S, S] in [0, 255] at the training size (any batch size) and returns
(probabilities, logits), [B, 14] each; normalization is inside, CLAHE/equalization is not: the folder also gets
preprocessing.json, preprocess.py (a numpy + OpenCV reference) and model.json. Every export is checked on real
images (--verify-images; default: the training data's images) against the PyTorch model; a maximum probability
difference above --tolerance (1e-4) is an error and leaves no model file. onnx and safetensors need the extra:
pip install 'cxr[export]'. Exit status 2 on a bad flag, file or failed verification.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.checkpoint import find_latest_best, load_checkpoint  # noqa: E402
from cxr.errors import ConfigError, run_main  # noqa: E402
from cxr.export import FORMATS, TOLERANCE, VERIFY_COUNT, export_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a best.pt/last.pt (default: the newest runs/*/best.pt)")
    parser.add_argument("--format", required=True, choices=(*FORMATS, "all"), help="what to write (all: every format)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--verify-images", nargs="+", help="image files or folders to verify on (default: the training data's)")
    parser.add_argument("--verify-count", type=int, default=VERIFY_COUNT, help="images used for the check")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest allowed probability difference")
    return parser


def default_verify_images(config: dict) -> list[Path]:
    """The training data's image folder(s): --data-dir's images/ or images_0NN/images/, or the demo set's."""
    if config.get("data_dir"):
        root = Path(config["data_dir"])
    else:
        from cxr.synthetic import ensure_demo_dataset

        root = ensure_demo_dataset(patients=config["synthetic_patients"], size=config["synthetic_size"])
    folders = [folder for folder in [root / "images", *sorted(root.glob("images_*/images"))] if folder.is_dir()]
    if not folders:
        raise ConfigError(f"no training images found in {root} to verify the export with; pass --verify-images FILES_OR_DIRS")
    return folders[:1]


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(build_parser().parse_args(argv)), error_status=2)


def run(args: argparse.Namespace) -> int:
    if args.verify_count < 1 or not args.tolerance > 0:
        raise ConfigError(f"--verify-count must be >= 1 and --tolerance > 0, got {args.verify_count} and {args.tolerance}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else find_latest_best()
    images = args.verify_images or default_verify_images(load_checkpoint(checkpoint)["config"])
    for fmt in FORMATS if args.format == "all" else [args.format]:
        report = export_model(checkpoint, fmt, args.out, images, args.tolerance, args.verify_count)
        print(f"{fmt}: wrote {Path(args.out) / report['file']}; verified on {len(report['verified_on'])} real image(s) "
              f"(and batch size 1): max |probability difference| {report['max_abs_diff']:.2e}, "
              f"logits {report['max_abs_diff_logits']:.2e} (tolerance {args.tolerance:g})")
    print(f"wrote preprocessing.json, preprocess.py and model.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
