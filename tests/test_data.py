"""Tests for cxr.data: the real NIH table, malformed tables, folder layouts, splits, filters, the Dataset."""

from __future__ import annotations

import gzip
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.data import (
    ChestXrayDataset,
    DataError,
    NihData,
    NihIndex,
    build_splits,
    find_table,
    load_nih,
    locate_images,
    patient_split,
    read_nih_table,
    table_to_index,
)
from cxr.labels import FINDINGS
from cxr.transforms import Preprocessing, build_train_augment

# Facts of the full table, from shared/data/nih-sample/README.md (not computed by the code under test).
REAL_LABEL_COUNTS = {
    "Infiltration": 19894, "Effusion": 13317, "Atelectasis": 11559, "Nodule": 6331, "Mass": 5782,
    "Pneumothorax": 5302, "Consolidation": 4667, "Pleural_Thickening": 3385, "Cardiomegaly": 2776,
    "Emphysema": 2516, "Edema": 2303, "Fibrosis": 1686, "Pneumonia": 1431, "Hernia": 227,
}
INDEX_ARRAYS = ("image_names", "patient_ids", "follow_ups", "ages", "genders", "views", "labels")


def read_index(path: Path) -> NihIndex:
    return table_to_index(read_nih_table(path), str(path))


def assert_same_index(first: NihIndex, second: NihIndex) -> None:
    for name in INDEX_ARRAYS:
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype, name
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


def patients_of(index: NihIndex, rows: np.ndarray) -> set[int]:
    return set(index.patient_ids[rows].tolist())


def read_list(path: Path) -> list[str]:
    return [line for line in path.read_text().split() if line]


def synthetic_table(root: Path) -> pd.DataFrame:
    """The generated Data_Entry_2017.csv read with pandas alone, so expected counts do not come from cxr.data."""
    return pd.read_csv(root / "Data_Entry_2017.csv", usecols=["Image Index", "Patient ID", "View Position"])


@pytest.fixture(scope="module")
def real_table_path(nih_sample: Path) -> Path:
    return nih_sample / "Data_Entry_2017_v2020.csv"


@pytest.fixture(scope="module")
def real_index(real_table_path: Path) -> NihIndex:
    return read_index(real_table_path)


@pytest.fixture(scope="module")
def real_sample_data(nih_sample: Path) -> NihData:
    return load_nih(nih_sample, skip_missing=True)


# ----------------------------------------------------------------------------------------------- the real table
def test_real_table_counts_match_the_release(real_index: NihIndex) -> None:
    assert len(real_index) == 112_120
    assert len(np.unique(real_index.patient_ids)) == 30_805
    assert int((real_index.views == "PA").sum()) == 67_310
    assert int((real_index.views == "AP").sum()) == 44_810
    counts = {name: int(real_index.labels[:, column].sum()) for column, name in enumerate(FINDINGS)}
    assert counts == REAL_LABEL_COUNTS
    assert int((real_index.labels.sum(axis=1) == 0).sum()) == 60_361  # No Finding = all-zero rows
    assert set(np.unique(real_index.labels).tolist()) == {0.0, 1.0}


def test_real_table_first_row_and_array_types(real_index: NihIndex) -> None:
    # 00000001_000.png,Cardiomegaly,0,1,57,M,PA,...
    assert real_index.image_names[0] == "00000001_000.png"
    assert real_index.patient_ids[0] == 1 and real_index.follow_ups[0] == 0
    assert real_index.ages[0] == 57.0 and real_index.genders[0] == "M" and real_index.views[0] == "PA"
    assert real_index.labels[0].tolist() == [float(name == "Cardiomegaly") for name in FINDINGS]
    expected_kinds = {"image_names": "U", "patient_ids": "i", "follow_ups": "i", "ages": "f", "genders": "U",
                      "views": "U", "labels": "f"}
    for name, kind in expected_kinds.items():
        array = getattr(real_index, name)
        assert isinstance(array, np.ndarray) and array.dtype.kind == kind, (name, array.dtype)
        assert len(array) == 112_120
    assert real_index.patient_ids.dtype == np.int64 and real_index.labels.dtype == np.float32
    assert real_index.labels.shape == (112_120, len(FINDINGS))
    assert not np.isnan(real_index.ages).any()


