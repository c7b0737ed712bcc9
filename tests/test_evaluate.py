"""evaluate.py end to end: output files, exact predictions under torchrun, clear errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr.data import load_nih
from cxr.labels import FINDINGS
from tests.test_train import run_cli


def read_predictions(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row["Image Index"] for row in rows], np.array([[float(row[name]) for name in FINDINGS] for row in rows])


@pytest.mark.slow
def test_cli_writes_every_output(tiny_run, tmp_path):
    out = tmp_path / "eval"
    result = run_cli(["evaluate.py", "--checkpoint", str(tiny_run["best"]), "--bootstrap", "50", "--workers", "0",
                      "--out", str(out), "--tensorboard", "--subgroups", "sex,age,view,follow-up"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("metrics.json", "metrics.csv", "predictions.csv", "thresholds.json", "roc_curves.png", "reliability.png",
                 "calibration.json", "subgroups.json", "subgroups.csv", "subgroups.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = load_nih(tiny_run["data_dir"], seed=0)
    test_rows = data.splits["test"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_images"] == len(test_rows)
    assert list(metrics["classes"]) == list(FINDINGS)
    run = metrics["run"]
    assert (run["split"], run["views"], run["skipped_missing_images"], run["image_size"], run["tta"]) == ("test", "both", 0, 64, "none")
    assert run["checkpoint_epoch"] == 2 and run["split_method"].startswith("official lists") and run["cxr_version"]
    assert set(metrics["headline"]) >= {"val_mean_auroc", "mean_auroc", "val_minus_evaluated"}
    assert set(metrics["calibration"]) >= {"mean_ece_before", "mean_ece_after", "mean_brier_before", "mean_brier_after"}
    assert metrics["metadata_baseline"]["fitted_on"] == "train" and "metadata_auroc" in metrics["classes"]["Mass"]
    calibration = json.loads((out / "calibration.json").read_text())
    assert list(calibration["temperatures"]) == list(FINDINGS) and all(t > 0 for t in calibration["temperatures"].values())
    subgroups = json.loads((out / "subgroups.json").read_text())
    assert list(subgroups["attributes"]) == ["sex", "age", "view", "follow-up"]
    assert sum(group["n_images"] for group in subgroups["attributes"]["sex"]["groups"].values()) == len(test_rows)
    assert metrics["n_patients"] == len(np.unique(data.index.patient_ids[test_rows]))
    for row in metrics["classes"].values():
        assert set(row) >= {"auroc", "ci_low", "ci_high", "auprc", "threshold", "sensitivity", "specificity", "ppv",
                            "npv", "f1", "ece", "prevalence", "n"}
    names, probabilities = read_predictions(out / "predictions.csv")
    assert names == data.index.image_names[test_rows].tolist()  # every test image once, in split order
    assert probabilities.shape == (len(test_rows), 14) and ((probabilities >= 0) & (probabilities <= 1)).all()
    with open(out / "metrics.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert [row[0] for row in table[1:]] == [*FINDINGS, "mean"]
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["method"] == "youden" and list(thresholds["thresholds"]) == list(FINDINGS)
    assert "CheXNet" in result.stdout and "This evaluation: the test split" in result.stdout
    assert "Meta" in result.stdout and "Subgroups (thresholds from the validation split)" in result.stdout
    assert list((tiny_run["dir"] / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_torchrun_predicts_each_image_exactly_once(tiny_run, tmp_path):
    data_dir = tmp_path / "odd"
    shutil.copytree(tiny_run["data_dir"], data_dir)
    test_list = (data_dir / "test_list.txt").read_text().split()
    if len(test_list) % 2 == 0:  # an odd count forces DistributedSampler to pad one rank
        test_list = test_list[:-1]
    (data_dir / "test_list.txt").write_text("\n".join(test_list) + "\n")
    common = ["evaluate.py", "--checkpoint", str(tiny_run["best"]), "--data-dir", str(data_dir), "--bootstrap", "0",
              "--workers", "0", "--batch-size", "4"]
    single = run_cli(common + ["--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_cli(common + ["--out", str(tmp_path / "ddp")], nproc=2)
    assert double.returncode == 0, double.stderr[-3000:]
    names_1, probabilities_1 = read_predictions(tmp_path / "single" / "predictions.csv")
    names_2, probabilities_2 = read_predictions(tmp_path / "ddp" / "predictions.csv")
    assert len(names_2) == len(test_list) and sorted(names_2) == sorted(test_list)
    assert names_1 == names_2
    np.testing.assert_allclose(probabilities_1, probabilities_2, atol=1e-5)


@pytest.mark.slow
def test_missing_and_broken_checkpoints_are_named(tmp_path):
    result = run_cli([str(Path(__file__).resolve().parents[1] / "evaluate.py")], cwd=tmp_path)
    assert result.returncode == 1 and "train first: python train.py" in result.stderr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    result = run_cli(["evaluate.py", "--checkpoint", str(broken)])
    assert result.returncode == 1 and str(broken) in result.stderr
