"""The sweep: every entry point over a list of bad inputs exits non-zero, names the input, and shows no traceback.

Each case runs the entry point's main() in this process (so an escaping exception fails the test outright) and
checks the exit status and the one-line message; two cases also run as real subprocesses.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import pytest

from tests.test_hardening import png_claiming
from tests.test_train import run_cli

REPO = Path(__file__).resolve().parents[1]


def entry(name: str):
    """An entry point's module: train/evaluate/explain at the top level, or scripts/NAME.py."""
    path = REPO / f"{name}.py" if (REPO / f"{name}.py").is_file() else REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cxr_entry_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bad(tmp_path_factory, synthetic_nih: Path) -> dict[str, Path]:
    """Bad files and folders, made once."""
    root = tmp_path_factory.mktemp("bad")
    files = {"missing": root / "missing", "a_file": root / "a_file.txt"}
    files["a_file"].write_text("not a folder")
    (root / "latin1.yaml").write_bytes("data_dir: caf\xe9\n".encode("latin-1"))
    (root / "intkey.yaml").write_text("1: 2\n")
    (root / "stride.yaml").write_text("output_stride: 4\n")
    files.update(latin1=root / "latin1.yaml", intkey=root / "intkey.yaml", stride=root / "stride.yaml")
    header = root / "header-only"
    header.mkdir()
    (header / "Data_Entry_2017.csv").write_text((synthetic_nih / "Data_Entry_2017.csv").read_text().splitlines()[0] + "\n")
    files["header_only"] = header
    no_images = root / "no-images"
    (no_images / "images").mkdir(parents=True)
    (no_images / "Data_Entry_2017.csv").write_text((synthetic_nih / "Data_Entry_2017.csv").read_text())
    files["no_images"] = no_images
    files["evil"] = root / "evil.pt"
    with open(files["evil"], "wb") as handle:
        pickle.dump({"model": {}, "config": {}, "x": print}, handle)
    files["truncated"] = root / "truncated.pt"
    files["truncated"].write_bytes(b"PK\x03\x04 truncated")
    files["huge"] = png_claiming(root / "huge.png", 100000, 100000)
    return files


