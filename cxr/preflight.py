"""The dataset preflight report behind scripts/check_dataset.py: what is there, what is missing, what is broken.

    report = preflight("/data/nih", skip_missing=True)
    print(format_report(report)); json.dump(report, open("report.json", "w"))

PNG headers and trailers are read for every image on disk (a truncated download lacks the IEND chunk);
`decode=True` also decodes every file, in worker processes.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxr.data import DataError, NihIndex, build_splits, find_table, locate_images, read_nih_table, table_to_index
from cxr.labels import FINDINGS, NO_FINDING
from cxr.subgroups import MAX_PLAUSIBLE_AGE, impossible_ages
from cxr.transforms import MAX_IMAGE_SIDE, ImageReadError, read_xray

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_MODES = {(0, 8): "L", (0, 16): "I;16", (2, 8): "RGB", (2, 16): "RGB;16", (3, 8): "P", (4, 8): "LA", (6, 8): "RGBA", (6, 16): "RGBA;16"}


def png_mode(path: str) -> str:
    """Mode of a PNG from its header ('L', 'I;16', 'RGBA', ...); raises ImageReadError if not a whole PNG."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(29)
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 12))
            tail = handle.read(12)
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read ({error.strerror})") from error
    if head.startswith(JPEG_SIGNATURE):
        return "JPEG"  # a JPEG under a .png name: train and evaluate decode it by content, and so do we
    if len(head) < 29 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ImageReadError(f"{path}: not a PNG file (nor a JPEG)")
    if tail != PNG_IEND:
        raise ImageReadError(f"{path}: truncated PNG (no IEND chunk at the end)")
    width, height = struct.unpack(">II", head[16:24])
    if max(width, height) > MAX_IMAGE_SIDE:  # too small is found by the decode (read_xray) instead
        raise ImageReadError(f"{path}: its PNG header claims {width} x {height} pixels, implausible for an X-ray "
                             f"(over {MAX_IMAGE_SIDE} per side)")
    bit_depth, color_type = struct.unpack(">BB", head[24:26])
    return PNG_MODES.get((color_type, bit_depth), f"color{color_type};{bit_depth}")


def _inspect(path: str, decode: bool) -> tuple[str, str | None]:
    """(mode, error message or None) for one file."""
    try:
        mode = png_mode(path) if path.lower().endswith(".png") else "other"
        if decode:
            read_xray(path)
        return mode, None
    except ImageReadError as error:
        return "unreadable", str(error)


def preflight(data_dir: str | Path, skip_missing: bool = False, decode: bool = False, workers: int = 1,
              split: str = "auto", val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Inspect a dataset folder; the result is JSON-ready."""
    table_path = find_table(data_dir)
    index: NihIndex = locate_images(table_to_index(read_nih_table(table_path), str(table_path)), data_dir)
    if len(index) == 0:
        raise DataError(f"{table_path}: the table has a header but no image rows; download the full Data_Entry_2017.csv again")
    found = index.image_dir_ids >= 0
    if skip_missing and not found.any():
        where = ", ".join(index.image_dirs) or f"{data_dir}/images (no image folder found)"
        raise DataError(f"none of the {len(index)} images listed in {table_path.name} is on disk under {where}; "
                        "download the images (images/ or images_001/images/ ...) into the data folder")
    paths = [index.image_path(row) for row in np.flatnonzero(found)]
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_inspect, paths, [decode] * len(paths), chunksize=64))
    else:
        results = [_inspect(path, decode) for path in paths]
    modes: dict[str, int] = {}
    for mode, _ in results:
        modes[mode] = modes.get(mode, 0) + 1
    unreadable = [(Path(path).name, message) for path, (_, message) in zip(paths, results) if message]
    used = index.subset(found) if skip_missing else index
    splits, how = build_splits(used, data_dir, split, val_fraction, test_fraction, seed)
    label_counts = {name: int(used.labels[:, column].sum()) for column, name in enumerate(FINDINGS)}
    label_counts[NO_FINDING] = int((used.labels.sum(axis=1) == 0).sum())
    views, view_counts = np.unique(used.views, return_counts=True)
    impossible = (used.ages > MAX_PLAUSIBLE_AGE) | (used.ages < 0)
    known_ages = used.ages[np.isfinite(used.ages)]
    return {
        "data_dir": str(data_dir), "table": str(table_path), "image_folders": index.image_dirs,
        "rows": int(len(index)), "patients": int(len(np.unique(index.patient_ids))),
        "images_found": int(found.sum()), "images_missing": int((~found).sum()),
        "missing_examples": index.image_names[~found][:5].tolist(), "skip_missing": skip_missing,
        "decoded": decode, "modes": modes,
        "unreadable": [name for name, _ in unreadable], "unreadable_reasons": [message for _, message in unreadable],
        "label_counts": label_counts,
        "age_range": [float(known_ages.min()), float(known_ages.max())] if len(known_ages) else None,
        "impossible_ages": impossible_ages(used.ages), "impossible_age_examples": used.image_names[impossible][:5].tolist(),
        "unknown_ages": int(np.isnan(used.ages).sum()), "view_positions": {str(v): int(c) for v, c in zip(views, view_counts)},
        "split_method": how,
        "splits": {name: {"images": int(len(rows)), "patients": int(len(np.unique(used.patient_ids[rows])))}
                   for name, rows in splits.items()},
        "patient_overlap": 0,  # build_splits raises on any overlap, so a finished report has none
    }


def format_report(report: dict[str, Any]) -> str:
    """The human-readable preflight report."""
    lines = [f"Dataset preflight: {report['data_dir']}",
             f"  table            {report['table']}",
             f"  rows             {report['rows']:,} images of {report['patients']:,} patients",
             f"  images on disk   {report['images_found']:,} found, {report['images_missing']:,} missing"
             + (f" (e.g. {', '.join(report['missing_examples'])})" if report["images_missing"] else ""),
             f"  image folders    {', '.join(report['image_folders']) or 'none found'}",
             "  modes            " + ", ".join(f"{mode}: {count:,}" for mode, count in sorted(report["modes"].items())),
             f"  unreadable       {len(report['unreadable'])}" + (" (full decode)" if report["decoded"] else " (header/trailer check; --decode for a full decode)")]
    lines += [f"    {message}" for message in report["unreadable_reasons"][:50]]
    lines.append("  views            " + ", ".join(f"{view}: {count:,}" for view, count in report["view_positions"].items()))
    if report["age_range"] is not None:
        low, high = report["age_range"]
        lines.append(f"  ages             {low:g} to {high:g}; {report['impossible_ages']:,} impossible (> {MAX_PLAUSIBLE_AGE}, "
                     f"left out of the age subgroups){'' if not report['impossible_ages'] else ', e.g. ' + ', '.join(report['impossible_age_examples'])}"
                     f"; {report['unknown_ages']:,} unknown")
    lines.append("  label counts" + ("" if not report["images_missing"] or not report["skip_missing"] else " (rows with images)"))
    lines += [f"    {name:20s} {count:7,}" for name, count in report["label_counts"].items()]
    lines.append(f"  splits           {report['split_method']}; patient overlap: {report['patient_overlap']}")
    lines += [f"    {name:5s} {split['images']:7,} images {split['patients']:6,} patients" for name, split in report["splits"].items()]
    if report["images_missing"] and not report["skip_missing"]:
        lines.append(f"  WARNING: {report['images_missing']:,} images are missing: training fails unless you pass --skip-missing")
    return "\n".join(lines)
