"""Tests for scripts/check_dataset.py (run as a user would, via subprocess) and cxr.preflight.

The CLI runs are started together by one module fixture and collected by the tests that need them:
each run spends most of its time importing torch, so running them side by side halves the wait.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr.labels import FINDINGS, NO_FINDING
from cxr.preflight import png_mode, preflight
from cxr.transforms import ImageReadError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_dataset.py"
TRUNCATED = "00000005_001.png"
README_LABEL_COUNTS = {
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Effusion": 13317, "Infiltration": 19894, "Mass": 5782,
    "Nodule": 6331, "Pneumonia": 1431, "Pneumothorax": 5302, "Consolidation": 4667, "Edema": 2303,
    "Emphysema": 2516, "Fibrosis": 1686, "Pleural_Thickening": 3385, "Hernia": 227, NO_FINDING: 60361,
}


@dataclass
class CliRun:
    """One check_dataset.py process; `finish()` waits for it once and keeps its outputs."""

    process: subprocess.Popen
    json_path: Path | None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""

    def finish(self) -> CliRun:
        if self.returncode is None:
            self.stdout, self.stderr = self.process.communicate(timeout=120)
            self.returncode = self.process.returncode
        return self

    def report(self) -> dict:
        assert self.json_path is not None and self.json_path.is_file(), self.stderr
        return json.loads(self.json_path.read_text())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def truncated_copy(synthetic_nih: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set with one PNG cut in half."""
    root = Path(shutil.copytree(synthetic_nih, tmp_path_factory.mktemp("truncated") / "nih"))
    truncate(root / "images" / TRUNCATED)
    return root


