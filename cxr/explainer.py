"""Explanations of a trained model: Grad-CAM maps, boxes and overlays for files or dataset images.

    explainer = Explainer(model, Preprocessing.from_checkpoint(checkpoint), policy, method="gradcam")
    maps, probabilities = explainer([read_xray("chest.png")])     # [1, 14, S, S] in [0, 1], [1, 14]
    results, failures = explain_images(explainer, items, truth, out_dir, classes="top3", batch_size=16)

`explain.py` is the command-line front of this module; cxr.localization_report scores the same maps
against ground-truth boxes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath

import cv2
import numpy as np
import torch

from cxr.calibration import apply_calibration
from cxr.data import BOX_SPACE
from cxr.device import DevicePolicy
from cxr.errors import ConfigError
from cxr.gradcam import METHODS, GradCAM
from cxr.labels import FINDINGS
from cxr.localization import heatmap_to_boxes
from cxr.occlusion import Occlusion, patch_positions
from cxr.overlays import overlay, panel
from cxr.rundir import OutputWriteError
from cxr.transforms import DICOM_SUFFIXES, ImageReadError, Preprocessing, read_xray

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)


# Grad-CAM family methods (one layer's activations and gradients) and the model-agnostic reference.
CAM_METHODS = METHODS
ALL_METHODS = (*METHODS, "occlusion")
# `auto`: occlusion where it is cheap (inputs up to OCCLUSION_AUTO_MAX px: 225 small forwards per image) and the
# measured best of the Grad-CAM family elsewhere; README "Explanations" has the figures behind both choices.
DEFAULT_METHOD = "auto"
DEFAULT_CAM = "hirescam@features.denseblock1"
OCCLUSION_AUTO_MAX = 128


def resolve_method(spec: str, image_size: int) -> str:
    """`auto` -> occlusion for inputs of at most OCCLUSION_AUTO_MAX px, else DEFAULT_CAM; anything else unchanged."""
    if spec != "auto":
        return spec
    return "occlusion" if image_size <= OCCLUSION_AUTO_MAX else DEFAULT_CAM


def find_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called `name` (dotted, as in model.named_modules()); the error lists the likely choices."""
    modules = dict(model.named_modules())
    if name not in modules:
        choices = [n for n in modules if n.count(".") == 1 and n.startswith("features.")]
        raise ConfigError(f"--layer {name!r}: the model has no such module; try one of {', '.join(choices)}")
    return modules[name]


def parse_methods(spec: str, layer: str | None = None) -> list[tuple[str, str | None]]:
    """`gradcam,layercam@features.denseblock2,occlusion` -> [(method, layer or None)]; `--layer` fills the rest."""
    chosen = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        method, _, own_layer = item.partition("@")
        if method not in ALL_METHODS:
            raise ConfigError(f"--method(s) {item!r}: unknown method {method!r}; choose from {', '.join(ALL_METHODS)} "
                              "(a CAM method may name its layer: layercam@features.denseblock2)")
        if method == "occlusion" and own_layer:
            raise ConfigError(f"--methods {item!r}: occlusion works on the input image and takes no layer")
        chosen.append((method, None if method == "occlusion" else (own_layer or layer)))
    if not chosen:
        raise ConfigError(f"--methods {spec!r}: name at least one of {', '.join(ALL_METHODS)}")
    return chosen


def method_label(method: str, layer: str | None) -> str:
    """The name a method's results are filed under: `layercam@features.denseblock2`, or the bare method."""
    return f"{method}@{layer}" if layer else method


def build_saliency(model: torch.nn.Module, method: str, layer: str | None = None, occlusion_patch: int = 8,
                   occlusion_stride: int = 4, occlusion_batch: int = 256) -> GradCAM | Occlusion:
    """The callable images -> (maps [B, K, H, W], logits) for one method; bad names are ConfigErrors."""
    parse_methods(method, layer)
    if method == "occlusion":
        return Occlusion(model, occlusion_patch, occlusion_stride, occlusion_batch)
    return GradCAM(model, target_layer=find_layer(model, layer) if layer else None, method=method)


