"""The Python API: a trained model from its checkpoint, probabilities for files, folders or arrays, and explanations.

    from cxr import Classifier
    clf = Classifier.from_checkpoint("runs/X/best.pt", device="auto")     # calibration="auto" | None | path
    result = clf.predict(["scan1.png", "scan2.dcm", "scans/"])          # files, folders, numpy gray/RGB/RGBA arrays
    result.probabilities                                                 # [N, 14] numpy, calibrated when available
    result.to_frame()                                                    # pandas: Image, one column per finding
    result.failures                                                      # [{"image", "path", "error"}]: unreadable files
    explanations = clf.explain("scan1.png", classes="top3", method="gradcam")   # maps and boxes, as explain.py

The model, its preprocessing (`cxr.transforms.Preprocessing`) and the device settings (`cxr.device`) all come
from the checkpoint, as in evaluate.py, so the same image gives the same probabilities here and there. Arrays
are one image each: [H, W] gray, or [H, W, 3|4] RGB/RGBA (numpy's usual order, as Pillow and imageio give);
any bit depth (16-bit and float are min-max scaled). Explanations go through `cxr.explainer.Explainer`, the
code explain.py runs. scripts/predict.py is the command-line front for folders of any size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cxr.calibration import apply_calibration, find_calibration, load_calibration
from cxr.checkpoint import CheckpointError
from cxr.device import device_policy
from cxr.errors import ConfigError
from cxr.labels import FINDINGS, NUM_CLASSES
from cxr.transforms import ImageReadError, Preprocessing, read_xray, to_uint8_gray

ImageInput = str | Path | np.ndarray


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N' or a torch.device; no process group is touched."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available here; use device='cpu' or 'auto'")
    return resolved


def probabilities_from_logits(logits: np.ndarray, temperatures: dict[str, float] | None = None) -> np.ndarray:
    """sigmoid(logit / T) per class in float64 through cxr.calibration (plain sigmoid without temperatures)."""
    calibration = {"temperatures": temperatures} if temperatures else None
    return apply_calibration(np.asarray(logits, dtype=np.float64), calibration, FINDINGS, logits=True)


def array_to_gray(image: np.ndarray, name: str = "array") -> np.ndarray:
    """One image array ([H, W] gray or [H, W, 1|3|4] RGB/RGBA, any depth) -> uint8 gray [H, W]."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)) or min(image.shape[:2]) < 1:
        raise ImageReadError(f"{name}: expected one image [H, W] or [H, W, 1|3|4], got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16, np.float32):
        image = image.astype(np.float32)  # OpenCV's colour conversion takes 8/16-bit and float32 only
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., [2, 1, 0, 3][: image.shape[2]]]  # RGB(A) -> BGR(A), the order to_uint8_gray reads
    return to_uint8_gray(np.ascontiguousarray(image))


def resolve_inputs(images: ImageInput | Sequence[ImageInput]) -> list[tuple[str, ImageInput]]:
    """(name, source) pairs in input order: files named or found in folders (as explain.py finds them), and arrays."""
    from cxr.explainer import collect_files, unique_names

    if isinstance(images, (str, Path, np.ndarray)):
        images = [images]
    entries: list[tuple[str | None, Any]] = []
    for position, item in enumerate(images):
        if isinstance(item, np.ndarray):
            entries.append((f"array{position}", item))
        else:
            entries += [(None, path.absolute()) for path in collect_files([str(item)])]
    files = list(dict.fromkeys(value for name, value in entries if name is None))  # a file named twice counts once
    names = dict(zip(files, unique_names(files)))
    items: list[tuple[str, ImageInput]] = []
    for name, value in entries:
        if name is not None:
            items.append((name, value))
        elif value in names:
            items.append((names.pop(value), str(value)))
    return items