@pytest.fixture(scope="module")
def cli_runs(truncated_copy: Path, nih_sample_location: Path | None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, CliRun]]:
    """Start every CLI run at once (the real-sample ones only where the sample exists)."""
    out = tmp_path_factory.mktemp("cli")
    commands: dict[str, list[str]] = {
        "truncated": ["--data-dir", str(truncated_copy), "--json", str(out / "truncated.json")],
        "truncated_decode": ["--data-dir", str(truncated_copy), "--decode", "--json", str(out / "truncated_decode.json")],
        "absent": ["--data-dir", str(out / "no-such-folder")],
    }
    if nih_sample_location is not None:
        sample = str(nih_sample_location)
        commands["real_skip"] = ["--data-dir", sample, "--skip-missing", "--json", str(out / "real_skip.json")]
        commands["real_strict"] = ["--data-dir", sample, "--json", str(out / "real_strict.json")]
    runs = {}
    for name, arguments in commands.items():
        process = subprocess.Popen([sys.executable, str(SCRIPT), *arguments], cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs[name] = CliRun(process, out / f"{name}.json" if "--json" in arguments else None)
    yield runs
    for run in runs.values():
        run.finish()


def table_rows(data_dir: Path) -> int:
    """Rows of a synthetic Data_Entry_2017.csv, counted here without cxr.data."""
    return len((data_dir / "Data_Entry_2017.csv").read_text().splitlines()) - 1  # less the header


def sample_label_counts(nih_sample: Path, names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Label and view counts of the rows whose image is in the sample, parsed here without cxr.data."""
    wanted, labels, views = set(names), {name: 0 for name in (*FINDINGS, NO_FINDING)}, {}
    lines = (nih_sample / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]
    for cells in (line.split(",") for line in lines):
        if cells[0] in wanted:
            for label in cells[1].split("|"):
                labels[label] += 1
            views[cells[6]] = views.get(cells[6], 0) + 1
    return labels, views


# ----------------------------------------------------------------------------------------------- the real sample
@pytest.mark.slow
def test_real_sample_with_skip_missing(cli_runs, nih_sample: Path, nih_sample_images: list[str]) -> None:
    run = cli_runs["real_skip"].finish()
    assert run.returncode == 0, run.stderr
    report = run.report()
    assert report["rows"] == 112_120 and report["patients"] == 30_805
    assert report["images_found"] == 24 and report["images_missing"] == 112_096
    assert report["modes"] == {"L": 23, "RGBA": 1}
    assert report["unreadable"] == [] and report["unreadable_reasons"] == []
    assert report["image_folders"] == [str(nih_sample / "images")]
    labels, views = sample_label_counts(nih_sample, nih_sample_images)
    assert report["label_counts"] == labels and sum(labels.values()) >= 24
    assert report["view_positions"] == views and sum(views.values()) == 24
    # 24 patients with one image each: round(24 * 0.72) / round(24 * 0.08) / the rest
    assert report["splits"] == {"train": {"images": 17, "patients": 17}, "val": {"images": 2, "patients": 2},
                                "test": {"images": 5, "patients": 5}}
    assert report["split_method"] == "random patient split 72%/8%/20% (seed 0)"
    assert report["patient_overlap"] == 0
    assert "rows             112,120 images of 30,805 patients" in run.stdout
    assert "modes            L: 23, RGBA: 1" in run.stdout
    assert "WARNING" not in run.stdout


@pytest.mark.slow
def test_real_sample_without_skip_missing_fails_with_a_warning(cli_runs, nih_sample: Path) -> None:
    run = cli_runs["real_strict"].finish()
    assert run.returncode == 1, run.stderr
    assert "WARNING: 112,096 images are missing: training fails unless you pass --skip-missing" in run.stdout
    report = run.report()
    assert report["label_counts"] == README_LABEL_COUNTS  # counted over the whole table
    assert report["view_positions"] == {"AP": 44_810, "PA": 67_310}
    assert report["missing_examples"][:2] == ["00000001_000.png", "00000001_001.png"]
    assert sum(split["images"] for split in report["splits"].values()) == 112_120


# ----------------------------------------------------------------------------------------------- broken data
@pytest.mark.slow
@pytest.mark.parametrize("name, decoded", [("truncated", False), ("truncated_decode", True)])
def test_truncated_png_is_reported_and_fails(cli_runs, truncated_copy: Path, name: str, decoded: bool) -> None:
    run = cli_runs[name].finish()
    assert run.returncode == 1, run.stderr
    report = run.report()
    assert report["decoded"] is decoded
    assert report["unreadable"] == [TRUNCATED]
    path = truncated_copy / "images" / TRUNCATED
    assert report["unreadable_reasons"] == [f"{path}: truncated PNG (no IEND chunk at the end)"]
    rows = table_rows(truncated_copy)
    assert report["modes"] == {"L": rows - 1, "unreadable": 1}
    assert report["images_found"] == rows and report["images_missing"] == 0
    assert report["split_method"].startswith("official lists (train_val_list.txt, test_list.txt)")
    assert f"unreadable       1 ({'full decode' if decoded else 'header/trailer check'}" in run.stdout
    assert "WARNING" not in run.stdout


@pytest.mark.slow
def test_absent_data_dir_exits_2_naming_it(cli_runs) -> None:
    run = cli_runs["absent"].finish()
    assert run.returncode == 2
    assert run.stderr.startswith("error: --data-dir ") and run.stderr.rstrip().endswith("no-such-folder: no such folder")
    assert run.stdout == ""


# ----------------------------------------------------------------------------------------------- in-process checks
def test_decode_catches_damage_the_header_check_cannot_see(synthetic_copy: Path) -> None:
    path = synthetic_copy / "images" / "00000003_000.png"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # header and IEND intact, pixel data broken
    path.write_bytes(bytes(data))
    assert png_mode(str(path)) == "L"
    assert preflight(synthetic_copy)["unreadable"] == []
    report = preflight(synthetic_copy, decode=True)
    assert report["unreadable"] == ["00000003_000.png"]
    assert report["unreadable_reasons"] == [f"{path}: not a decodable image (truncated or corrupt?); "
                                            "re-download or remove it"]


def test_png_mode_reads_depth_and_color(tmp_path: Path, nih_sample: Path) -> None:
    assert png_mode(str(nih_sample / "images" / "00000100_000.png")) == "RGBA"
    assert png_mode(str(nih_sample / "images" / "00001933_000.png")) == "L"
    cv2.imwrite(str(tmp_path / "deep.png"), np.zeros((4, 4), np.uint16))
    cv2.imwrite(str(tmp_path / "color.png"), np.zeros((4, 4, 3), np.uint8))
    assert png_mode(str(tmp_path / "deep.png")) == "I;16" and png_mode(str(tmp_path / "color.png")) == "RGB"
    (tmp_path / "fake.png").write_bytes(b"GIF89a" + bytes(40))
    with pytest.raises(ImageReadError, match="fake.png: not a PNG file"):
        png_mode(str(tmp_path / "fake.png"))
