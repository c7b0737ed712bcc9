"""The drawing half of the synthetic generator: a chest template and the 14 findings painted on it.

`anatomy(size)` builds (once per process and size) a frontal chest template in [0, 1] gray levels: dark
lungs narrowing to the apices, mediastinum, heart, diaphragm domes (the right one higher), rib arcs,
clavicles, and the soft lung masks, wall distances and hilar weights that lesions draw on. Each entry of
`LESIONS` (keyed by the names in `cxr.labels.FINDINGS`) paints one finding with its own signature at its
own anatomical place and returns an additive float32 change of the template; `cxr.synthetic` adds pose,
exposure and noise, writes the PNGs and boxes the changes.

    import numpy as np
    from cxr.synthetic_anatomy import LESIONS, anatomy
    anat = anatomy(128)                                   # read-only arrays, cached per size
    rng = np.random.default_rng(0)
    markings = anat.vessel_markings(rng)
    template = anat.base + markings + LESIONS["Effusion"](rng, anat, markings)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from cxr.labels import FINDINGS

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
