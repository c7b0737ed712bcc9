"""Reference preprocessing for an exported cxr model, with numpy and OpenCV only (no cxr, no torch).

scripts/export.py copies this file into the export folder as preprocess.py, beside preprocessing.json:

    import json, preprocess
    params = json.load(open("preprocessing.json"))           # size, preprocess, clahe_clip, clahe_grid
    batch = preprocess.preprocess_files(["scan.png"], params)   # float32 [N, 1, S, S] in [0, 255]: the model's input

Its pixels equal cxr.transforms.Preprocessing's (a test checks it on real NIH images): gray from 8/16-bit,
BGR or BGRA (16-bit min-max scaled, not clipped), resize to S x S (halvings, then area; bilinear to enlarge),
then global histogram equalization and/or CLAHE as preprocessing.json says. DICOM is left to the caller
(pydicom: apply RescaleSlope/Intercept, invert MONOCHROME1, then call `preprocess` on the uint8 gray image).
"""

from __future__ import annotations

import cv2
import numpy as np


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 gray [H, W] from a decoded image (OpenCV's BGR/BGRA order, any bit depth)."""
    if image.ndim == 3:
        channels = image.shape[2]
        image = image[:, :, 0] if channels == 1 else cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if channels == 4 else cv2.COLOR_BGR2GRAY)
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((image - low) * (255.0 / (high - low))).astype(np.uint8)


def preprocess(gray: np.ndarray, params: dict) -> np.ndarray:
    """uint8 gray [H, W] -> uint8 [S, S]: resize, then equalize and/or CLAHE."""
    size = int(params["size"])
    if gray.shape[0] != size or gray.shape[1] != size:
        if gray.shape[0] <= size and gray.shape[1] <= size:
            gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_LINEAR)
        else:
            while gray.shape[0] >= 2 * size and gray.shape[1] >= 2 * size:
                gray = cv2.resize(gray, (gray.shape[1] // 2, gray.shape[0] // 2), interpolation=cv2.INTER_AREA)
            gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    method = params["preprocess"]
    if "equalize" in method:
        gray = cv2.equalizeHist(gray)
    if "clahe" in method:
        grid = int(params["clahe_grid"])
        gray = cv2.createCLAHE(clipLimit=float(params["clahe_clip"]), tileGridSize=(grid, grid)).apply(gray)
    return gray


def preprocess_files(paths: list, params: dict) -> np.ndarray:
    """PNG/JPEG files -> float32 [N, 1, S, S] in [0, 255], ready for the exported model."""
    images = []
    for path in paths:
        decoded = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if decoded is None:
            raise ValueError(f"{path}: not a decodable image")
        images.append(preprocess(to_gray(decoded), params))
    return np.stack(images)[:, None].astype(np.float32)
