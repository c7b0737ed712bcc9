"""Tests for cxr.checkpoint: atomic save, strict loading, the schema and its version, unwrapping, state copies, path lookup."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from cxr.checkpoint import (
    SCHEMA_VERSION,
    CheckpointError,
    build_checkpoint,
    find_latest_best,
    load_checkpoint,
    model_state_for_saving,
    resolve_checkpoint_path,
    restore_checkpoint,
    save_checkpoint,
    save_epoch_checkpoints,
    unwrap_model,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def cxr_state(model: nn.Module) -> dict:
    return {"schema_version": SCHEMA_VERSION, "model": model_state_for_saving(model),
            "config": {"lr": 1e-3, "name": "demo", "note": None}, "epoch": 2}


class WritesMarkerWhenUnpickled:
    """A payload whose unpickling creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = tiny_model()
    state = cxr_state(model)
    path = save_checkpoint(state, tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(path)
    assert loaded["config"] == {"lr": 1e-3, "name": "demo", "note": None} and loaded["epoch"] == 2
    assert loaded["model"].keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)
    assert os.listdir(tmp_path / "run") == ["last.pt"]


def test_failure_mid_save_keeps_previous_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"schema_version": SCHEMA_VERSION, "model": {"w": torch.ones(2)}, "config": {"epoch": 1}}, path)

    def partial_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"schema_version": SCHEMA_VERSION, "model": {"w": torch.zeros(2)}, "config": {"epoch": 2}}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["config"] == {"epoch": 1} and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_code_running_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": WritesMarkerWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt: it holds pickled Python objects") as info:
        load_checkpoint(path)
    assert "only loads plain tensors and containers" in str(info.value)
    assert not marker.exists()
    # The payload is real: unrestricted unpickling does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(cxr_state(tiny_model()), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {path}: the file is truncated, corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not written by torch.save"):
        load_checkpoint(path)


