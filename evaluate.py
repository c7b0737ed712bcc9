"""Evaluate a checkpoint: per-class AUROC with patient-bootstrap CIs, AUPRC, operating points, calibration.

    python evaluate.py                                          # latest runs/*/best.pt on its own test split
    python evaluate.py --checkpoint runs/X/best.pt --split test --tta flip
    torchrun --nproc_per_node=8 evaluate.py --checkpoint runs/X/best.pt --data-dir /data/nih

Probabilities are temperature-scaled per class (fitted on the validation split; --calibration none to keep
them raw). Thresholds are chosen on the calibrated validation probabilities (Youden's J, or max-F1 with
--threshold-method f1) and applied to the evaluated split. Writes metrics.json, metrics.csv, predictions.csv,
thresholds.json, calibration.json, roc_curves.png, reliability.png and the subgroup audit (subgroups.json,
subgroups.csv, subgroups.png; --subgroups sex,age,view,<any table column> or none) into --out
(default: <run dir>/eval-<split>).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from cxr.audit import describe_run, evaluation_report, format_report_notes, metadata_of, subgroup_columns, write_report_files
from cxr.checkpoint import find_latest_best
from cxr.device import device_policy
from cxr.distributed import RankZero, cleanup_distributed, setup_distributed
from cxr.engine import predict
from cxr.errors import ConfigError, describe_os_error, run_main
from cxr.factory import load_data, load_trained_model, make_dataset, make_loader, open_cache, resolve_data_dir
from cxr.labels import FINDINGS
from cxr.plots import plot_reliability, plot_roc_curves
from cxr.report import format_table
from cxr.rundir import OutputWriteError, writable_folder
from cxr.transforms import Preprocessing

TENCROP_RESIZE = 256 / 224  # CheXNet: resize to 256, ten 224 crops


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a best.pt/last.pt (default: the newest runs/*/best.pt)")
    parser.add_argument("--data-dir", help="dataset folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--out", help="output folder (default: <run dir>/eval-<split>)")
    parser.add_argument("--skip-missing", action="store_true", help="drop rows whose image is not on disk")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the training run's)")
    parser.add_argument("--tta", default="none", choices=("none", "flip", "tencrop"), help="test-time augmentation")
    parser.add_argument("--threshold-method", default="youden", choices=("youden", "f1"))
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap resamples for the CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--calibration", default="temperature", choices=("temperature", "none"),
                        help="per-class temperature scaling fitted on the validation split")
    parser.add_argument("--subgroups", default="sex,age,view",
                        help="subgroup audit: sex, age, view, follow-up and/or table column names, comma-separated; none")
    parser.add_argument("--tensorboard", action="store_true", help="also log PR curves and metrics to the run's TensorBoard")
    return parser


def tta_views(mode: str, image_size: int):
    """The test-time views of a normalized batch: the batch itself, + its mirror, or ten crops."""
    if mode == "none":
        return None
    if mode == "flip":
        return lambda batch: [batch, torch.flip(batch, dims=[3])]
    return lambda batch: list(TF.ten_crop(batch, [image_size, image_size]))


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: evaluate(build_parser().parse_args(argv)))


def evaluate(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.bootstrap < 0 or (args.workers is not None and args.workers < 0):
        raise ConfigError("--batch-size must be >= 1, --bootstrap >= 0 and --workers >= 0")
    ctx = setup_distributed(args.device)
    try:
        return run(args, ctx)
    finally:
        cleanup_distributed(ctx)


def run(args: argparse.Namespace, ctx) -> int:
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else find_latest_best()
    model, config, checkpoint = load_trained_model(checkpoint_path, ctx.device)
    log = RankZero(ctx, None)
    log.print(f"checkpoint: {checkpoint_path} (epoch {checkpoint.get('epoch')}, val mean AUROC {checkpoint.get('best_metric', float('nan')):.4f})")
    if args.data_dir:
        config.data_dir = args.data_dir
    config.skip_missing = config.skip_missing or args.skip_missing
    if args.workers is not None:
        config.workers = args.workers
    out = Path(args.out) if args.out else checkpoint_path.parent / f"eval-{args.split}"
    if ctx.is_main:
        writable_folder(out)  # find out now, not after predicting the whole split
    policy = device_policy(config, ctx.device)
    policy.prepare_model(model)
    data = load_data(config, resolve_data_dir(config, ctx))
    log.print(data.summary())

    preprocessing = Preprocessing.from_checkpoint(checkpoint)
    if args.tta == "tencrop":  # CheXNet: resize to 256, ten 224 crops
        preprocessing = preprocessing.with_size(round(preprocessing.size * TENCROP_RESIZE))
    cache = open_cache(config, preprocessing) if args.tta != "tencrop" else None
    views = tta_views(args.tta, config.image_size)

    def predict_split(split: str) -> dict:
        loader = make_loader(make_dataset(config, data, split, preprocessing, train=False, cache=cache), config, ctx,
                             train=False, batch_size=args.batch_size)
        return predict(model, loader, ctx, policy, desc=f"predict {split}", log=log, views=views)

    validation = predict_split("val")
    result = validation if args.split == "val" else predict_split(args.split)
    log.print(f"{args.split}: {len(result['labels'])} images predicted at {result['images_per_s']:.1f} images/s "
              f"per process ({policy.describe()}, TTA {args.tta})")
    if not ctx.is_main:
        return 0

    rows = data.splits[args.split]
    patient_ids = data.index.patient_ids[rows]
    train_meta = {**metadata_of(data, data.splits["train"]), "labels": data.index.labels[data.splits["train"]]}
    report = evaluation_report(validation, result, patient_ids, subgroup_columns(args.subgroups, data, rows), train_meta,
                               metadata_of(data, rows), FINDINGS, args.threshold_method, args.bootstrap, args.seed,
                               calibrate=args.calibration == "temperature", same_split=args.split == "val")
    summary, thresholds = report["summary"], report["thresholds"]
    result = {**result, "probabilities": report["probabilities"], "raw_probabilities": report["raw_probabilities"]}
    summary.update(split=args.split, checkpoint=str(checkpoint_path), data_dir=str(data.data_dir), tta=args.tta,
                   threshold_method=args.threshold_method, thresholds_from="val",
                   note="thresholds chosen on the same split" if args.split == "val" else "thresholds chosen on the validation split",
                   run=describe_run(args, config, data, checkpoint))
    try:
        write_outputs(out, summary, result, data.index.image_names[rows], patient_ids, thresholds, args.threshold_method)
        write_report_files(out, report)
    except OSError as error:
        raise OutputWriteError(describe_os_error(error, out)) from error
    print(format_table(summary, FINDINGS))
    print(format_report_notes(report))
    print(f"This evaluation: the {args.split} split of {data.data_dir} ({len(rows)} images, "
          f"{len(np.unique(patient_ids))} patients); {data.notes[-1]}; TTA {args.tta}.")
    print(f"\nwrote {', '.join(sorted(path.name for path in out.iterdir()))} to {out}")
    if args.tensorboard:
        log_tensorboard(checkpoint_path.parent / "tensorboard", summary, result, args.split, int(checkpoint.get("epoch", 0)))
    return 0


def write_outputs(out: Path, summary: dict, result: dict, image_names: np.ndarray, patient_ids: np.ndarray,
                  thresholds: np.ndarray, method: str) -> None:
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    fields = ["auroc", "ci_low", "ci_high", "auprc", "threshold", "sensitivity", "specificity", "ppv", "npv", "f1",
              "ece", "prevalence", "n", "positives", "metadata_auroc"]
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["finding", *fields])
        for name in FINDINGS:
            writer.writerow([name, *("" if summary["classes"][name].get(key) is None else summary["classes"][name][key] for key in fields)])
        low, high = summary["mean_auroc_ci"]
        writer.writerow(["mean", summary["mean_auroc"], low, high, *[""] * (len(fields) - 3)])
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Patient ID", *FINDINGS, *(f"label_{name}" for name in FINDINGS)])
        for name, patient, probabilities, labels in zip(image_names, patient_ids, result["probabilities"], result["labels"]):
            writer.writerow([name, int(patient), *(f"{p:.6f}" for p in probabilities), *(f"{v:g}" for v in labels)])
    (out / "thresholds.json").write_text(json.dumps(
        {"method": method, "chosen_on": "val",
         "applies_to": "temperature-scaled probabilities (calibration.json)"
         if summary.get("calibration", {}).get("method") == "temperature" else "raw probabilities", "thresholds": {n: (None if np.isnan(t) else float(t)) for n, t in zip(FINDINGS, thresholds)}}, indent=2))
    plot_roc_curves(result["labels"], result["probabilities"], FINDINGS, out / "roc_curves.png")
    plot_reliability(result["labels"], result["probabilities"], FINDINGS, out / "reliability.png", before=result.get("raw_probabilities"))


def log_tensorboard(log_dir: Path, summary: dict, result: dict, split: str, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for column, name in enumerate(FINDINGS):
            labels = result["labels"][:, column]
            known = ~np.isnan(labels)
            writer.add_pr_curve(f"eval_{split}/pr/{name}", labels[known], result["probabilities"][known, column], step)
            if summary["classes"][name]["auroc"] is not None:
                writer.add_scalar(f"eval_{split}/auroc/{name}", summary["classes"][name]["auroc"], step)
        if summary["mean_auroc"] is not None:
            writer.add_scalar(f"eval_{split}/mean_auroc", summary["mean_auroc"], step)


if __name__ == "__main__":
    sys.exit(main())
