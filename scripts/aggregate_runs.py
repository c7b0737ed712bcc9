"""Mean ± standard deviation over training runs that differ only in the seed: what a paper reports.

    python scripts/aggregate_runs.py runs/seed0 runs/seed1 runs/seed2 --out runs/aggregate
    python scripts/aggregate_runs.py runs/* --eval eval-test --allow-differences

Each RUN is a training run directory holding config.yaml and an evaluation folder (--eval, default eval-test,
with metrics.json from evaluate.py). Runs whose configs differ in anything but the seed (bookkeeping keys such
as the output folder, workers or logging aside) are refused and the differences printed, unless
--allow-differences; their evaluations must agree on split, TTA, calibration and the number of images.
Writes aggregate.json and aggregate.csv into --out when given.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from cxr.errors import CxrError, run_main  # noqa: E402
from cxr.labels import FINDINGS  # noqa: E402
from cxr.report import CHEXNET_AUROC, CHEXNET_MEAN_AUROC, to_jsonable  # noqa: E402

IGNORED_KEYS = ("seed", "out", "resume", "workers", "log_every", "tensorboard")  # do not change what is learned
EVALUATION_KEYS = ("split", "tta", "calibration")


class AggregateError(CxrError, ValueError):
    """Runs that cannot be pooled; the message names the run and says what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training run directories (config.yaml + an evaluation folder)")
    parser.add_argument("--eval", default="eval-test", help="evaluation folder inside each run (default eval-test)")
    parser.add_argument("--allow-differences", action="store_true", help="pool runs whose configs differ beyond the seed")
    parser.add_argument("--out", help="write aggregate.json and aggregate.csv here")
    return parser


def load_run(run: Path, eval_name: str) -> tuple[dict, dict]:
    """(config, metrics) of one run; errors name the missing file."""
    config_path, metrics_path = run / "config.yaml", run / eval_name / "metrics.json"
    for path, hint in ((config_path, "is it a training run directory?"), (metrics_path, f"run evaluate.py --checkpoint {run}/best.pt first")):
        if not path.is_file():
            raise AggregateError(f"{path}: no such file; {hint}")
    try:
        return yaml.safe_load(config_path.read_text()) or {}, json.loads(metrics_path.read_text())
    except (yaml.YAMLError, ValueError) as error:
        raise AggregateError(f"{run}: unreadable config.yaml or metrics.json ({error})") from error


def differences(configs: list[dict], evaluations: list[dict], names: list[str]) -> list[str]:
    """One line per config key (other than IGNORED_KEYS) or evaluation setting whose value is not the same in every run."""
    lines = []
    keys = sorted(set().union(*configs) - set(IGNORED_KEYS))
    for key in keys:
        values = [config.get(key) for config in configs]
        if any(value != values[0] for value in values):
            lines.append(f"config {key}: " + ", ".join(f"{name}={value!r}" for name, value in zip(names, values)))
    for key in (*EVALUATION_KEYS, "n_images"):
        values = [evaluation.get("run", {}).get(key, evaluation.get(key)) for evaluation in evaluations]
        if any(value != values[0] for value in values):
            lines.append(f"evaluation {key}: " + ", ".join(f"{name}={value!r}" for name, value in zip(names, values)))
    return lines


def mean_sd(values: list) -> dict:
    """Mean, sample standard deviation (ddof 1), min, max and count of the non-missing values."""
    array = np.array([np.nan if value is None else value for value in values], dtype=np.float64)
    array = array[~np.isnan(array)]
    if len(array) == 0:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else None,
            "min": float(array.min()), "max": float(array.max()), "n": int(len(array))}


