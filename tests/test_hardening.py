"""Bad input and faults: no lost runs, no silent wrong results, no tracebacks (one test per defect, then a sweep)."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import pickle
import shutil
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cxr.checkpoint import SCHEMA_VERSION, CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint, save_epoch_checkpoints
from cxr.data import ChestXrayDataset, DataError, load_nih, unwrap_worker_errors
from cxr.transforms import ImageReadError, Preprocessing, read_xray
from tests.test_train import TINY_RUN, run_cli

REPO = Path(__file__).resolve().parents[1]
FAST = [*TINY_RUN, "--epochs", "1", "--warmup-epochs", "0", "--max-steps-per-epoch", "1"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"cxr_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A syntactically valid PNG header (and IEND) that claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------------- images
def test_implausible_image_sizes_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"huge\.png: its PNG header claims 100000 x 100000 pixels, implausible"):
        read_xray(png_claiming(tmp_path / "huge.png", 100000, 100000))
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((1, 1), np.uint8))
    with pytest.raises(ImageReadError, match=r"tiny\.png: 1 x 1 pixels is implausibly small"):
        read_xray(tiny)


def test_a_symlink_loop_in_images_is_ignored_not_fatal(synthetic_copy: Path) -> None:
    os.symlink("loop", synthetic_copy / "images" / "loop")
    data = load_nih(synthetic_copy)
    assert len(data.index) == len(list((synthetic_copy / "images").glob("*.png")))


def test_header_only_table_and_no_usable_image_are_errors(synthetic_copy: Path, tmp_path: Path) -> None:
    table = synthetic_copy / "Data_Entry_2017.csv"
    header_only = tmp_path / "header"
    header_only.mkdir()
    (header_only / "Data_Entry_2017.csv").write_text(table.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="the table has a header but no image rows"):
        load_nih(header_only)
    shutil.rmtree(synthetic_copy / "images")
    (synthetic_copy / "images").mkdir()
    with pytest.raises(DataError, match="none of the images in Data_Entry_2017.csv is on disk"):
        load_nih(synthetic_copy, skip_missing=True)
    check = load_script("check_dataset")
    for folder in (header_only, synthetic_copy):
        assert check.main(["--data-dir", str(folder), "--skip-missing", "--workers", "1"]) == 2


def test_check_dataset_reads_a_jpeg_named_png_like_training_does(synthetic_copy: Path, capsys) -> None:
    first = sorted((synthetic_copy / "images").glob("*.png"))[0]
    cv2.imwrite(str(first.with_suffix(".jpg")), cv2.imread(str(first), cv2.IMREAD_GRAYSCALE))
    first.with_suffix(".jpg").replace(first)  # a JPEG saved under the .png name
    assert read_xray(first).shape == (64, 64)
    check = load_script("check_dataset")
    assert check.main(["--data-dir", str(synthetic_copy), "--decode", "--workers", "1"]) == 0
    assert "JPEG: 1" in capsys.readouterr().out


def test_worker_errors_arrive_as_their_message_alone(synthetic_copy: Path) -> None:
    data = load_nih(synthetic_copy)
    victim = data.index.image_path(int(data.splits["train"][0]))
    Path(victim).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = ChestXrayDataset(data.index, data.splits["train"][:4], Preprocessing(64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    with pytest.raises(ImageReadError) as caught:
        list(unwrap_worker_errors(loader))
    assert str(caught.value).startswith(f"{victim}: not a decodable image")
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_a_plain_pickle_is_refused_as_code_not_called_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": {}, "config": {}, "payload": os.getcwd}, handle)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "holds pickled Python objects" in message and "it was NOT loaded" in message
    assert "truncated" not in message and "Re-running" not in message  # no quote of torch's advice


def test_a_full_disk_is_named_and_the_previous_checkpoint_survives(tmp_path: Path, monkeypatch) -> None:
    state = {"schema_version": SCHEMA_VERSION, "model": {"w": torch.ones(2)}, "config": {}, "epoch": 1}
    save_epoch_checkpoints(state, tmp_path, improved=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match=f"no space left on the device holding {tmp_path}"):
        save_epoch_checkpoints({**state, "epoch": 2}, tmp_path, improved=True)
    with pytest.raises(CheckpointWriteError, match="no space left"):
        save_checkpoint(state, tmp_path / "other.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1 and sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


# ----------------------------------------------------------------------------------------------- run directories
@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_and_a_live_one_is_locked(tiny_run, tiny_data, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(tiny_run["dir"], tmp_path / "run"))
    best = (run_dir / "best.pt").read_bytes()
    result = run_cli(["train.py", "--data-dir", str(tiny_data), "--out", str(run_dir), *FAST])
    assert result.returncode == 1 and "already holds last.pt and best.pt of another run" in result.stderr
    assert f"--resume {run_dir}" in result.stderr and "--overwrite" in result.stderr
    assert (run_dir / "best.pt").read_bytes() == best
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with open(fresh / ".lock", "w") as holder:  # a live run holds the lock
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        holder.write("PID 4242 on somehost since now\n")
        holder.flush()
        result = run_cli(["train.py", "--data-dir", str(tiny_data), "--out", str(fresh), *FAST])
    assert result.returncode == 1 and f"run directory {fresh} is in use by PID 4242 on somehost" in result.stderr
    # The holder is gone (like a killed run): its lock file stays, and the next run takes it over.
    (fresh / ".last.pt.999.dead.tmp").write_bytes(b"x" * 100)  # leftover of a killed checkpoint write
    result = run_cli(["train.py", "--data-dir", str(tiny_data), "--out", str(fresh), *FAST])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed 1 unfinished temporary file(s)" in result.stdout and not list(fresh.glob(".*.tmp"))
    assert load_checkpoint(fresh / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_resume_continues_in_the_directory_it_was_given(tiny_run, tmp_path: Path) -> None:
    original = tiny_run["dir"]
    before = (original / "last.pt").read_bytes()
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli([str(REPO / "train.py"), "--resume", "copy", "--epochs", "3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(copy / "last.pt")["epoch"] == 3
    assert load_checkpoint(copy / "last.pt")["config"]["out"] == "copy"
    assert (original / "last.pt").read_bytes() == before  # the original run is untouched
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_diverging_run_is_warned_about_loudly(tiny_data, tmp_path: Path) -> None:
    result = run_cli(["train.py", "--data-dir", str(tiny_data), "--out", str(tmp_path / "run"), *FAST[:-2],
                      "--max-steps-per-epoch", "3", "--lr", "1e4", "--lr-warmup-steps", "0"])
    text = result.stdout + result.stderr
    assert "WARNING: the training loss" in text or "non-finite training loss" in text, text[-2000:]


# ----------------------------------------------------------------------------------------------- explain
@pytest.mark.slow
def test_explain_keeps_going_past_a_corrupt_image_and_never_overwrites(tiny_run, tmp_path: Path) -> None:
    images = sorted((tiny_run["data_dir"] / "images").glob("*.png"))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    shutil.copy(images[0], tmp_path / "a" / "x.png")
    shutil.copy(images[1], tmp_path / "b" / "x.png")
    cv2.imwrite(str(tmp_path / "a" / "x.jpg"), cv2.imread(str(images[2]), cv2.IMREAD_GRAYSCALE))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    result = run_cli(["explain.py", "--checkpoint", str(tiny_run["best"]), "--classes", "Mass", "--out", str(out),
                      str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), str(tmp_path / "a" / "x.jpg"),
                      str(tmp_path / "a" / "broken.png")])
    assert result.returncode == 1 and "1 image(s) could not be read" in result.stderr and "broken.png" in result.stderr
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == ["a/x.jpg", "a/x.png", "b/x.png"]
    overlays = sorted(entry["explained"]["Mass"]["overlay"] for entry in predictions.values())
    assert overlays == ["a__x_jpg_Mass.png", "a__x_png_Mass.png", "b__x_png_Mass.png"]
    assert all((out / name).is_file() for name in overlays)
    assert json.loads((out / "failed.json").read_text())[0]["name"] == "a/broken.png"


def test_a_failed_overlay_write_is_an_error(tmp_path: Path, monkeypatch) -> None:
    from cxr.explainer import write_image
    from cxr.rundir import OutputWriteError

    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)
    with pytest.raises(OutputWriteError, match="cannot write .*x.png: no space left on the device, or the folder is not"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from cxr.synthetic import generate_synthetic_nih

    root = tmp_path_factory.mktemp("nih") / "data"
    generate_synthetic_nih(root, patients=14, size=64, seed=3)
    return root


def test_the_header_check_catches_implausible_sizes(tmp_path: Path) -> None:
    from cxr.preflight import png_mode

    with pytest.raises(ImageReadError, match=r"claims 100000 x 100000 pixels, implausible for an X-ray \(over 16384 per side"):
        png_mode(str(png_claiming(tmp_path / "huge.png", 100000, 100000)))
    assert png_mode(str(png_claiming(tmp_path / "fine.png", 1024, 1024))) == "L"


@pytest.mark.slow
def test_explain_skip_missing_on_a_partial_download(tiny_run, tmp_path: Path, capsys) -> None:
    import explain

    partial = Path(shutil.copytree(tiny_run["data_dir"], tmp_path / "partial"))
    data = load_nih(partial)
    missing = data.index.image_names[data.splits["test"][0]]
    (partial / "images" / missing).unlink()
    common = ["--checkpoint", str(tiny_run["best"]), "--data-dir", str(partial), "--split", "test", "--limit", "2",
              "--classes", "Mass"]
    assert explain.main([*common, "--out", str(tmp_path / "strict")]) == 1
    assert "--skip-missing" in capsys.readouterr().err  # the advice given is a flag explain.py has
    assert explain.main([*common, "--skip-missing", "--out", str(tmp_path / "out")]) == 0
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(predictions) == 2 and missing not in predictions