def decode(name: str, source: ImageInput) -> np.ndarray:
    """uint8 gray [H, W] of a file or an array; ImageReadError (naming it) when it cannot be read."""
    try:
        return array_to_gray(source, name) if isinstance(source, np.ndarray) else read_xray(source)
    except cv2.error as error:  # e.g. an image OpenCV decodes but cannot convert
        raise ImageReadError(f"{name}: cannot convert the image ({str(error).strip().splitlines()[-1]})") from error


class _Images(torch.utils.data.Dataset):
    """(position, preprocessed uint8 [S, S] or None, error) per item; unreadable images are reported, not raised."""

    def __init__(self, items: Sequence[tuple[str, ImageInput]], preprocessing: Preprocessing):
        self.items, self.preprocessing = items, preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return position, torch.from_numpy(self.preprocessing(decode(*self.items[position]))), ""
        except ImageReadError as error:
            return position, None, str(error)


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(position, image) for position, image, _ in batch if image is not None]
    images = torch.stack([image for _, image in good]).unsqueeze(1) if good else None
    return [position for position, _ in good], images, [(position, error) for position, image, error in batch if image is None]


@dataclass
class Prediction:
    """Probabilities [N, 14] (calibrated when `calibrated`) and logits of the readable images, and the failures."""

    images: list[str]
    paths: list[str]
    logits: np.ndarray
    probabilities: np.ndarray
    calibrated: bool = False
    failures: list[dict] = field(default_factory=list)

    def to_frame(self) -> Any:
        """pandas DataFrame: Image, then one probability column per finding (Wang et al. order)."""
        import pandas as pd

        frame = pd.DataFrame(self.probabilities, columns=list(FINDINGS))
        frame.insert(0, "Image", self.images)
        return frame

    @classmethod
    def concatenate(cls, parts: Sequence[Prediction], calibrated: bool) -> Prediction:
        """One Prediction from several batches, in order."""
        empty = np.zeros((0, NUM_CLASSES))
        return cls([n for p in parts for n in p.images], [s for p in parts for s in p.paths],
                   np.concatenate([p.logits for p in parts]) if parts else empty.astype(np.float32),
                   np.concatenate([p.probabilities for p in parts]) if parts else empty, calibrated,
                   [f for p in parts for f in p.failures])


