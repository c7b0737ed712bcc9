"""Write a model card (Markdown) for a training run from its config, checkpoints and evaluation folders.

    python scripts/model_card.py runs/X --out runs/X/MODEL_CARD.md
    python scripts/model_card.py runs/X --out MODEL_CARD.md --no-data     # without reading the data folder

Split sizes, the label table and filters are recomputed from the run's config and data folder (as train.py
saw them); AUROCs, CIs and ECE come from RUN/eval-test/metrics.json, localization from a localization.json in
the run, temperatures from calibration.json. Missing parts are named as missing. Exit status 2 on a bad run folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.errors import run_main  # noqa: E402
from cxr.model_card import model_card  # noqa: E402
from cxr.rundir import OutputWriteError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run directory (holds best.pt)")
    parser.add_argument("--out", default="MODEL_CARD.md", help="where to write the card")
    parser.add_argument("--no-data", action="store_true", help="do not read the data folder (split sizes become missing)")
    return parser


def load_run_data(config: dict):
    """The run's data as train.py loaded it (the demo set when there was no --data-dir)."""
    from cxr.config import Config
    from cxr.factory import load_data
    from cxr.synthetic import ensure_demo_dataset

    run_config = Config.from_dict(config)
    folder = run_config.data_dir or ensure_demo_dataset(patients=run_config.synthetic_patients, size=run_config.synthetic_size)
    return load_data(run_config, Path(folder))


def run(args: argparse.Namespace) -> int:
    text = model_card(args.run, data_loader=None if args.no_data else load_run_data)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as error:
        raise OutputWriteError(f"cannot write {out} ({error.strerror or error})") from error
    missing = text.count("_Missing:")
    print(f"wrote {out} ({missing} part(s) missing, named in the card)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(build_parser().parse_args(argv)), error_status=2)


if __name__ == "__main__":
    sys.exit(main())
