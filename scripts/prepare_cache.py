"""Decode and preprocess every NIH image once into a cache folder, so that training epochs skip PNG decoding.

    python scripts/prepare_cache.py --data-dir /data/nih --out /fast/nih-256 --size 256 --workers 16
    python train.py --data-dir /data/nih --cache-dir /fast/nih-256 --image-size 256

--size / --preprocess / --clahe-clip / --clahe-grid must equal the training run's --image-size / --preprocess /
--clahe-clip / --clahe-grid (train.py checks and says what to rebuild). An interrupted (Ctrl-C) or failed build
resumes: run the same command again and only the images not yet cached are decoded.
Exit code 1 when some images could not be decoded, 2 on a bad folder or flag, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.cache_build import CacheBuildError, build_cache  # noqa: E402
from cxr.errors import CxrError  # noqa: E402
from cxr.transforms import PREPROCESS_CHOICES, Preprocessing  # noqa: E402


def format_summary(summary: dict) -> str:
    """The build summary and the training flags that use the cache."""
    params = summary["params"]
    out = shlex.quote(summary["cache_dir"])
    return "\n".join([
        f"cache: {summary['cache_dir']} ({summary['images']} images of {params['size']}x{params['size']}, "
        f"{params['preprocess']}, CLAHE clip {params['clahe_clip']} grid {params['clahe_grid']}; "
        f"{summary['bytes'] / 2**20:.1f} MiB)",
        f"decoded {summary['decoded']} images in this run ({summary['already_done']} were already cached) in "
        f"{summary['seconds']:.1f} s: {summary['images_per_second']:.1f} images/s with {summary['workers']} worker(s)",
        f"train with: --cache-dir {out} --image-size {params['size']} --preprocess {params['preprocess']} "
        f"--clahe-clip {params['clahe_clip']} --clahe-grid {params['clahe_grid']}",
    ])


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build (or finish) the cache, print the summary; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder with Data_Entry_2017.csv and the images")
    parser.add_argument("--out", required=True, help="cache folder to create or finish (pass it to train.py as --cache-dir)")
    parser.add_argument("--size", type=int, required=True, help="image side in pixels (= train.py --image-size)")
    parser.add_argument("--preprocess", default="clahe", choices=PREPROCESS_CHOICES, help="contrast enhancement")
    parser.add_argument("--clahe-clip", type=float, default=2.0, help="CLAHE clip limit")
    parser.add_argument("--clahe-grid", type=int, default=8, help="CLAHE tiles per side")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default: all usable cores)")
    parser.add_argument("--skip-missing", action="store_true", help="cache the images on disk, ignore rows whose image is absent")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        preprocessing = Preprocessing(args.size, args.preprocess, args.clahe_clip, args.clahe_grid)
        summary = build_cache(args.data_dir, args.out, preprocessing, workers=args.workers,
                              skip_missing=args.skip_missing, progress=not args.no_progress)
    except CacheBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except CxrError as error:  # bad folder, table or flag
        message = str(error).replace("--image-size", "--size")  # this script calls the image size --size
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: progress is saved in {args.out}; run the same command again to finish the cache",
              file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
