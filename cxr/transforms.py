"""Decoding, contrast enhancement (CLAHE / histogram equalization), augmentation and normalization.

    gray = read_xray("00000001_000.png")                 # uint8 [H, W], whatever the PNG's mode/depth
    image = preprocess_image(gray, 224, "clahe")          # resize first, then enhance (cheaper, same look)
    augment = build_train_augment(strength=1.0)           # albumentations, on uint8 gray
    batch = normalize_batch(uint8_batch.to(device))       # [B,1,S,S] uint8 -> [B,3,S,S] ImageNet-normalized

Images stay 1-channel uint8 until they reach the device: 12x less to copy than 3-channel float.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from cxr.errors import CxrError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(CxrError, ValueError):
    """An image file that is missing, truncated or undecodable; the message names the path."""


def to_uint8_gray(image: np.ndarray) -> np.ndarray:
    """Gray uint8 from 8/16-bit gray, BGR or BGRA arrays; 16-bit and float are min-max scaled, not clipped."""
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        else:
            code = cv2.COLOR_BGRA2GRAY if channels == 4 else cv2.COLOR_BGR2GRAY
            image = cv2.cvtColor(image, code)
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((image - low) * (255.0 / (high - low))).astype(np.uint8)


def read_xray(path: str | Path) -> np.ndarray:
    """Decode a PNG/JPEG (or DICOM, with pydicom installed) into uint8 gray [H, W]; errors name the file."""
    path = str(path)
    if path.lower().endswith(DICOM_SUFFIXES):
        return read_dicom(path)
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read image file ({error.strerror or error})") from error
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image (truncated or corrupt?); re-download or remove it")
    return to_uint8_gray(image)


def read_dicom(path: str) -> np.ndarray:
    """Decode a DICOM X-ray: rescale slope/intercept applied, MONOCHROME1 inverted, scaled to uint8."""
    try:
        import pydicom
    except ImportError as error:
        raise ImageReadError(f"{path}: reading DICOM needs pydicom: pip install 'cxr[dicom]'") from error
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageReadError(f"{path}: not a readable DICOM image ({error})") from error
    pixels = pixels * float(getattr(dataset, "RescaleSlope", 1.0)) + float(getattr(dataset, "RescaleIntercept", 0.0))
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels.mean(axis=-1)
    elif pixels.ndim == 3:
        pixels = pixels[0]  # multi-frame: first frame
    if getattr(dataset, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1: high values are dark
    return to_uint8_gray(pixels)


@lru_cache(maxsize=8)
def _clahe(clip_limit: float, tile_grid: int) -> cv2.CLAHE:
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking, bilinear when enlarging."""
    if image.shape[0] <= size and image.shape[1] <= size:
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    # OpenCV's area resize is ~4x faster for whole-number factors: halve while the image is at least twice
    # the target (1024 -> 512 -> 256 -> 224 costs 0.5 ms here, 1024 -> 224 in one go 1.7 ms).
    while image.shape[0] >= 2 * size and image.shape[1] >= 2 * size:
        image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def preprocess_image(image: np.ndarray, size: int, method: str = "clahe", clahe_clip: float = 2.0,
                     clahe_grid: int = 8) -> np.ndarray:
    """Resize to size x size (area interpolation), then CLAHE and/or global histogram equalization."""
    if image.shape[0] != size or image.shape[1] != size:
        image = resize_square(image, size)
    if method == "none":
        return image
    if method not in ("clahe", "equalize", "clahe+equalize"):
        raise ValueError(f"--preprocess must be clahe, equalize, clahe+equalize or none, got {method!r}")
    if "equalize" in method:
        image = cv2.equalizeHist(image)
    if "clahe" in method:
        image = _clahe(float(clahe_clip), int(clahe_grid)).apply(image)
    return image


def build_train_augment(strength: float = 1.0, hflip: bool = False) -> A.Compose | None:
    """Small shift/scale/rotate and brightness/contrast changes on uint8 gray; None when strength is 0."""
    if strength <= 0 and not hflip:
        return None
    steps = []
    if strength > 0:
        steps += [
            A.Affine(translate_percent=(-0.06 * strength, 0.06 * strength), scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
                     rotate=(-7 * strength, 7 * strength), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8),
            A.RandomBrightnessContrast(brightness_limit=0.1 * strength, contrast_limit=0.1 * strength, p=0.8),
        ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps)


def normalize_batch(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,1,H,W] (any device) -> float [B,3,H,W] with ImageNet mean/std, for ImageNet-style trunks."""
    scale, shift = _normalization_constants(images.device)
    # (x / 255 - mean) / std as one multiply-add per channel; broadcasting the gray channel makes the 3 copies.
    batch = torch.addcmul(shift, images.float(), scale)
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@lru_cache(maxsize=8)
def _normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift on `device`, built once: no host-to-device copy per batch."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    return scale.view(1, 3, 1, 1).to(device), shift.view(1, 3, 1, 1).to(device)
