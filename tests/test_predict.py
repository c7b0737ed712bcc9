"""The Python API and scripts/predict.py: real sample images (RGBA included) and arrays equal evaluate.py's
predictions; calibration; refusal of foreign checkpoints; explanations equal explain.py's; failed.csv and --resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from cxr.checkpoint import CheckpointError
from cxr.explainer import Explainer, explain_images
from cxr.labels import FINDINGS
from cxr.predict import Classifier, probabilities_from_logits
from tests.test_train import run_cli

RGBA_IMAGE = "00000100_000.png"  # the RGBA image of the real sample


def real_data_folder(nih_sample: Path, root: Path) -> Path:
    """The 24 sample images with their table rows; the RGBA image and 13 others in test_list.txt."""
    names = sorted(os.listdir(nih_sample / "images"))
    (root / "images").mkdir(parents=True)
    for name in names:
        os.symlink(nih_sample / "images" / name, root / "images" / name)
    lines = (nih_sample / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([lines[0], *(line for line in lines[1:] if line.split(",")[0] in names)]) + "\n")
    others = [name for name in names if name != RGBA_IMAGE]
    (root / "train_val_list.txt").write_text("\n".join(others[:10]) + "\n")
    (root / "test_list.txt").write_text("\n".join([RGBA_IMAGE, *others[10:]]) + "\n")
    return root


@pytest.fixture(scope="module")
def classifier(tiny_run) -> Classifier:
    return Classifier.from_checkpoint(tiny_run["best"], device="cpu")


@pytest.mark.slow
def test_api_equals_evaluate_on_real_images_and_arrays(tiny_run, nih_sample, classifier, tmp_path):
    data = real_data_folder(nih_sample, tmp_path / "nih")
    result = run_cli(["evaluate.py", "--checkpoint", str(tiny_run["best"]), "--data-dir", str(data), "--bootstrap", "0",
                      "--workers", "0", "--out", str(tmp_path / "eval")])
    assert result.returncode == 0, result.stderr[-2000:]
    expected = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert RGBA_IMAGE in set(expected["Image Index"]) and len(expected) == 14
    reference = expected[list(FINDINGS)].to_numpy()

    files = classifier.predict([data / "images" / name for name in expected["Image Index"]], batch_size=4)
    assert files.images == list(expected["Image Index"]) and not files.failures and not files.calibrated
    np.testing.assert_allclose(files.probabilities, reference, atol=2e-6)  # the CSV keeps 6 decimals
    frame = files.to_frame()
    assert list(frame.columns) == ["Image", *FINDINGS] and frame.shape == (14, 15)

    decoded = [cv2.imread(str(nih_sample / "images" / name), cv2.IMREAD_UNCHANGED) for name in expected["Image Index"][:3]]
    assert decoded[0].shape == (1024, 1024, 4)
    arrays = [cv2.cvtColor(decoded[0], cv2.COLOR_BGRA2RGBA), decoded[1], np.dstack([decoded[2]] * 3)]  # RGBA, gray, RGB
    from_arrays = classifier.predict(arrays)
    assert from_arrays.images == ["array0", "array1", "array2"]
    np.testing.assert_allclose(from_arrays.probabilities, reference[:3], atol=2e-6)
    gray = decoded[1].copy()
    gray[0, :2] = (0, 255)  # full range, so that min-max scaling of the 16-bit copy gives back the same pixels
    eight, sixteen = classifier.predict([gray, gray.astype(np.uint16) * 257]).probabilities
    np.testing.assert_array_equal(eight, sixteen)


def test_folder_input_and_calibration_hook(tiny_run, classifier, tmp_path):
    folder = tiny_run["data_dir"] / "images"
    plain = classifier.predict(folder)
    assert plain.images == sorted(path.name for path in folder.iterdir())
    np.testing.assert_allclose(plain.probabilities, probabilities_from_logits(plain.logits), rtol=0, atol=0)
    temperatures = {name: 1.0 + index / 7 for index, name in enumerate(FINDINGS)}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"temperatures": temperatures}))
    calibrated = Classifier.from_checkpoint(tiny_run["best"], device="cpu", calibration=path).predict(folder)
    assert calibrated.calibrated
    expected = 1 / (1 + np.exp(-plain.logits.astype(np.float64) / np.array(list(temperatures.values()))))
    np.testing.assert_allclose(calibrated.probabilities, expected, rtol=1e-6)
    path.write_text(json.dumps({"temperatures": {"Mass": -1}}))
    with pytest.raises(Exception, match="temperatures must be positive"):
        Classifier.from_checkpoint(tiny_run["best"], device="cpu", calibration=path)


@pytest.mark.parametrize("change, message", [
    (lambda state: state.update(schema_version=1), "schema version 1"),
    (lambda state: state["config"].update(hidden="64"), "do not fit the model"),
    (lambda state: state.update(class_names=["Mass"] * 14), "not the 14 ChestX-ray14 findings"),
])
def test_foreign_checkpoints_are_refused(tiny_run, tmp_path, change, message):
    state = torch.load(tiny_run["best"], weights_only=True)
    change(state)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=message):
        Classifier.from_checkpoint(tmp_path / "other.pt", device="cpu")


def test_explain_equals_explain_py(classifier, nih_sample, tmp_path):
    paths = [str(nih_sample / "images" / name) for name in (RGBA_IMAGE, "00001933_000.png")]
    ours = classifier.explain(paths, classes="top3")
    explainer = Explainer(classifier.model, classifier.preprocessing, classifier.policy, "gradcam", 0.5)
    theirs, failures = explain_images(explainer, [(Path(p).name, p) for p in paths], {}, tmp_path, "top3", 16)
    assert not failures and [entry["image"] for entry in ours] == list(theirs)
    for entry in ours:
        reference = theirs[entry["image"]]
        assert list(entry["boxes"]) == list(reference["explained"]) and len(entry["maps"]) == 3
        for finding, boxes in entry["boxes"].items():
            assert boxes == reference["explained"][finding]["boxes"]
            assert entry["maps"][finding].shape == (64, 64) and 0 <= entry["maps"][finding].min() <= entry["maps"][finding].max() <= 1
        assert {k: round(v, 6) for k, v in entry["probabilities"].items()} == reference["probabilities"]


@pytest.mark.slow
def test_cli_lists_corrupt_image_and_resumes(tiny_run, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for source in sorted((tiny_run["data_dir"] / "images").iterdir())[:5]:
        shutil.copy(source, folder / source.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out" / "predictions.csv"
    command = ["scripts/predict.py", "--checkpoint", str(tiny_run["best"]), str(folder), "--out", str(out),
               "--device", "cpu", "--batch-size", "2", "--workers", "1"]
    first = run_cli(command)
    assert first.returncode == 1, first.stderr[-2000:]
    assert "predicted 5 image(s)" in first.stdout and "1 unreadable" in first.stdout and "broken.png" in first.stderr
    failed = list(csv.DictReader(open(out.with_name("failed.csv"))))
    assert [row["Image"] for row in failed] == ["broken.png"] and "not a decodable image" in failed[0]["Error"]
    rows = pd.read_csv(out)
    assert list(rows.columns) == ["Image", "Path", *FINDINGS] and len(rows) == 5
    assert run_cli(command).returncode == 2  # an existing CSV is never overwritten by accident

    data = out.read_bytes()
    out.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1] + b"00000012_001.png,/cut")  # killed: 4 rows + half a line
    resumed = run_cli([*command, "--resume", "--no-progress"])
    assert resumed.returncode == 1 and "4 already in" in resumed.stdout and "predicted 1 image(s)" in resumed.stdout
    again = pd.read_csv(out)
    assert sorted(again["Image"]) == sorted(rows["Image"]) and len(again) == 5
    np.testing.assert_allclose(again.sort_values("Image")[list(FINDINGS)].to_numpy(),
                               rows.sort_values("Image")[list(FINDINGS)].to_numpy(), atol=1e-6)
