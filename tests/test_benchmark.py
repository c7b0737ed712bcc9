"""Tests for scripts/benchmark.py: one tiny end-to-end CPU run (report structure, not speed) and its input checks.

The goals are measurements, so nothing here asserts that they are met; only that every number is there,
finite and positive, and that `goals_met` agrees with `ratios` and `goals`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cxr.data import DataError
from cxr.synthetic import generate_synthetic_nih

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"
RATIO_KEYS = ["png_pipeline_vs_decode", "cache_vs_png_pipeline", "train_step_vs_bare", "eval_vs_bare_forward",
              "gradcam14_vs_forward", "data_wait_fraction", "predict_files_vs_bare_forward"]
FIGURE_KEYS = ["decode_images_per_s_per_core", "png_pipeline_images_per_s_per_core",
               "cache_pipeline_images_per_s_per_core", "train_step_images_per_s", "bare_train_step_images_per_s",
               "predict_images_per_s", "bare_forward_images_per_s",
               "gradcam14_seconds_per_batch", "forward_seconds_per_batch", "data_wait_seconds",
               "end_to_end_train_images_per_s", "total_seconds", "train_step_phase1_images_per_s",
               "train_step_phase2_images_per_s", "data_wait_first_batch_seconds_phase1",
               "data_wait_first_batch_seconds_phase2", "end_to_end_train_images_per_s_phase1",
               "highres64_plain_step_seconds", "highres64_memory_efficient_step_seconds",
               "highres64_plain_peak_rss_mb", "highres64_memory_efficient_peak_rss_mb"]
TINY = ["--device", "cpu", "--image-size", "64", "--batch-size", "2", "--steps", "1", "--warmup", "1",
        "--max-images", "6", "--rounds", "2", "--workers", "1", "--synthetic-patients", "4", "--synthetic-size", "64",
        "--epoch-images", "4", "--highres-size", "64", "--highres-batch", "2"]


@pytest.fixture(scope="module")
def benchmark_module():
    spec = importlib.util.spec_from_file_location("cxr_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    """The script run the way a user would, from outside the checkout, on a tiny synthetic set."""
    folder = tmp_path_factory.mktemp("benchmark")
    report_path = folder / "report.json"
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["OMP_NUM_THREADS"] = "1"  # a structure test: one thread is faster on a shared 2-core machine
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json", str(report_path)], cwd=folder,
                            capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(report_path.read_text())


@pytest.mark.slow
def test_report_structure(tiny_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, report = tiny_run
    assert list(report) == ["device", "cpu_count", "torch_threads", "amp", "memory_format", "image_size", "batch_size",
                            "steps", "warmup", "rounds", "workers", "epoch_images", "figures", "ratios", "spread",
                            "ratio_rounds", "goals", "goals_met"]
    # The trainer's own CPU policy: no autocast (bf16 is 10x slower on CPUs without it); the format is its choice.
    assert (report["device"], report["amp"]) == ("cpu", "off")
    assert report["memory_format"] in ("channels_last", "contiguous")
    settings = [report[name] for name in ("image_size", "batch_size", "steps", "warmup", "rounds", "workers",
                                          "epoch_images")]
    assert settings == [64, 2, 1, 1, 2, 1, 4]
    assert report["cpu_count"] >= 1 and report["torch_threads"] == 1  # OMP_NUM_THREADS, as set above
    assert list(report["ratios"]) == RATIO_KEYS
    assert list(report["goals"]) == RATIO_KEYS and list(report["goals_met"]) == RATIO_KEYS
    assert list(report["spread"]) == RATIO_KEYS and list(report["ratio_rounds"]) == RATIO_KEYS
    assert report["goals"] == {"png_pipeline_vs_decode": ">= 0.85", "cache_vs_png_pipeline": ">= 10",
                               "train_step_vs_bare": ">= 0.98", "eval_vs_bare_forward": ">= 0.9",
                               "gradcam14_vs_forward": "<= 2", "data_wait_fraction": "< 0.02",
                               "predict_files_vs_bare_forward": ">= 0.9"}
    for name, value in report["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    assert report["ratios"]["data_wait_fraction"] < 1.0  # a share of the epoch
    for name, values in report["ratio_rounds"].items():  # the ratio is the median of its rounds (two here)
        assert len(values) == 2 and report["ratios"][name] == pytest.approx(sum(values) / 2, rel=1e-3), name
        expected = (max(values) - min(values)) / 2 / report["ratios"][name]
        # The rounds are stored to 4 significant digits, so their difference is known to about 1e-3 of the ratio.
        assert report["spread"][name] == pytest.approx(expected, rel=1e-2, abs=1e-3), name
    figures = report["figures"]
    assert figures["epoch_images"] == 4 and figures["epoch_distinct_images"] == 4
    # One process per setting: each measured its own peak, which includes its state before training.
    for setting in ("plain", "memory_efficient"):
        assert figures[f"highres64_{setting}_peak_rss_mb"] >= figures[f"highres64_{setting}_rss_before_training_mb"] > 0
    assert figures["highres64_memory_efficient_vs_plain_step_seconds"] == pytest.approx(
        figures["highres64_memory_efficient_step_seconds"] / figures["highres64_plain_step_seconds"], rel=2e-3)
    for name in FIGURE_KEYS:
        value = report["figures"][name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)
    assert report["figures"]["benchmark_files"] == 6 and report["figures"]["source_image_px"] == 64
    assert "gpu_train_images_per_s" not in report["figures"] and "peak_gpu_memory_gb" not in report["figures"]


@pytest.mark.slow
def test_goals_met_follow_ratios_and_goals(tiny_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, report = tiny_run
    comparisons = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__}
    for name, goal in report["goals"].items():
        op, limit = goal.split()
        assert isinstance(report["goals_met"][name], bool)
        assert report["goals_met"][name] == comparisons[op](report["ratios"][name], float(limit)), name
    # Each ratio is the median of its rounds; the figures are medians of the raw timings. With two rounds both are
    # means, so the ratio of two figures is a mediant of the per-round ratios and lies between them.
    figures, rounds = report["figures"], report["ratio_rounds"]
    for name, expected in (
            ("png_pipeline_vs_decode",
             figures["png_pipeline_images_per_s_per_core"] / figures["decode_images_per_s_per_core"]),
            ("train_step_vs_bare", figures["train_step_images_per_s"] / figures["bare_train_step_images_per_s"]),
            ("gradcam14_vs_forward", figures["gradcam14_seconds_per_batch"] / figures["forward_seconds_per_batch"])):
        assert min(rounds[name]) * (1 - 2e-3) <= expected <= max(rounds[name]) * (1 + 2e-3), (name, expected)


@pytest.mark.slow
def test_table_printed(tiny_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    result, report = tiny_run
    assert "device cpu," in result.stdout and f"AMP off, {report['memory_format']};" in result.stdout
    assert f"{report['torch_threads']} torch thread(s)" in result.stdout
    lines = result.stdout.splitlines()
    for name in RATIO_KEYS:
        cells = next(line for line in lines if line.startswith(name + " ")).split()
        assert cells[:6] == [name, f"{report['ratios'][name]:.4g}", *report["goals"][name].split(),
                             "yes" if report["goals_met"][name] else "NO", f"+-{100 * report['spread'][name]:.1f}%"]
    assert "(goal is for GPUs)" in result.stdout


def test_only_images_on_disk_up_to_max_images(benchmark_module, tmp_path: Path) -> None:
    source = tmp_path / "nih"
    generate_synthetic_nih(source, patients=4, size=64, seed=0)
    names = sorted(path.name for path in (source / "images").glob("*.png"))
    (source / "images" / names[0]).unlink()  # a partial download
    args = argparse.Namespace(data_dir=str(source), max_images=5, epoch_images=0, synthetic_patients=4,
                              synthetic_size=64, workers=1)
    work = tmp_path / "work"
    work.mkdir()
    files_dir, source_size = benchmark_module.prepare_files(args, work)
    linked = sorted(path.name for path in (files_dir / "images").iterdir())
    table = pd.read_csv(files_dir / "Data_Entry_2017.csv")
    assert source_size == 64 and len(linked) == 5 and names[0] not in linked
    assert sorted(table["Image Index"]) == linked


def test_too_few_images_names_the_folder(benchmark_module, tmp_path: Path) -> None:
    source = tmp_path / "nih"
    generate_synthetic_nih(source, patients=2, size=64, seed=0)
    for path in sorted((source / "images").glob("*.png"))[1:]:
        path.unlink()
    args = argparse.Namespace(data_dir=str(source), max_images=64, epoch_images=0, synthetic_patients=4,
                              synthetic_size=64, workers=1)
    with pytest.raises(DataError, match=f"--data-dir {source}: 1 image\\(s\\) of Data_Entry_2017.csv on disk"):
        benchmark_module.prepare_files(args, tmp_path)


def test_missing_data_dir_exits_2(benchmark_module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert benchmark_module.main(["--device", "cpu", "--data-dir", str(tmp_path / "absent")]) == 2
    assert f"error: --data-dir {tmp_path / 'absent'}: no such folder" in capsys.readouterr().err


def test_bad_sizes_name_the_flag(benchmark_module, capsys: pytest.CaptureFixture) -> None:
    assert benchmark_module.main(["--device", "cpu", "--batch-size", "1", "--steps", "0"]) == 2
    assert "error: --batch-size must be at least 2; --steps must be at least 1" in capsys.readouterr().err


def test_device_defaults(benchmark_module) -> None:
    args = benchmark_module.parse_args([])
    gpu = benchmark_module.resolve_defaults(args, cuda=True, cpus=16)
    assert (gpu.image_size, gpu.batch_size, gpu.steps, gpu.warmup, gpu.workers) == (224, 128, 30, 5, 8)
    assert (gpu.epoch_images, gpu.highres_size, gpu.highres_batch, gpu.rounds) == (4096, 512, 32, 5)
    cpu = benchmark_module.resolve_defaults(benchmark_module.parse_args(["--workers", "0"]), cuda=False, cpus=2)
    assert (cpu.image_size, cpu.batch_size, cpu.steps, cpu.warmup, cpu.workers) == (128, 8, 3, 1, 0)
    assert (cpu.epoch_images, cpu.highres_batch) == (128, 4)


def test_evaluation_report_only(benchmark_module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report_path = tmp_path / "evaluation.json"
    assert benchmark_module.main(["--only", "evaluation-report", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    figures = report["figures"]
    assert list(figures) == ["evaluation_report_seconds", "comparison_seconds", "full_evaluation_report_seconds"]
    assert all(value > 0 for value in figures.values())
    assert figures["full_evaluation_report_seconds"] == pytest.approx(
        figures["evaluation_report_seconds"] + figures["comparison_seconds"], rel=1e-3)
    assert report["goal_seconds"] == 10.0 and report["goal_met"] == (figures["full_evaluation_report_seconds"] < 10.0)
    assert "25,596 x 14 predictions, one core" in capsys.readouterr().out


def test_synthetic_files_cover_the_data_wait_epoch(benchmark_module, tmp_path: Path) -> None:
    """--epoch-images distinct images: more synthetic patients are generated than --synthetic-patients asks."""
    args = argparse.Namespace(data_dir="", max_images=4, epoch_images=30, synthetic_patients=2, synthetic_size=64,
                              workers=1)
    files_dir, _ = benchmark_module.prepare_files(args, tmp_path)
    assert len(list((files_dir / "images").iterdir())) == 30


def test_round_statistics(benchmark_module) -> None:
    assert benchmark_module.per_round([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert benchmark_module.median([1.0, 9.0, 2.0]) == 2.0
    assert benchmark_module.spread([0.9, 1.0, 1.1]) == pytest.approx(0.1)  # every round within +-10%
    assert benchmark_module.spread([0.1, 1.0, 1.0]) == pytest.approx(0.45)  # one disturbed round shows
    with pytest.raises(ValueError):
        benchmark_module.per_round([1.0], [1.0, 2.0])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_memory_figures_are_this_process(benchmark_module) -> None:
    peak, now = benchmark_module.memory_mb("VmHWM"), benchmark_module.memory_mb("VmRSS")
    assert peak >= now > 10