def test_2017_form_with_trailing_commas_parses_identically(real_table_path: Path, real_index: NihIndex,
                                                            tmp_path: Path) -> None:
    lines = real_table_path.read_text().splitlines()
    form_2017 = tmp_path / "Data_Entry_2017.csv"
    form_2017.write_text("".join(line + ",\n" for line in lines))
    assert form_2017.read_text().splitlines()[0].endswith("OriginalImagePixelSpacing[x,y],")
    assert_same_index(read_index(form_2017), real_index)


def test_gzipped_table_is_found_and_parses_identically(real_table_path: Path, real_index: NihIndex,
                                                       tmp_path: Path) -> None:
    packed = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    with gzip.open(packed, "wb", compresslevel=1) as handle:
        handle.write(real_table_path.read_bytes())
    assert find_table(tmp_path) == packed
    assert_same_index(read_index(packed), real_index)


def test_reading_the_full_table_is_fast(real_table_path: Path) -> None:
    start = time.perf_counter()
    index = read_index(real_table_path)
    elapsed = time.perf_counter() - start
    assert len(index) == 112_120
    assert elapsed < 5.0, f"reading + indexing took {elapsed:.2f} s (about 0.3 s expected)"


# ----------------------------------------------------------------------------------------------- malformed tables
@pytest.mark.parametrize("bad_line, message", [
    ("b.png,Masss,0,2,58,M,PA,2500,2048,0.143,0.143", "line 3: unknown finding 'Masss' in 'Masss'"),
    (",Mass,0,2,58,M,PA,2500,2048,0.143,0.143", "line 3: empty 'Image Index'"),
    ("a.png,Mass,1,1,58,M,PA,2500,2048,0.143,0.143", "line 3: image a.png is listed twice"),
    ("b.png,Mass,0,x2,58,M,PA,2500,2048,0.143,0.143", "line 3: 'Patient ID' is 'x2', not a number"),
    ("b.png,No Finding|Mass,0,2,58,M,PA,2500,2048,0.143,0.143", "line 3: 'No Finding' together with findings"),
    ("b.png,Mass|No Finding,0,2,58,M,PA,2500,2048,0.143,0.143", "line 3: 'No Finding' together with findings"),
    ("b.png,Mass,0,2,58,M,,2500,2048,0.143,0.143", "line 3: empty 'View Position'"),
])
def test_bad_rows_are_rejected_with_line_and_reason(write_table, nih_row, bad_line: str, message: str) -> None:
    path = write_table([nih_row("a.png", "Mass"), bad_line])
    with pytest.raises(DataError, match=re.escape(f"{path}, {message}")):
        read_index(path)


def test_unknown_label_further_down_names_its_own_line(write_table, nih_row) -> None:
    lines = [nih_row(f"{n:08d}_000.png", "Effusion", patient=n) for n in range(1, 6)]
    lines.insert(3, nih_row("00000099_000.png", "Effusion|Pneumonitis", patient=99))
    with pytest.raises(DataError, match=r"line 5: unknown finding 'Pneumonitis' in 'Effusion\|Pneumonitis'"):
        read_index(write_table(lines))


def test_missing_column_is_named(write_table) -> None:
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender"
    path = write_table(["a.png,Mass,0,1,58,M"], header=header)
    with pytest.raises(DataError, match=re.escape("missing column(s) ['View Position']")):
        read_nih_table(path)


def test_legacy_spellings_and_age_format_are_accepted(write_table, nih_row) -> None:
    index = read_index(write_table([nih_row("a.png", "Infiltrate|Pleural Thickening", age="058Y"),
                                    nih_row("b.png", "No Finding", patient=2, age="", gender="")]))
    infiltration, thickening = FINDINGS.index("Infiltration"), FINDINGS.index("Pleural_Thickening")
    assert np.flatnonzero(index.labels[0]).tolist() == sorted([infiltration, thickening])
    assert index.labels[1].tolist() == [0.0] * len(FINDINGS)
    assert index.ages[0] == 58.0 and np.isnan(index.ages[1])
    assert index.genders.tolist() == ["M", ""]


