"""One preprocessing contract: every consumer builds its pixels through cxr.transforms.Preprocessing.

A checkpoint whose config says CLAHE clip 3.7 and grid 4 must be seen as such by the Dataset, explain.py,
evaluate.py's ten-crop and the cache check; and no module but cxr/transforms.py calls the pixel function.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import cxr.transforms
from cxr.cache_build import build_cache
from cxr.checkpoint import load_checkpoint, save_checkpoint
from cxr.data import ChestXrayDataset, load_nih
from cxr.transforms import Preprocessing

REPO = Path(__file__).resolve().parents[1]
CLIP, GRID = 3.7, 4


@pytest.fixture(scope="module")
def changed_checkpoint(tiny_run, tmp_path_factory) -> Path:
    state = load_checkpoint(tiny_run["best"])
    state["config"] = {**state["config"], "clahe_clip": CLIP, "clahe_grid": GRID}
    path = tmp_path_factory.mktemp("changed") / "best.pt"
    save_checkpoint(state, path)
    return path


@pytest.fixture
def recorded(monkeypatch) -> list[tuple]:
    """Every call of the pixel function, as (size, method, clip, grid)."""
    calls: list[tuple] = []
    real = cxr.transforms.preprocess_image

    def spy(image, size, method="clahe", clahe_clip=2.0, clahe_grid=8):
        calls.append((size, method, clahe_clip, clahe_grid))
        return real(image, size, method, clahe_clip, clahe_grid)

    monkeypatch.setattr(cxr.transforms, "preprocess_image", spy)
    return calls


def test_no_module_but_transforms_calls_the_pixel_function() -> None:
    sources = [*REPO.glob("cxr/*.py"), *REPO.glob("*.py"), *REPO.glob("scripts/*.py")]
    callers = [path.relative_to(REPO).as_posix() for path in sources
               if path.name != "transforms.py" and re.search(r"\bpreprocess_image\b", path.read_text())]
    assert callers == []


@pytest.mark.slow
def test_preprocessing_object_from_checkpoint_and_its_contract(changed_checkpoint) -> None:
    prep = Preprocessing.from_checkpoint(load_checkpoint(changed_checkpoint))
    assert prep == Preprocessing(64, "clahe", CLIP, GRID)
    assert prep.as_dict() == {"size": 64, "preprocess": "clahe", "clahe_clip": CLIP, "clahe_grid": GRID}
    assert Preprocessing.from_dict(prep.as_dict()) == prep and prep.with_size(73).size == 73
    assert prep.differences({**prep.as_dict(), "clahe_clip": 2.0}) == ["clahe_clip: cache has 2.0, this run needs 3.7"]
    gray = (np.arange(100 * 120) % 251).astype(np.uint8).reshape(100, 120)
    assert np.array_equal(prep(gray), cxr.transforms.preprocess_image(gray, 64, "clahe", CLIP, GRID))
    with pytest.raises(TypeError, match="a Preprocessing"):
        ChestXrayDataset(None, np.arange(2), 64)  # loose values are refused


@pytest.mark.slow
def test_explain_sees_the_checkpoints_preprocessing(changed_checkpoint, synthetic_nih, recorded, tmp_path) -> None:
    import explain

    image = sorted((synthetic_nih / "images").iterdir())[0]
    assert explain.main(["--checkpoint", str(changed_checkpoint), str(image), "--out", str(tmp_path / "x")]) == 0
    assert recorded and set(recorded) == {(64, "clahe", CLIP, GRID)}


@pytest.mark.slow
def test_evaluate_tencrop_sees_the_checkpoints_preprocessing(changed_checkpoint, recorded, tmp_path) -> None:
    import evaluate

    assert evaluate.main(["--checkpoint", str(changed_checkpoint), "--tta", "tencrop", "--bootstrap", "0",
                          "--workers", "0", "--out", str(tmp_path / "eval")]) == 0
    assert recorded and set(recorded) == {(round(64 * 256 / 224), "clahe", CLIP, GRID)}  # loads at 73 for 64 crops


@pytest.mark.slow
def test_cache_check_sees_the_checkpoints_preprocessing(changed_checkpoint, synthetic_nih, tmp_path, capsys) -> None:
    import evaluate

    cache_dir = tmp_path / "cache"
    build_cache(synthetic_nih, cache_dir, Preprocessing(64), workers=1, progress=False)  # clip 2.0, grid 8
    state = load_checkpoint(changed_checkpoint)
    state["config"]["cache_dir"] = str(cache_dir)
    with_cache = tmp_path / "with-cache.pt"
    save_checkpoint(state, with_cache)
    assert evaluate.main(["--checkpoint", str(with_cache), "--bootstrap", "0", "--workers", "0",
                          "--out", str(tmp_path / "eval")]) == 1
    error = capsys.readouterr().err
    assert "clahe_clip: cache has 2.0, this run needs 3.7; clahe_grid: cache has 8, this run needs 4" in error
    assert "Traceback" not in error and error.count("\n") == 1  # one line, no traceback


def test_datasets_take_the_one_object(synthetic_nih) -> None:
    from cxr.config import Config
    from cxr.factory import make_dataset

    data = load_nih(synthetic_nih)
    prep = Preprocessing(48, "equalize")
    dataset = make_dataset(Config(data_dir=str(synthetic_nih)), data, "train", prep, train=True)
    assert dataset.preprocessing is prep
    image, _, _ = dataset[0]
    assert image.shape == (1, 48, 48)