class Classifier:
    """A trained cxr model ready for inference: preprocessing, device policy and optional calibration included."""

    def __init__(self, model: torch.nn.Module, config: Any, checkpoint: dict, device: torch.device,
                 temperatures: dict[str, float] | None = None, calibration_source: str | None = None,
                 batch_size: int = 16, workers: int = 0):
        if batch_size < 1 or workers < 0:
            raise ConfigError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
        self.config, self.checkpoint = config, checkpoint
        self.preprocessing = Preprocessing.from_checkpoint(checkpoint)
        self.policy = device_policy(config, device)
        self.model = self.policy.prepare_model(model).eval()
        self.temperatures, self.calibration_source = temperatures, calibration_source
        self.batch_size, self.workers = batch_size, workers

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", calibration: str | Path | None = "auto",
                        batch_size: int = 16, workers: int = 0) -> Classifier:
        """Rebuild from a best.pt/last.pt or a model.safetensors export (scripts/export.py: no pickle at all, needs
        the `export` extra); calibration: 'auto' (the run's calibration.json if any), None, or a file."""
        from cxr.config import Config
        from cxr.factory import load_trained_model

        path = Path(path)
        if path.suffix == ".safetensors":
            from cxr.export import checkpoint_from_safetensors, require_extra

            require_extra("safetensors")  # names the extra to install
            model, checkpoint = checkpoint_from_safetensors(path)
            model, config = model.to(resolve_device(device)), Config.from_dict(checkpoint["config"])
        else:
            model, config, checkpoint = load_trained_model(path, resolve_device(device))
        names = list(checkpoint.get("class_names") or FINDINGS)
        if names != list(FINDINGS):
            raise CheckpointError(f"{path}: its classes {names} are not the 14 ChestX-ray14 findings this code predicts")
        source = find_calibration(path) if calibration == "auto" else (Path(calibration) if calibration else None)
        temperatures = load_calibration(source)["temperatures"] if source is not None else None
        return cls(model, config, checkpoint, model.normalize.scale.device, temperatures,
                   str(source) if source else None, batch_size, workers)

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def iter_predict(self, items: Sequence[tuple[str, ImageInput]], batch_size: int | None = None,
                     workers: int | None = None) -> Iterator[Prediction]:
        """One Prediction per batch of (name, source) items, in order; decoding runs in `workers` processes."""
        workers = self.workers if workers is None else workers
        if any(isinstance(source, np.ndarray) for _, source in items):
            workers = 0  # arrays are already in memory: copying them to worker processes costs more than it saves
        loader = torch.utils.data.DataLoader(
            _Images(items, self.preprocessing), batch_size=batch_size or self.batch_size, collate_fn=_collate,
            num_workers=workers, pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None)
        for positions, images, failed in loader:
            logits = self.logits(images) if images is not None else np.zeros((0, NUM_CLASSES), np.float32)
            failures = [{"image": items[p][0], "path": _path_text(items[p][1]), "error": error} for p, error in failed]
            yield Prediction([items[p][0] for p in positions], [_path_text(items[p][1]) for p in positions], logits,
                             probabilities_from_logits(logits, self.temperatures), self.temperatures is not None, failures)

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int | None = None) -> Prediction:
        """Probabilities for files, folders (their PNG/JPEG/DICOM files) and arrays; unreadable files are in .failures."""
        parts = list(self.iter_predict(resolve_inputs(images), batch_size))
        return Prediction.concatenate(parts, self.temperatures is not None)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> np.ndarray:
        """Logits [B, 14] float32 for preprocessed uint8 images [B, 1, S, S] (the evaluation forward pass)."""
        with self.policy.autocast():
            return self.model(self.policy.inputs(images)).float().cpu().numpy()

    def explain(self, images: ImageInput | Sequence[ImageInput], classes: str = "top3", method: str = "gradcam",
                box_threshold: float = 0.5, layer: str | None = None, batch_size: int | None = None) -> list[dict]:
        """Per image: Grad-CAM maps and boxes of the chosen classes, exactly as explain.py computes them.

        Each entry: image, path, size [W, H], probabilities {finding: p} (uncalibrated, as explain.py reports),
        and per chosen finding maps[finding] ([S, S] in [0, 1]) and boxes[finding] (original pixel coordinates).
        Unreadable images raise ImageReadError.
        """
        from cxr.explainer import Explainer, batches, choose_classes

        calibration = {"temperatures": self.temperatures} if self.temperatures else None
        explainer = Explainer(self.model, self.preprocessing, self.policy, method, box_threshold, layer, calibration=calibration)
        choose_classes(classes, np.zeros(NUM_CLASSES))  # a bad `classes` fails before any work
        results = []
        for chunk in batches(resolve_inputs(images), batch_size or self.batch_size):
            grays = [decode(name, source) for name, source in chunk]
            maps, probabilities = explainer(grays)
            for (name, source), gray, image_maps, probs in zip(chunk, grays, maps, probabilities):
                height, width = gray.shape
                scale = (width / image_maps.shape[-1], height / image_maps.shape[-2])
                chosen = [FINDINGS[column] for column in choose_classes(classes, probs)]
                results.append({"image": name, "path": _path_text(source), "size": [width, height],
                                "probabilities": dict(zip(FINDINGS, map(float, probs))),
                                "maps": {f: image_maps[FINDINGS.index(f)] for f in chosen},
                                "boxes": {f: explainer.boxes(image_maps[FINDINGS.index(f)], scale) for f in chosen}})
        return results


def _path_text(source: ImageInput) -> str:
    return "" if isinstance(source, np.ndarray) else str(source)
