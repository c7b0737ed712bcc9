"""Tests for cxr.config: flags from fields, YAML files, precedence, the demo preset, validation, round trips."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from cxr.config import DEMO_PRESET, Config, build_parser, parse_config
from cxr.errors import ConfigError


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_every_field_has_a_flag_and_help_renders() -> None:
    parser = build_parser("train")
    flags = {option for action in parser._actions for option in action.option_strings}
    for item in fields(Config):
        assert "--" + item.name.replace("_", "-") in flags
    help_text = parser.format_help()
    assert "--data-dir" in help_text and "--clahe-clip" in help_text and "--config FILE.yaml" in help_text


def test_flags_set_fields_with_their_types() -> None:
    config = parse_config(["--data-dir", "/data/nih", "--epochs", "20", "--lr", "3e-4", "--views", "PA",
                           "--clahe-grid", "4"])
    assert config.data_dir == "/data/nih" and config.views == "PA"
    assert config.epochs == 20 and isinstance(config.epochs, int)
    assert config.lr == 3e-4 and config.clahe_grid == 4


@pytest.mark.parametrize("argv, expected", [
    ([], False), (["--hflip"], True), (["--hflip", "false"], False), (["--hflip", "true"], True),
    (["--hflip", "0"], False), (["--hflip", "--epochs", "3"], True),
])
def test_bool_flags(argv: list[str], expected: bool) -> None:
    assert parse_config(["--data-dir", "d", *argv]).hflip is expected


def test_bad_bool_and_bad_choice_are_argparse_errors(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_config(["--hflip", "maybe"])
    assert caught.value.code == 2
    assert "--hflip: expected true/false, got 'maybe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--views", "LL"])
    assert "argument --views: invalid choice: 'LL'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--output-stride", "4"])
    assert "argument --output-stride: invalid choice: 4 (choose from 32, 16, 8)" in capsys.readouterr().err
    assert parse_config(["--data-dir", "d", "--output-stride", "8"]).output_stride == 8


def test_demo_preset_applies_only_without_data_dir() -> None:
    demo = parse_config([])
    assert demo.is_demo
    for key, value in DEMO_PRESET.items():
        assert getattr(demo, key) == value, key
    real = parse_config(["--data-dir", "/data/nih"])
    assert not real.is_demo
    assert (real.image_size, real.epochs, real.weights, real.workers) == (224, 30, "auto", 4)
    assert parse_config(["--epochs", "2"]).epochs == 2  # flags beat the preset
    assert parse_config(["--epochs", "2"]).image_size == DEMO_PRESET["image_size"]


def test_yaml_file_applies_and_flags_override_it(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "data-dir: /data/nih\nepochs: 12\nlr: 1e-3\nhidden: 1024,256\nunfreeze: 3\n"
                                "hflip: true\npreprocess: equalize\nclahe_clip: 3\n")
    config = parse_config(["--config", path])
    assert (config.data_dir, config.epochs, config.hidden_sizes, config.unfreeze) == ("/data/nih", 12, (1024, 256), "3")
    assert config.lr == 1e-3 and isinstance(config.lr, float)  # YAML reads 1e-3 as text
    assert config.hflip is True and config.preprocess == "equalize" and config.clahe_clip == 3.0
    assert config.image_size == 224  # data_dir from the file: no demo preset
    overridden = parse_config(["--config", path, "--epochs", "5", "--hflip", "false"])
    assert overridden.epochs == 5 and overridden.hflip is False and overridden.unfreeze == "3"


def test_yaml_numbers_become_the_field_type(tmp_path: Path) -> None:
    config = parse_config(["--config", write_yaml(tmp_path, "data_dir: d\nhidden: 512\nunfreeze: 2\nepochs: 8.0\n")])
    assert (config.hidden, config.unfreeze, config.epochs) == ("512", "2", 8)
    assert config.hidden_sizes == (512,)


@pytest.mark.parametrize("text, message", [
    ("epochs: 30\nbatch_sise: 8\nlearning_rate: 1\n", "unknown option(s) batch_sise, learning_rate; see train.py --help"),
    ("epochs: many\n", "epochs: expected int, got 'many'"),
    ("epochs: 2.5\n", "epochs: expected int, got 2.5"),
    ("hflip: sometimes\n", "hflip: expected bool, got 'sometimes'"),
    ("views: LL\n", "views: must be one of both, PA, AP, got 'LL'"),
    ("output_stride: 4\n", "output_stride: must be one of 32, 16, 8, got 4"),
    ("1: 2\n", "option names must be text, got 1; see train.py --help"),
    ("- epochs\n", "expected a mapping of option: value"),
    ("epochs: [1\n", "not valid YAML"),
])
def test_bad_yaml_is_rejected_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"--config {path}: {message}")):
        parse_config(["--config", path])


def test_missing_yaml_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"--config {tmp_path / 'none.yaml'}: no such file")):
        parse_config(["--config", str(tmp_path / "none.yaml")])


def test_to_dict_from_dict_round_trip() -> None:
    config = parse_config(["--data-dir", "/d", "--epochs", "7", "--hflip", "--hidden", "256,64", "--lr", "0.002"])
    values = config.to_dict()
    assert values["epochs"] == 7 and values["hflip"] is True and values["hidden"] == "256,64"
    assert Config.from_dict(values) == config
    assert Config.from_dict({**values, "field_from_the_future": 1}) == config
    partial = Config.from_dict({"epochs": 7})
    assert partial.epochs == 7 and partial.image_size == Config().image_size


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--unfreeze", "7"], "--unfreeze must be 0..4 or 'all', got '7'"),
    (["--warmup-epochs", "9", "--epochs", "5"], "--warmup-epochs must be between 0 and --epochs"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--image-size", "16"], "--image-size must be at least 32"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--val-fraction", "0"], "--val-fraction and --test-fraction must be in (0, 1)"),
    (["--lr", "0"], "--lr must be positive"),
    (["--hidden", "512,x"], "--hidden must be comma-separated integers, got '512,x'"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0 (0: off), got -1.0"),
    (["--hidden", "0"], "--hidden sizes must be at least 1 (empty for one linear layer), got '0'"),
    (["--log-every", "0"], "--log-every must be at least 1 step, got 0"),
    (["--clahe-grid", "0"], "--clahe-grid must be 1..64 tiles per side, got 0"),
    (["--clahe-clip", "0"], "--clahe-clip must be in (0, 1000], got 0.0"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--lr", "nan"], "--lr, --grad-clip, --weight-decay and --dropout must be finite numbers"),
])
def test_validation_names_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(["--data-dir", "d", *argv])


def test_unfreeze_accepts_all_and_block_counts() -> None:
    assert parse_config(["--data-dir", "d", "--unfreeze", "all"]).unfreeze == "all"
    assert parse_config(["--data-dir", "d", "--unfreeze", "4"]).unfreeze == "4"


def test_non_utf8_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"--config {path}: not UTF-8 text (byte 13); save it as UTF-8")):
        parse_config(["--config", str(path)])
