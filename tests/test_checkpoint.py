"""Tests for cxr.checkpoint: atomic save, strict loading, unwrapping, state copies, RNG state, path lookup."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from cxr.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest_best,
    load_checkpoint,
    model_state_for_saving,
    resolve_checkpoint_path,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def cxr_state(model: nn.Module) -> dict:
    return {"model": model_state_for_saving(model), "config": {"lr": 1e-3, "name": "demo", "note": None}, "epoch": 2}


class WritesMarkerWhenUnpickled:
    """A payload whose unpickling creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = tiny_model()
    state = cxr_state(model)
    state["rng"] = capture_rng_state()
    path = save_checkpoint(state, tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(path)
    assert loaded["config"] == {"lr": 1e-3, "name": "demo", "note": None} and loaded["epoch"] == 2
    assert loaded["model"].keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)
    assert os.listdir(tmp_path / "run") == ["last.pt"]


def test_failure_mid_save_keeps_previous_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"epoch": 1}}, path)

    def partial_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {"epoch": 2}}, path)
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


def test_rng_state_round_trip_reproduces_draws(tmp_path: Path) -> None:
    def draws() -> tuple:
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()  # and maybe in numpy's
    save_checkpoint({"model": {}, "config": {}, "rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = draws()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # also proves weights_only can load it
    assert draws() == expected


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
