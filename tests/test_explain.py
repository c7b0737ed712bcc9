"""explain.py end to end: real NIH sample images (RGBA included), DICOM, dataset splits, the localization report."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr.data import read_box_list
from cxr.labels import FINDINGS
from tests.test_train import run_cli

GREEN = np.array([0, 255, 0])  # ground-truth box colour in the overlays (RGB)


def green_pixels(path: Path) -> int:
    picture = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return int((picture == GREEN).all(axis=-1).sum())


@pytest.mark.slow
def test_real_sample_images_with_ground_truth_boxes(tiny_run, nih_sample, nih_sample_images, tmp_path):
    out = tmp_path / "explain"
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), str(nih_sample / "images"), "--out", str(out),
                      "--boxes", str(nih_sample / "BBox_List_2017.csv"), "--classes", "Cardiomegaly,Nodule"])
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == nih_sample_images  # the RGBA image 00000100_000.png among them
    for name, entry in predictions.items():
        assert list(entry["probabilities"]) == list(FINDINGS)
        assert all(0 <= p <= 1 for p in entry["probabilities"].values())
        assert set(entry["explained"]) == {"Cardiomegaly", "Nodule"}
        assert entry["size"] == [1024, 1024]
        for explained in entry["explained"].values():
            assert (out / explained["overlay"]).is_file()
            assert all(0 <= box["x"] <= 1024 and 0 <= box["y"] <= 1024 for box in explained["boxes"])
        assert f"{name}: " in result.stdout  # probabilities printed per image
    truth = read_box_list(nih_sample / "BBox_List_2017.csv")
    assert [g["finding"] for g in predictions["00009745_000.png"]["ground_truth"]] == ["Cardiomegaly"]
    assert green_pixels(out / "00009745_000_Cardiomegaly.png") > 500  # the ground-truth box is drawn
    assert green_pixels(out / "00009745_000_Nodule.png") == 0  # ...only on its own finding
    assert green_pixels(out / "00008386_000_Nodule.png") > 100
    assert green_pixels(out / "00000100_000_Cardiomegaly.png") == 0 and "00000100_000.png" not in truth


@pytest.mark.slow
def test_top3_on_dataset_split(tiny_run, tmp_path):
    out = tmp_path / "split"
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), "--split", "test", "--limit", "3", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 3
    for entry in predictions.values():
        top = sorted(entry["probabilities"], key=lambda name: -entry["probabilities"][name])[:3]
        assert sorted(entry["explained"]) == sorted(top)
    assert len(list(out.glob("*.png"))) == 9
    assert f"ground-truth boxes: {tiny_run['data_dir'] / 'BBox_List_2017.csv'}" in result.stdout
    truth = read_box_list(tiny_run["data_dir"] / "BBox_List_2017.csv")
    for name, entry in predictions.items():
        assert [item["finding"] for item in entry["ground_truth"]] == [finding for finding, _ in truth.get(name, [])]


@pytest.mark.slow
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_input(tiny_run, tmp_path, photometric):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from cxr.transforms import read_xray

    pixels = (np.arange(64)[None, :] * 60 + np.arange(64)[:, None] * 4).astype(np.uint16)  # brighter to the right
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / f"{photometric}.dcm"
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.PixelData = pixels.tobytes()
    dataset.save_as(str(path), enforce_file_format=True)

    gray = read_xray(path)
    assert gray.shape == (64, 64) and gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255
    rising = gray[0, -1] > gray[0, 0]
    assert rising == (photometric == "MONOCHROME2")  # MONOCHROME1 stores inverted intensities
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), str(path), "--out", str(tmp_path / "out"),
                      "--classes", "Effusion"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / f"{photometric}_Effusion.png").is_file()


@pytest.mark.slow
def test_localization_report(tiny_run, tmp_path):
    boxes = tiny_run["data_dir"] / "BBox_List_2017.csv"
    truth = read_box_list(boxes)
    out = tmp_path / "loc"
    # No --boxes: the data folder's own box list; a Grad-CAM layer other than the last.
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), "--layer", "features.denseblock3",
                      "--localization-report", str(out), "--methods", "gradcam,layercam@features.denseblock2,occlusion",
                      "--occlusion-patch", "16", "--occlusion-stride", "16"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ground-truth boxes: {boxes}" in result.stdout
    report = json.loads((out / "localization.json").read_text())
    assert report["layer"] == "features.denseblock3" and report["output_stride"] == 32
    assert report["default_method"] == "gradcam@features.denseblock3"
    assert list(report["methods"]) == ["gradcam@features.denseblock3", "layercam@features.denseblock2", "occlusion"]
    assert report["methods"]["occlusion"]["layer"] == "input image"
    for scores in report["methods"].values():  # every method scored on the same boxes, AFP per IoBB threshold
        assert scores["overall"]["boxes"] == report["overall"]["boxes"]
        assert set(scores["overall"]["afp"]) == {"0.1", "0.25", "0.5", "0.75", "0.9"}
        assert sum(row["pointing_hits"] for row in scores["per_class"].values()) == scores["overall"]["pointing_hits"]
    assert (out / "contact_sheet_occlusion.png").is_file() and (out / "contact_sheet_layercam_features_denseblock2.png").is_file()
    assert "AFP@0.1" in result.stdout and result.stdout.count("pointing game") == 1
    total_boxes = sum(len(items) for items in truth.values())
    assert report["overall"]["boxes"] == total_boxes == sum(report["boxes_by_split"].values())
    assert set(report["overall"]["iobb"]) == {"0.1", "0.25", "0.5", "0.75", "0.9"}
    assert set(report["overall"]["iou"]) == {"0.1", "0.3", "0.5"}
    assert 0 <= report["overall"]["pointing"] <= 1
    assert (out / "contact_sheet.png").stat().st_size > 1000
    assert "Overall" in result.stdout and "boxes by split" in result.stdout


@pytest.mark.slow
def test_bad_inputs_are_named(tiny_run, tmp_path):
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), str(tmp_path / "absent.png")])
    assert result.returncode == 1 and "absent.png: no such image file or folder" in result.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), str(broken)])
    assert result.returncode == 1 and "broken.png: not a decodable image" in result.stderr
    image = sorted((tiny_run["data_dir"] / "images").iterdir())[0]
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), str(image), "--classes", "Tumour",
                      "--out", str(tmp_path / "out")])
    assert result.returncode == 1 and "--classes 'Tumour': unknown finding(s) ['Tumour']" in result.stderr
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), str(image), "--layer", "features.block9"])
    assert result.returncode == 1
    assert "--layer 'features.block9': the model has no such module; try one of features.conv0" in result.stderr


@pytest.mark.slow
def test_panel_and_sanity_check(tiny_run, tmp_path):
    image = sorted((tiny_run["data_dir"] / "images").iterdir())[0]
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), str(image), "--classes", "top2", "--panel",
                      "--method", "hirescam@features.denseblock2", "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())[image.name]
    panel = cv2.imread(str(tmp_path / "out" / predictions["panel"]))
    single = cv2.imread(str(tmp_path / "out" / next(iter(predictions["explained"].values()))["overlay"]))
    assert max(single.shape[:2]) >= 512 and panel.shape[1] > 2 * single.shape[1]  # two findings side by side
    out = tmp_path / "sanity"
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), "--sanity-check", str(out), "--sanity-images", "2",
                      "--methods", "gradcam,hirescam@features.denseblock2"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "sanity.json").read_text())
    assert list(report["methods"]) == ["gradcam", "hirescam@features.denseblock2", "edge detector"]
    assert len(report["methods"]["gradcam"]["stages"]) == 6 and "edge detector" in report["flagged"]
    assert (out / "sanity_0.png").is_file() and "FLAGGED" in result.stdout


@pytest.mark.slow
def test_bad_method_flags_are_named(tiny_run, tmp_path):
    image = sorted((tiny_run["data_dir"] / "images").iterdir())[0]
    base = ["explain.py", "--checkpoint", str(tiny_run["best"]), str(image), "--out", str(tmp_path / "out")]
    result = run_cli(base + ["--method", "smoothgrad"])
    assert result.returncode == 1 and "unknown method 'smoothgrad'" in result.stderr
    result = run_cli(base + ["--method", "occlusion", "--occlusion-patch", "65"])
    assert result.returncode == 1 and "--occlusion-patch 65 is larger than the 64 px network input" in result.stderr


@pytest.mark.slow
def test_localization_check_smoke(tmp_path):
    result = run_cli(["scripts/localization_check.py", "--out", str(tmp_path / "check"), "--epochs", "1", "--patients", "30",
                      "--methods", "gradcam", "--train-flag=--image-size=64", "--train-flag=--max-steps-per-epoch=1",
                      "--train-flag=--synthetic-size=64"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("overall pointing game (gradcam): ")
    summary = json.loads((tmp_path / "check" / "summary.json").read_text())
    assert summary["default_method"] == "gradcam" and 0 <= summary["pointing"]["gradcam"] <= 1
    sanity = json.loads((tmp_path / "check" / "sanity" / "sanity.json").read_text())
    assert list(sanity["methods"]) == ["gradcam", "edge detector"] and "edge detector" in sanity["flagged"]
    assert summary["sanity_flagged"] == [label for label in sanity["flagged"] if label == "gradcam"]
    verdict = "FLAGGED by the sanity check" if summary["sanity_flagged"] else "passes the sanity check"
    assert f"pointing {summary['pointing']['gradcam']:.3f}" in result.stdout and verdict in result.stdout
