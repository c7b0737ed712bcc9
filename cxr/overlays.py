"""Overlays people can read: heatmap over the X-ray, boxes with class and score, a title band and a colour bar.

    picture = overlay(gray, heatmap, boxes, gt_boxes=[(20, 30, 40, 40)], title="x.png  Mass p=0.83", label="Mass")
    picture.shape        # (H' + title band, W' + colour bar, 3) with max(H', W') >= MIN_SIDE (512)
    row = panel([picture_mass, picture_nodule, picture_effusion])     # side by side, one per finding

Boxes are in the gray image's pixel coordinates (cxr.localization's (x, y, w, h) or dicts with a `score`).
Small images (the demo's are 64-128 px) are enlarged first so that text, boxes and the bar stay legible; the
title sits in its own band above the image, shrunk or wrapped until it fits, never cut off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np

from cxr.localization import Box, as_xywh

MIN_SIDE = 512  # the longer side of every overlay, at least
PRED_COLOUR = (255, 0, 255)  # magenta: absent from the jet colormap, unlike red or yellow
GT_COLOUR = (0, 255, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _draw_text(image: np.ndarray, text: str, bottom_left: tuple[int, int], colour: tuple[int, int, int],
               font_scale: float, thickness: int) -> None:
    """Text on a filled black band, so it stays readable over any part of the heatmap."""
    (width, height), baseline = cv2.getTextSize(text, FONT, font_scale, thickness)
    x, y = bottom_left
    y = max(y, height + baseline)
    x = max(0, min(x, image.shape[1] - width))  # a label near the right edge moves left instead of leaving
    cv2.rectangle(image, (x, y - height - baseline), (x + width, y), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, text, (x, y - baseline), FONT, font_scale, colour, thickness, cv2.LINE_AA)


def _draw_box(image: np.ndarray, box: Box, colour: tuple[int, int, int], label: str | None, thickness: int,
              font_scale: float, factor: float) -> None:
    x, y, w, h = (value * factor for value in as_xywh(box))
    top_left = (int(round(x)), int(round(y)))
    bottom_right = (int(round(x + w)) - 1, int(round(y + h)) - 1)
    cv2.rectangle(image, top_left, bottom_right, colour, thickness)
    if label:
        _draw_text(image, label, (top_left[0], max(top_left[1] - thickness, 0)), colour, font_scale, thickness)


def title_lines(title: str, width: int, font_scale: float, thickness: int) -> tuple[list[str], float]:
    """The title as lines that each fit `width` pixels: shrink the font to 0.45 at most, then wrap at spaces."""
    def fits(text: str, scale: float) -> bool:
        return cv2.getTextSize(text, FONT, scale, thickness)[0][0] <= width - 8

    scale = font_scale
    while not fits(title, scale) and scale > 0.45:
        scale -= 0.05
    lines: list[str] = []
    for word in title.split():
        if lines and fits(f"{lines[-1]} {word}", scale):
            lines[-1] = f"{lines[-1]} {word}"
        else:
            while not fits(word, scale) and len(word) > 4:  # one word wider than the image: cut it in two
                cut = len(word) - 1
                while cut > 1 and not fits(word[:cut], scale):
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    return lines or [""], scale


def colour_bar(height: int, width: int = 64, font_scale: float = 0.5) -> np.ndarray:
    """A vertical jet scale from 1 (top) to 0 (bottom) with three tick labels, RGB uint8 [height, width, 3]."""
    bar = np.full((height, width, 3), 255, np.uint8)
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None]
    strip = cv2.cvtColor(cv2.applyColorMap(np.repeat(ramp, 16, axis=1), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    bar[:, 4:20] = strip
    for value in (1.0, 0.5, 0.0):
        y = int(round((1 - value) * (height - 1)))
        y_text = min(max(y + 5, 12), height - 3)
        cv2.line(bar, (20, y), (25, y), (0, 0, 0), 1)
        cv2.putText(bar, f"{value:.1f}", (27, y_text), FONT, font_scale * 0.8, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def heat_blend(gray_image: np.ndarray, heatmap: np.ndarray, size: tuple[int, int], alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 [h, w, 3] for size (w, h): the gray image resized, the heatmap in jet blended over it."""
    width, height = size
    interpolation = cv2.INTER_LINEAR if width >= gray_image.shape[1] else cv2.INTER_AREA
    base = cv2.resize(gray_image, (width, height), interpolation=interpolation)
    heat = cv2.resize(np.asarray(heatmap, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    heat_uint8 = np.clip(np.nan_to_num(heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour_map = cv2.cvtColor(cv2.applyColorMap(heat_uint8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colour_map, alpha, cv2.cvtColor(base, cv2.COLOR_GRAY2RGB), 1.0 - alpha, 0.0)


def overlay(
    gray_image: np.ndarray,
    heatmap: np.ndarray,
    pred_boxes: Iterable[Box] = (),
    gt_boxes: Iterable[Box] | None = None,
    title: str | None = None,
    alpha: float = 0.4,
    label: str | None = None,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """RGB uint8 picture: the image enlarged to `min_side` px on its longer side (if smaller), the heatmap (jet)
    blended over it, predicted boxes in magenta labelled `<label> <score>`, ground truth in green, a title band
    above and a colour bar on the right."""
    gray_image = np.asarray(gray_image)
    if gray_image.ndim != 2 or gray_image.dtype != np.uint8:
        raise ValueError(f"overlay expects a 2-D uint8 grayscale image, got {gray_image.dtype} {gray_image.shape}")
    height, width = gray_image.shape
    factor = max(1.0, min_side / max(height, width))
    out_w, out_h = int(round(width * factor)), int(round(height * factor))
    image = heat_blend(gray_image, heatmap, (out_w, out_h), alpha)
    thickness = max(1, round(min(out_h, out_w) / 256))
    font_scale = max(0.45, min(out_h, out_w) / 700)
    for box in gt_boxes or ():
        _draw_box(image, box, GT_COLOUR, None, thickness, font_scale, factor)
    for box in pred_boxes:
        score = box.get("score") if isinstance(box, Mapping) else None
        text = " ".join(part for part in (label, None if score is None else f"{score:.2f}") if part)
        _draw_box(image, box, PRED_COLOUR, text or None, thickness, font_scale, factor)
    image = np.concatenate([image, colour_bar(out_h, font_scale=font_scale)], axis=1)
    if title:
        lines, scale = title_lines(title, image.shape[1], font_scale, thickness)
        (_, line_height), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
        step = line_height + baseline + 4
        band = np.zeros((step * len(lines) + 4, image.shape[1], 3), np.uint8)
        for row, line in enumerate(lines):
            cv2.putText(band, line, (4, 2 + step * row + line_height + 2), FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        image = np.concatenate([band, image], axis=0)
    return image


def panel(pictures: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Pictures side by side (top-aligned, white gaps), e.g. one overlay per finding of one image."""
    if not pictures:
        raise ValueError("panel needs at least one picture")
    height = max(picture.shape[0] for picture in pictures)
    padded = []
    for index, picture in enumerate(pictures):
        column = np.full((height, picture.shape[1] + (gap if index < len(pictures) - 1 else 0), 3), 255, np.uint8)
        column[:picture.shape[0], :picture.shape[1]] = picture
        padded.append(column)
    return np.concatenate(padded, axis=1)
