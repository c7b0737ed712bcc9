"""The preprocessing contract, decoding, contrast enhancement (CLAHE / histogram equalization) and augmentation.

    prep = Preprocessing.from_config(config)              # or .from_checkpoint(checkpoint): size, method, CLAHE
    gray = read_xray("00000001_000.png")                 # uint8 [H, W], whatever the PNG's mode/depth
    image = prep(gray)                                    # resize first, then enhance (cheaper, same look)
    prep.as_dict()                                        # what a cache stores and is checked against; JSON
    prep.with_size(256)                                   # ten-crop loads at 256 for 224 crops
    augment = build_train_augment(strength=1.0)           # albumentations, on uint8 gray

`Preprocessing` is the one description of what happens to an image before the network: every consumer (the
Dataset, the cache builder and reader, explain, evaluate's ten-crop, the benchmark, exports) takes that object
and none rebuilds the steps from loose values. It stops at a 1-channel uint8 image.

Where normalization lives: in the model (`cxr.model.ImageNetNormalization`, its first layer, buffers only).
The network takes 1-channel images with values in [0, 255] and repeats the gray channel and applies the
ImageNet mean/std itself, so no consumer (a training loop, Grad-CAM, an exported ONNX file) can forget or
double it, and images stay 1-channel uint8 until they reach the device: 12x less to copy than 3-channel float.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np

from cxr.errors import ConfigError, CxrError

PREPROCESS_CHOICES = ("clahe", "equalize", "clahe+equalize", "none")
PREPROCESS_TEXT = "clahe, equalize, clahe+equalize or none"
DICOM_SUFFIXES = (".dcm", ".dicom")
MIN_IMAGE_SIDE = 32  # smaller than any X-ray worth reading: a placeholder or a damaged file
MAX_IMAGE_SIDE = 16384  # NIH PNGs are 1024; digital radiographs stay well under 5000


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
    width, height = png_size(buffer)
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageReadError(f"{path}: its PNG header claims {width} x {height} pixels, implausible for an X-ray "
                             f"(over {MAX_IMAGE_SIDE} per side); the file is damaged or not an X-ray: remove it")
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    except cv2.error as error:  # e.g. a header whose size exceeds OpenCV's limits
        raise ImageReadError(f"{path}: OpenCV cannot decode it ({str(error).strip().splitlines()[-1][:200]}); "
                             "re-download or remove it") from error
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image (truncated or corrupt?); re-download or remove it")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ImageReadError(f"{path}: {image.shape[1]} x {image.shape[0]} pixels is implausibly small for an X-ray "
                             f"(under {MIN_IMAGE_SIDE} per side); remove it or replace it with the real image")
    return to_uint8_gray(image)


def png_size(buffer: np.ndarray) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; (0, 0) when the bytes are not a PNG (JPEG, say)."""
    head = buffer[:24].tobytes()
    if len(head) < 24 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return 0, 0
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


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
    if method not in PREPROCESS_CHOICES:
        raise ConfigError(f"--preprocess must be {PREPROCESS_TEXT}, got {method!r}")
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


@dataclass(frozen=True)
class Preprocessing:
    """What happens to a decoded gray image before the network: resize to `size`, then `preprocess`.

    Frozen and comparable; `as_dict()` uses the key names a cache stores (size, preprocess, clahe_clip,
    clahe_grid). Invalid values raise ConfigError naming the flag, so a bad --clahe-grid never reaches OpenCV.
    """

    size: int
    preprocess: str = "clahe"
    clahe_clip: float = 2.0
    clahe_grid: int = 8

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.size, int) or self.size < 1:
            problems.append(f"--image-size must be a positive number of pixels, got {self.size!r}")
        if self.preprocess not in PREPROCESS_CHOICES:
            problems.append(f"--preprocess must be {PREPROCESS_TEXT}, got {self.preprocess!r}")
        if not 0 < float(self.clahe_clip) <= 1000:
            problems.append(f"--clahe-clip must be in (0, 1000], got {self.clahe_clip!r}")
        if not isinstance(self.clahe_grid, int) or not 1 <= self.clahe_grid <= 64:
            problems.append(f"--clahe-grid must be 1..64 tiles per side, got {self.clahe_grid!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        object.__setattr__(self, "clahe_clip", float(self.clahe_clip))

    @classmethod
    def from_config(cls, config: Any) -> Preprocessing:
        """From a run's Config (or anything with image_size, preprocess, clahe_clip, clahe_grid)."""
        return cls(int(config.image_size), str(config.preprocess), float(config.clahe_clip), int(config.clahe_grid))

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        """From `as_dict()` output or a cache's params.json (extra keys are ignored)."""
        return cls(int(values["size"]), str(values["preprocess"]), float(values["clahe_clip"]), int(values["clahe_grid"]))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> Preprocessing:
        """The preprocessing a checkpoint's model was trained with (from its stored config)."""
        config = checkpoint["config"]
        return cls(int(config["image_size"]), str(config["preprocess"]), float(config["clahe_clip"]), int(config["clahe_grid"]))

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        """uint8 [H, W] -> uint8 [size, size]."""
        return preprocess_image(gray, self.size, self.preprocess, self.clahe_clip, self.clahe_grid)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_size(self, size: int) -> Preprocessing:
        return replace(self, size=int(size))

    def differences(self, stored: dict) -> list[str]:
        """'name: cache has X, this run needs Y' for every stored parameter that would change the pixels."""
        names = list(self.as_dict())
        if "clahe" not in self.preprocess and "clahe" not in str(stored.get("preprocess")):
            names = [name for name in names if not name.startswith("clahe_")]  # unused without CLAHE
        wanted = self.as_dict()

        def same(first: object, second: object) -> bool:
            numbers = (int, float)
            return float(first) == float(second) if isinstance(first, numbers) and isinstance(second, numbers) else first == second

        return [f"{name}: cache has {stored.get(name)!r}, this run needs {wanted[name]!r}"
                for name in names if not same(stored.get(name), wanted[name])]

    def describe(self) -> str:
        enhance = self.preprocess if "clahe" not in self.preprocess else f"{self.preprocess} (clip {self.clahe_clip:g}, grid {self.clahe_grid})"
        return f"{self.size} px, {enhance}"
