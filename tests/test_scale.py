"""Training at scale on CPU: gradient accumulation, per-sample seeds with persistent workers, mid-epoch resume,
preemption signals (also during validation and the checkpoint write), kill -9 at random moments, torchrun restarts
after a lost worker, metrics.jsonl."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxr.checkpoint import load_checkpoint
from cxr.config import Config
from cxr.data import load_nih
from cxr.device import DevicePolicy
from cxr.distributed import DistContext, RankZero
from cxr.engine import train_one_epoch
from cxr.factory import make_dataset, make_loader, start_epoch
from cxr.preemption import PREEMPTED_EXIT_CODE
from cxr.rundir import append_metrics
from cxr.transforms import Preprocessing

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TINY = ["--image-size", "64", "--batch-size", "4", "--weights", "none", "--hidden", "32", "--tensorboard", "false",
        "--log-every", "1", "--device", "cpu"]


def environment(threads: str = "1") -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}


def start(args: list[str], log: Path, nproc: int = 1, cwd: Path = REPO, extra: list[str] = ()) -> subprocess.Popen:
    """Launch train.py (python or torchrun) with its output in the file `log` (a pipe left unread while torchrun
    restarts its workers stalled the job here)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}", *extra]
    with open(log, "w") as handle:
        process = subprocess.Popen(launcher + [str(REPO / "train.py"), *args], cwd=cwd, env=environment(),
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    return process


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 240, poll: float = 0.2) -> None:
    """Wait until the process's output contains `needle`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if needle in process.log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(poll)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"never saw {needle!r}:\n" + process.log.read_text(errors="replace")[-3000:])


def finish(process: subprocess.Popen, timeout: float) -> str:
    """Wait for the end and return the whole output; on a timeout the process group (torchrun and workers) is killed."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.log.read_text(errors="replace")


def model_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from cxr.synthetic import generate_synthetic_nih

    root = tmp_path_factory.mktemp("nih-scale") / "data"
    generate_synthetic_nih(root, patients=14, size=64, seed=3)
    return root


