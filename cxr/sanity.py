"""Sanity checks for saliency maps (Adebayo et al. 2018): cascading model-parameter randomization.

    result = sanity_check(model, images, ["gradcam", "layercam@features.denseblock2", "occlusion"], Path("out"))
    result["methods"]["gradcam"]["stages"][-1]["spearman"], result["flagged"]

A map that does not change when the weights that produced it are destroyed explains nothing. Starting from
the trained model, re-initialize the head, then the head and the last dense block, then one more block at a
time down to the stem (CASCADE), recompute every method's maps of the same images and classes (each image's
top class under the trained model), and compare each with the trained model's map: Spearman rank correlation
and SSIM (Wang et al. 2004, Gaussian window, written here), averaged over the maps. An edge detector of the
input (Sobel magnitude), which ignores the model and so never changes, is reported alongside as the known
trap. A method whose maps keep their ranking with every weight randomized (Spearman >= SIMILAR at the last
stage) is flagged; SSIM is reported beside it but not used to flag, since two mostly empty maps score a high
SSIM whatever their peaks.
Writes sanity.json and one figure per image (sanity_<n>.png; rows: stages, columns: methods).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.stats import rankdata

from cxr.explainer import build_saliency, method_label, parse_methods, write_image, write_json
from cxr.labels import FINDINGS
from cxr.overlays import FONT, heat_blend

# Each stage re-initializes these parts, cumulatively: head, then the last block, ... down to the stem.
CASCADE = ("head", "block4", "block3", "block2", "block1", "stem")
EDGE = "edge detector"
SIMILAR = 0.5  # Spearman at the last stage at or above this: the maps did not follow the weights


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties ranked by their average); 0 when either map is constant."""
    a, b = rankdata(first.ravel()), rankdata(second.ravel())
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def ssim(first: np.ndarray, second: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Mean structural similarity of two 2-D maps (Wang et al. 2004: 11 x 11 Gaussian window, K1 0.01, K2 0.03)."""
    x, y = first.astype(np.float64), second.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (11, 11), sigma, borderType=cv2.BORDER_REFLECT)

    mean_x, mean_y = blur(x), blur(y)
    var_x = blur(x * x) - mean_x**2
    var_y = blur(y * y) - mean_y**2
    covariance = blur(x * y) - mean_x * mean_y
    numerator = (2 * mean_x * mean_y + c1) * (2 * covariance + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return float((numerator / denominator).mean())


def edge_maps(images: torch.Tensor) -> np.ndarray:
    """Sobel gradient magnitude of each gray input, scaled to [0, 1]: [B, H, W]."""
    maps = []
    for image in images[:, 0].float().cpu().numpy():
        magnitude = np.hypot(cv2.Sobel(image, cv2.CV_64F, 1, 0, ksize=3), cv2.Sobel(image, cv2.CV_64F, 0, 1, ksize=3))
        maps.append(magnitude / magnitude.max() if magnitude.max() > 0 else magnitude)
    return np.stack(maps)


def randomized(model: torch.nn.Module, stages: Sequence[str], seed: int = 0) -> torch.nn.Module:
    """A copy of `model` whose head and trunk `stages` are re-initialized (parameters and BatchNorm statistics)."""
    torch.manual_seed(seed)
    clone = copy.deepcopy(model)
    parts = [clone.head] if "head" in stages else []
    parts += [module for stage in stages if stage != "head" for module in clone.stage_modules(stage)]
    for part in parts:
        for module in part.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return clone.eval()


def _maps(model: torch.nn.Module, method: str, layer: str | None, images: torch.Tensor, classes: torch.Tensor,
          occlusion: tuple[int, int]) -> np.ndarray:
    saliency = build_saliency(model, method, layer, *occlusion)
    maps, _ = saliency(images, classes[:, None])
    return maps[:, 0].float().cpu().numpy()


def sanity_check(model: torch.nn.Module, images: torch.Tensor, methods: Sequence[str], out: Path | None = None,
                 occlusion: tuple[int, int] = (8, 4), figures: int = 3, seed: int = 0) -> dict:
    """Cascading randomization for `methods` (names or name@layer) on gray [B, 1, H, W] inputs; sanity.json + figures."""
    specs = [item for spec in methods for item in parse_methods(spec)]
    labels = [method_label(method, layer) for method, layer in specs]
    with torch.no_grad():
        classes = model.eval()(images).argmax(dim=1)
    trained = {label: _maps(model, method, layer, images, classes, occlusion) for label, (method, layer) in zip(labels, specs)}
    trained[EDGE] = edge_maps(images)
    results: dict[str, dict] = {label: {"stages": []} for label in [*labels, EDGE]}
    shown: list[dict[str, np.ndarray]] = [{label: maps for label, maps in trained.items()}]
    for depth in range(1, len(CASCADE) + 1):
        stages = CASCADE[:depth]
        random_model = randomized(model, stages, seed)
        current = {label: _maps(random_model, method, layer, images, classes, occlusion)
                   for label, (method, layer) in zip(labels, specs)}
        current[EDGE] = edge_maps(images)  # the edge detector never looks at the weights
        shown.append(current)
        for label, maps in current.items():
            pairs = list(zip(trained[label], maps))
            results[label]["stages"].append({
                "randomized": list(stages),
                "spearman": float(np.mean([spearman(a, b) for a, b in pairs])),
                "ssim": float(np.mean([ssim(a, b) for a, b in pairs])),
            })
    flagged = [label for label, result in results.items() if result["stages"][-1]["spearman"] >= SIMILAR]
    for label, result in results.items():
        result["flagged"] = label in flagged
    report = {"stages": ["trained"] + ["+".join(CASCADE[:depth]) for depth in range(1, len(CASCADE) + 1)],
              "classes": [FINDINGS[int(c)] if int(c) < len(FINDINGS) else int(c) for c in classes],
              "similar_threshold": SIMILAR, "methods": results, "flagged": flagged}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "sanity.json", report)
        grays = images[:, 0].float().clamp(0, 255).byte().cpu().numpy()
        for index in range(min(figures, len(grays))):
            write_image(out / f"sanity_{index}.png", sanity_figure(grays[index], [s_maps for s_maps in shown], index,
                                                                    report["stages"]))
    print(format_sanity(report))
    return report


def sanity_figure(gray: np.ndarray, shown: list[dict[str, np.ndarray]], index: int, stages: list[str], tile: int = 160) -> np.ndarray:
    """Rows: trained model, then each randomization stage; columns: methods; one image's maps."""
    labels = list(shown[0])
    label_width, header = 200, 40
    rows = [np.full((header, label_width + tile * len(labels), 3), 255, np.uint8)]
    for column, label in enumerate(labels):
        cv2.putText(rows[0], label.replace("features.", "")[:24], (label_width + column * tile + 4, 26), FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    for stage, maps in zip(stages, shown):
        row = np.full((tile, label_width, 3), 255, np.uint8)
        for line, text in enumerate(stage.split("+")):
            cv2.putText(row, ("random: " if stage != "trained" and line == 0 else "") + text, (4, 20 + 16 * line), FONT,
                        0.42, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([row] + [heat_blend(gray, maps[label][index], (tile, tile)) for label in labels], axis=1))
    return np.concatenate(rows, axis=0)


def format_sanity(report: dict) -> str:
    """Spearman / SSIM per stage and method, then the flagged methods."""
    names = list(report["methods"])
    width = max(14, *(len(name) for name in names))
    header = f"{'randomized':34s} " + " ".join(f"{name:>{width}s}" for name in names)
    lines = ["cascading randomization: Spearman / SSIM of each map against the trained model's", header, "-" * len(header)]
    for index, stage in enumerate(report["stages"][1:]):
        cells = [f"{m['stages'][index]['spearman']:.2f} / {m['stages'][index]['ssim']:.2f}" for m in report["methods"].values()]
        lines.append(f"{stage:34s} " + " ".join(f"{cell:>{width}s}" for cell in cells))
    if report["flagged"]:
        lines.append(f"FLAGGED (maps keep their ranking, Spearman >= {report['similar_threshold']} with every weight "
                     f"randomized; they do not explain the model): {', '.join(report['flagged'])}")
    else:
        lines.append("no method flagged")
    return "\n".join(lines)
