"""scripts/aggregate_runs.py: mean ± sd over seeds, refusal of runs that differ beyond the seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cxr.labels import FINDINGS
from tests.test_train import run_cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aggregate_runs.py"


@pytest.fixture(scope="module")
def aggregate_module():
    spec = importlib.util.spec_from_file_location("cxr_aggregate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def fake_run(root: Path, seed: int, mean: float, **config_changes) -> Path:
    run = root / f"seed{seed}"
    (run / "eval-test").mkdir(parents=True)
    config = {"data_dir": "/data/nih", "lr": 0.001, "epochs": 30, "seed": seed, "out": str(run), "workers": 8, **config_changes}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    classes = {name: {"auroc": mean + 0.01 * column, "metadata_auroc": 0.6} for column, name in enumerate(FINDINGS)}
    classes["Hernia"]["auroc"] = None  # undefined in every run
    metrics = {"classes": classes, "mean_auroc": mean, "n_images": 100, "split": "test", "tta": "none",
               "metadata_baseline": {"mean_auroc": 0.6}, "headline": {"val_minus_evaluated": 0.03},
               "run": {"split": "test", "tta": "none", "calibration": "temperature"}}
    (run / "eval-test" / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_mean_and_sd_over_seeds(aggregate_module, tmp_path, capsys):
    runs = [fake_run(tmp_path, seed, mean) for seed, mean in enumerate((0.80, 0.82, 0.84))]
    assert aggregate_module.main([*map(str, runs), "--out", str(tmp_path / "agg")]) == 0
    result = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    assert result["mean_auroc"]["mean"] == pytest.approx(0.82) and result["mean_auroc"]["sd"] == pytest.approx(0.02)
    mass = result["classes"]["Mass"]["auroc"]
    assert mass["mean"] == pytest.approx(0.86) and (mass["min"], mass["max"]) == pytest.approx((0.84, 0.88))
    assert result["classes"]["Hernia"]["auroc"]["n"] == 0 and result["seeds"] == [0, 1, 2]
    assert result["val_minus_evaluated"]["mean"] == pytest.approx(0.03)
    printed = capsys.readouterr().out
    assert "0.820 ± 0.020" in printed and "3 runs (seeds 0, 1, 2)" in printed
    rows = (tmp_path / "agg" / "aggregate.csv").read_text().splitlines()
    assert rows[0].startswith("finding,auroc_mean,auroc_sd") and rows[-1].startswith("mean,0.82")
    assert np.isclose(float(rows[-1].split(",")[2]), 0.02)


def test_runs_that_differ_beyond_the_seed_are_refused(aggregate_module, tmp_path, capsys):
    runs = [fake_run(tmp_path, 0, 0.8), fake_run(tmp_path, 1, 0.81, lr=0.0003)]
    assert aggregate_module.main(list(map(str, runs))) == 1
    err = capsys.readouterr().err
    assert "config lr: seed0=0.001, seed1=0.0003" in err and "--allow-differences" in err
    assert "workers" not in err and "config out" not in err  # bookkeeping keys do not count
    assert aggregate_module.main([*map(str, runs), "--allow-differences"]) == 0


@pytest.mark.slow
def test_cli_names_a_run_without_an_evaluation(tmp_path):
    run = fake_run(tmp_path, 0, 0.8)
    (run / "eval-test" / "metrics.json").unlink()
    result = run_cli([str(SCRIPT), str(run)])
    assert result.returncode == 1 and f"{run / 'eval-test' / 'metrics.json'}: no such file" in result.stderr
    assert "Traceback" not in result.stderr
