"""The NIH ChestX-ray14 table, image lookup, patient-level splits and the PyTorch Dataset.

    data = load_nih("/data/nih", views="both", skip_missing=False, split="auto", seed=0)
    print(data.summary())
    train_set = ChestXrayDataset(data.index, data.splits["train"], Preprocessing(224, "clahe"))

The index is a handful of numpy arrays (no per-row Python objects), so DataLoader workers share it
without copy-on-read growth. Reading the full 112,120-row table takes well under 2 seconds.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cxr.errors import CxrError
from cxr.labels import ALIASES, FINDINGS, NO_FINDING
from cxr.transforms import Preprocessing, read_xray

TABLE_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv.gz", "Data_Entry_2017_v2020.csv.gz")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position")
SPLIT_NAMES = ("train", "val", "test")


class DataError(CxrError, ValueError):
    """Bad input data: the message names the file, row or flag and says what to do."""


@dataclass
class NihIndex:
    """One entry per image, as parallel numpy arrays; `image_dir_ids` point into `image_dirs`."""

    image_names: np.ndarray  # '<U..' fixed-width strings
    patient_ids: np.ndarray  # int64
    follow_ups: np.ndarray  # int32
    ages: np.ndarray  # float32 (NaN when unknown)
    genders: np.ndarray  # '<U1'
    views: np.ndarray  # '<U2'
    labels: np.ndarray  # float32 [N, 14], NaN = unknown
    image_dirs: list[str] = field(default_factory=list)
    image_dir_ids: np.ndarray | None = None  # int16, -1 = not on disk

    def __len__(self) -> int:
        return len(self.image_names)

    def subset(self, rows: np.ndarray) -> NihIndex:
        """A new index with only `rows` (boolean mask or integer positions)."""
        return NihIndex(
            self.image_names[rows], self.patient_ids[rows], self.follow_ups[rows], self.ages[rows],
            self.genders[rows], self.views[rows], self.labels[rows], list(self.image_dirs),
            None if self.image_dir_ids is None else self.image_dir_ids[rows],
        )

    def image_path(self, row: int) -> str:
        if self.image_dir_ids is None or self.image_dir_ids[row] < 0:
            raise DataError(f"image {self.image_names[row]} was not found on disk")
        return os.path.join(self.image_dirs[self.image_dir_ids[row]], self.image_names[row])


# ----------------------------------------------------------------------------------------------- table
def find_table(data_dir: str | Path) -> Path:
    """The label table inside `data_dir` under any of its published names."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such folder")
    for name in TABLE_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"--data-dir {data_dir}: no label table found (looked for {', '.join(TABLE_NAMES)}); "
                    "download Data_Entry_2017.csv from the NIH release into that folder")


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: the same on every platform, and a spreadsheet's byte-order mark does not hide 'Image Index'
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _physical_columns(header_cells: list[str]) -> list[str]:
    """Name every CSV cell: a header like 'OriginalImage[Width,Height]' spans two cells, a trailing ',' one more."""
    names: list[str] = []
    cells = iter(header_cells)
    for cell in cells:
        if "[" in cell and "]" not in cell:  # a bracketed header split by the comma inside it
            prefix, first = cell.split("[", 1)
            parts = [first]
            for continuation in cells:
                parts.append(continuation.rstrip("]"))
                if "]" in continuation:
                    break
            names.extend(f"{prefix} {part}" for part in parts)
        else:
            names.append(cell.strip() or f"_empty{len(names)}")
    return names


