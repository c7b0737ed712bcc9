"""Shared fixtures: the real NIH sample, a small synthetic NIH folder, and tiny-table builders.

    def test_table(nih_sample, write_table, nih_row):
        path = write_table([nih_row("a.png", "Mass", patient=1), nih_row("b.png", "Masss", patient=2)])

`nih_sample` skips the test when the real sample is absent; `nih_sample_location` is None then.
`synthetic_nih` (12 patients, 64 px, with official lists) is generated once per session and must not
be modified; tests that change files take `synthetic_copy`, a private copy in tmp_path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cxr.synthetic import generate_synthetic_nih

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with shared/ beside it; CXR_NIH_SAMPLE points elsewhere when needed.
NIH_SAMPLE = Path(os.environ.get("CXR_NIH_SAMPLE") or REPO.parent / "shared" / "data" / "nih-sample")
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
SYNTHETIC_PATIENTS, SYNTHETIC_SIZE, SYNTHETIC_SEED = 12, 64, 0


@pytest.fixture(scope="session")
def nih_sample_location() -> Path | None:
    """Where the real NIH sample is, or None when it is absent (for fixtures that must not skip)."""
    return NIH_SAMPLE if (NIH_SAMPLE / "Data_Entry_2017_v2020.csv").is_file() else None


@pytest.fixture(scope="session")
def nih_sample(nih_sample_location: Path | None) -> Path:
    """The real NIH sample folder (full label table + 24 images); skips when it is not there."""
    if nih_sample_location is None:
        pytest.skip(f"real NIH sample not found at {NIH_SAMPLE} (expected shared/data/nih-sample beside the repo, "
                    "or set CXR_NIH_SAMPLE)")
    return nih_sample_location


@pytest.fixture(scope="session")
def nih_sample_images(nih_sample: Path) -> list[str]:
    """Sorted file names of the images present in the real sample."""
    return sorted(entry.name for entry in os.scandir(nih_sample / "images") if entry.name.endswith(".png"))


@pytest.fixture(scope="session")
def synthetic_nih(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only synthetic NIH folder (12 patients, 64 px, official lists), generated once per session."""
    root = tmp_path_factory.mktemp("synthetic-nih")
    generate_synthetic_nih(root, patients=SYNTHETIC_PATIENTS, size=SYNTHETIC_SIZE, seed=SYNTHETIC_SEED)
    return root


@pytest.fixture
def synthetic_copy(synthetic_nih: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synthetic NIH folder."""
    return Path(shutil.copytree(synthetic_nih, tmp_path / "nih"))


@pytest.fixture
def write_table(tmp_path: Path) -> Callable[..., Path]:
    """Builder: write_table(lines, header=NIH_HEADER, name=...) writes a label table and returns its path."""
    def write(lines: list[str], header: str = NIH_HEADER, name: str = "Data_Entry_2017.csv") -> Path:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in [header, *lines]))
        return path
    return write


@pytest.fixture(scope="session")
def nih_row() -> Callable[..., str]:
    """Builder: nih_row(image, labels, patient, ...) is one 2020-form table line with real-looking extra columns."""
    def row(image: str, labels: str = "No Finding", patient: int | str = 1, follow_up: int = 0, view: str = "PA",
            age: str = "58", gender: str = "M") -> str:
        return f"{image},{labels},{follow_up},{patient},{age},{gender},{view},2500,2048,0.143,0.143"
    return row


@pytest.fixture(scope="session")
def tiny_run(synthetic_nih: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished 2-epoch (one per phase) training run on `synthetic_nih`: {'dir', 'best', 'last', 'data_dir'}."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    command = [sys.executable, "train.py", "--data-dir", str(synthetic_nih), "--out", str(out), "--epochs", "2",
               "--warmup-epochs", "1", "--image-size", "64", "--batch-size", "8", "--workers", "0", "--weights", "none",
               "--hidden", "32", "--max-steps-per-epoch", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"dir": out, "best": out / "best.pt", "last": out / "last.pt", "data_dir": synthetic_nih}
