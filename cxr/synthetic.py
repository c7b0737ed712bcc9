"""Synthetic chest X-rays in exactly the NIH ChestX-ray14 release layout, for the demo and the tests.

Each image is a chest-like radiograph (dark lungs, bright mediastinum and heart, rib arcs, diaphragm
domes, smooth noise, varying pose and exposure) on which each of the 14 findings is drawn with its own
signature at its own anatomical place, so a CNN learns them in minutes and Grad-CAM can be scored
against the boxes. The template and the lesion painters live in `cxr.synthetic_anatomy`; this
module plans the dataset, renders whole images (pose, exposure, noise, boxes) and writes the files.

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
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cxr.data import BOX_SPACE
from cxr.labels import FINDINGS, NO_FINDING
from cxr.synthetic_anatomy import LESIONS, anatomy, smooth_noise

GENERATOR_VERSION = 3  # bump whenever the pixels or tables change: it names the cache folder
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
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
            findings = {name for name in sorted(chronic) if rng.random() < 0.75}  # sorted: set order varies by process
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
    scale = BOX_SPACE / size
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