def test_table_saved_by_a_spreadsheet_parses(write_table, nih_row) -> None:
    path = write_table([nih_row("a.png", "Mass"), nih_row("b.png", "Edema|Hernia", patient=2)])
    text = path.read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())  # byte-order mark, CRLF
    index = read_index(path)
    assert index.image_names.tolist() == ["a.png", "b.png"] and index.patient_ids.tolist() == [1, 2]
    assert index.views.tolist() == ["PA", "PA"]
    assert [FINDINGS[column] for column in np.flatnonzero(index.labels[1])] == ["Edema", "Hernia"]


def test_find_table_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"--data-dir {tmp_path / 'absent'}: no such folder")):
        find_table(tmp_path / "absent")
    with pytest.raises(DataError, match=re.escape(f"--data-dir {tmp_path}: no label table found (looked for "
                                                  "Data_Entry_2017.csv, Data_Entry_2017_v2020.csv")):
        find_table(tmp_path)


# ----------------------------------------------------------------------------------------------- layouts
def synthetic_names(root: Path) -> set[str]:
    return {path.name for path in (root / "images").glob("*.png")}


def test_flat_images_folder_finds_every_image(synthetic_nih: Path) -> None:
    data = load_nih(synthetic_nih)
    assert set(data.index.image_names.tolist()) == synthetic_names(synthetic_nih)
    assert data.index.image_dirs == [str(synthetic_nih / "images")]
    assert data.index.image_dir_ids.dtype == np.int16 and (data.index.image_dir_ids == 0).all()


