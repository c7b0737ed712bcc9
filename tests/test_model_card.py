"""The model card of a demo run holds its real figures (checked against metrics.json) and names what is missing."""

from __future__ import annotations

import json
import shutil

import pytest

from cxr.labels import FINDINGS
from tests.test_train import run_cli


@pytest.mark.slow
def test_card_of_a_demo_run_has_its_figures(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt", "config.yaml"):
        shutil.copy(tiny_run["dir"] / name, run / name)
    result = run_cli(["evaluate.py", "--checkpoint", str(run / "best.pt"), "--bootstrap", "50", "--workers", "0"])
    assert result.returncode == 0, result.stderr[-2000:]
    card_path = tmp_path / "MODEL_CARD.md"
    result = run_cli(["scripts/model_card.py", str(run), "--out", str(card_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    card = card_path.read_text()
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    for name in FINDINGS:
        entry = metrics["classes"][name]
        assert f"| {name} | {entry['positives']} | {fmt(entry['auroc'])} [{fmt(entry['ci_low'])}, {fmt(entry['ci_high'])}] |" in card
    low, high = metrics["mean_auroc_ci"]
    assert f"| **mean** | | {fmt(metrics['mean_auroc'])} [{fmt(low)}, {fmt(high)}] |" in card
    assert f"{metrics['n_images']} images, {metrics['n_patients']} patients" in card
    assert "random patient split" in card and "Not a medical device" in card and "ChestX-ray8" in card
    assert "| test |" in card and "Data_Entry_2017.csv" in card  # split sizes recomputed from the data folder
    assert "_Missing: a localization report" in card  # none was made for this run
    # evaluate.py writes calibration, subgroups and the metadata baseline: the card carries them, not "missing"
    assert "_Missing: calibration.json" not in card and "Per-class temperature scaling fitted on val" in card
    assert "| sex AUROC gap | sex TPR gap |" in card and "### Shortcut baseline" in card
    baseline = metrics["metadata_baseline"]["auroc"]
    for name in FINDINGS:
        assert f"| {name} | {fmt(metrics['classes'][name]['auroc'])} | {fmt(baseline[name])} |" in card
    assert "wrote" in result.stdout


def test_missing_run_is_an_error(tmp_path):
    result = run_cli(["scripts/model_card.py", str(tmp_path), "--out", str(tmp_path / "card.md")])
    assert result.returncode == 2 and "no best.pt" in result.stderr