def read_nih_table(path: str | Path) -> pd.DataFrame:
    """Read Data_Entry_2017.csv (2017 form, 2020 revision, gzipped or not) into a DataFrame keyed by column name."""
    path = Path(path)
    try:
        with _open_text(path) as handle:
            header = next(csv.reader(handle))
            names = _physical_columns(header)
            table = pd.read_csv(handle, header=None, names=names, usecols=list(REQUIRED_COLUMNS),
                                dtype={"Image Index": str, "Finding Labels": str, "Patient Gender": str, "View Position": str,
                                       "Patient Age": str}, keep_default_na=False, na_values=[""])
    except (StopIteration, UnicodeDecodeError, OSError, pd.errors.ParserError, EOFError) as error:
        raise DataError(f"{path}: not a readable NIH label table ({error})") from error
    except ValueError as error:  # usecols names a column the header lacks
        missing = [column for column in REQUIRED_COLUMNS if column not in names]
        raise DataError(f"{path}: missing column(s) {missing}; expected the NIH header "
                        f"{', '.join(REQUIRED_COLUMNS)}, ... ({error})") from error
    for column in ("Image Index", "Finding Labels", "Patient ID", "View Position"):
        empty = table[column].isna().to_numpy()
        if empty.any():
            row = int(np.flatnonzero(empty)[0]) + 2  # +1 header, +1 one-based
            raise DataError(f"{path}, line {row}: empty '{column}'; fix or remove that row")
    duplicated = table["Image Index"].duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise DataError(f"{path}, line {row + 2}: image {table['Image Index'].iat[row]} is listed twice")
    return table


def read_table_columns(path: str | Path, columns: list[str]) -> pd.DataFrame:
    """Other columns of the label table by header name (as strings), with 'Image Index'; names a missing column."""
    path = Path(path)
    with _open_text(path) as handle:
        names = _physical_columns(next(csv.reader(handle)))
        missing = [column for column in columns if column not in names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r}; its columns are {', '.join(names)}")
        wanted = list(dict.fromkeys(["Image Index", *columns]))
        return pd.read_csv(handle, header=None, names=names, usecols=wanted, dtype=str, keep_default_na=False)


def labels_matrix(finding_labels: pd.Series, source: str = "table") -> np.ndarray:
    """'A|B' strings -> float32 [N, 14]; 'No Finding' is all zeros; an unknown label names its row."""
    # The real table has ~800 distinct label strings for 112,120 rows: parse each distinct string once.
    codes, distinct = pd.factorize(finding_labels, sort=False)
    column_of = {name: column for column, name in enumerate(FINDINGS)}
    distinct_labels = np.zeros((len(distinct), len(FINDINGS)), dtype=np.float32)
    for code, text in enumerate(distinct):
        names = [ALIASES.get(name.strip(), name.strip()) for name in text.split("|")]
        for name in names:
            if name in column_of:
                distinct_labels[code, column_of[name]] = 1.0
                continue
            row = int(np.flatnonzero(codes == code)[0])
            if name != NO_FINDING:
                raise DataError(f"{source}, line {row + 2}: unknown finding {name!r} in {text!r}; "
                                f"known findings: {', '.join(FINDINGS)} or {NO_FINDING!r}")
            if len(names) > 1:
                raise DataError(f"{source}, line {row + 2}: {NO_FINDING!r} together with findings in {text!r}")
    return distinct_labels[codes]


def table_to_index(table: pd.DataFrame, source: str = "table") -> NihIndex:
    """Convert the DataFrame from read_nih_table into a NihIndex of numpy arrays."""
    def integers(column: str) -> np.ndarray:
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise DataError(f"{source}, line {row + 2}: '{column}' is {table[column].iat[row]!r}, not a number")
        return values.to_numpy(dtype=np.int64)

    ages = pd.to_numeric(table["Patient Age"].str.extract(r"(\d+)", expand=False), errors="coerce")  # '58' or '058Y'
    return NihIndex(
        image_names=table["Image Index"].str.strip().to_numpy(dtype=str),
        patient_ids=integers("Patient ID"),
        follow_ups=integers("Follow-up #").astype(np.int32),
        ages=ages.to_numpy(dtype=np.float32),
        genders=table["Patient Gender"].fillna("").str.strip().to_numpy(dtype="<U1"),
        views=table["View Position"].str.strip().to_numpy(dtype="<U2"),
        labels=labels_matrix(table["Finding Labels"], source),
    )