def aggregate(evaluations: list[dict]) -> dict:
    """Per class and for the mean: the model's AUROC and the metadata baseline's, mean ± sd over runs."""
    classes = {name: {"auroc": mean_sd([e["classes"][name]["auroc"] for e in evaluations]),
                      "metadata_auroc": mean_sd([e["classes"][name].get("metadata_auroc") for e in evaluations])}
               for name in FINDINGS}
    return {"classes": classes, "mean_auroc": mean_sd([e["mean_auroc"] for e in evaluations]),
            "metadata_mean_auroc": mean_sd([e.get("metadata_baseline", {}).get("mean_auroc") for e in evaluations]),
            "val_minus_evaluated": mean_sd([e.get("headline", {}).get("val_minus_evaluated") for e in evaluations]),
            "n_runs": len(evaluations)}


def _cell(stats: dict, digits: int = 3) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}" if stats["sd"] is not None else f"{stats['mean']:.{digits}f}"


def format_aggregate(result: dict, seeds: list) -> str:
    """The pooled table: AUROC mean ± sd [min, max] over the runs, the metadata baseline, CheXNet."""
    width = max(len("Finding"), *map(len, FINDINGS))
    header = f"{'Finding':<{width}}  {'AUROC mean ± sd':<15}  {'[min, max]':<14}  {'Meta':<13}  {'CheXNet':>7}"
    lines = [f"{result['n_runs']} runs (seeds {', '.join(map(str, seeds))})", header, "-" * len(header)]
    for name in FINDINGS:
        stats = result["classes"][name]["auroc"]
        spread = "n/a" if stats["mean"] is None else f"[{stats['min']:.3f}, {stats['max']:.3f}]"
        lines.append(f"{name:<{width}}  {_cell(stats):<15}  {spread:<14}  {_cell(result['classes'][name]['metadata_auroc']):<13}  "
                     f"{CHEXNET_AUROC[name]:>7.4f}")
    lines.append("-" * len(header))
    stats = result["mean_auroc"]
    spread = "n/a" if stats["mean"] is None else f"[{stats['min']:.3f}, {stats['max']:.3f}]"
    lines.append(f"{'Mean':<{width}}  {_cell(stats):<15}  {spread:<14}  {_cell(result['metadata_mean_auroc']):<13}  "
                 f"{CHEXNET_MEAN_AUROC:>7.4f}")
    if result["val_minus_evaluated"]["mean"] is not None:
        lines.append(f"validation minus evaluated mean AUROC: {_cell(result['val_minus_evaluated'])}")
    lines.append("sd: sample standard deviation over runs (ddof 1). Meta: metadata-only baseline (no image).")
    return "\n".join(lines)


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    runs = [Path(run) for run in args.runs]
    loaded = [load_run(run, args.eval) for run in runs]
    configs, evaluations = [config for config, _ in loaded], [metrics for _, metrics in loaded]
    names = [run.name for run in runs]
    found = differences(configs, evaluations, names)
    if found:
        print("runs differ beyond the seed:\n  " + "\n  ".join(found), file=sys.stderr)
        if not args.allow_differences:
            raise AggregateError(f"{len(found)} difference(s) between {', '.join(map(str, runs))} (listed above); "
                                 "pool only runs that differ in the seed, or pass --allow-differences")
    result = aggregate(evaluations)
    result.update(runs=[str(run) for run in runs], seeds=[config.get("seed") for config in configs], differences=found)
    print(format_aggregate(result, result["seeds"]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "aggregate.json").write_text(json.dumps(to_jsonable(result), indent=2))
        with open(out / "aggregate.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["finding", "auroc_mean", "auroc_sd", "auroc_min", "auroc_max", "metadata_auroc_mean", "n_runs"])
            rows = [(name, result["classes"][name]["auroc"], result["classes"][name]["metadata_auroc"]) for name in FINDINGS]
            rows.append(("mean", result["mean_auroc"], result["metadata_mean_auroc"]))
            for name, stats, meta in rows:
                writer.writerow([name, *("" if stats[key] is None else stats[key] for key in ("mean", "sd", "min", "max")),
                                 "" if meta["mean"] is None else meta["mean"], stats["n"]])
        print(f"wrote aggregate.json, aggregate.csv to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