def test_accumulated_micro_batches_equal_one_larger_batch():
    """K micro-batches of n give the update of one batch of K*n (a model without BatchNorm or dropout: BN
    normalizes each micro-batch with its own statistics, which is the one intended difference)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    labels = (torch.rand(8, 14) > 0.5).float()
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 14))
    results = []
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = DataLoader(TensorDataset(images.float() / 255, labels, torch.arange(8)), batch_size=batch)
        stats = train_one_epoch(model, nn.BCEWithLogitsLoss(), optimizer, loader, CPU, RankZero(CPU, None),
                                DevicePolicy(CPU.device), epoch=0, global_step=0, accum_steps=accum)
        assert stats["steps"] == 1 and stats["global_step"] == 1
        results.append([parameter.detach().clone() for parameter in model.parameters()])
    for other in results[1:]:
        for expected, got in zip(results[0], other):
            assert torch.allclose(expected, got, rtol=0, atol=1e-6)  # float32 sums in another order
    assert not torch.equal(results[0][0], base[1].weight)  # the step did move the weights


def _batches(loader: DataLoader) -> list[torch.Tensor]:
    return [images.clone() for images, _, _ in loader]


def test_per_sample_seeds_persistent_workers_and_skipping_replay_an_epoch(tiny_data):
    config = Config(data_dir=str(tiny_data), image_size=64, batch_size=4, workers=1, augment_strength=1.0)
    data = load_nih(tiny_data, split="random", seed=0)
    dataset = make_dataset(config, data, "train", Preprocessing.from_config(config), train=True)
    persistent = make_loader(dataset, config, CPU, train=True)
    assert persistent.persistent_workers
    start_epoch(persistent, config, CPU, 0)
    first = _batches(persistent)
    start_epoch(persistent, config, CPU, 1)
    second = _batches(persistent)  # the same worker process as epoch 0
    fresh = make_loader(dataset, Config(**{**config.to_dict(), "workers": 0}), CPU, train=True)
    start_epoch(fresh, config, CPU, 1)
    assert all(torch.equal(a, b) for a, b in zip(second, _batches(fresh)))
    start_epoch(fresh, config, CPU, 1, skip_batches=2)
    skipped = _batches(fresh)
    assert len(skipped) == len(second) - 2 and all(torch.equal(a, b) for a, b in zip(second[2:], skipped))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # epochs differ


def test_metrics_jsonl_replaces_a_redone_epoch(tmp_path):
    for epoch in (1, 2, 3):
        append_metrics(tmp_path, {"epoch": epoch, "train_loss": float(epoch)})
    append_metrics(tmp_path, {"epoch": 3, "train_loss": 30.0})  # epoch 3 redone after a kill before its checkpoint
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3] and lines[-1]["train_loss"] == 30.0


def test_mid_epoch_stop_then_resume_equals_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch, capsys):
    import cxr.preemption
    import train

    common = ["--data-dir", str(tiny_data), "--epochs", "2", "--warmup-epochs", "2", "--max-steps-per-epoch", "4",
              "--workers", "1", *TINY]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert train.main([*common, "--out", str(straight)]) == 0
    polls = {"count": 0}

    def stop_after_some_steps(self) -> bool:
        polls["count"] += 1
        return polls["count"] >= 8  # epoch 2, step 2: per epoch one poll per step, one at its end, one after saving

    monkeypatch.setattr(cxr.preemption.StopSignals, "requested", stop_after_some_steps)
    assert train.main([*common, "--out", str(interrupted), "--resume", "auto"]) == PREEMPTED_EXIT_CODE
    saved = load_checkpoint(interrupted / "last.pt")
    assert saved["epoch"] == 1 and saved["position"]["batches"] == 2 and saved["position"]["steps"] == 2
    monkeypatch.undo()
    assert train.main([*common, "--out", str(interrupted), "--resume", "auto"]) == 0
    assert "resumed from epoch 1, batch 2 of epoch 2" in capsys.readouterr().out
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    assert model_equal(a["model"], b["model"]) and a["global_step"] == b["global_step"] == 8
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2]
    assert records[1]["train_loss"] == a["history"][1]["train_loss"]


@pytest.mark.parametrize("moment", ["validation", "checkpoint write"])
def test_a_signal_during_validation_or_the_checkpoint_write_completes_it_then_exits_75(tiny_data, tmp_path, monkeypatch,
                                                                                        capsys, moment):
    """SIGUSR1 arrives inside validation / inside the checkpoint write of epoch 1: that work completes, the epoch's
    checkpoint is whole, the run exits 75, and --resume auto finishes the remaining epoch."""
    import cxr.trainer
    import train

    target = "predict" if moment == "validation" else "save_epoch_checkpoints"
    original, sent = getattr(cxr.trainer, target), []

    def signalled(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cxr.trainer, target, signalled)
    out = tmp_path / "run"
    args = ["--data-dir", str(tiny_data), "--epochs", "2", "--warmup-epochs", "2", "--max-steps-per-epoch", "2",
            "--workers", "0", "--out", str(out), "--resume", "auto", *TINY]
    assert train.main(args) == PREEMPTED_EXIT_CODE
    assert sent == [True]
    assert "stopped by a signal at the end of epoch 1" in capsys.readouterr().out
    saved = load_checkpoint(out / "last.pt")
    assert saved["epoch"] == 1 and saved["position"] == {} and len(saved["history"]) == 1
    assert load_checkpoint(out / "best.pt")["epoch"] == 1
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert train.main(args) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2]


@pytest.mark.slow
def test_sigterm_saves_the_position_and_exits_75_then_resume_auto_finishes(tiny_data, tmp_path):
    """The signal goes out as soon as training starts: the 4 epochs left after it take seconds (batch 2, up to
    19 steps each), against a poll of 0.05 s, so the stop always lands before the end of the run."""
    out = tmp_path / "run"
    args = ["--data-dir", str(tiny_data), "--epochs", "4", "--warmup-epochs", "4", "--workers", "1", "--out", str(out),
            "--resume", "auto", *TINY, "--batch-size", "2"]
    process = start(args, tmp_path / "first.log")
    wait_for_line(process, "phase 1", poll=0.05)
    process.send_signal(signal.SIGTERM)
    output = finish(process, 240)
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    assert "stopped by SIGTERM" in output or "stopped by a signal" in output, output[-3000:]
    saved = load_checkpoint(out / "last.pt")
    assert saved["epoch"] < 4, output[-3000:]
    process = start(args, tmp_path / "second.log")
    output = finish(process, 300)
    assert process.returncode == 0, output[-3000:]
    assert "resumed from epoch" in output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3, 4]
    assert load_checkpoint(out / "last.pt")["epoch"] == 4


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_loadable_last_pt(tiny_data, tmp_path):
    out, rng = tmp_path / "run", random.Random(14)
    args = ["--data-dir", str(tiny_data), "--epochs", "50", "--warmup-epochs", "50", "--max-steps-per-epoch", "1",
            "--workers", "0", "--out", str(out), "--resume", "auto", *TINY]
    epochs = []
    for attempt in range(3):
        process = start(args, tmp_path / f"attempt{attempt}.log")
        wait_for_line(process, "projected:" if attempt == 0 else "resumed from")  # a checkpoint exists from here on
        time.sleep(rng.uniform(0.0, 3.0))
        process.kill()  # SIGKILL: no handler runs
        process.wait(timeout=60)
        epochs.append(load_checkpoint(out / "last.pt")["epoch"])  # weights_only, schema checked
    assert epochs == sorted(epochs) and epochs[-1] > epochs[0]  # each restart continued, never restarted at 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_torchrun_restarts_after_a_lost_worker_and_finishes(tiny_data, tmp_path):
    """Two gloo ranks, no --out: the run directory comes from the rendezvous id; one rank is killed mid-run.

    Before the per-restart store prefix (cxr.distributed._process_group_store) the restarted group read the dead
    group's addresses from torchrun's shared store and every restart failed with "Connection refused"."""
    args = ["--data-dir", str(tiny_data), "--epochs", "3", "--warmup-epochs", "3", "--max-steps-per-epoch", "20",
            "--workers", "0", *TINY]
    process = start(args, tmp_path / "torchrun.log", nproc=2, cwd=tmp_path, extra=["--max-restarts=2"])
    wait_for_line(process, "epoch 1/3")
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # one worker lost in epoch 2
    output = finish(process, 240)
    assert "Connection refused" not in output, output[-4000:]
    assert process.returncode == 0, output[-4000:]
    assert "resuming" in output and "resumed from epoch" in output, output[-4000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1  # runs/<rendezvous id>, the same before and after the restart
    last, best = load_checkpoint(run_dirs[0] / "last.pt"), load_checkpoint(run_dirs[0] / "best.pt")
    assert last["epoch"] == 3 and last["position"] == {} and 1 <= best["epoch"] <= 3
    records = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_writes_every_part(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--device",
                             "cpu", "--quick"], env=environment("2"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == ["train", "fp16", "evaluate", "gradcam", "memory", "loader", "train_py"]
    assert all(part["ok"] for part in report["parts"].values())
    assert report["parts"]["train"]["eager_phase2_batch4"]["images_per_s"] > 0
    assert report["parts"]["memory"]["64px_memory_efficient"]["images_per_s"] > 0
    assert report["parts"]["train_py"]["returncode"] == 0 and report["parts"]["train_py"]["lines"]


@pytest.mark.slow
def test_compiled_ddp_model_trains_under_torchrun_on_cpu(tiny_data, tmp_path):
    """--compile wraps the DDP module (inductor on CPU, gloo): the step runs compiled on both ranks and the
    checkpoint holds the plain model's keys (no _orig_mod. or module. prefix), so evaluate.py loads it."""
    out = tmp_path / "run"
    args = ["--data-dir", str(tiny_data), "--epochs", "1", "--warmup-epochs", "1", "--max-steps-per-epoch", "2",
            "--workers", "0", "--out", str(out), "--compile", *TINY]
    process = start(args, tmp_path / "torchrun.log", nproc=2)
    output = finish(process, 540)
    assert process.returncode == 0, output[-4000:]
    checkpoint = load_checkpoint(out / "best.pt")
    assert checkpoint["config"]["compile"] is True
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in checkpoint["model"]), list(checkpoint["model"])[:3]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1] and records[0]["train_loss"] > 0
