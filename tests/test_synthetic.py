"""Tests for cxr.synthetic and scripts/make_synthetic_nih.py: format, determinism, splits, boxes, CLI, cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.labels import FINDINGS, NO_FINDING, canonical_finding
from cxr.synthetic import GENERATOR_VERSION, ensure_demo_dataset, generate_synthetic_nih, plan_dataset, render_image

REPO = Path(__file__).resolve().parents[1]
# Columns of the real Data_Entry_2017_v2020.csv as pandas reads them (the brackets hold commas).
REAL_2020_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                     "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                     "OriginalImagePixelSpacing[x", "y]"]
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
PATIENTS, SIZE, SEED = 20, 64, 1  # with seed 1 the test split holds an Infiltration box


def file_hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, generate_synthetic_nih(root, patients=PATIENTS, size=SIZE, seed=SEED, workers=1)


def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    again = generate_synthetic_nih(tmp_path / "again", patients=PATIENTS, size=SIZE, seed=SEED, workers=2)
    expected = file_hashes(root)
    assert again["images"] == len([name for name in expected if name.startswith("images/")])
    assert file_hashes(tmp_path / "again") == expected


def test_different_seed_gives_different_data(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    generate_synthetic_nih(tmp_path, patients=PATIENTS, size=SIZE, seed=SEED + 1)
    first, second = file_hashes(root), file_hashes(tmp_path)
    assert first["Data_Entry_2017.csv"] != second["Data_Entry_2017.csv"]
    shared_images = [name for name in first if name.startswith("images/") and name in second]
    assert shared_images and all(first[name] != second[name] for name in shared_images)
    # The seed reaches every random stream, the background included, not only the labels.
    background, other_background = (render_image(1, 0, [], SIZE, seed=seed)[0] for seed in (SEED, SEED + 1))
    assert not np.array_equal(background, other_background)


def test_data_entry_has_the_real_2017_form(dataset, nih_sample_location: Path | None) -> None:
    root, summary = dataset
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == DATA_ENTRY_HEADER
    assert all(line.endswith(",") and line.count(",") == 11 for line in lines)
    table = pd.read_csv(root / "Data_Entry_2017.csv")
    assert list(table.columns[:11]) == REAL_2020_COLUMNS
    if nih_sample_location is not None:  # the real 2020 table lacks only the trailing empty column
        real = pd.read_csv(nih_sample_location / "Data_Entry_2017_v2020.csv", nrows=0)
        assert list(table.columns[:11]) == list(real.columns)
    assert table.columns[11].startswith("Unnamed") and table.iloc[:, 11].isna().all()

    assert len(table) == summary["images"] and table["Patient ID"].nunique() == PATIENTS
    for labels in table["Finding Labels"]:
        names = labels.split("|")
        assert names == [NO_FINDING] or (names == sorted(names) and set(names) <= set(FINDINGS)), labels
    expected_names = [f"{pid:08d}_{fu:03d}.png" for pid, fu in zip(table["Patient ID"], table["Follow-up #"])]
    assert table["Image Index"].tolist() == expected_names
    assert table.groupby("Patient ID")["Follow-up #"].max().between(0, 4).all()
    assert set(table["View Position"]) <= {"PA", "AP"} and set(table["Patient Gender"]) <= {"M", "F"}
    assert table["OriginalImage[Width"].between(2000, 3000).all() and table["Height]"].between(2000, 3000).all()
    assert table["OriginalImagePixelSpacing[x"].equals(table["y]"])
    assert set(table["y]"]) <= {0.139, 0.143, 0.168}
    image = cv2.imread(str(root / "images" / expected_names[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
    assert sorted(path.name for path in (root / "images").iterdir()) == sorted(expected_names)


def test_splits_partition_the_images_by_patient(dataset) -> None:
    root, summary = dataset
    train_val = (root / "train_val_list.txt").read_text().splitlines()
    test = (root / "test_list.txt").read_text().splitlines()
    all_images = pd.read_csv(root / "Data_Entry_2017.csv")["Image Index"].tolist()
    assert train_val == sorted(train_val) and test == sorted(test)
    assert sorted(train_val + test) == sorted(all_images) and not set(train_val) & set(test)
    patients_of = lambda names: {int(name[:8]) for name in names}  # noqa: E731
    assert not patients_of(train_val) & patients_of(test)
    assert len(patients_of(test)) == summary["test_patients"] == PATIENTS // 5
    assert len(test) == summary["test_images"]


def test_box_list_has_the_real_quirks_and_covers_every_test_finding(dataset, nih_sample_location) -> None:
    root, summary = dataset
    lines = (root / "BBox_List_2017.csv").read_text().splitlines()
    assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    boxes = pd.read_csv(root / "BBox_List_2017.csv")
    if nih_sample_location is not None:
        real = pd.read_csv(nih_sample_location / "BBox_List_2017.csv", nrows=0)
        assert list(boxes.columns) == list(real.columns)
    assert len(boxes) == summary["boxes"] > 0
    assert "Infiltrate" in set(boxes["Finding Label"]) and "Infiltration" not in set(boxes["Finding Label"])
    x, y, w, h = (boxes[column].to_numpy() for column in ("Bbox [x", "y", "w", "h]"))
    assert (w > 0).all() and (h > 0).all() and (x >= 0).all() and (y >= 0).all()
    assert (x + w <= 1024 + 1e-6).all() and (y + h <= 1024 + 1e-6).all()

    table = pd.read_csv(root / "Data_Entry_2017.csv").set_index("Image Index")
    test = set((root / "test_list.txt").read_text().splitlines())
    boxed = boxes.groupby("Image Index")["Finding Label"].apply(lambda s: sorted(map(canonical_finding, s)))
    assert set(boxed.index) <= test
    for name in test:
        labels = table.loc[name, "Finding Labels"]
        assert boxed.get(name, []) == ([] if labels == NO_FINDING else labels.split("|")), name


def test_written_pixels_and_boxes_match_the_renderer(dataset) -> None:
    root, _ = dataset
    boxes = pd.read_csv(root / "BBox_List_2017.csv")
    row = boxes.iloc[0]
    table = pd.read_csv(root / "Data_Entry_2017.csv").set_index("Image Index")
    record = table.loc[row["Image Index"]]
    findings = record["Finding Labels"].split("|")
    image, pixel_boxes = render_image(int(record["Patient ID"]), int(record["Follow-up #"]), findings, SIZE, SEED)
    written = cv2.imread(str(root / "images" / row["Image Index"]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(image, written)
    expected = np.array(pixel_boxes[canonical_finding(row["Finding Label"])]) * 1024 / SIZE
    assert np.allclose(row[["Bbox [x", "y", "w", "h]"]].to_numpy(float), expected, atol=1e-3)


def test_every_class_is_present_and_counts_match(dataset) -> None:
    root, summary = dataset
    table = pd.read_csv(root / "Data_Entry_2017.csv")
    counts = Counter(name for labels in table["Finding Labels"] for name in labels.split("|"))
    assert {name: counts[name] for name in (*FINDINGS, NO_FINDING)} == summary["label_counts"]
    assert all(counts[name] > 0 for name in FINDINGS)


def test_prevalences_follow_ups_and_views_look_like_the_real_table() -> None:
    records = plan_dataset(3000, seed=0)
    counts = Counter(name for record in records for name in record.findings)
    fractions = {name: counts[name] / len(records) for name in FINDINGS}
    assert 0.4 < sum(not record.findings for record in records) / len(records) < 0.6
    assert min(fractions.values()) > 0.035, fractions
    assert max(fractions, key=fractions.get) == "Infiltration"
    assert 2.5 < len(records) / 3000 < 3.5 and max(record.follow_up for record in records) == 4
    assert 0.55 < np.mean([record.view == "PA" for record in records]) < 0.65
    # Findings persist: a patient's next image shares a finding far more often than chance.
    pairs = [(a, b) for a, b in zip(records, records[1:]) if a.patient_id == b.patient_id and a.findings]
    assert np.mean([bool(set(a.findings) & set(b.findings)) for a, b in pairs]) > 0.6


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_box_bounds_where_its_lesion_is_drawn(finding: str) -> None:
    for patient_id in (3, 11):
        with_lesion, boxes = render_image(patient_id, 1, [finding], size=128, seed=0)
        without, no_boxes = render_image(patient_id, 1, [], size=128, seed=0)
        assert no_boxes == {} and set(boxes) == {finding}
        x, y, w, h = boxes[finding]
        inside = np.zeros((128, 128), bool)
        inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
        difference = np.abs(with_lesion.astype(float) - without.astype(float))
        assert difference[inside].mean() > 6, (finding, difference[inside].mean())
        assert difference[inside].sum() > 0.97 * difference.sum(), finding
        assert difference[~inside].mean() < 0.05 * difference[inside].mean(), finding


def test_bad_arguments_are_refused_with_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size >= 32"):
        generate_synthetic_nih(tmp_path, patients=2, size=16)
    with pytest.raises(ValueError, match=r"unknown finding\(s\) \['Infiltrate'\]"):
        render_image(1, 0, ["Infiltrate"], size=64)


@pytest.mark.slow
def test_workers_in_an_unguarded_script_fail_fast_instead_of_hanging(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from cxr.synthetic import generate_synthetic_nih\n"
                      f"generate_synthetic_nih({str(tmp_path / 'out')!r}, patients=4, size=32, workers=2)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "if __name__ == '__main__':" in done.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_nih.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_end_to_end_refuses_non_empty_out_and_bad_values(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_cli("--out", str(out), "--patients", "5", "--size", "48", "--seed", "2")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["images"] == len(list((out / "images").glob("*.png"))) > 0 and summary["size"] == 48

    refused = run_cli("--out", str(out), "--patients", "5", "--size", "48")
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--overwrite" in refused.stderr

    stale = out / "images" / "99999999_000.png"
    stale.write_bytes(b"stale")
    replaced = run_cli("--out", str(out), "--patients", "5", "--size", "48", "--seed", "2", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not stale.exists() and json.loads(replaced.stdout)["images"] == summary["images"]

    for flags, message in ((["--patients", "0"], "--patients must be at least 1, got 0"),
                           (["--size", "16"], "--size must be at least 32 pixels, got 16")):
        bad = run_cli("--out", str(tmp_path / "bad"), *flags)
        assert bad.returncode == 2 and message in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_ensure_demo_dataset_generates_once_into_the_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    stale = tmp_path / f"synthetic-nih-v{GENERATOR_VERSION}-p3-s32-seed0"
    stale.mkdir()  # an incomplete folder (no marker) must not count as the dataset
    (stale / "junk.txt").write_text("x")
    path = ensure_demo_dataset(patients=3, size=32)
    assert path == stale and not (path / "junk.txt").exists()
    assert json.loads((path / "COMPLETE.json").read_text())["patients"] == 3
    assert "generating" in capsys.readouterr().err
    images = sorted((path / "images").iterdir())
    assert images and sorted(path.iterdir()) == sorted(
        path / name for name in ("BBox_List_2017.csv", "COMPLETE.json", "Data_Entry_2017.csv", "images",
                                 "test_list.txt", "train_val_list.txt"))

    assert ensure_demo_dataset(patients=3, size=32) == path
    assert capsys.readouterr().err == ""  # cached: nothing generated, nothing printed
    assert sorted(tmp_path.iterdir()) == [path]  # no partial folders left behind


@pytest.mark.slow
def test_same_seed_same_bytes_across_processes(tmp_path):
    """String hashing differs between processes (PYTHONHASHSEED): nothing may depend on set or hash order."""
    import hashlib
    import os
    import subprocess
    import sys

    digests = []
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / f"hash{hash_seed}"
        code = f"from cxr.synthetic import generate_synthetic_nih as g; g({str(out)!r}, patients=80, size=32, seed=4)"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
        digests.append({path.relative_to(out).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                        for path in sorted(out.rglob("*")) if path.is_file()})
    assert digests[0] == digests[1] == digests[2]
