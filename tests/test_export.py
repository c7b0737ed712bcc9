"""Exports: every format written by scripts/export.py reproduces the PyTorch probabilities on real images, loaded
in a fresh process that cannot import cxr (onnx, torchscript, exported); the reference preprocessing equals ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cxr.export as export
from cxr.export import ExportError, export_model, load_safetensors
from cxr.export_reference import preprocess, to_gray
from cxr.predict import Classifier
from cxr.transforms import Preprocessing, read_xray
from tests.test_train import run_cli

FRESH_PROCESS = r"""
import importlib.abc, json, sys
class NoCxr(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cxr" or name.startswith("cxr."):
            raise ImportError("cxr must not be needed to serve an export")
sys.meta_path.insert(0, NoCxr())
folder, files = sys.argv[1], sys.argv[2:]
sys.path.insert(0, folder)
import numpy as np, preprocess
batch = preprocess.preprocess_files(files, json.load(open(folder + "/preprocessing.json")))
import onnxruntime, torch
session = onnxruntime.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
outputs = {"onnx": session.run(["probabilities", "logits"], {"images": batch})[0]}
with torch.no_grad():
    outputs["torchscript"] = torch.jit.load(folder + "/model.torchscript.pt")(torch.from_numpy(batch))[0].numpy()
    outputs["exported"] = torch.export.load(folder + "/model.pt2").module()(torch.from_numpy(batch))[0].numpy()
assert not [name for name in sys.modules if name.split(".")[0] == "cxr"]
print(json.dumps({name: value.tolist() for name, value in outputs.items()}))
"""


@pytest.fixture(scope="module")
def exported(tiny_run, nih_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    result = run_cli(["scripts/export.py", "--checkpoint", str(tiny_run["best"]), "--format", "all", "--out", str(out),
                      "--verify-images", str(nih_sample / "images"), "--verify-count", "3"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for fmt in export.FORMATS:
        assert f"{fmt}: wrote" in result.stdout and "max |probability difference|" in result.stdout
    return out


@pytest.mark.slow
def test_every_format_round_trips_on_real_images(exported, tiny_run, nih_sample):
    report = json.loads((exported / "model.json").read_text())
    assert sorted(report) == sorted(export.FORMATS)
    assert all(entry["max_abs_diff"] <= 1e-4 and len(entry["verified_on"]) == 3 for entry in report.values())
    assert json.loads((exported / "preprocessing.json").read_text()) == Classifier.from_checkpoint(tiny_run["best"], "cpu").preprocessing.as_dict()
    files = [str(nih_sample / "images" / name) for name in ("00000100_000.png", "00001933_000.png")]  # RGBA first
    expected = Classifier.from_checkpoint(tiny_run["best"], device="cpu").predict(files).probabilities
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(exported), *files], capture_output=True, text=True,
                            timeout=300, cwd=exported)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.splitlines()[-1])
    assert sorted(outputs) == ["exported", "onnx", "torchscript"]
    for fmt, probabilities in outputs.items():
        assert np.abs(np.array(probabilities) - expected).max() <= 1e-4, fmt
    model, config = load_safetensors(exported / "model.safetensors")
    assert config["image_size"] == 64
    state = Classifier.from_checkpoint(tiny_run["best"], device="cpu").model.state_dict()
    assert all((model.state_dict()[name] == value).all() for name, value in state.items())


@pytest.mark.parametrize("params", [dict(size=64, preprocess="clahe", clahe_clip=2.0, clahe_grid=8),
                                    dict(size=96, preprocess="clahe+equalize", clahe_clip=3.0, clahe_grid=4),
                                    dict(size=2048, preprocess="none", clahe_clip=2.0, clahe_grid=8)])
def test_reference_preprocessing_equals_ours(nih_sample, nih_sample_images, params):
    import cv2

    ours = Preprocessing.from_dict(params)
    for name in nih_sample_images[:6] + ["00000100_000.png"]:
        path = str(nih_sample / "images" / name)
        reference = preprocess(to_gray(cv2.imread(path, cv2.IMREAD_UNCHANGED)), params)
        np.testing.assert_array_equal(reference, ours(read_xray(path)))


def test_missing_extra_is_named(tiny_run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ExportError, match=r"pip install 'cxr\[export\]'"):
        export_model(tiny_run["best"], "onnx", tmp_path, [])


def test_failed_verification_leaves_no_model(tiny_run, nih_sample, monkeypatch, tmp_path):
    real_runner = export.runner
    monkeypatch.setattr(export, "runner", lambda fmt, path: (lambda images: tuple(v + 1e-3 for v in real_runner(fmt, path)(images))))
    with pytest.raises(ExportError, match=r"does not reproduce the PyTorch model: max \|probability difference\| 0.001"):
        export_model(tiny_run["best"], "safetensors", tmp_path, [nih_sample / "images"], verify_count=2)
    assert not list(tmp_path.iterdir())


def test_classifier_loads_a_safetensors_export_with_its_pooling(tmp_path):
    """The sharing format is a checkpoint for the API too; its config rebuilds the head exactly (pooling included)."""
    from safetensors.torch import save_file

    from cxr.config import Config
    from cxr.factory import model_for_config

    config = Config(image_size=64, pool="lse", lse_r=5.0, weights="none", device="cpu")
    model = model_for_config(config).eval()
    checkpoint = {"config": config.to_dict(), "schema_version": 3, "epoch": 2, "best_metric": 0.5}
    path = tmp_path / "model.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path),
              metadata=export.safetensors_metadata(checkpoint))
    clf = Classifier.from_checkpoint(path, device="cpu", calibration=None)
    assert (clf.model.pool, clf.model.lse_r) == ("lse", 5.0)
    assert clf.preprocessing.as_dict() == {"size": 64, "preprocess": config.preprocess, "clahe_clip": config.clahe_clip,
                                           "clahe_grid": config.clahe_grid}
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(images.float()).numpy()
    np.testing.assert_allclose(clf.logits(images), expected, rtol=1e-5, atol=1e-5)
    save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "other.safetensors"),
              metadata=export.safetensors_metadata(checkpoint))
    with pytest.raises(ExportError, match="other.safetensors: its weights do not fit"):
        Classifier.from_checkpoint(tmp_path / "other.safetensors", device="cpu", calibration=None)
