"""Write a synthetic dataset in exactly the NIH ChestX-ray14 release layout.

    python scripts/make_synthetic_nih.py --out data/synthetic --patients 300 --size 256 --seed 0 --workers 2

The folder then holds images/, Data_Entry_2017.csv, BBox_List_2017.csv, train_val_list.txt and
test_list.txt, and can be used wherever the real NIH folder is expected. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.synthetic import generate_synthetic_nih  # noqa: E402

# What the generator writes; --overwrite removes exactly these, nothing else in --out.
DATASET_ENTRIES = ("images", "Data_Entry_2017.csv", "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt")


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must be empty or new)")
    parser.add_argument("--patients", type=int, default=300, help="number of patients, >= 1 (default 300)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, >= 32 (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="processes; the output does not depend on it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset files already in --out (images/, the CSVs and the lists)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, check them, generate the dataset and print its summary."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.patients < 1:
        parser.error(f"--patients must be at least 1, got {args.patients}")
    if args.size < 32:
        parser.error(f"--size must be at least 32 pixels, got {args.size}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder path")
    if args.out.is_dir() and any(args.out.iterdir()):
        if not args.overwrite:
            parser.error(f"--out {args.out} is not empty; choose an empty folder or pass --overwrite")
        for name in DATASET_ENTRIES:  # stale images of a bigger earlier run would otherwise linger
            entry = args.out / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    summary = generate_synthetic_nih(args.out, patients=args.patients, size=args.size, seed=args.seed,
                                     workers=args.workers)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