class Explainer:
    """Maps of all 14 classes for batches of gray images (one method), with the checkpoint's preprocessing."""

    def __init__(self, model: torch.nn.Module, preprocessing: Preprocessing, policy: DevicePolicy, method: str = DEFAULT_METHOD,
                 box_threshold: float = 0.5, layer: str | None = None, occlusion_patch: int = 8, occlusion_stride: int = 4,
                 calibration: dict | None = None):
        if not 0 < box_threshold <= 1:
            raise ConfigError(f"--box-threshold must be in (0, 1] (a fraction of the map's maximum), got {box_threshold}")
        method = resolve_method(method, preprocessing.size)
        if "@" in method:
            (method, layer), = parse_methods(method, layer)
        self.cam = build_saliency(model, method, layer, occlusion_patch, occlusion_stride)
        if method == "occlusion":
            patch_positions(preprocessing.size, occlusion_patch, occlusion_stride)  # a patch too large fails now
            layer = None
        self.method, self.label = method, method_label(method, layer)
        self.preprocessing, self.policy, self.box_threshold = preprocessing, policy, box_threshold
        self.layer = layer or ("input image" if method == "occlusion" else "last feature map")
        self.calibration = calibration  # cxr.calibration's per-class temperatures, or None for raw probabilities
        self.output_stride = getattr(model, "output_stride", None)

    def __call__(self, grays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """maps [B, 14, S, S] in [0, 1] and probabilities [B, 14]."""
        batch = np.stack([self.preprocessing(gray) for gray in grays])
        inputs = self.policy.inputs(torch.from_numpy(batch).unsqueeze(1))
        maps, logits = self.cam(inputs, list(range(len(FINDINGS))))
        probabilities = apply_calibration(logits.float().cpu().numpy(), self.calibration, FINDINGS, logits=True)
        return maps.float().cpu().numpy(), probabilities

    def boxes(self, heatmap: np.ndarray, scale: tuple[float, float]) -> list[dict]:
        return heatmap_to_boxes(heatmap, self.box_threshold, scale=scale)


def collect_files(inputs: Sequence[str]) -> list[Path]:
    """Image files named directly or found (non-recursively) in the named folders, in a stable order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                files += sorted(path for path in item.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
            except OSError as error:
                raise ImageReadError(f"{item}: cannot list the folder ({error.strerror or error})") from error
        elif item.is_file():
            files.append(item)
        else:
            raise ImageReadError(f"{item}: no such image file or folder")
    if not files:
        raise ImageReadError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(inputs)}")
    return files


def unique_names(files: Sequence[Path]) -> list[str]:
    """Names for outputs: the file name when stems are unique, else the path relative to the inputs' common folder."""
    stems = [path.stem for path in files]
    if len(set(stems)) == len(stems):
        return [path.name for path in files]
    resolved = [path.resolve() for path in files]
    common = Path(os.path.commonpath([path.parent for path in resolved]))
    return [path.relative_to(common).as_posix() for path in resolved]


def overlay_file_name(name: str, finding: str, disambiguate: bool) -> str:
    """`<stem>_<Finding>.png`; with `disambiguate`, the whole relative name (folders, suffix) flattened."""
    base = PurePath(name).stem if not disambiguate else name.replace("/", "__").replace(".", "_")
    return f"{base}_{finding}.png"


def choose_classes(spec: str, probabilities: np.ndarray) -> list[int]:
    """Class indices to explain for one image: the top N, all, or the named findings."""
    if spec == "all":
        return list(range(len(FINDINGS)))
    if spec.startswith("top") and spec[3:].isdigit() and 1 <= int(spec[3:]) <= len(FINDINGS):
        return [int(i) for i in np.argsort(-probabilities)[: int(spec[3:])]]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in FINDINGS]
    if unknown or not names:
        raise ConfigError(f"--classes {spec!r}: unknown finding(s) {unknown}; use top1..top14, all, or names from "
                          f"{', '.join(FINDINGS)}")
    return [FINDINGS.index(name) for name in names]


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB picture as PNG; a failed write (full disk, read-only folder) is an OutputWriteError."""
    try:
        written = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error as error:
        raise OutputWriteError(f"cannot write {path} ({error})") from error
    if not written or not path.is_file():
        raise OutputWriteError(f"cannot write {path}: no space left on the device, or the folder is not writable")


def write_json(path: Path, content: object) -> None:
    """Write JSON; a failed write is an OutputWriteError naming the file."""
    try:
        path.write_text(json.dumps(content, indent=2))
    except OSError as error:
        raise OutputWriteError(f"cannot write {path}: {error.strerror or error}") from error


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read_all(chunk: Sequence[tuple[str, str]]) -> tuple[list, list[dict]]:
    readable, failures = [], []
    for name, path in chunk:
        try:
            readable.append((name, path, read_xray(path)))
        except ImageReadError as error:
            failures.append({"name": name, "path": str(path), "error": str(error)})
    return readable, failures


def explain_images(explainer: Explainer, items: Sequence[tuple[str, str]], truth: dict, out: Path, classes: str,
                   batch_size: int, disambiguate: bool = False, with_panel: bool = False) -> tuple[dict, list[dict]]:
    """Overlays (and with `with_panel` one panel of all explained findings per image) and predictions for
    (name, path) items: (predictions.json content, unreadable images)."""
    choose_classes(classes, np.zeros(len(FINDINGS)))  # a bad --classes fails before any work
    results: dict = {}
    failures: list[dict] = []
    for chunk in batches(items, batch_size):
        readable, failed = _read_all(chunk)
        failures += failed
        for entry in failed:
            print(f"skipped {entry['name']}: {entry['error']}")
        if not readable:
            continue
        maps, probabilities = explainer([gray for _, _, gray in readable])
        for (name, path, gray), image_maps, probs in zip(readable, maps, probabilities):
            height, width = gray.shape
            scale = (width / image_maps.shape[-1], height / image_maps.shape[-2])
            to_pixels = (width / BOX_SPACE, height / BOX_SPACE)
            known = truth.get(Path(name).name, [])
            entry = {"path": str(path), "size": [width, height],
                     "probabilities": {finding: round(float(p), 6) for finding, p in zip(FINDINGS, probs)},
                     "ground_truth": [{"finding": f, "box": list(box)} for f, box in known], "explained": {}}
            pictures = []
            for column in choose_classes(classes, probs):
                finding = FINDINGS[column]
                boxes = explainer.boxes(image_maps[column], scale)
                gt = [tuple(v * to_pixels[i % 2] for i, v in enumerate(box)) for f, box in known if f == finding]
                picture = overlay(gray, image_maps[column], boxes, gt, label=finding,
                                  title=f"{name}  {finding} p={probs[column]:.3f}  ({explainer.label})")
                file = out / overlay_file_name(name, finding, disambiguate)
                write_image(file, picture)
                pictures.append(picture)
                entry["explained"][finding] = {"probability": round(float(probs[column]), 6), "boxes": boxes, "overlay": file.name}
            if with_panel:
                file = out / overlay_file_name(name, "panel", disambiguate)
                write_image(file, panel(pictures))
                entry["panel"] = file.name
            results[name] = entry
            top = sorted(entry["probabilities"].items(), key=lambda item: -item[1])[:3]
            print(f"{name}: " + ", ".join(f"{finding} {p:.3f}" for finding, p in top))
    return results, failures
