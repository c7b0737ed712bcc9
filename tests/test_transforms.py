"""Tests for cxr.transforms: decoding (8/16-bit, RGB, RGBA, broken files), CLAHE/equalization, augmentation, normalization."""

from __future__ import annotations

import re
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

from cxr.transforms import (
    ImageReadError,
    build_train_augment,
    preprocess_image,
    read_xray,
    resize_square,
    to_uint8_gray,
)

RGBA_IMAGE = "00000100_000.png"
PLAIN_IMAGE = "00001933_000.png"


@pytest.fixture(scope="module")
def real_image(nih_sample: Path) -> np.ndarray:
    """One real 1024x1024 8-bit gray NIH image."""
    return read_xray(nih_sample / "images" / PLAIN_IMAGE)


@pytest.fixture(scope="module")
def small_image(real_image: np.ndarray) -> np.ndarray:
    return cv2.resize(real_image, (128, 128), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------------------------- decoding
def test_every_real_sample_image_decodes_to_1024_uint8(nih_sample: Path, nih_sample_images: list[str]) -> None:
    assert len(nih_sample_images) == 24
    for name in nih_sample_images:
        image = read_xray(nih_sample / "images" / name)
        assert image.shape == (1024, 1024) and image.dtype == np.uint8, name
        assert image.min() <= 20 and image.max() >= 200 and image.std() > 30, name


def test_rgba_image_is_converted_like_cv2_bgra_to_gray(nih_sample: Path) -> None:
    path = nih_sample / "images" / RGBA_IMAGE
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.shape == (1024, 1024, 4)  # the file really is RGBA
    assert np.array_equal(read_xray(path), cv2.cvtColor(raw, cv2.COLOR_BGRA2GRAY))


def test_16_bit_png_keeps_its_contrast(tmp_path: Path) -> None:
    values = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    values = np.ascontiguousarray(np.random.default_rng(0).permutation(values.ravel()).reshape(64, 64))
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), values)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    image = read_xray(path)
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    low, high = int(values.min()), int(values.max())
    expected = np.round((values.astype(np.float32) - low) * (255.0 / (high - low))).astype(np.uint8)
    assert np.array_equal(image, expected)
    order = np.argsort(values.ravel(), kind="stable")
    assert (np.diff(image.ravel()[order].astype(int)) >= 0).all()  # ordering preserved
    assert len(np.unique(image)) == 256


def test_rgb_png_becomes_gray(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    color = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    path = tmp_path / "color.png"
    cv2.imwrite(str(path), color)
    image = read_xray(path)
    assert image.shape == (32, 48)
    assert np.array_equal(image, cv2.cvtColor(color, cv2.COLOR_BGR2GRAY))


def test_to_uint8_gray_edge_cases() -> None:
    assert np.array_equal(to_uint8_gray(np.full((4, 4), 700, np.uint16)), np.zeros((4, 4), np.uint8))
    single = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    assert np.array_equal(to_uint8_gray(single), single[:, :, 0])
    floats = np.array([[-1.0, 0.0], [0.5, 1.0]], dtype=np.float32)
    assert to_uint8_gray(floats).tolist() == [[0, 128], [191, 255]]


def test_truncated_png_names_the_file(nih_sample: Path, tmp_path: Path) -> None:
    data = (nih_sample / "images" / PLAIN_IMAGE).read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=re.escape(f"{path}: not a decodable image (truncated or corrupt?)")):
        read_xray(path)


def test_missing_and_empty_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.png"
    with pytest.raises(ImageReadError, match=re.escape(f"{missing}: cannot read image file")):
        read_xray(missing)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=re.escape(f"{empty}: not a decodable image")):
        read_xray(empty)


def test_dicom_monochrome1_is_inverted_and_scaled(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    pixels = np.tile(np.arange(16, dtype=np.uint16) * 100, (8, 1))
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME1"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = pixels.tobytes()
    path = tmp_path / "xray.dcm"
    dataset.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME1"
    image = read_xray(path)
    assert image.shape == (8, 16) and image.dtype == np.uint8
    assert image[0].tolist() == [255 - 17 * column for column in range(16)]  # bright raw values come out dark
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom")
    with pytest.raises(ImageReadError, match=re.escape(f"{broken}: not a readable DICOM image")):
        read_xray(broken)


# ----------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("method", ["clahe", "equalize", "clahe+equalize", "none"])
@pytest.mark.parametrize("size", [64, 256])
def test_preprocess_output_shape_and_dtype(small_image: np.ndarray, method: str, size: int) -> None:
    output = preprocess_image(small_image, size, method)
    assert output.shape == (size, size) and output.dtype == np.uint8


def test_halving_resize_matches_one_step_area_resize(real_image: np.ndarray) -> None:
    for size in (224, 256, 100):
        fast = resize_square(real_image, size).astype(int)
        direct = cv2.resize(real_image, (size, size), interpolation=cv2.INTER_AREA).astype(int)
        assert fast.shape == (size, size)
        difference = np.abs(fast - direct)  # in gray levels; edges shift by a fraction of a pixel
        assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 6, size
    small = real_image[:40, :40]
    assert np.array_equal(resize_square(small, 64), cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR))


