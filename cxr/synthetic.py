"""Synthetic chest X-rays in exactly the NIH ChestX-ray14 release layout, for the demo and the tests.

Each image is a chest-like radiograph (dark lungs, bright mediastinum and heart, rib arcs, diaphragm
domes, smooth noise, varying pose and exposure) on which each of the 14 findings is drawn with its own
signature at its own anatomical place, so a CNN learns them in minutes and Grad-CAM can be scored
against the boxes.

    from cxr.synthetic import ensure_demo_dataset, generate_synthetic_nih, render_image
    summary = generate_synthetic_nih("data/synthetic", patients=300, size=256, seed=0, workers=2)
    root = ensure_demo_dataset()          # cached under $CXR_CACHE_DIR or ~/.cache/cxr
    image, boxes = render_image(7, 0, ["Mass"], size=128)   # boxes in pixels of `image`

Files written: images/%08d_%03d.png, Data_Entry_2017.csv (2017 form: trailing empty column),
BBox_List_2017.csv (1024x1024 coordinates, spelled ``Infiltrate``, boxes for every finding of the test
images: the real release also boxes test images only), train_val_list.txt / test_list.txt (by patient).
Outputs are byte-identical for the same arguments, whatever the number of workers (on one platform and
set of library versions: OpenCV and NumPy kernels may round differently elsewhere).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from cxr.labels import FINDINGS, NO_FINDING

GENERATOR_VERSION = 2  # bump whenever the pixels or tables change: it names the cache folder
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BBOX_SPACE = 1024.0  # the real box list is in 1024x1024 pixels whatever the image size
# Huffman-only deflate: 3x faster than the default on noisy images, and smaller; explicit for determinism.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
COMPLETE_MARKER = "COMPLETE.json"

# Share of sick patients' primary findings; every class gets enough to stay >= ~4% of images.
PRIMARY_WEIGHTS = dict(zip(FINDINGS, (1.5, 1.5, 1.7, 2.1, 1.5, 1.5, 1.7, 1.6, 1.7, 1.7, 1.5, 1.5, 1.5, 1.7)))
# Pairs that co-occur in the real table (Effusion with Atelectasis/Infiltration/Cardiomegaly, ...).
COMPANIONS = {
    "Atelectasis": ("Effusion", "Infiltration"), "Cardiomegaly": ("Effusion",),
    "Effusion": ("Atelectasis", "Infiltration", "Cardiomegaly"), "Infiltration": ("Effusion", "Atelectasis"),
    "Mass": ("Nodule",), "Nodule": ("Mass",), "Pneumonia": ("Infiltration",), "Pneumothorax": ("Emphysema",),
    "Consolidation": ("Effusion", "Atelectasis"), "Edema": ("Infiltration", "Effusion"),
    "Emphysema": ("Pneumothorax",), "Fibrosis": ("Pleural_Thickening",), "Pleural_Thickening": ("Fibrosis",),
    "Hernia": ("Cardiomegaly",),
}
SICK_FRACTION = 0.52
TEST_EVERY = 5  # 20% of patients in test_list.txt
FOLLOW_UP_COUNTS = (1, 2, 3, 4, 5)
FOLLOW_UP_PROBS = (0.15, 0.2, 0.25, 0.2, 0.2)  # mean 3.1 images per patient
PIXEL_SPACINGS = (0.139, 0.143, 0.168)


# Template geometry in [0, 1] image coordinates (x right, y down); lung 0 is on the image left.
LUNG_CX, LUNG_CY, LUNG_RX, LUNG_RY = (0.285, 0.715), 0.45, 0.175, 0.34
DOME_TOP = (0.70, 0.73)  # the patient's right hemidiaphragm (image left) sits higher
HEART = (0.555, 0.64, 0.155, 0.12)  # centre x, centre y, radius x, radius y
LUNG, SOFT_TISSUE, DENSE = 0.16, 0.45, 0.70  # template gray levels, before exposure


def smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """A smooth random float32 field of about `cells` blobs across a size x size image."""
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    # Cubic to a small size, then linear: as smooth to the eye, and 4x faster than cubic at 256 px.
    step = min(size, 64)
    smooth = cv2.resize(grid, (step, step), interpolation=cv2.INTER_CUBIC)
    return smooth if step == size else cv2.resize(smooth, (size, size), interpolation=cv2.INTER_LINEAR)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def _soft(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(0.6, 0.006 * size))


def _lung_masks(x: np.ndarray, y: np.ndarray, heart: np.ndarray, dome_drop: float, dome_curve: float,
                extra_depth: float) -> np.ndarray:
    masks = []
    for side in (0, 1):
        radius_y = np.where(y > LUNG_CY, LUNG_RY + extra_depth, LUNG_RY)
        radius_x = LUNG_RX * (0.8 + 0.35 * np.clip((y - 0.11) / 0.6, 0, 1))  # narrow apex, wide base
        inside = _ellipse(x, y, LUNG_CX[side], LUNG_CY, radius_x, radius_y) < 1
        dome = DOME_TOP[side] + dome_drop + dome_curve * ((x - LUNG_CX[side]) / LUNG_RX) ** 2
        masks.append(inside & (y < dome) & (np.abs(x - 0.5) > 0.06) & ~heart)
    return np.stack(masks)


@dataclass(frozen=True)
class Anatomy:
    """A chest template of one size: coordinate grids, gray levels and the masks lesions draw on."""

    size: int
    x: np.ndarray
    y: np.ndarray
    base: np.ndarray
    lungs: np.ndarray  # (2, S, S) soft masks
    lungs_flat: np.ndarray  # (2, S, S) soft masks over the low, flat diaphragm of emphysema
    wall_distance: np.ndarray  # (2, S, S) pixels from each lung's edge, 0 outside it
    heart: np.ndarray
    hilar_weight: np.ndarray  # where vessel markings show, strongest at the hila

    def vessel_markings(self, rng: np.random.Generator) -> np.ndarray:
        """Branching line texture inside the lungs (zero crossings of smooth noise)."""
        return 0.08 * np.exp(-((smooth_noise(rng, 12, self.size) / 0.15) ** 2)) * self.hilar_weight


@lru_cache(maxsize=8)
def anatomy(size: int) -> Anatomy:
    """The chest template at `size` pixels, computed once per process."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    heart = _ellipse(x, y, *HEART) < 1
    lungs = _lung_masks(x, y, heart, 0.0, 0.12, 0.0)
    dome_line = np.where(x < 0.5, DOME_TOP[0] + 0.12 * ((x - LUNG_CX[0]) / LUNG_RX) ** 2,
                         DOME_TOP[1] + 0.12 * ((x - LUNG_CX[1]) / LUNG_RX) ** 2)
    body = np.abs(x - 0.5) < 0.44
    base = np.where(body, SOFT_TISSUE, 0.04)
    base = np.where(body & (y > dome_line), 0.62, base)
    base = np.where((np.abs(x - 0.5) < 0.06) & (y < HEART[1]), 0.72, base)
    base = np.where(np.abs(x - 0.5) < 0.022, 0.78, base)
    base = np.where(heart, DENSE, base)
    lung_any = lungs.any(axis=0)
    base = np.where(lung_any, LUNG, base).astype(np.float32)
    ribs = np.zeros_like(x)
    for k in range(9):
        arc = 0.1 + 0.072 * k + 0.09 * ((np.abs(x - 0.5) - 0.1) / 0.35) ** 2  # posterior ribs fall laterally
        ribs = np.maximum(ribs, np.abs(y - arc) < 0.011)
    base += 0.1 * ribs * lung_any
    for lateral in (-1, 1):  # clavicles, from the sternum up and out to the shoulders
        t = np.clip((lateral * (x - 0.5) - 0.05) / 0.25, 0, 1)
        base += 0.15 * ((np.abs(y - (0.15 - 0.05 * t)) < 0.012) & (lateral * (x - 0.5) > 0.05)
                        & (lateral * (x - 0.5) < 0.3))
    soft_lungs = np.stack([_soft(mask, size) for mask in lungs])
    hila = np.exp(-(((np.abs(x - 0.5) - 0.12) / 0.09) ** 2) - ((y - 0.45) / 0.2) ** 2)
    arrays = dict(
        x=x, y=y, base=cv2.GaussianBlur(base, (0, 0), max(0.5, 0.004 * size)), lungs=soft_lungs,
        lungs_flat=np.stack([_soft(m, size) for m in _lung_masks(x, y, heart, 0.07, 0.03, 0.06)]),
        wall_distance=np.stack([cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5) for m in lungs]),
        heart=_soft(heart, size), hilar_weight=soft_lungs.sum(axis=0) * (0.35 + 0.65 * hila))
    for array in arrays.values():
        array.flags.writeable = False  # shared by every image of this size through the cache
    return Anatomy(size=size, **arrays)


