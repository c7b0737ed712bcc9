"""A model card for a training run, from its own files: config, checkpoints, evaluation and localization outputs.

    text = model_card("runs/X")                   # Markdown; scripts/model_card.py writes it to MODEL_CARD.md

Every figure is read from the run directory (best.pt / last.pt, RUN/eval-<split>/metrics.json, thresholds.json,
calibration.json, RUN/**/localization.json) or recomputed from the run's config and data folder (split sizes,
filters). A part that is not there is named as missing, with the command that produces it; nothing is invented.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr.checkpoint import BEST_NAME, LAST_NAME, CheckpointMissingError, load_checkpoint
from cxr.errors import CxrError
from cxr.labels import FINDINGS
from cxr.report import CHEXNET_AUROC, CHEXNET_FOOTNOTE, CHEXNET_MEAN_AUROC
from cxr.transforms import Preprocessing

CITATION = """Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray Database and
Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases. CVPR 2017.
Please acknowledge the NIH Clinical Center as the data provider."""


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _missing(what: str, how: str) -> str:
    return f"_Missing: {what}. {how[0].upper() + how[1:]}_"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CxrError(f"{path}: cannot read it as JSON ({error}); re-run the step that wrote it") from error


def _model_section(config: dict, checkpoint: dict) -> list[str]:
    parameters = sum(tensor.numel() for tensor in checkpoint["model"].values() if tensor.is_floating_point())
    hidden = config.get("hidden") or "none"
    return ["## Model", "",
            f"- Architecture: torchvision DenseNet121 trunk (output stride {config.get('output_stride')}) → global average pool → "
            f"BatchNorm → dense head (hidden sizes {hidden}, ReLU, dropout {config.get('dropout')}) → 14 logits; sigmoid per finding.",
            f"- Parameters: {parameters:,} (floating-point tensors of the state dict).",
            f"- Trunk initialisation (`--weights`): {config.get('weights')}.",
            f"- Input: 1-channel images at {config.get('image_size')} px in [0, 255]; ImageNet normalization is the model's first layer.",
            f"- Checkpoint schema version {checkpoint.get('schema_version')}; findings in Wang et al. order: {', '.join(FINDINGS)}.", ""]


def _data_section(config: dict, data_loader: Callable[[dict], Any] | None) -> list[str]:
    lines = ["## Training data", ""]
    folder = config.get("data_dir") or "the synthetic NIH-format demo set (no --data-dir)"
    lines.append(f"- Data folder: {folder}.")
    lines.append(f"- View filter (`--views`): {config.get('views')}; skip images missing on disk (`--skip-missing`): "
                 f"{config.get('skip_missing')}.")
    lines.append(f"- Split (`--split`): {config.get('split')}, validation fraction {config.get('val_fraction')}"
                 + (f", test fraction {config.get('test_fraction')}" if config.get("split") != "official" else "") + ", by patient.")
    data = None
    if data_loader is not None:
        try:
            data = data_loader(config)
        except CxrError as error:
            lines.append(_missing("the table version, split sizes and skipped images", f"the data folder could not be read ({error})"))
    else:
        lines.append(_missing("the table version, split sizes and skipped images", "the data folder was not read (--no-data)"))
    if data is not None:
        lines.append(f"- Label table: {data.table_path.name} ({len(data.index)} images after filters).")
        lines += [f"- {note}" for note in data.notes]
        lines += ["", "| split | images | patients |", "| --- | ---: | ---: |"]
        import numpy as np

        for name, rows in data.splits.items():
            lines.append(f"| {name} | {len(rows)} | {len(np.unique(data.index.patient_ids[rows]))} |")
    return lines + [""]


def _training_section(config: dict, best: dict, last: dict | None) -> list[str]:
    preprocessing = Preprocessing.from_checkpoint(best)
    history = (last or best).get("history") or []
    lines = ["## Preprocessing and training", "",
             f"- Preprocessing: decode to 8-bit gray → resize → {preprocessing.describe()} (`preprocessing.json` of an export holds the same).",
             f"- Augmentation strength {config.get('augment_strength')}, horizontal flips {config.get('hflip')}.",
             f"- Schedule: {config.get('epochs')} epochs planned, {config.get('warmup_epochs')} with the trunk frozen, then the last "
             f"{config.get('unfreeze')} dense block(s) unfrozen at lr × {config.get('trunk_lr_mult')}; {config.get('optimizer')} lr "
             f"{config.get('lr')}, weight decay {config.get('weight_decay')}, {config.get('scheduler')} schedule, batch "
             f"{config.get('batch_size')} per process, label smoothing {config.get('label_smoothing')}, pos_weight "
             f"{config.get('pos_weight')}, early stopping patience {config.get('patience')}.",
             f"- Epochs run: {(last or best).get('epoch')}" + ("" if last else " (no last.pt: taken from best.pt)")
             + f"; best.pt written after epoch {best.get('epoch')} (its validation criterion: {_fmt(best.get('best_metric'), 4)}; "
             "mean AUROC, or minus the loss while AUROC is undefined)."]
    if history:
        lines += ["", "| epoch | phase | train loss | val loss | val mean AUROC |", "| ---: | ---: | ---: | ---: | ---: |"]
        for entry in history:
            auroc = entry.get("val_mean_auroc")
            auroc = None if auroc is None or auroc != auroc else auroc
            lines.append(f"| {entry.get('epoch')} | {entry.get('phase')} | {_fmt(entry.get('train_loss'), 4)} | "
                         f"{_fmt(entry.get('val_loss'), 4)} | {_fmt(auroc)} |")
    return lines + [""]


def _evaluation_section(run: Path, config: dict) -> tuple[list[str], dict | None]:
    folder = run / "eval-test"
    if not (folder / "metrics.json").is_file():
        done = sorted(path.parent.name for path in run.glob("eval-*/metrics.json"))
        return ["## Test performance", "", _missing("test-split evaluation (RUN/eval-test/metrics.json)",
                f"Run `python evaluate.py --checkpoint {run / BEST_NAME} --split test`"
                + (f" (only {', '.join(done)} exist)." if done else ".")), ""], None
    metrics = _read_json(folder / "metrics.json")
    low, high = metrics.get("mean_auroc_ci") or [None, None]
    lines = ["## Test performance", "",
             f"Split `{metrics.get('split')}` of {metrics.get('data_dir')}: {metrics.get('n_images')} images, "
             f"{metrics.get('n_patients')} patients; TTA {metrics.get('tta')}; 95% CIs from {metrics.get('n_resamples')} "
             f"patient-bootstrap resamples; thresholds {metrics.get('threshold_method')} chosen on {metrics.get('thresholds_from')}.", "",
             "| finding | positives | AUROC [95% CI] | AUPRC | sensitivity | specificity | ECE | CheXNet AUROC |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in FINDINGS:
        entry = metrics["classes"][name]
        lines.append(f"| {name} | {entry.get('positives')} | {_fmt(entry.get('auroc'))} [{_fmt(entry.get('ci_low'))}, "
                     f"{_fmt(entry.get('ci_high'))}] | {_fmt(entry.get('auprc'))} | {_fmt(entry.get('sensitivity'))} | "
                     f"{_fmt(entry.get('specificity'))} | {_fmt(entry.get('ece'))} | {CHEXNET_AUROC[name]:.4f} |")
    lines.append(f"| **mean** | | {_fmt(metrics.get('mean_auroc'))} [{_fmt(low)}, {_fmt(high)}] | | | | | {CHEXNET_MEAN_AUROC:.3f} |")
    lines += ["", f"CheXNet comparison: {CHEXNET_FOOTNOTE} This run's split: `{config.get('split')}`"
              + (" (synthetic demo data: the figures say nothing about real X-rays)." if not config.get("data_dir") else "."),
              "A finding with a single label value in the split has no AUROC (n/a) and is left out of the mean.", ""]
    lines += _headline_lines(metrics) + _shortcut_lines(metrics) + _subgroup_lines(folder)
    return lines, metrics


def _headline_lines(metrics: dict) -> list[str]:
    headline = metrics.get("headline") or {}
    if headline.get("val_minus_evaluated") is None:
        return []
    return [f"Validation mean AUROC {_fmt(headline.get('val_mean_auroc'))} vs {_fmt(headline.get('mean_auroc'))} here: "
            f"a gap of {_fmt(headline['val_minus_evaluated'])}. {headline.get('note', '')}", ""]


def _shortcut_lines(metrics: dict) -> list[str]:
    baseline = metrics.get("metadata_baseline")
    lines = ["### Shortcut baseline", ""]
    if not baseline:
        return lines + [_missing("shortcut baseline", "this evaluation reports no metadata baseline"), ""]
    lines += [f"A {baseline.get('model', 'logistic regression')} on the metadata alone ({', '.join(baseline.get('features', []))}), "
              f"fitted on {baseline.get('fitted_on', 'train')}: how much of each AUROC needs no image.", "",
              "| finding | model AUROC | metadata-only AUROC |", "| --- | ---: | ---: |"]
    for name in FINDINGS:
        lines.append(f"| {name} | {_fmt(metrics['classes'][name].get('auroc'))} | {_fmt(baseline.get('auroc', {}).get(name))} |")
    return lines + [""]


def _subgroup_lines(folder: Path) -> list[str]:
    lines = ["### Subgroup gaps", ""]
    path = folder / "subgroups.json"
    if not path.is_file():
        return lines + [_missing("subgroup gaps", "this evaluation reports no subgroups"), ""]
    attributes = _read_json(path).get("attributes", {})
    lines += ["Largest difference between subgroups per finding (AUROC, and true-positive rate at the validation "
              "threshold: the underdiagnosis measure); n/a where a subgroup is too small.", "",
              "| finding | " + " | ".join(f"{name} AUROC gap | {name} TPR gap" for name in attributes) + " |",
              "| --- | " + " | ".join("---: | ---:" for _ in attributes) + " |"]
    for finding in FINDINGS:
        cells = []
        for attribute in attributes.values():
            gaps = attribute.get("gaps", {}).get(finding, {})
            cells += [_fmt((gaps.get("auroc") or {}).get("gap")), _fmt((gaps.get("tpr") or {}).get("gap"))]
        lines.append(f"| {finding} | " + " | ".join(cells) + " |")
    excluded = {name: attribute.get("excluded") for name, attribute in attributes.items() if attribute.get("excluded")}
    if excluded:
        lines.append(f"Left out of the groups (unknown or impossible values): {excluded}.")
    return lines + [""]


def _calibration_section(run: Path, metrics: dict | None) -> list[str]:
    lines = ["## Calibration", ""]
    calibration = (metrics or {}).get("calibration")
    if calibration and calibration.get("classes"):
        rows = calibration["classes"].values()

        def mean(key: str) -> str:
            known = [row[key] for row in rows if row.get(key) is not None]
            return _fmt(sum(known) / len(known)) if known else "n/a"

        lines.append(f"- Per-class temperature scaling fitted on {calibration.get('fitted_on')}: mean ECE {mean('ece_before')} "
                     f"before, {mean('ece_after')} after; mean Brier score {mean('brier_before')} before, "
                     f"{mean('brier_after')} after (test split).")
    elif metrics is not None:
        eces = [metrics["classes"][name].get("ece") for name in FINDINGS]
        known = [value for value in eces if value is not None]
        lines.append(f"- Expected calibration error on the test split: mean {_fmt(sum(known) / len(known)) if known else 'n/a'}.")
    paths = sorted(run.glob("eval-*/calibration.json"))
    if paths:
        values = _read_json(paths[0])
        temperatures = values.get("temperatures", values) if isinstance(values, dict) else values
        lines.append(f"- Temperature scaling ({paths[0].relative_to(run)}), applied by `cxr.Classifier` and scripts/predict.py: "
                     + ", ".join(f"{name} {temperatures[name]:.3g}" for name in FINDINGS if name in temperatures) + ".")
    else:
        lines.append("- " + _missing("calibration.json", "predictions are plain sigmoid probabilities; evaluate.py writes it once calibration is fitted"))
    return lines + [""]


def _localization_section(run: Path) -> list[str]:
    reports = sorted(run.glob("**/localization.json"))
    if not reports:
        return ["## Localization", "", _missing("a localization report", f"Run `python explain.py --checkpoint {run / BEST_NAME} "
                "--localization-report RUN/localization`"), ""]
    scores = _read_json(reports[0])
    overall = scores["overall"]
    lines = ["## Localization", "", f"From {reports[0].relative_to(run)} (Grad-CAM on {scores.get('layer')}, {overall['boxes']} boxes "
             f"on {scores.get('images')} images; boxes by split {scores.get('boxes_by_split')}).", "",
             "| finding | boxes | " + " | ".join(f"IoBB>{t}" for t in overall["iobb"]) + " | pointing |",
             "| --- | ---: |" + " ---: |" * (len(overall["iobb"]) + 1)]
    for name, entry in [*scores["per_class"].items(), ("**overall**", overall)]:
        lines.append(f"| {name} | {entry['boxes']} | " + " | ".join(_fmt(v, 2) for v in entry["iobb"].values())
                     + f" | {_fmt(entry.get('pointing'), 2)} |")
    return lines + [""]


def model_card(run_dir: str | Path, data_loader: Callable[[dict], Any] | None = None) -> str:
    """The Markdown card of a run directory; `data_loader(config)` gives its NihData (None: data not read)."""
    run = Path(run_dir)
    best_path, last_path = run / BEST_NAME, run / LAST_NAME
    if not best_path.is_file():
        raise CheckpointMissingError(f"{run}: no {BEST_NAME}; pass a run directory written by train.py")
    best = load_checkpoint(best_path)
    last = load_checkpoint(last_path) if last_path.is_file() else None
    config = best["config"]
    evaluation, metrics = _evaluation_section(run, config)
    demo = not config.get("data_dir")
    sections = [f"# Model card: {run.resolve().name}", "",
                f"Multi-label classifier of the 14 ChestX-ray14 findings, trained with cxr. Generated from {run} by scripts/model_card.py."
                + (" **This is a demo run on synthetic images.**" if demo else ""), "",
                *_model_section(config, best), *_data_section(config, data_loader), *_training_section(config, best, last),
                *evaluation, *_calibration_section(run, metrics), *_localization_section(run),
                "## Intended use and limitations", "",
                "- Research on chest X-ray classification and its evaluation. **Not a medical device**; not for diagnosis or triage.",
                "- NIH ChestX-ray14 labels were text-mined from radiology reports (estimated accuracy above 90% but imperfect); "
                "test figures measure agreement with those labels, not with radiologists.",
                "- One hospital's images (NIH Clinical Center): performance on other sites, scanners, populations and views is unknown "
                "until measured; AP and PA views differ, and models can learn shortcuts (devices, markers, view).",
                "- Grad-CAM maps show where evidence sits for the model, at the resolution of its last feature map; they are not segmentations.",
                "", "## Citation", "", CITATION, ""]
    return "\n".join(sections)