def sweep_cases(bad: dict[str, Path], checkpoint: Path, data_dir: Path) -> list[tuple[str, list[str], str]]:
    """(entry point, argv, text the one-line message must hold)."""
    ck = ["--checkpoint", str(checkpoint)]
    return [
        ("train", ["--clahe-grid", "0"], "--clahe-grid must be 1..64"),
        ("train", ["--log-every", "0"], "--log-every must be at least 1"),
        ("train", ["--grad-clip", "-1"], "--grad-clip must be >= 0"),
        ("train", ["--hidden", "0"], "--hidden sizes must be at least 1"),
        ("train", ["--image-size", "8"], "--image-size must be at least 32"),
        ("train", ["--config", str(bad["latin1"])], f"--config {bad['latin1']}: not UTF-8"),
        ("train", ["--config", str(bad["intkey"])], "option names must be text"),
        ("train", ["--config", str(bad["stride"])], "output_stride: must be one of 32, 16, 8"),
        ("train", ["--data-dir", str(bad["missing"])], f"--data-dir {bad['missing']}: no such folder"),
        ("train", ["--data-dir", str(bad["header_only"]), "--out", str(bad["missing"].parent / "r1")], "no image rows"),
        ("train", ["--data-dir", str(bad["no_images"]), "--skip-missing", "--out", str(bad["missing"].parent / "r2")],
         "none of the images in Data_Entry_2017.csv is on disk"),
        ("train", ["--resume", str(bad["missing"])], f"{bad['missing']} is neither a checkpoint file nor a run directory"),
        ("train", ["--resume", str(bad["evil"])], "holds pickled Python objects"),
        ("train", ["--resume", str(bad["truncated"])], f"cannot read checkpoint {bad['truncated']}"),
        ("train", ["--data-dir", str(data_dir), "--cache-dir", str(bad["missing"]), "--out", str(bad["missing"].parent / "r3")],
         f"--cache-dir {bad['missing']}: no such folder"),
        ("train", ["--data-dir", str(data_dir), "--weights", str(bad["missing"]), "--out", str(bad["missing"].parent / "r4")],
         f"--weights {bad['missing']}: no such file"),
        ("train", ["--data-dir", str(data_dir), "--out", str(bad["a_file"])], str(bad["a_file"])),
        ("evaluate", ["--checkpoint", str(bad["missing"])], f"checkpoint {bad['missing']} does not exist"),
        ("evaluate", ["--checkpoint", str(bad["evil"])], "holds pickled Python objects"),
        ("evaluate", [*ck, "--batch-size", "0"], "--batch-size must be >= 1"),
        ("evaluate", [*ck, "--data-dir", str(bad["missing"])], f"--data-dir {bad['missing']}: no such folder"),
        ("evaluate", [*ck, "--out", str(bad["a_file"])], str(bad["a_file"])),
        ("explain", [*ck, "--batch-size", "0"], "--batch-size must be at least 1"),
        ("explain", [*ck, str(bad["missing"])], f"{bad['missing']}: no such image file or folder"),
        ("explain", [*ck, str(bad["huge"]), "--out", str(bad["missing"].parent / "e1")], "claims 100000 x 100000 pixels"),
        ("explain", [*ck, "--classes", "Tumour", str(bad["huge"])], "--classes 'Tumour': unknown finding"),
        ("explain", [*ck, "--layer", "features.block9", str(bad["huge"])], "--layer 'features.block9'"),
        ("explain", [*ck, "--box-threshold", "2", str(bad["huge"])], "--box-threshold must be in (0, 1]"),
        ("explain", [*ck, "--out", str(bad["a_file"]), str(bad["huge"])], str(bad["a_file"])),
        ("check_dataset", ["--data-dir", str(bad["missing"])], f"--data-dir {bad['missing']}: no such folder"),
        ("check_dataset", ["--data-dir", str(bad["header_only"])], "no image rows"),
        ("check_dataset", ["--data-dir", str(bad["no_images"]), "--skip-missing"], "none of the"),
        ("check_dataset", ["--data-dir", str(data_dir), "--workers", "0"], "--workers must be at least 1"),
        ("prepare_cache", ["--data-dir", str(data_dir), "--out", str(bad["missing"]), "--size", "0"], "--size must be"),
        ("prepare_cache", ["--data-dir", str(data_dir), "--out", str(bad["missing"]), "--size", "64", "--clahe-grid", "0"],
         "--clahe-grid must be 1..64"),
        ("benchmark", ["--device", "cpu", "--batch-size", "1"], "--batch-size must be at least 2"),
    ]


@pytest.mark.slow
def test_every_entry_point_rejects_bad_input_cleanly(bad, tiny_run, capsys) -> None:
    modules: dict[str, object] = {}
    failures = []
    runs_before = sorted((Path.cwd() / "runs").glob("*"))
    for name, argv, expected in sweep_cases(bad, tiny_run["best"], tiny_run["data_dir"]):
        module = modules.setdefault(name, entry(name))
        try:
            status = module.main(argv)
        except SystemExit as exit_:  # argparse's own usage errors: a message, no traceback
            status = exit_.code
        captured = capsys.readouterr()
        message = captured.err
        if not status or expected not in message or "Traceback" in message:
            failures.append((name, argv, status, message[-500:]))
    assert failures == []
    assert sorted((Path.cwd() / "runs").glob("*")) == runs_before  # a refused run leaves no run directory behind


@pytest.mark.slow
def test_bad_input_as_a_subprocess_is_one_line(bad) -> None:
    for argv in (["train.py", "--config", str(bad["stride"])], ["scripts/check_dataset.py", "--data-dir", str(bad["header_only"])]):
        result = run_cli(argv)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr
