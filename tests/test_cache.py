"""Tests for cxr.cache and scripts/prepare_cache.py: bit-exact round trip, resume, bad images, parameter checks, CLI."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cxr import cache_build as cache_module
from cxr.cache import COMPLETE_MARKER, CacheError, CacheMissError, ImageCache
from cxr.cache_build import CacheBuildError, build_cache
from cxr.data import ChestXrayDataset, DataError, load_nih
from cxr.synthetic import generate_synthetic_nih
from cxr.transforms import Preprocessing, build_train_augment, preprocess_image, read_xray

REPO = Path(__file__).resolve().parents[1]
SIZE = 48  # not the PNGs' 64 px, so the resize is part of what must match
PARAMS = Preprocessing(SIZE, "clahe", 2.0, 8)


@pytest.fixture(scope="module")
def nih_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nih")
    generate_synthetic_nih(root, patients=8, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def built_cache(nih_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    cache_dir = tmp_path_factory.mktemp("cache") / "nih-48"
    summary = build_cache(nih_dir, cache_dir, PARAMS, workers=2, progress=False)  # the multiprocessing path
    return cache_dir, summary


@pytest.fixture
def own_nih_dir(nih_dir: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic set that the test may damage."""
    return Path(shutil.copytree(nih_dir, tmp_path / "nih"))


def png_paths(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "images").glob("*.png"))


def png_pipeline(path: Path, size: int = SIZE, preprocess: str = "clahe", clip: float = 2.0, grid: int = 8) -> np.ndarray:
    return preprocess_image(read_xray(path), size, preprocess, clip, grid)


def record_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the decodes of in-process builds (workers=1) by wrapping read_xray."""
    decoded: list[str] = []

    def counting_read(path: str) -> np.ndarray:
        decoded.append(path)
        return read_xray(path)

    monkeypatch.setattr(cache_module, "read_xray", counting_read)
    return decoded


def test_cache_equals_png_pipeline_bit_for_bit(nih_dir: Path, built_cache: tuple[Path, dict]) -> None:
    cache_dir, summary = built_cache
    cache = ImageCache.open(cache_dir, expected=PARAMS)
    paths = png_paths(nih_dir)
    assert len(paths) >= 12  # the tests below need a few chunks of images
    assert summary["images"] == summary["decoded"] == len(cache) == len(paths)
    assert summary["complete"] and summary["failed"] == 0 and summary["already_done"] == 0
    assert (cache_dir / "images.u8").stat().st_size == len(paths) * SIZE * SIZE
    for path in paths:
        image = cache.get(path.name)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(image, png_pipeline(path))
    image[:] = 0  # a writable copy: scribbling on it must not reach the cache
    np.testing.assert_array_equal(cache.get(paths[-1].name), png_pipeline(paths[-1]))
    assert sorted(cache.image_names) == [path.name for path in paths]


@pytest.mark.parametrize("size, preprocess, clip, grid", [(64, "equalize", 2.0, 8), (80, "clahe+equalize", 3.5, 4),
                                                          (40, "none", 2.0, 8)])
def test_other_preprocessing_round_trips(nih_dir: Path, tmp_path: Path, size: int, preprocess: str, clip: float,
                                         grid: int) -> None:
    build_cache(nih_dir, tmp_path / "cache", Preprocessing(size, preprocess, clip, grid), workers=1, progress=False)
    cache = ImageCache.open(tmp_path / "cache", expected=Preprocessing(size, preprocess, clip, grid))
    for path in png_paths(nih_dir)[::5]:
        np.testing.assert_array_equal(cache.get(path.name), png_pipeline(path, size, preprocess, clip, grid))
    if "clahe" not in preprocess:  # CLAHE settings do not change these pixels, so they are no mismatch
        assert len(ImageCache.open(tmp_path / "cache", expected=Preprocessing(size, preprocess, clip + 1, grid))) == len(cache)


def test_dataset_with_cache_yields_the_same_tensors(nih_dir: Path, built_cache: tuple[Path, dict]) -> None:
    data = load_nih(nih_dir)
    rows = data.splits["train"]
    cache = ImageCache.open(built_cache[0], expected=PARAMS)
    plain = ChestXrayDataset(data.index, rows, PARAMS)
    cached = ChestXrayDataset(data.index, rows, PARAMS, cache=cache)
    for position in range(len(plain)):
        (plain_image, plain_labels, plain_position), (image, labels, cached_position) = plain[position], cached[position]
        assert image.dtype == torch.uint8 and image.shape == (1, SIZE, SIZE)
        assert torch.equal(image, plain_image) and torch.equal(labels, plain_labels) and cached_position == plain_position
    # DataLoader workers re-open the map in their own process.
    batches = list(DataLoader(cached, batch_size=4, num_workers=2))
    assert torch.equal(torch.cat([batch[0] for batch in batches]), torch.stack([plain[i][0] for i in range(len(plain))]))
    augmented = ChestXrayDataset(data.index, rows, PARAMS, augment=build_train_augment(1.0), cache=cache)
    augmented.reseed(0)
    assert augmented[0][0].shape == (1, SIZE, SIZE)


def test_cache_pickles_without_pixels(nih_dir: Path, built_cache: tuple[Path, dict]) -> None:
    cache = ImageCache.open(built_cache[0])
    name = png_paths(nih_dir)[3].name
    original = cache.get(name)
    blob = pickle.dumps(cache)
    assert len(blob) < 2000  # parameters and a path, not the 73 KB of pixels or the name index
    clone = pickle.loads(blob)
    assert len(clone) == len(cache) == len(png_paths(nih_dir)) and clone.params == cache.params
    np.testing.assert_array_equal(clone.get(name), original)


def test_unknown_image_name_raises_a_key_error_saying_to_rebuild(built_cache: tuple[Path, dict]) -> None:
    cache = ImageCache.open(built_cache[0])
    with pytest.raises(KeyError) as caught:
        cache.get("99999999_000.png")
    assert isinstance(caught.value, CacheMissError)
    assert "99999999_000.png is not in the cache" in str(caught.value)
    assert "rebuild the cache for this table" in str(caught.value)
    with pytest.raises(CacheMissError):
        cache.get("")  # sorts before every name


def test_interrupted_build_resumes_with_only_the_remaining_rows(nih_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    count = len(png_paths(nih_dir))
    started: list[str] = []

    def interrupted_read(path: str) -> np.ndarray:
        if len(started) == 10:
            raise KeyboardInterrupt  # Ctrl-C in the third chunk of 4: two chunks (8 rows) are complete
        started.append(path)
        return read_xray(path)

    monkeypatch.setattr(cache_module, "read_xray", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        build_cache(nih_dir, cache_dir, PARAMS, workers=1, chunk_rows=4, progress=False)
    done = np.load(cache_dir / "done.npy")
    assert done.sum() == 8 and not (cache_dir / COMPLETE_MARKER).exists()
    with pytest.raises(CacheError, match=rf"not complete \(8 of {count} images cached\).*prepare_cache.py .*to finish it"):
        ImageCache.open(cache_dir)

    decoded = record_decodes(monkeypatch)
    summary = build_cache(nih_dir, cache_dir, PARAMS, workers=1, chunk_rows=4, progress=False)
    names = np.load(cache_dir / "index.npy")
    assert sorted(Path(path).name for path in decoded) == sorted(names[~done])
    assert (summary["decoded"], summary["already_done"], summary["complete"]) == (count - 8, 8, True)
    cache = ImageCache.open(cache_dir, expected=PARAMS)
    for path in png_paths(nih_dir):
        np.testing.assert_array_equal(cache.get(path.name), png_pipeline(path))
    decoded.clear()
    assert build_cache(nih_dir, cache_dir, PARAMS, workers=1, progress=False)["decoded"] == 0 and decoded == []


def test_corrupt_png_is_named_and_the_cache_stays_incomplete(own_nih_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    count = len(png_paths(own_nih_dir))
    bad = png_paths(own_nih_dir)[5]
    original = bad.read_bytes()
    bad.write_bytes(original[:40])  # truncated mid-stream, as after an interrupted download
    with pytest.raises(CacheBuildError) as caught:
        build_cache(own_nih_dir, cache_dir, PARAMS, workers=2, progress=False)
    message = str(caught.value)
    assert f"{bad}: not a decodable image" in message and f"1 of {count} images could not be decoded" in message
    assert "NOT complete" in message and "run the same command again" in message
    assert [path for path, _ in caught.value.failures] == [str(bad)]
    assert caught.value.summary["decoded"] == count - 1 and not caught.value.summary["complete"]
    assert not (cache_dir / COMPLETE_MARKER).exists()
    with pytest.raises(CacheError, match=rf"not complete \({count - 1} of {count} images"):
        ImageCache.open(cache_dir)

    bad.write_bytes(original)  # fixed: the re-run decodes that one image and completes the cache
    decoded = record_decodes(monkeypatch)
    assert build_cache(own_nih_dir, cache_dir, PARAMS, workers=1, progress=False)["decoded"] == 1
    assert decoded == [str(bad)]
    np.testing.assert_array_equal(ImageCache.open(cache_dir).get(bad.name), png_pipeline(bad))


def test_parameter_mismatch_names_each_parameter_with_both_values(nih_dir: Path, built_cache: tuple[Path, dict]) -> None:
    cache_dir = built_cache[0]
    with pytest.raises(CacheError) as caught:
        ImageCache.open(cache_dir, expected=Preprocessing(224, "clahe", 3.0, 8))
    message = str(caught.value)
    assert "size: cache has 48, this run needs 224" in message
    assert "clahe_clip: cache has 2.0, this run needs 3.0" in message
    assert "preprocess:" not in message and "clahe_grid:" not in message
    assert f"prepare_cache.py --data-dir {nih_dir.resolve()} --out {cache_dir}-224px-clahe --size 224 --preprocess clahe " \
           "--clahe-clip 3.0 --clahe-grid 8" in message
    # The same values spelled as other types are no mismatch.
    same = Preprocessing.from_dict({"size": 48.0, "preprocess": "clahe", "clahe_clip": 2, "clahe_grid": 8})
    assert ImageCache.open(cache_dir, expected=same).params["size"] == 48
    with pytest.raises(CacheError, match="preprocess: cache has 'clahe', this run needs 'none'; clahe_clip: cache has 2.0"):
        ImageCache.open(cache_dir, expected=Preprocessing(SIZE, "none", 9.0, 8))
    # Building into the folder with other parameters is refused, not mixed.
    with pytest.raises(CacheError, match="already holds a cache built with other parameters "
                                         r"\(preprocess: cache has 'clahe', this run needs 'equalize'\)"):
        build_cache(nih_dir, cache_dir, Preprocessing(SIZE, "equalize"), workers=1, progress=False)


def test_folder_errors_say_what_to_do(own_nih_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"no such folder; build it first with: python scripts/prepare_cache.py"):
        ImageCache.open(tmp_path / "absent")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not empty and is not an image cache .*notes.txt"):
        build_cache(own_nih_dir, stranger, PARAMS, workers=1, progress=False)
    count = len(png_paths(own_nih_dir))
    missing = png_paths(own_nih_dir)[0]
    missing.unlink()
    with pytest.raises(DataError, match=f"1 of {count} images .*{missing.name}.*--skip-missing"):
        build_cache(own_nih_dir, tmp_path / "cache", PARAMS, workers=1, progress=False)
    summary = build_cache(own_nih_dir, tmp_path / "cache", PARAMS, workers=1, skip_missing=True, progress=False)
    assert summary["images"] == count - 1
    with pytest.raises(CacheMissError):
        ImageCache.open(tmp_path / "cache").get(missing.name)


@pytest.mark.slow
def test_cli_end_to_end(own_nih_dir: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cli-cache"
    command = [sys.executable, str(REPO / "scripts" / "prepare_cache.py"), "--data-dir", str(own_nih_dir),
               "--out", str(cache_dir), "--size", str(SIZE), "--no-progress"]
    bad = png_paths(own_nih_dir)[2]
    original = bad.read_bytes()
    bad.write_bytes(b"not a png")
    failed = subprocess.run(command + ["--workers", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed.stderr
    assert f"{bad}: not a decodable image" in failed.stderr and "NOT complete" in failed.stderr
    bad.write_bytes(original)
    finished = subprocess.run(command + ["--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert f"decoded 1 images in this run ({len(png_paths(own_nih_dir)) - 1} were already cached)" in finished.stdout
    assert f"--cache-dir {cache_dir} --image-size {SIZE} --preprocess clahe" in finished.stdout
    cache = ImageCache.open(cache_dir, expected=PARAMS)
    np.testing.assert_array_equal(cache.get(bad.name), png_pipeline(bad))