def test_split_mirror_layout_finds_every_image(synthetic_copy: Path) -> None:
    names = sorted(synthetic_names(synthetic_copy))
    first, second = synthetic_copy / "images_001" / "images", synthetic_copy / "images_002" / "images"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    for position, name in enumerate(names):
        shutil.move(synthetic_copy / "images" / name, (first if position < len(names) // 2 else second) / name)
    (synthetic_copy / "images").rmdir()
    data = load_nih(synthetic_copy)
    index = data.index
    assert sorted(index.image_names.tolist()) == names
    assert index.image_dirs == [str(first), str(second)]
    for row in range(len(index)):
        path = Path(index.image_path(row))
        assert path.is_file() and path.name == index.image_names[row]
    assert np.bincount(index.image_dir_ids).tolist() == [len(names) // 2, len(names) - len(names) // 2]


# ----------------------------------------------------------------------------------------------- splits
def test_official_lists_define_test_and_validation_comes_from_train_val_patients(synthetic_nih: Path) -> None:
    data = load_nih(synthetic_nih, val_fraction=0.25, seed=3)
    index, splits = data.index, data.splits
    test_list, train_val_list = read_list(synthetic_nih / "test_list.txt"), read_list(synthetic_nih / "train_val_list.txt")
    assert sorted(index.image_names[splits["test"]].tolist()) == sorted(test_list)
    train_val_rows = np.concatenate([splits["train"], splits["val"]])
    assert sorted(index.image_names[train_val_rows].tolist()) == sorted(train_val_list)
    train_val_patients = patients_of(index, train_val_rows)
    assert len(patients_of(index, splits["val"])) == round(0.25 * len(train_val_patients))
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not patients_of(index, splits[first]) & patients_of(index, splits[second])
    assert "official lists (train_val_list.txt, test_list.txt)" in data.summary()
    assert "validation = 25% of train_val patients (seed 3)" in data.summary()


def test_random_split_is_by_patient_reproducible_and_sized(real_index: NihIndex, tmp_path: Path) -> None:
    splits, how = build_splits(real_index, tmp_path, "random", val_fraction=0.1, test_fraction=0.2, seed=7)
    again, _ = build_splits(real_index, tmp_path, "random", val_fraction=0.1, test_fraction=0.2, seed=7)
    other, _ = build_splits(real_index, tmp_path, "random", val_fraction=0.1, test_fraction=0.2, seed=8)
    assert how == "random patient split 72%/8%/20% (seed 7)"
    assert all(np.array_equal(splits[name], again[name]) for name in splits)
    assert not np.array_equal(splits["test"], other["test"])
    every_row = np.sort(np.concatenate(list(splits.values())))
    assert np.array_equal(every_row, np.arange(len(real_index)))  # each row in exactly one split
    patients = {name: patients_of(real_index, rows) for name, rows in splits.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    for name, fraction in (("train", 0.72), ("val", 0.08), ("test", 0.2)):
        assert abs(len(patients[name]) - fraction * 30_805) <= 1
        assert abs(len(splits[name]) / len(real_index) - fraction) < 0.02


def test_patient_split_keeps_every_image_of_a_patient_together() -> None:
    patient_ids = np.repeat(np.arange(100), np.arange(100) % 5 + 1)
    parts = patient_split(patient_ids, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    assert [len(np.unique(patient_ids[rows])) for rows in parts.values()] == [50, 30, 20]
    for rows in parts.values():
        for patient in np.unique(patient_ids[rows]):
            assert np.array_equal(rows[patient_ids[rows] == patient], np.flatnonzero(patient_ids == patient))


def test_auto_without_lists_falls_back_to_a_random_patient_split(synthetic_copy: Path) -> None:
    (synthetic_copy / "train_val_list.txt").unlink()
    data = load_nih(synthetic_copy, seed=0)
    assert "split: random patient split 72%/8%/20% (seed 0)" in data.notes
    assert sum(len(rows) for rows in data.splits.values()) == len(data.index)


def test_official_split_without_lists_says_which_files_are_needed(synthetic_copy: Path) -> None:
    (synthetic_copy / "test_list.txt").unlink()
    with pytest.raises(DataError, match=re.escape(f"--split official: {synthetic_copy / 'train_val_list.txt'} and "
                                                  f"{synthetic_copy / 'test_list.txt'} are needed; use --split random")):
        load_nih(synthetic_copy, split="official")


def test_official_lists_that_share_a_patient_are_rejected(synthetic_copy: Path) -> None:
    test_list = read_list(synthetic_copy / "test_list.txt")
    patient_of = dict(synthetic_table(synthetic_copy)[["Image Index", "Patient ID"]].itertuples(index=False))
    by_patient: dict[int, list[str]] = {}
    for name in test_list:
        by_patient.setdefault(int(patient_of[name]), []).append(name)
    # A patient with two or more test images keeps the others in the test list once one image moves.
    patient, moved = next((patient, names[-1]) for patient, names in by_patient.items() if len(names) >= 2)
    (synthetic_copy / "test_list.txt").write_text("\n".join(name for name in test_list if name != moved) + "\n")
    with open(synthetic_copy / "train_val_list.txt", "a") as handle:
        handle.write(moved + "\n")
    with pytest.raises(DataError, match=r"patient overlap between the (train|val) and test splits: 1 patient\(s\), "
                                        + re.escape(f"e.g. [{patient}]; a patient's images must all be in one split")):
        load_nih(synthetic_copy)


def test_image_in_both_lists_is_rejected(synthetic_copy: Path) -> None:
    duplicated = read_list(synthetic_copy / "test_list.txt")[-1]
    assert duplicated not in read_list(synthetic_copy / "train_val_list.txt")
    with open(synthetic_copy / "train_val_list.txt", "a") as handle:
        handle.write(duplicated + "\n")
    with pytest.raises(DataError, match=re.escape("1 image(s) are in both train_val_list.txt and test_list.txt, "
                                                  f"e.g. [{duplicated!r}]")):
        load_nih(synthetic_copy)


# ----------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("view", ["PA", "AP"])
def test_view_filter_keeps_only_that_view_and_says_so(synthetic_nih: Path, view: str) -> None:
    table = synthetic_table(synthetic_nih)
    assert set(table["View Position"]) == {"PA", "AP"}  # both views present, so the filter has rows to drop
    wanted = set(table.loc[table["View Position"] == view, "Image Index"])
    assert 0 < len(wanted) < len(table)
    data = load_nih(synthetic_nih, views=view, split="random")
    assert set(data.index.image_names.tolist()) == wanted
    assert set(data.index.views.tolist()) == {view}
    assert f"views: kept {view} only ({len(wanted)} of {len(table)} images)" in data.summary()


def test_unknown_view_is_rejected(synthetic_nih: Path) -> None:
    with pytest.raises(DataError, match="--views must be both, PA or AP, got 'LL'"):
        load_nih(synthetic_nih, views="LL")


def test_missing_images_fail_with_count_examples_and_the_way_out(nih_sample: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_nih(nih_sample)
    message = str(caught.value)
    assert message.startswith("112096 of 112120 images listed in Data_Entry_2017_v2020.csv are not on disk under "
                              f"{nih_sample / 'images'}")
    assert "(e.g. 00000001_000.png, 00000001_001.png" in message
    assert "pass --skip-missing to use the 24 that are there" in message


def test_skip_missing_keeps_exactly_the_rows_with_images(real_sample_data: NihData, nih_sample_images: list[str]) -> None:
    data = real_sample_data
    assert len(nih_sample_images) == 24
    assert sorted(data.index.image_names.tolist()) == nih_sample_images
    assert all(Path(data.index.image_path(row)).is_file() for row in range(len(data.index)))
    assert any(note.startswith("--skip-missing: dropped 112096 of 112120 rows") for note in data.notes)
    assert sum(len(rows) for rows in data.splits.values()) == 24


def test_one_deleted_image_is_named(synthetic_copy: Path) -> None:
    names = synthetic_table(synthetic_copy)["Image Index"].tolist()
    deleted = names[len(names) // 2]
    (synthetic_copy / "images" / deleted).unlink()
    with pytest.raises(DataError, match=rf"^1 of {len(names)} images .* \(e\.g\. {re.escape(deleted)}\)\. "
                                        rf".*--skip-missing to use the {len(names) - 1} that are there\.$"):
        load_nih(synthetic_copy)
    assert len(load_nih(synthetic_copy, skip_missing=True).index) == len(names) - 1


# ----------------------------------------------------------------------------------------------- Dataset
def test_dataset_items_are_uint8_images_labels_and_positions(synthetic_nih: Path) -> None:
    data = load_nih(synthetic_nih)
    rows = data.splits["test"]
    dataset = ChestXrayDataset(data.index, rows, Preprocessing(48, "clahe"))
    assert len(dataset) == len(rows) == len(read_list(synthetic_nih / "test_list.txt"))
    for position in (0, len(dataset) - 1):
        image, labels, returned = dataset[position]
        assert image.dtype == torch.uint8 and image.shape == (1, 48, 48)
        assert labels.dtype == torch.float32 and labels.shape == (len(FINDINGS),)
        assert torch.equal(labels, torch.from_numpy(data.index.labels[rows[position]]))
        assert returned == position
        assert torch.equal(image[0], torch.from_numpy(dataset.load_image(position)))
        assert image.float().std() > 10  # a real picture, not a blank


def test_dataset_augmentation_keeps_shape_and_changes_pixels(synthetic_nih: Path) -> None:
    data = load_nih(synthetic_nih)
    plain = ChestXrayDataset(data.index, data.splits["train"], Preprocessing(64, "none"))
    augmented = ChestXrayDataset(data.index, data.splits["train"], Preprocessing(64, "none"),
                                 augment=build_train_augment(1.0))
    augmented.reseed(0)
    images = [augmented[position][0] for position in range(4)]
    assert all(image.shape == (1, 64, 64) and image.dtype == torch.uint8 for image in images)
    assert any(not torch.equal(image, plain[position][0]) for position, image in enumerate(images))


def test_real_sample_dataset_decodes_and_resizes(real_sample_data: NihData) -> None:
    data = real_sample_data
    rows = np.flatnonzero(data.index.image_names == "00000100_000.png")  # the RGBA one
    image, labels, position = ChestXrayDataset(data.index, rows, Preprocessing(128))[0]
    assert image.shape == (1, 128, 128) and image.dtype == torch.uint8 and position == 0
    assert torch.equal(labels, torch.from_numpy(data.index.labels[rows[0]]))


def test_image_path_of_a_missing_image_raises(nih_sample: Path, real_index: NihIndex) -> None:
    index = locate_images(real_index.subset(np.arange(3)), nih_sample)
    with pytest.raises(DataError, match="image 00000001_000.png was not found on disk"):
        index.image_path(0)
