"""Training: phases, checkpoints, resume, DDP under torchrun (gloo on CPU), non-finite loss, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cxr.checkpoint import load_checkpoint
from cxr.config import Config
from cxr.device import DevicePolicy
from cxr.distributed import DistContext, RankZero
from cxr.engine import NonFiniteLossError, train_one_epoch
from cxr.losses import LabelSmoothedBCE
from cxr.model import STAGES, build_model, stages_to_unfreeze
from cxr.synthetic import generate_synthetic_nih

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TINY_RUN = ["--image-size", "64", "--batch-size", "8", "--workers", "0", "--weights", "none", "--hidden", "32",
            "--max-steps-per-epoch", "2", "--tensorboard", "false"]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command-line tool as a user would: python SCRIPT or torchrun --standalone --nproc_per_node=N SCRIPT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONPATH": str(REPO)}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih") / "data"
    generate_synthetic_nih(root, patients=14, size=64, seed=3)
    return root


def tiny_loader(n: int = 16, size: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=generator)
    labels = (torch.rand(n, 14, generator=generator) > 0.7).float()
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=8)


def parameters_by_stage(model) -> dict[str, list[torch.Tensor]]:
    stages = {stage: [p.detach().clone() for m in model.stage_modules(stage) for p in m.parameters()] for stage in STAGES}
    stages["head"] = [p.detach().clone() for p in model.head.parameters()]
    stages["trunk_buffers"] = [b.detach().clone() for b in model.features.buffers()]
    return stages


def changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("phase,unfreeze,expected", [
    (1, "2", set()),
    (2, "1", {"block4"}),
    (2, "2", {"block3", "block4"}),
    (2, "all", set(STAGES)),
])
def test_phases_train_exactly_the_requested_stages(phase, unfreeze, expected):
    torch.manual_seed(0)
    model = build_model("none", hidden=(32,))
    trainable = set() if phase == 1 else stages_to_unfreeze(unfreeze)
    assert trainable == expected
    model.set_trainable_stages(trainable)
    before = parameters_by_stage(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_one_epoch(model, LabelSmoothedBCE(0.1), optimizer, tiny_loader(), CPU, RankZero(CPU, None), DevicePolicy(CPU.device),
                    epoch=0, global_step=0)
    after = parameters_by_stage(model)
    assert changed(before["head"], after["head"])
    for stage in STAGES:
        assert changed(before[stage], after[stage]) == (stage in expected), stage
    if phase == 1:  # frozen BatchNorm layers keep their running statistics too
        assert not changed(before["trunk_buffers"], after["trunk_buffers"])
        assert all(not m.training for m in model.features.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_non_finite_loss_stops_with_a_clear_message():
    model = build_model("none", hidden=(32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def nan_loss(logits, targets):
        return logits.sum() * float("nan")

    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at epoch 1, step 1"):
        train_one_epoch(model, nan_loss, optimizer, tiny_loader(), CPU, RankZero(CPU, None), DevicePolicy(CPU.device),
                        epoch=0, global_step=0)


@pytest.mark.slow
def test_single_process_run_writes_complete_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train.py", "--data-dir", str(tiny_data), "--epochs", "2", "--warmup-epochs", "1",
                      "--out", str(out), *TINY_RUN[:-2]])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phase 1: training the head (trunk frozen)" in result.stdout
    assert "phase 2: training the head and trunk stages ['block3', 'block4']" in result.stdout
    assert f"best checkpoint: {out / 'best.pt'}" in result.stdout
    assert "tensorboard --logdir" in result.stdout
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = load_checkpoint(out / "last.pt")  # weights_only=True inside
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "phase", "best_metric", "bad_epochs", "schema_version",
                "config", "class_names", "global_step"):
        assert key in checkpoint, key
    assert checkpoint["epoch"] == 2 and checkpoint["phase"] == 2 and checkpoint["global_step"] == 4
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["model"])
    assert Config.from_dict(checkpoint["config"]).image_size == 64
    assert checkpoint["class_names"][0] == "Atelectasis" and len(checkpoint["class_names"]) == 14
    assert load_checkpoint(out / "best.pt")["epoch"] == checkpoint["best_epoch"] + 1


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process_structure(tiny_data, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ["train.py", "--data-dir", str(tiny_data), "--epochs", "2", "--warmup-epochs", "1", *TINY_RUN]
    assert run_cli(args + ["--out", str(single)]).returncode == 0
    result = run_cli(args + ["--out", str(ddp)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cxr train: run") == 1  # only rank 0 prints
    one, two = load_checkpoint(single / "last.pt"), load_checkpoint(ddp / "last.pt")
    assert one.keys() == two.keys()
    assert {k: v.shape for k, v in one["model"].items()} == {k: v.shape for k, v in two["model"].items()}
    assert two["epoch"] == 2 and two["phase"] == 2
    assert two["config"]["out"] == str(ddp)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_data, tmp_path):
    # plateau: the schedule does not depend on --epochs, so "1 epoch, then resume to 2" is the same run as "2 epochs"
    common = ["train.py", "--data-dir", str(tiny_data), "--warmup-epochs", "1", "--scheduler", "plateau",
              "--augment-strength", "1", *TINY_RUN[:4], "--workers", "1", *TINY_RUN[6:]]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_cli(common + ["--epochs", "2", "--out", str(straight)]).returncode == 0
    assert run_cli(common + ["--epochs", "1", "--out", str(interrupted)]).returncode == 0
    result = run_cli(["train.py", "--resume", str(interrupted), "--epochs", "2", "--workers", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from epoch 1" in result.stdout
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    assert b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["best_metric"] == b["best_metric"]


@pytest.mark.slow
def test_bad_flags_and_data_get_clear_errors(tmp_path):
    result = run_cli(["train.py", "--epochs", "0"])
    assert result.returncode != 0 and "--epochs must be at least 1" in result.stderr
    result = run_cli(["train.py", "--data-dir", str(tmp_path / "nowhere")])
    assert result.returncode == 1 and f"--data-dir {tmp_path / 'nowhere'}: no such folder" in result.stderr
    result = run_cli(["train.py", "--resume", str(tmp_path / "missing-run")])
    assert result.returncode != 0 and "missing-run" in result.stderr


@pytest.mark.slow
def test_short_run_learns_the_synthetic_findings(tmp_path):
    """The whole loop learns: a minute of CPU training on synthetic data clearly beats chance on validation."""
    data_dir = tmp_path / "data"
    generate_synthetic_nih(data_dir, patients=150, size=64, seed=5)
    out = tmp_path / "run"
    result = run_cli(["train.py", "--data-dir", str(data_dir), "--out", str(out), "--image-size", "64", "--epochs", "6",
                      "--warmup-epochs", "1", "--unfreeze", "all", "--batch-size", "16", "--weights", "none",
                      "--workers", "0", "--val-fraction", "0.25", "--lr-warmup-steps", "10", "--trunk-lr-mult", "1",
                      "--tensorboard", "false"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = load_checkpoint(out / "best.pt")
    assert best["best_metric"] >= 0.65, best["history"]  # chance is 0.5; ~0.75 measured here
    assert sum(np.isfinite(best["val_aurocs"])) >= 12  # the mean covers (nearly) every finding


@pytest.mark.slow
def test_resume_validates_and_refuses_changes_it_cannot_apply(tiny_run, tmp_path):
    run_dir = Path(shutil.copytree(tiny_run["dir"], tmp_path / "copy"))
    before = (run_dir / "last.pt").read_bytes()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rate: 0.1\n")
    lr_yaml = tmp_path / "lr.yaml"
    lr_yaml.write_text("lr: 0.5\n")
    cases = [
        (["--config", str(bad_yaml)], f"--config {bad_yaml}: unknown option(s) learning_rate"),
        (["--config", str(lr_yaml)], "cannot change --lr (the run has 0.001, given 0.5) when resuming"),
        (["--lr", "0.5"], "cannot change --lr (the run has 0.001, given 0.5) when resuming"),
        (["--image-size", "8"], "cannot change --image-size (the run has 64, given 8)"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--out", str(tmp_path / "elsewhere")], "--out cannot differ from the --resume directory"),
    ]
    for flags, message in cases:
        result = run_cli(["train.py", "--resume", str(run_dir), *flags])
        assert result.returncode == 1, (flags, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, (flags, result.stderr[-2000:])
    assert (run_dir / "last.pt").read_bytes() == before  # nothing was touched


@pytest.mark.slow
def test_a_cache_with_other_preprocessing_is_one_line_without_traceback(tiny_data, tmp_path):
    from cxr.cache_build import build_cache
    from cxr.transforms import Preprocessing

    cache_dir = tmp_path / "cache"
    build_cache(tiny_data, cache_dir, Preprocessing(64), workers=1, progress=False)
    result = run_cli(["train.py", "--data-dir", str(tiny_data), "--cache-dir", str(cache_dir), "--clahe-clip", "3",
                      "--out", str(tmp_path / "run"), "--epochs", "1", "--warmup-epochs", "0", *TINY_RUN])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cache-dir")
    assert "clahe_clip: cache has 2.0, this run needs 3.0" in lines[0] and "scripts/prepare_cache.py" in lines[0]
