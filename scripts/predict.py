"""Predict the 14 findings for image files and folders of any size, into a CSV written as it goes.

    python scripts/predict.py --checkpoint runs/X/best.pt scans/ more/scan1.dcm --out predictions.csv
    python scripts/predict.py --checkpoint runs/X/best.pt scans/ --out predictions.csv --resume   # after a stop

predictions.csv holds Image, Path and one probability per finding (calibrated when the run has a
calibration.json, see --calibration). Rows are appended and flushed batch by batch, so a stopped run keeps what
it did and --resume carries on with the images not yet in the CSV (a half-written last line is dropped first).
Images that cannot be read go to failed.csv (Image, Path, Error) and the run goes on; they are tried again on
--resume. Exit status 1 when some images could not be read, 2 on a bad flag or file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.checkpoint import find_latest_best  # noqa: E402
from cxr.errors import ConfigError, run_main  # noqa: E402
from cxr.labels import FINDINGS  # noqa: E402
from cxr.predict import Classifier, resolve_inputs  # noqa: E402
from cxr.rundir import OutputWriteError  # noqa: E402

COLUMNS = ["Image", "Path", *FINDINGS]
FAILED_COLUMNS = ["Image", "Path", "Error"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders (PNG, JPEG; DICOM with pydicom installed)")
    parser.add_argument("--checkpoint", help="a best.pt/last.pt (default: the newest runs/*/best.pt)")
    parser.add_argument("--out", default="predictions.csv", help="the predictions CSV (default: predictions.csv)")
    parser.add_argument("--failed", help="where unreadable images are listed (default: failed.csv beside --out)")
    parser.add_argument("--resume", action="store_true", help="keep --out and predict only the images not yet in it")
    parser.add_argument("--overwrite", action="store_true", help="start --out afresh when it exists")
    parser.add_argument("--calibration", default="auto", help="auto (the run's calibration.json if any), none, or a file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images while the model runs")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(build_parser().parse_args(argv)), error_status=2)


def settings_of(clf: Classifier, checkpoint: Path) -> dict:
    """What makes the rows of one CSV comparable; a resumed run must match it."""
    return {"checkpoint": str(checkpoint.absolute()), "calibration": clf.calibration_source,
            "preprocessing": clf.preprocessing.as_dict(), "columns": COLUMNS}


def prepare_output(out: Path, settings: dict, resume: bool, overwrite: bool) -> set[str]:
    """Start or reopen `out`; returns the paths already predicted (resume), after dropping a half-written line."""
    meta = out.with_name(out.name + ".json")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if out.exists() and not (resume or overwrite):
        raise ConfigError(f"--out {out} exists: pass --resume to continue it or --overwrite to start it again")
    if resume and out.exists():
        stored = json.loads(meta.read_text()) if meta.is_file() else None
        if stored is not None and stored != settings:
            changed = [key for key in settings if stored.get(key) != settings[key]]
            raise ConfigError(f"--resume: {out} was written with another {', '.join(changed)} ({meta}); "
                              "use the same settings, or --overwrite")
        return read_done(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as handle:
            csv.writer(handle).writerow(COLUMNS)
        meta.write_text(json.dumps(settings, indent=2) + "\n")
    except OSError as error:
        raise OutputWriteError(f"cannot write {out} ({error.strerror or error})") from error
    return set()


def read_done(out: Path) -> set[str]:
    """Paths in an existing predictions CSV; a last line cut off by a kill is removed from the file."""
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(out, "r+b") as handle:
            handle.truncate(len(complete))
    rows = list(csv.reader(complete.decode("utf-8").splitlines()))
    if not rows or rows[0] != COLUMNS:
        raise ConfigError(f"--resume: {out} is not a predictions CSV of this tool (header {rows[:1]}); use --overwrite")
    return {row[1] for row in rows[1:] if len(row) == len(COLUMNS)}


class AppendingCsv:
    """Rows appended and flushed to disk batch by batch, so that a kill loses at most the line being written."""

    def __init__(self, path: Path, header: list[str] | None = None):
        self.path = path
        try:
            self.handle = open(path, "a" if header is None else "w", newline="")
        except OSError as error:
            raise OutputWriteError(f"cannot write {path} ({error.strerror or error})") from error
        self.writer = csv.writer(self.handle)
        if header is not None:
            self.write([header])

    def write(self, rows: list[list]) -> None:
        self.writer.writerows(rows)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else find_latest_best()
    calibration = None if args.calibration == "none" else args.calibration
    clf = Classifier.from_checkpoint(checkpoint, device=args.device, calibration=calibration,
                                     batch_size=args.batch_size, workers=args.workers)
    print(f"checkpoint: {checkpoint} ({clf.policy.describe()}; preprocessing {clf.preprocessing.describe()}; "
          f"calibration {clf.calibration_source or 'none'})")
    items = resolve_inputs(args.inputs)
    out = Path(args.out)
    done = prepare_output(out, settings_of(clf, checkpoint), args.resume, args.overwrite)
    todo = [item for item in items if item[1] not in done]
    failed_path = Path(args.failed) if args.failed else out.with_name("failed.csv")
    rows, failures = AppendingCsv(out), AppendingCsv(failed_path, FAILED_COLUMNS)
    print(f"{len(items)} image(s) found, {len(items) - len(todo)} already in {out}, {len(todo)} to predict")
    predicted, failed, started = 0, [], time.perf_counter()
    progress = None if args.no_progress else _progress_bar(len(todo))
    try:
        for part in clf.iter_predict(todo):
            rows.write([[name, path, *(f"{p:.6f}" for p in probs)]
                        for name, path, probs in zip(part.images, part.paths, part.probabilities)])
            failures.write([[entry["image"], entry["path"], entry["error"]] for entry in part.failures])
            predicted, failed = predicted + len(part.images), failed + part.failures
            if progress is not None:
                progress.update(len(part.images) + len(part.failures))
                progress.set_postfix(failed=len(failed))
    finally:
        rows.close()
        failures.close()
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - started
    print(f"predicted {predicted} image(s) in {seconds:.1f} s ({predicted / max(seconds, 1e-9):.1f} images/s), "
          f"{len(items) - len(todo)} skipped (already in {out}), {len(failed)} unreadable; "
          f"{'calibrated' if clf.temperatures else 'uncalibrated'} probabilities in {out}")
    if failed:
        print(f"error: {len(failed)} image(s) could not be read (listed in {failed_path}):", file=sys.stderr)
        for entry in failed[:20]:
            print(f"  {entry['error']}", file=sys.stderr)
        return 1
    return 0


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