def test_missing_file_and_missing_keys_are_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"not a cxr checkpoint: missing keys \['config'\] \(found \['epoch', 'model'\]\)"):
        load_checkpoint(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        load_checkpoint(path)


def test_unwrap_compiled_model_drops_orig_mod_prefix() -> None:
    model = tiny_model()
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first call
    assert all(key.startswith("_orig_mod.") for key in compiled.state_dict())
    assert unwrap_model(compiled) is model
    assert model_state_for_saving(compiled).keys() == model.state_dict().keys()


def test_unwrap_real_ddp_and_nesting(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        ddp_outside = nn.parallel.DistributedDataParallel(torch.compile(model))  # nanoGPT's order
        compile_outside = torch.compile(nn.parallel.DistributedDataParallel(model))
        assert all(key.startswith("module._orig_mod.") for key in ddp_outside.state_dict())
        assert all(key.startswith("_orig_mod.module.") for key in compile_outside.state_dict())
        for wrapped in (ddp_outside, compile_outside):
            assert unwrap_model(wrapped) is model
            assert list(model_state_for_saving(wrapped)) == list(model.state_dict())
    finally:
        dist.destroy_process_group()


def test_unwrap_leaves_a_submodule_named_module_alone() -> None:
    class HasModuleAttribute(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    model = HasModuleAttribute()
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(model)) is model


def test_saved_state_does_not_alias_the_live_model() -> None:
    model = tiny_model()
    saved = model_state_for_saving(model)
    before = {name: tensor.clone() for name, tensor in saved.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.train()(torch.randn(5, 3))  # updates BatchNorm running statistics (buffers)
    for name, tensor in saved.items():
        assert torch.equal(tensor, before[name]), name
        assert not tensor.requires_grad and tensor.device.type == "cpu"
    assert not torch.equal(saved["1.running_mean"], model.state_dict()["1.running_mean"])


def test_other_schema_versions_are_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    save_checkpoint({"model": {}, "config": {}}, path)  # the first release wrote no version: version 1
    with pytest.raises(CheckpointError, match=rf"{path} uses checkpoint schema version 1, this code reads version "
                                              rf"{SCHEMA_VERSION}: it was written by an older version of cxr"):
        load_checkpoint(path)
    save_checkpoint({"schema_version": SCHEMA_VERSION + 1, "model": {}, "config": {}}, path)
    with pytest.raises(CheckpointError, match=rf"version {SCHEMA_VERSION + 1}, this code reads .*a newer version"):
        load_checkpoint(path)


def training_objects(model: nn.Module):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def test_build_and_restore_round_trip_every_part(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler, scaler = training_objects(model)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    counters = {"epoch": 3, "global_step": 30, "best_metric": 0.7, "best_epoch": 1, "bad_epochs": 1,
                "history": [{"epoch": 1}], "position": {}}
    state = build_checkpoint(model, optimizer, scheduler, scaler, config={"lr": 0.01}, phase=2, counters=counters,
                             val_aurocs=np.array([0.5, 0.75]))
    assert state["schema_version"] == SCHEMA_VERSION and state["phase"] == 2 and state["val_aurocs"] == [0.5, 0.75]
    save_checkpoint(state, tmp_path / "last.pt")
    fresh = tiny_model()
    torch.nn.init.zeros_(fresh[0].weight)
    fresh_optimizer, fresh_scheduler, fresh_scaler = training_objects(fresh)
    restored = restore_checkpoint(load_checkpoint(tmp_path / "last.pt"), fresh, fresh_optimizer, fresh_scheduler, fresh_scaler)
    assert restored == counters
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    assert fresh_scheduler.last_epoch == 3 and fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="counters lack"):
        build_checkpoint(model, optimizer, scheduler, scaler, config={}, phase=1, counters={"epoch": 1})


def test_best_is_the_same_file_as_last_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (saves.append(1), real_save(*args, **kwargs)))
    state = cxr_state(tiny_model())
    save_epoch_checkpoints({**state, "epoch": 1}, tmp_path, improved=True)
    assert len(saves) == 1  # serialized once for both files
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    save_epoch_checkpoints({**state, "epoch": 2}, tmp_path, improved=False)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2 and load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_best_is_never_older_than_last_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between the two renames: best.pt is already the new best, last.pt still the previous epoch."""
    state = cxr_state(tiny_model())
    save_epoch_checkpoints({**state, "epoch": 1, "best_epoch": 0}, tmp_path, improved=True)
    real_replace = os.replace

    def killed_before_last(source, target):
        if Path(target).name == "last.pt":
            raise KeyboardInterrupt  # the process dies here
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_before_last)
    with pytest.raises(KeyboardInterrupt):
        save_epoch_checkpoints({**state, "epoch": 2, "best_epoch": 1}, tmp_path, improved=True)
    monkeypatch.setattr(os, "replace", real_replace)
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert (last["epoch"], best["epoch"]) == (1, 2)  # best >= what last.pt records: never stale
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # the temporary file is gone


def test_resolve_checkpoint_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp1"
    run_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"run directory {run_dir} has no last\.pt"):
        resolve_checkpoint_path(run_dir)
    (run_dir / "last.pt").write_bytes(b"x")
    (run_dir / "best.pt").write_bytes(b"x")
    assert resolve_checkpoint_path(run_dir) == run_dir / "last.pt"
    assert resolve_checkpoint_path(run_dir / "best.pt") == run_dir / "best.pt"
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a run directory"):
        resolve_checkpoint_path(tmp_path / "missing")


def test_find_latest_best_picks_newest_by_mtime(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match=r"train first: python train\.py"):
        find_latest_best(runs)
    now = time.time()
    for age, name in ((300, "old"), (10, "new"), (100, "middle")):
        (runs / name).mkdir(parents=True)
        (runs / name / "best.pt").write_bytes(b"x")
        os.utime(runs / name / "best.pt", (now - age, now - age))
    (runs / "newest_without_best").mkdir()
    (runs / "newest_without_best" / "last.pt").write_bytes(b"x")
    assert find_latest_best(runs) == runs / "new" / "best.pt"