# Each finding: (rng, anatomy, vessel markings) -> additive float32 change of the template.
def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))  # a Python float keeps the float32 arrays float32


def _side(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.integers(2))
    return side, (-1, 1)[side]  # lung index and the sign of its lateral direction


def _disc(anat: Anatomy, cx: float, cy: float, rx: float, ry: float, edge: float) -> np.ndarray:
    return np.clip((1 - np.sqrt(_ellipse(anat.x, anat.y, cx, cy, rx, ry))) / edge, 0, 1)


def _atelectasis(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, lateral = _side(rng)  # a linear plate of collapse in a lower zone
    cx, cy = LUNG_CX[side] + lateral * _u(rng, -0.02, 0.06), _u(rng, 0.56, 0.66)
    half_length, half_width, angle = _u(rng, 0.07, 0.1), _u(rng, 0.014, 0.02), _u(rng, -0.35, 0.35)
    along = (anat.x - cx) * math.cos(angle) + (anat.y - cy) * math.sin(angle)
    across = (anat.y - cy) * math.cos(angle) - (anat.x - cx) * math.sin(angle)
    distance = np.hypot(np.maximum(np.abs(along) - half_length, 0), across)
    return 0.42 * np.clip((half_width - distance) / 0.006 + 0.5, 0, 1)


def _cardiomegaly(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    big_heart = _disc(anat, HEART[0] + _u(rng, 0.01, 0.03), HEART[1] - _u(rng, 0, 0.01),
                      _u(rng, 0.23, 0.26), _u(rng, 0.135, 0.155), 0.04)
    return big_heart * np.maximum(DENSE - anat.base, 0)


def _effusion(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, lateral = _side(rng)  # fluid level with a meniscus climbing the lateral wall
    wall_x = LUNG_CX[side] + lateral * 1.1 * LUNG_RX
    level, rise, reach = _u(rng, 0.62, 0.68), _u(rng, 0.08, 0.15), _u(rng, 0.1, 0.17)
    surface = level - rise * np.clip(1 - np.abs(anat.x - wall_x) / reach, 0, 1) ** 2
    return np.clip((anat.y - surface) / 0.012, 0, 1) * anat.lungs[side] * np.maximum(0.68 - anat.base, 0)


def _infiltration(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, _ = _side(rng)  # a speckled patch: many small soft spots over a faint haze
    cx, cy, radius = LUNG_CX[side] + _u(rng, -0.05, 0.05), _u(rng, 0.32, 0.5), _u(rng, 0.1, 0.13)
    speckle = np.clip(1.5 * smooth_noise(rng, 20, anat.size), 0, 1)
    return (0.1 + 0.35 * speckle) * _disc(anat, cx, cy, radius, 1.2 * radius, 0.4) * anat.lungs[side]


def _mass(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, _ = _side(rng)
    cx, cy, radius = LUNG_CX[side] + _u(rng, -0.06, 0.06), _u(rng, 0.25, 0.58), _u(rng, 0.055, 0.08)
    return 0.45 * _disc(anat, cx, cy, radius, radius * _u(rng, 0.9, 1.1), 0.12)


def _nodule(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, _ = _side(rng)
    cx, cy = LUNG_CX[side] + _u(rng, -0.08, 0.08), _u(rng, 0.2, 0.64)
    delta = np.zeros_like(anat.x)
    for _ in range(int(rng.integers(1, 4))):
        radius = _u(rng, 0.022, 0.03)
        dot = _disc(anat, cx + _u(rng, -0.04, 0.04), cy + _u(rng, -0.04, 0.04), radius, radius, 0.3)
        delta = np.maximum(delta, 0.6 * dot)
    return delta


def _pneumonia(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, _ = _side(rng)  # a fluffy cloud: its edge wobbles with smooth noise
    cx, cy, radius = LUNG_CX[side] + _u(rng, -0.04, 0.04), _u(rng, 0.57, 0.67), _u(rng, 0.11, 0.14)
    distance = np.sqrt(_ellipse(anat.x, anat.y, cx, cy, radius, 0.85 * radius))
    distance += 0.25 * smooth_noise(rng, 7, anat.size)
    return 0.45 * np.clip((1 - distance) / 0.35, 0, 1) * anat.lungs[side]


def _pneumothorax(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, lateral = _side(rng)  # apical air: dark, no vessel markings, a thin bright pleural line
    depth, line = _u(rng, 0.045, 0.075) * anat.size, max(1.5, 0.012 * anat.size)
    upper_lateral = (anat.y < _u(rng, 0.32, 0.45)) & (lateral * (anat.x - LUNG_CX[side]) > -0.04)
    distance = anat.wall_distance[side]
    air = (distance > 0) & (distance < depth) & upper_lateral
    pleura = (distance >= depth) & (distance < depth + line) & upper_lateral
    return np.where(air, -0.14 - markings, 0) + np.where(pleura, 0.4, 0).astype(np.float32)


def _consolidation(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, _ = _side(rng)  # a homogeneous lobe above a sharp fissure
    fissure = _u(rng, 0.3, 0.42) + _u(rng, -0.25, 0.25) * (anat.x - LUNG_CX[side])
    height = _u(rng, 0.13, 0.2)
    lobe = np.clip((fissure - anat.y) / 0.008, 0, 1) * np.clip((anat.y - fissure + height) / 0.05, 0, 1)
    return 0.4 * lobe * anat.lungs[side]


def _edema(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    cy, spread_x, spread_y = _u(rng, 0.42, 0.5), _u(rng, 0.06, 0.08), _u(rng, 0.08, 0.11)
    haze = sum(np.exp(-_ellipse(anat.x, anat.y, 0.5 + lateral * _u(rng, 0.1, 0.13), cy, spread_x, spread_y))
               for lateral in (-1, 1))  # bilateral "bat wings" around the hila
    texture = 1 + 0.3 * smooth_noise(rng, 12, anat.size)
    return 0.4 * np.clip((haze - 0.12) / 0.88, 0, 1) * texture * anat.lungs.sum(axis=0)


def _emphysema(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    flat, normal = anat.lungs_flat.sum(axis=0), anat.lungs.sum(axis=0)
    gained = np.clip(flat - normal, 0, 1)  # lung where the flattened diaphragm used to be
    return -_u(rng, 0.09, 0.13) * flat + gained * (LUNG - anat.base) - 0.6 * markings


def _fibrosis(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, _ = _side(rng)  # a reticular net: three families of wobbly parallel lines, 60 degrees apart
    cx, cy, radius = LUNG_CX[side] + _u(rng, -0.03, 0.03), _u(rng, 0.22, 0.32), _u(rng, 0.1, 0.13)
    period, angle = _u(rng, 0.07, 0.09), _u(rng, 0, math.pi)
    wobble = 0.012 * smooth_noise(rng, 10, anat.size)
    net = np.zeros_like(anat.x)
    for k in range(3):
        across = anat.x * math.cos(angle + k * math.pi / 3) + anat.y * math.sin(angle + k * math.pi / 3)
        offset = np.abs((across + wobble) / period % 1.0 - 0.5) * period  # distance to the nearest line
        net = np.maximum(net, np.clip(1 - offset / 0.014, 0, 1))
    # A faint haze under the net keeps the region visible where downsampling blurs the lines away.
    return (0.12 + 0.4 * net) * _disc(anat, cx, cy, radius, radius, 0.3) * anat.lungs[side]


def _pleural_thickening(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    side, lateral = _side(rng)
    thickness, top, length = _u(rng, 0.035, 0.05) * anat.size, _u(rng, 0.3, 0.5), _u(rng, 0.15, 0.25)
    window = np.clip((anat.y - top) / 0.02, 0, 1) * np.clip((top + length - anat.y) / 0.02, 0, 1)
    distance = anat.wall_distance[side]
    band = (distance > 0) & (distance < thickness) & (lateral * (anat.x - LUNG_CX[side]) > 0.05)
    return 0.5 * window * band


def _hernia(rng: np.random.Generator, anat: Anatomy, markings: np.ndarray) -> np.ndarray:
    cx, cy, radius = _u(rng, 0.49, 0.57), _u(rng, 0.64, 0.7), _u(rng, 0.045, 0.06)
    distance = np.sqrt(_ellipse(anat.x, anat.y, cx, cy, radius, radius))  # a gas bubble behind the heart
    gas = np.clip((1 - distance) / 0.08, 0, 1) * np.where(anat.y > cy + 0.35 * radius, np.float32(0.4), np.float32(1))
    return -0.45 * gas + 0.3 * np.clip(1 - np.abs(distance - 1.12) / 0.15, 0, 1)  # fluid below, bright rim


LESIONS: dict[str, Callable[[np.random.Generator, Anatomy, np.ndarray], np.ndarray]] = dict(zip(FINDINGS, (
    _atelectasis, _cardiomegaly, _effusion, _infiltration, _mass, _nodule, _pneumonia, _pneumothorax,
    _consolidation, _edema, _emphysema, _fibrosis, _pleural_thickening, _hernia)))


@dataclass(frozen=True)
class ImageRecord:
    """One row of Data_Entry_2017.csv plus the split it belongs to."""

    image_index: str
    patient_id: int
    follow_up: int
    findings: tuple[str, ...]
    age: int
    gender: str
    view: str
    width: int
    height: int
    spacing: float
    split: str  # "train_val" or "test"

    def csv_line(self) -> str:
        """The Data_Entry_2017.csv line of this image, trailing comma included."""
        labels = "|".join(sorted(self.findings)) or NO_FINDING
        return (f"{self.image_index},{labels},{self.follow_up},{self.patient_id},{self.age},{self.gender},"
                f"{self.view},{self.width},{self.height},{self.spacing},{self.spacing},")


def _weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    probs = np.array([weights[name] for name in names])
    return names[rng.choice(len(names), p=probs / probs.sum())]


def plan_dataset(patients: int, seed: int = 0) -> list[ImageRecord]:
    """Patients, follow-ups, labels, metadata and split of a synthetic set (no pixels)."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    patient_ids = np.arange(1, patients + 1)
    # At least 14 sick patients (when there are that many) so that tiny sets still hold every class.
    n_sick = max(round(SICK_FRACTION * patients), min(patients, len(FINDINGS)))
    counts = rng.choice(FOLLOW_UP_COUNTS, p=FOLLOW_UP_PROBS, size=patients)
    follow_up_counts = dict(zip(patient_ids.tolist(), counts.tolist()))
    # Dealing in order of follow-up count gives every class a similar mix of short and long histories,
    # which keeps per-class image counts steady in small sets.
    sick_ids = sorted(rng.permutation(patient_ids)[:n_sick].tolist(),
                      key=lambda pid: (follow_up_counts[pid], pid))
    # The first 14 sick patients get one class each; the rest are dealt by smooth weighted round robin,
    # so every class gets its share of patients (and of long and short histories) even in small sets.
    primary = {pid: FINDINGS[k] for pid, k in zip(sick_ids, rng.permutation(len(FINDINGS)))}
    weights = np.array([PRIMARY_WEIGHTS[name] for name in FINDINGS])
    credit = rng.random(len(FINDINGS))  # a random start keeps the dealing order seed-dependent
    for pid in sick_ids[len(FINDINGS):]:
        credit += weights / weights.sum()
        primary[pid] = FINDINGS[int(np.argmax(credit))]
        credit[FINDINGS.index(primary[pid])] -= 1
    # Systematic sampling over patients sorted by primary finding: every 5th is a test patient, so the
    # test list gets about 20% of the patients of every class.
    rank = {name: i for i, name in enumerate((NO_FINDING, *FINDINGS))}
    by_class = sorted(rng.permutation(patient_ids).tolist(),
                      key=lambda pid: rank[primary.get(pid, NO_FINDING)])
    offset = int(rng.integers(TEST_EVERY))
    test_ids = {pid for i, pid in enumerate(by_class) if (i + offset) % TEST_EVERY == 0 and patients > 1}

    records = []
    for pid in patient_ids.tolist():
        age = int(np.clip(rng.normal(47, 16), 1, 90))
        gender = "M" if rng.random() < 0.56 else "F"
        chronic: set[str] = set()
        if pid in primary:
            chronic.add(primary[pid])
            if rng.random() < 0.35:
                chronic.add(str(rng.choice(COMPANIONS[primary[pid]])))
            if rng.random() < 0.3:
                chronic.add(_weighted_choice(rng, PRIMARY_WEIGHTS))
        for follow_up in range(follow_up_counts[pid]):
            findings = {name for name in chronic if rng.random() < 0.75}
            if pid in primary and (follow_up == 0 or rng.random() < 0.9):
                findings.add(primary[pid])  # the primary persists: findings correlate over follow-ups
            if rng.random() < 0.08:
                findings.add(_weighted_choice(rng, PRIMARY_WEIGHTS))  # an acute, one-off finding
            age += int(rng.random() < 0.4)
            width, height = (int(v) for v in rng.integers(2000, 3001, size=2))
            records.append(ImageRecord(
                image_index=f"{pid:08d}_{follow_up:03d}.png", patient_id=pid, follow_up=follow_up,
                findings=tuple(sorted(findings)), age=min(age, 95), gender=gender,
                view="PA" if rng.random() < 0.6 else "AP", width=width, height=height,
                spacing=float(rng.choice(PIXEL_SPACINGS)), split="test" if pid in test_ids else "train_val"))
    return records


def _pose(rng: np.random.Generator, size: int) -> np.ndarray:
    """Per-image scale and shift (no rotation, so boxes stay tight) as a 2x3 affine matrix."""
    scale_x, scale_y = rng.uniform(0.93, 1.05, size=2)
    shift_x, shift_y = rng.uniform(-0.035, 0.035, size=2) * size
    center = (size - 1) / 2
    return np.array([[scale_x, 0, (1 - scale_x) * center + shift_x],
                     [0, scale_y, (1 - scale_y) * center + shift_y]], dtype=np.float64)


def _support_box(delta: np.ndarray, matrix: np.ndarray, size: int) -> tuple[float, float, float, float]:
    """Pixel box (x, y, w, h) of where a lesion changed the template, after the image's pose."""
    # Where the lesion is visible; the relative floor keeps tiny lesions at tiny image sizes boxed.
    magnitude = np.abs(delta)
    mask = magnitude > min(0.03, 0.5 * float(magnitude.max()))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:  # nothing drawn at all
        return (0.0, 0.0, 0.0, 0.0)
    # Pixel i spans [i, i + 1); warpAffine maps pixel centres, hence the half-pixel shifts.
    x0, x1 = (matrix[0, 0] * (np.array([cols[0], cols[-1] + 1.0]) - 0.5) + matrix[0, 2] + 0.5).clip(0, size)
    y0, y1 = (matrix[1, 1] * (np.array([rows[0], rows[-1] + 1.0]) - 0.5) + matrix[1, 2] + 0.5).clip(0, size)
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


def render_image(patient_id: int, follow_up: int, findings: Sequence[str], size: int = 256,
                 seed: int = 0) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """One uint8 size x size image with the given findings and each finding's (x, y, w, h) pixel box."""
    unknown = [name for name in findings if name not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; expected names from cxr.labels.FINDINGS")
    anat = anatomy(size)
    # Separate streams for the background and each finding: removing a finding leaves the rest unchanged.
    background_rng = np.random.default_rng([seed, patient_id, follow_up, 0])
    markings = anat.vessel_markings(background_rng)
    matrix = _pose(background_rng, size)
    gain, offset, gamma = (float(background_rng.uniform(low, high))
                           for low, high in ((0.85, 1.15), (-0.06, 0.06), (0.8, 1.25)))
    noise = 0.03 * smooth_noise(background_rng, 4, size)
    noise += 0.012 * background_rng.standard_normal((size, size), dtype=np.float32)

    template = anat.base + markings
    boxes = {}
    for name in dict.fromkeys(findings):
        lesion_rng = np.random.default_rng([seed, patient_id, follow_up, 1 + FINDINGS.index(name)])
        delta = LESIONS[name](lesion_rng, anat, markings)
        template += delta
        boxes[name] = _support_box(delta, matrix, size)
    image = cv2.warpAffine(template, matrix, (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    image = np.clip(gain * image + offset, 0, 1) ** np.float32(gamma) + noise
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), boxes


def _render_and_write(task: tuple[str, ImageRecord, int, int]) -> list[str]:
    """Render one record into images/ and return its BBox_List lines (test images only)."""
    images_dir, record, size, seed = task
    image, boxes = render_image(record.patient_id, record.follow_up, record.findings, size, seed)
    ok, encoded = cv2.imencode(".png", image, PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"cv2 could not encode {record.image_index} as PNG")
    Path(images_dir, record.image_index).write_bytes(encoded.tobytes())
    if record.split != "test":
        return []
    scale = BBOX_SPACE / size
    return [f"{record.image_index},{'Infiltrate' if name == 'Infiltration' else name},"
            + ",".join(f"{value * scale:.4f}" for value in boxes[name])
            for name in record.findings if boxes[name][2] > 0]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; extra OpenCV threads only contend


def generate_synthetic_nih(out_dir: str | os.PathLike, patients: int = 300, size: int = 256, seed: int = 0,
                           workers: int = 1) -> dict:
    """Write a synthetic NIH ChestX-ray14 folder (images, tables, lists) and return a summary dict."""
    if patients < 1 or size < 32 or workers < 1:
        raise ValueError(f"need patients >= 1, size >= 32, workers >= 1; got {patients}, {size}, {workers}")
    start = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = plan_dataset(patients, seed)
    tasks = [(str(out / "images"), record, size, seed) for record in records]
    if workers == 1:
        box_lines = [_render_and_write(task) for task in tasks]
    else:
        # spawn, not fork: a forked child can inherit a lock of OpenCV's thread pool and hang for good.
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
                chunk = max(1, len(tasks) // (8 * workers))
                box_lines = list(pool.map(_render_and_write, tasks, chunksize=chunk))
        except BrokenProcessPool as error:
            raise RuntimeError(
                "a synthetic-data worker process died; spawned workers re-import the calling script, so run "
                "it from a file whose entry point is guarded by `if __name__ == '__main__':`, or pass "
                "workers=1") from error

    _write_lines(out / "Data_Entry_2017.csv", [DATA_ENTRY_HEADER] + [r.csv_line() for r in records])
    boxes = [line for lines in box_lines for line in lines]
    _write_lines(out / "BBox_List_2017.csv", [BBOX_HEADER] + boxes)
    for split, file_name in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        _write_lines(out / file_name, sorted(r.image_index for r in records if r.split == split))

    label_counts = Counter(name for r in records for name in r.findings)
    label_counts[NO_FINDING] = sum(not r.findings for r in records)
    return {
        "out_dir": str(out), "images": len(records), "patients": patients, "size": size, "seed": seed,
        "test_images": sum(r.split == "test" for r in records),
        "test_patients": len({r.patient_id for r in records if r.split == "test"}),
        "label_counts": {name: label_counts[name] for name in (*FINDINGS, NO_FINDING)},
        "boxes": len(boxes), "seconds": round(time.perf_counter() - start, 3),
    }


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as handle:
        handle.write("".join(line + "\n" for line in lines))


def ensure_demo_dataset(root: str | os.PathLike | None = None, patients: int = 300, size: int = 128,
                        seed: int = 0, workers: int = 1) -> Path:
    """Return a cached synthetic dataset folder, generating it on first use (atomically, via rename)."""
    default_root = os.environ.get("CXR_CACHE_DIR") or Path.home() / ".cache" / "cxr"
    root_dir = Path(root if root is not None else default_root)
    params = {"generator_version": GENERATOR_VERSION, "patients": patients, "size": size, "seed": seed}
    target = root_dir / f"synthetic-nih-v{GENERATOR_VERSION}-p{patients}-s{size}-seed{seed}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    root_dir.mkdir(parents=True, exist_ok=True)
    print(f"cxr: generating the synthetic NIH-format demo set ({patients} patients, {size} px) in {target} "
          "(one-time)", file=sys.stderr, flush=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        summary = generate_synthetic_nih(staging, patients=patients, size=size, seed=seed, workers=workers)
        marker = {**params, "images": summary["images"], "boxes": summary["boxes"]}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # a folder of ours that was never completed
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