# ----------------------------------------------------------------------------------------------- images on disk
def image_folders(data_dir: str | Path) -> list[Path]:
    """Folders that hold images: `images/`, and the mirror's `images_001/images/` ... `images_012/images/`."""
    data_dir = Path(data_dir)
    folders = [data_dir / "images"] if (data_dir / "images").is_dir() else []
    for candidate in sorted(data_dir.glob("images_*")):
        inner = candidate / "images"
        folders.append(inner if inner.is_dir() else candidate)
    return [folder for folder in folders if folder.is_dir()]


def _is_file(entry: os.DirEntry) -> bool:
    """A regular file (or a link to one); a symlink loop or dangling link counts as absent, not as a crash."""
    try:
        return entry.is_file()
    except OSError:
        return False


def locate_images(index: NihIndex, data_dir: str | Path) -> NihIndex:
    """Fill `image_dirs` / `image_dir_ids` (-1 where the file is absent) by listing the image folders once."""
    folders = image_folders(data_dir)
    dir_ids = np.full(len(index), -1, dtype=np.int16)
    position = pd.Index(index.image_names)
    for folder_id, folder in enumerate(folders):
        try:
            names = [entry.name for entry in os.scandir(folder) if _is_file(entry)]
        except OSError as error:
            raise DataError(f"{folder}: cannot list the image folder ({error.strerror or error})") from error
        rows = position.get_indexer(names)
        rows = rows[rows >= 0]
        dir_ids[rows[dir_ids[rows] < 0]] = folder_id
    index.image_dirs = [str(folder) for folder in folders]
    index.image_dir_ids = dir_ids
    return index