def test_preprocess_resizes_first_then_enhances(real_image: np.ndarray) -> None:
    resized = resize_square(real_image, 256)
    assert np.array_equal(preprocess_image(real_image, 256, "none"), resized)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(resized)
    assert np.array_equal(preprocess_image(real_image, 256, "clahe"), clahe)
    assert np.array_equal(preprocess_image(real_image, 256, "equalize"), cv2.equalizeHist(resized))


def test_methods_give_different_images(real_image: np.ndarray) -> None:
    outputs = {method: preprocess_image(real_image, 256, method) for method in ("clahe", "equalize", "clahe+equalize", "none")}
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert np.abs(outputs[first].astype(int) - outputs[second].astype(int)).mean() > 2, (first, second)


def test_equalize_gives_a_flat_histogram(real_image: np.ndarray) -> None:
    before = np.histogram(preprocess_image(real_image, 256, "none"), bins=8, range=(0, 256))[0] / 256**2
    after = np.histogram(preprocess_image(real_image, 256, "equalize"), bins=8, range=(0, 256))[0] / 256**2
    assert np.abs(before - 1 / 8).max() > 0.08  # the raw image is far from flat
    assert np.abs(after - 1 / 8).max() < 0.01


def test_clahe_parameters_change_the_output(real_image: np.ndarray) -> None:
    default = preprocess_image(real_image, 256, "clahe", clahe_clip=2.0, clahe_grid=8)
    coarse = preprocess_image(real_image, 256, "clahe", clahe_clip=2.0, clahe_grid=2)
    assert np.abs(coarse.astype(int) - default.astype(int)).mean() > 2

    def local_contrast(image: np.ndarray) -> float:
        return float(np.abs(cv2.Laplacian(image, cv2.CV_32F)).mean())

    # A higher clip limit lets CLAHE amplify local contrast more (about 7 raw, 10 / 13 / 19 for clip 1 / 2 / 6).
    contrasts = [local_contrast(preprocess_image(real_image, 256, "none"))]
    contrasts += [local_contrast(preprocess_image(real_image, 256, "clahe", clahe_clip=clip)) for clip in (1.0, 2.0, 6.0)]
    assert contrasts == sorted(contrasts) and contrasts[-1] > 2 * contrasts[0]


def test_unknown_preprocess_method_names_the_flag(small_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="--preprocess must be clahe, equalize, clahe\\+equalize or none, got 'gamma'"):
        preprocess_image(small_image, 64, "gamma")


# ----------------------------------------------------------------------------------------------- augmentation
def test_no_augmentation_at_strength_zero() -> None:
    assert build_train_augment(0) is None
    flip_only = build_train_augment(0, hflip=True)
    assert [type(step) for step in flip_only.transforms] == [A.HorizontalFlip]


def test_augmentation_keeps_shape_and_is_seeded(small_image: np.ndarray) -> None:
    augment = build_train_augment(1.0)
    assert [type(step) for step in augment.transforms] == [A.Affine, A.RandomBrightnessContrast]

    def run(seed: int) -> np.ndarray:
        augment.set_random_seed(seed)
        return augment(image=small_image)["image"]

    first, repeat, other = run(1), run(1), run(2)
    assert first.shape == small_image.shape and first.dtype == np.uint8
    assert np.array_equal(first, repeat)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, small_image)


def test_hflip_mirrors_the_image(small_image: np.ndarray) -> None:
    augment = build_train_augment(0, hflip=True)
    outputs = []
    for seed in range(8):
        augment.set_random_seed(seed)
        outputs.append(augment(image=small_image)["image"])
    flipped = small_image[:, ::-1]
    assert any(np.array_equal(output, flipped) for output in outputs)
    assert all(np.array_equal(output, flipped) or np.array_equal(output, small_image) for output in outputs)
