"""Paired comparison of two models on the same images: ΔAUROC with a paired patient bootstrap, DeLong, Holm.

    python scripts/compare_models.py runs/A/eval-test runs/B/eval-test --out comparison/
    python scripts/compare_models.py runs/A/best.pt runs/B/best.pt --split test --data-dir /data/nih

A and B are evaluation folders (holding predictions.csv), predictions.csv files, or checkpoints; checkpoints are
evaluated first with evaluate.py (into OUT/eval-A and OUT/eval-B). Two prediction sets that do not cover the
same images are refused. Writes comparison.json, comparison.csv and forest.png into --out and prints the table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.compare import compare_predictions  # noqa: E402
from cxr.comparison_io import PredictionsError, format_comparison, pair_predictions, read_predictions, write_comparison  # noqa: E402
from cxr.errors import run_main  # noqa: E402
from cxr.labels import FINDINGS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="model A: an evaluation folder, a predictions.csv or a checkpoint (.pt)")
    parser.add_argument("b", help="model B: the same kinds")
    parser.add_argument("--out", default="comparison", help="output folder (default: ./comparison)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired patient resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"), help="split for checkpoints")
    parser.add_argument("--data-dir", help="data folder for checkpoints (default: each checkpoint's own)")
    parser.add_argument("--evaluate-args", default="", help="extra evaluate.py flags for checkpoints, e.g. '--tta flip'")
    return parser


def predictions_of(source: str, label: str, args: argparse.Namespace) -> Path:
    """The predictions.csv behind `source`, evaluating a checkpoint first."""
    path = Path(source)
    if path.suffix != ".pt":
        return path
    if not path.is_file():
        raise PredictionsError(f"{path}: no such checkpoint")
    out = Path(args.out) / f"eval-{label}"
    command = [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(path), "--split", args.split, "--out", str(out),
               "--bootstrap", "0", "--subgroups", "none", *args.evaluate_args.split()]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    print(f"evaluating {path} -> {out}", flush=True)
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise PredictionsError(f"evaluate.py failed for {path}:\n{finished.stderr.strip()[-2000:]}")
    return out


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.bootstrap < 1:
        raise PredictionsError(f"--bootstrap {args.bootstrap}: need at least 1 resample (1000 for a paper)")
    a = read_predictions(predictions_of(args.a, "A", args))
    b = read_predictions(predictions_of(args.b, "B", args))
    labels, score_a, score_b, patients = pair_predictions(a, b)
    result = compare_predictions(labels, score_a, score_b, patients, FINDINGS, n_resamples=args.bootstrap, seed=args.seed)
    names = (str(args.a), str(args.b))
    written = write_comparison(result, args.out, FINDINGS, names)
    print(format_comparison(result, FINDINGS, names))
    print(f"\nwrote {', '.join(path.name for path in written)} to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