# ----------------------------------------------------------------------------------------------- splits
def patient_split(patient_ids: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Assign whole patients to named parts by seeded shuffle; returns row positions per part."""
    unique = np.unique(patient_ids)
    order = np.random.default_rng(seed).permutation(unique)
    bounds = np.cumsum([round(fraction * len(unique)) for fraction in fractions.values()])
    parts = np.split(order, bounds[:-1])
    return {name: np.flatnonzero(np.isin(patient_ids, part)) for name, part in zip(fractions, parts)}


def check_no_patient_overlap(patient_ids: np.ndarray, splits: dict[str, np.ndarray]) -> None:
    """Raise DataError if any patient appears in two splits."""
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = np.intersect1d(patient_ids[splits[first]], patient_ids[splits[second]])
            if len(shared):
                raise DataError(f"patient overlap between the {first} and {second} splits: {len(shared)} patient(s), "
                                f"e.g. {shared[:5].tolist()}; a patient's images must all be in one split "
                                "(check train_val_list.txt / test_list.txt)")


def _read_list(path: Path) -> np.ndarray:
    return np.array([line.strip() for line in path.read_text().splitlines() if line.strip()], dtype=str)


def build_splits(index: NihIndex, data_dir: str | Path, split: str = "auto", val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Row positions of train/val/test and a description of how they were made. Overlap is always checked."""
    data_dir = Path(data_dir)
    lists = data_dir / "train_val_list.txt", data_dir / "test_list.txt"
    official = all(path.is_file() for path in lists)
    if split == "official" and not official:
        raise DataError(f"--split official: {lists[0]} and {lists[1]} are needed; use --split random for a patient split")
    if split == "official" or (split == "auto" and official):
        in_train_val = np.isin(index.image_names, _read_list(lists[0]))
        in_test = np.isin(index.image_names, _read_list(lists[1]))
        both = in_train_val & in_test
        if both.any():
            raise DataError(f"{both.sum()} image(s) are in both {lists[0].name} and {lists[1].name}, "
                            f"e.g. {index.image_names[both][:3].tolist()}")
        train_val_rows = np.flatnonzero(in_train_val)
        inner = patient_split(index.patient_ids[train_val_rows], {"train": 1 - val_fraction, "val": val_fraction}, seed)
        splits = {"train": train_val_rows[inner["train"]], "val": train_val_rows[inner["val"]], "test": np.flatnonzero(in_test)}
        unlisted = len(index) - len(train_val_rows) - len(splits["test"])
        how = f"official lists ({lists[0].name}, {lists[1].name}); validation = {val_fraction:.0%} of train_val patients (seed {seed})"
        if unlisted:
            how += f"; {unlisted} image(s) in neither list left out"
    else:
        fractions = {"train": (1 - test_fraction) * (1 - val_fraction), "val": (1 - test_fraction) * val_fraction,
                     "test": test_fraction}
        splits = patient_split(index.patient_ids, fractions, seed)
        how = f"random patient split {fractions['train']:.0%}/{fractions['val']:.0%}/{test_fraction:.0%} (seed {seed})"
    check_no_patient_overlap(index.patient_ids, splits)
    return splits, how


def keep_images_on_disk(index: NihIndex, data_dir: Path, table_name: str, skip_missing: bool) -> tuple[NihIndex, str | None]:
    """Rows whose image is absent: an error naming a few (default), or dropped with a note (--skip-missing)."""
    missing = index.image_dir_ids < 0
    if not missing.any():
        return index, None
    examples = ", ".join(index.image_names[missing][:5])
    where = ", ".join(index.image_dirs) or f"{data_dir}/images (no image folder found)"
    if not skip_missing:
        raise DataError(f"{missing.sum()} of {len(index)} images listed in {table_name} are not on disk under "
                        f"{where} (e.g. {examples}). Download them, or pass --skip-missing to use the "
                        f"{(~missing).sum()} that are there.")
    if missing.all():
        raise DataError(f"--data-dir {data_dir}: none of the images in {table_name} is on disk")
    note = f"--skip-missing: dropped {missing.sum()} of {len(index)} rows whose image is not on disk (e.g. {examples})"
    return index.subset(~missing), note


# ----------------------------------------------------------------------------------------------- the whole thing
@dataclass
class NihData:
    """The filtered index, its splits and notes on every filter applied (for the run log)."""

    data_dir: Path
    table_path: Path
    index: NihIndex
    splits: dict[str, np.ndarray]
    notes: list[str]
    dropped_missing: int = 0  # rows dropped by --skip-missing

    def summary(self) -> str:
        lines = [f"data: {self.table_path} ({len(self.index)} images, {len(np.unique(self.index.patient_ids))} patients)"]
        lines += [f"  {note}" for note in self.notes]
        for name in SPLIT_NAMES:
            rows = self.splits[name]
            lines.append(f"  {name:5s} {len(rows):7d} images {len(np.unique(self.index.patient_ids[rows])):6d} patients")
        return "\n".join(lines)


def load_nih(data_dir: str | Path, views: str = "both", skip_missing: bool = False, split: str = "auto",
             val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> NihData:
    """Table -> index -> view filter -> images on disk -> patient-level splits, with every drop reported."""
    data_dir = Path(data_dir)
    table_path = find_table(data_dir)
    index = table_to_index(read_nih_table(table_path), str(table_path))
    if len(index) == 0:
        raise DataError(f"{table_path}: the table has a header but no image rows; download the full "
                        "Data_Entry_2017.csv again")
    notes = []
    if views != "both":
        if views not in ("PA", "AP"):
            raise DataError(f"--views must be both, PA or AP, got {views!r}")
        keep = index.views == views
        notes.append(f"views: kept {views} only ({keep.sum()} of {len(index)} images)")
        index = index.subset(keep)
    else:
        notes.append(f"views: PA and AP ({(index.views == 'PA').sum()} PA, {(index.views == 'AP').sum()} AP)")
    listed = len(index)
    index, note = keep_images_on_disk(locate_images(index, data_dir), data_dir, table_path.name, skip_missing)
    if note:
        notes.append(note)
    splits, how = build_splits(index, data_dir, split, val_fraction, test_fraction, seed)
    notes.append(f"split: {how}")
    return NihData(data_dir, table_path, index, splits, notes, dropped_missing=listed - len(index))


class ChestXrayDataset(Dataset):
    """Images of one split: decoded, preprocessed, augmented; returns (uint8 [1,S,S], labels, row)."""

    def __init__(self, index: NihIndex, rows: np.ndarray, preprocessing: Preprocessing, augment: Callable | None = None,
                 cache: object | None = None):
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"ChestXrayDataset takes a Preprocessing (cxr.transforms), got {type(preprocessing).__name__}")
        self.index, self.rows = index, np.asarray(rows, dtype=np.int64)
        self.preprocessing = preprocessing
        self.augment, self.cache = augment, cache

    def __len__(self) -> int:
        return len(self.rows)

    def reseed(self, seed: int) -> None:
        """Seed the augmentation's own generators (albumentations >= 2 does not use the global ones)."""
        if self.augment is not None and hasattr(self.augment, "set_random_seed"):
            self.augment.set_random_seed(int(seed) % 2**32)

    def load_image(self, position: int) -> np.ndarray:
        """The preprocessed uint8 image of split position `position` (from the cache when there is one)."""
        row = self.rows[position]
        if self.cache is not None:
            return self.cache.get(self.index.image_names[row])
        return self.preprocessing(read_xray(self.index.image_path(row)))

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.load_image(position)
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0)
        return tensor, torch.from_numpy(self.index.labels[self.rows[position]]), position


