"""Preflight an NIH ChestX-ray14 folder before a long run.

    python scripts/check_dataset.py --data-dir /data/nih [--json report.json] [--skip-missing] [--decode --workers 16]

Exit code 1 when an image on disk is unreadable, or when images are missing and --skip-missing is not given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.errors import ConfigError, run_main  # noqa: E402
from cxr.preflight import format_report, preflight  # noqa: E402
from cxr.rundir import describe_os_error  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: check(argv), error_status=2)


def check(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder with Data_Entry_2017.csv and the images")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--skip-missing", action="store_true", help="count labels and splits over the images on disk only")
    parser.add_argument("--decode", action="store_true", help="fully decode every image (slow), not only header/trailer")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the image checks")
    parser.add_argument("--split", default="auto", choices=("auto", "official", "random"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    report = preflight(args.data_dir, args.skip_missing, args.decode, args.workers, args.split, seed=args.seed)
    print(format_report(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2))
        except OSError as error:
            raise ConfigError(f"--json: {describe_os_error(error, args.json)}") from error
        print(f"JSON report: {args.json}")
    broken = bool(report["unreadable"]) or (report["images_missing"] > 0 and not args.skip_missing)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