def unwrap_worker_errors(batches: Iterable) -> Iterator:
    """Iterate a DataLoader; a CxrError raised in a worker reaches the caller as its own message alone.

    PyTorch re-raises a worker's exception with the worker's whole traceback inside the message; for errors
    meant for users (an unreadable image, a cache miss) only the original message is worth showing.
    """
    try:
        yield from batches
    except CxrError as error:
        text = str(error)
        if not (text.startswith("Caught ") and "Original Traceback" in text):
            raise
        last = text.strip().splitlines()[-1]  # "cxr.transforms.ImageReadError: /data/x.png: not a decodable image"
        message = last.split(": ", 1)[1] if ": " in last else last
        try:
            clean = type(error)(message)
        except TypeError:  # an error class with another constructor: keep it as it came
            raise error from None
        raise clean from None


# BBox_List_2017.csv coordinates live in the 1024 x 1024 pixel space of the NIH PNGs, whatever a file's own size.
BOX_SPACE = 1024.0


def read_box_list(path: str | Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """BBox_List_2017.csv -> {image name: [(finding, (x, y, w, h)), ...]}, boxes in NIH's 1024 x 1024 space.

    Its header `Image Index,Finding Label,Bbox [x,y,w,h],,,` spans empty cells; `Infiltrate` means Infiltration.
    """
    from cxr.labels import canonical_finding

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--boxes {path}: no such file (the NIH release calls it BBox_List_2017.csv)")
    boxes: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {}
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, [])
        if len(header) < 3 or header[0].strip() != "Image Index":
            raise DataError(f"{path}: not a box list (header should start 'Image Index,Finding Label,Bbox [x,y,w,h]')")
        for line, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                finding = canonical_finding(row[1])
                x, y, w, h = (float(cell) for cell in row[2:6])
            except KeyError:
                raise DataError(f"{path}, line {line}: unknown finding {row[1]!r}") from None
            except (ValueError, IndexError):
                raise DataError(f"{path}, line {line}: expected name,finding,x,y,w,h, got {row!r}") from None
            boxes.setdefault(row[0].strip(), []).append((finding, (x, y, w, h)))
    return boxes
