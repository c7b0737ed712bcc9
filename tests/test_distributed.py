"""Tests for cxr.distributed: exact gather, flags, seeding, RankZero, and a real 2-process gloo job."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

from cxr.distributed import (
    DistContext,
    RankZero,
    any_rank,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_predictions,
    setup_distributed,
)
from cxr.errors import ConfigError
from cxr.seeding import seed_everything

TOTAL_SAMPLES = 7  # odd, so DistributedSampler pads 2 ranks to 8
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def single_process() -> DistContext:
    return DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def values_for(indices: torch.Tensor) -> torch.Tensor:
    """Deterministic per-sample 'predictions' [n, 3] so any rank can recompute them."""
    return torch.stack([indices * 10.0, indices * 10.0 + 1, -indices.float()], dim=1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_gather_sorts_and_keeps_first_duplicate() -> None:
    indices = torch.tensor([3, 1, 0, 2, 3, 1])
    values = torch.tensor([[30.0], [10.0], [0.0], [20.0], [-1.0], [-1.0]])  # duplicates differ on purpose
    sorted_indices, gathered = gather_predictions(indices, values, total=4, ctx=single_process())
    assert sorted_indices.tolist() == [0, 1, 2, 3]
    assert gathered.ravel().tolist() == [0.0, 10.0, 20.0, 30.0]
    assert isinstance(gathered, np.ndarray) and gathered.dtype == np.float32


def test_gather_converts_bfloat16_and_keeps_trailing_shape() -> None:
    values = torch.ones(3, 2, 2, dtype=torch.bfloat16)
    _, gathered = gather_predictions(torch.tensor([2, 0, 1]), values, total=3, ctx=single_process())
    assert gathered.shape == (3, 2, 2) and gathered.dtype == np.float32


def test_gather_reports_missing_and_out_of_range_indices() -> None:
    with pytest.raises(RuntimeError, match=r"1 missing \(first: \[2\]\), 1 out of range \(first: \[9\]\)"):
        gather_predictions(torch.tensor([0, 1, 3, 9]), torch.zeros(4), total=4, ctx=single_process())


def test_gather_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="must match"):
        gather_predictions(torch.tensor([0, 1]), torch.zeros(3, 2), total=2, ctx=single_process())


def test_single_process_setup_without_torchrun(no_torchrun_env: None) -> None:
    ctx = setup_distributed("cpu")
    assert ctx == DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert ctx.is_main and not ctx.distributed
    assert not torch.distributed.is_initialized()
    assert any_rank(True, ctx) is True and any_rank(False, ctx) is False
    assert broadcast_object({"a": 1}, ctx) == {"a": 1}
    barrier(ctx)
    cleanup_distributed(ctx)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_without_cuda_names_the_flag(no_torchrun_env: None) -> None:
    with pytest.raises(ConfigError, match="--device cuda was given but CUDA is not available"):
        setup_distributed("cuda")
    assert setup_distributed("auto").device == torch.device("cpu")


def test_unknown_device_and_bad_env_are_reported(monkeypatch: pytest.MonkeyPatch, no_torchrun_env: None) -> None:
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, got 'gpu'"):
        setup_distributed("gpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        setup_distributed("cpu")


def test_seed_everything_reproduces_draws_and_offsets_by_rank() -> None:
    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    assert seed_everything(5, rank=0) == 5
    first = draws()
    seed_everything(5, rank=0)
    assert draws() == first
    assert seed_everything(5, rank=1) == 6
    other_rank = draws()
    assert all(a != b for a, b in zip(first, other_rank))


def test_rank_zero_logs_scalars_on_rank_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    helper = RankZero(single_process(), tmp_path / "tb")
    helper.print("epoch", 1)
    helper.add_scalar("train/loss", 0.5, step=1)
    helper.add_scalars_flat({"auroc": 0.75, "loss": 0.25}, step=2, prefix="val")
    helper.add_image("sample", np.zeros((1, 4, 4), dtype=np.float32), step=0)
    assert list(helper.progress([1, 2, 3], disable=True)) == [1, 2, 3]
    helper.close()
    assert capsys.readouterr().out == "epoch 1\n"
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "val/auroc", "val/loss"]
    assert [(e.step, e.value) for e in events.Scalars("val/auroc")] == [(2, 0.75)]
    assert events.Tags()["images"] == ["sample"]


def test_rank_zero_does_nothing_on_other_ranks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = DistContext(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
    helper = RankZero(other, tmp_path / "tb")
    helper.print("should not appear")
    helper.add_scalar("loss", 1.0, step=0)
    helper.add_scalars_flat({"a": 1.0}, step=0)
    items = [1, 2]
    assert helper.progress(items) is items
    helper.close()
    assert helper.writer is None
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "tb").exists()


def test_rank_zero_without_log_dir_has_no_writer() -> None:
    assert RankZero(single_process(), None).writer is None
    assert RankZero(single_process(), Path("unused"), enable_tensorboard=False).writer is None


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """Body of each spawned rank: the env torchrun would set, then the public API."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    ctx = setup_distributed("cpu", timeout=timedelta(seconds=60))
    result: dict = {"initialized": torch.distributed.is_initialized(), "world": ctx.world_size}
    sampler = DistributedSampler(range(TOTAL_SAMPLES), num_replicas=2, rank=rank, shuffle=True, seed=3)
    local = torch.tensor(list(sampler))
    result["local_count"] = len(local)
    indices, values = gather_predictions(local, values_for(local), TOTAL_SAMPLES, ctx)
    result["indices"], result["values"] = indices.tolist(), values.tolist()
    # Unequal row counts per rank (an unpadded shard) must gather too.
    uneven = torch.arange(5) if rank == 0 else torch.arange(5, TOTAL_SAMPLES)
    result["uneven"] = gather_predictions(uneven, values_for(uneven), TOTAL_SAMPLES, ctx)[0].tolist()
    try:  # rank 1 loses a sample: every rank must raise, none may hang
        gather_predictions(local[: 1 + rank * 2], values_for(local[: 1 + rank * 2]), TOTAL_SAMPLES, ctx)
        result["missing_error"] = None
    except RuntimeError as error:
        result["missing_error"] = str(error)
    result["any_one_true"] = any_rank(rank == 1, ctx)
    result["any_none_true"] = any_rank(False, ctx)
    result["broadcast"] = broadcast_object({"from": rank}, ctx)
    barrier(ctx)
    cleanup_distributed(ctx)
    result["initialized_after_cleanup"] = torch.distributed.is_initialized()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_process_gloo_gather_drops_sampler_padding(tmp_path: Path) -> None:
    context = mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    try:
        # join() returns False each time one rank ends while the other still runs; it raises if a rank failed.
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError("2-process gloo test did not finish within 90 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    expected_indices = list(range(TOTAL_SAMPLES))
    expected_values = values_for(torch.arange(TOTAL_SAMPLES)).tolist()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["initialized"] and result["world"] == 2
        assert result["local_count"] == 4  # the sampler padded 7 to 8
        assert result["indices"] == expected_indices
        assert result["values"] == expected_values
        assert result["uneven"] == expected_indices
        assert "missing" in result["missing_error"] and "samples 0..6" in result["missing_error"]
        assert result["any_one_true"] is True and result["any_none_true"] is False
        assert result["broadcast"] == {"from": 0}
        assert result["initialized_after_cleanup"] is False


@pytest.mark.parametrize(("agent_store", "local_world", "prefixed"), [("True", "1", True), ("True", "2", False),
                                                                     (None, "1", False)])
def test_restarted_groups_get_their_own_keys_in_torchruns_shared_store(
        monkeypatch: pytest.MonkeyPatch, agent_store: str | None, local_world: str, prefixed: bool) -> None:
    """A restart must not read the addresses its dead predecessor left in torchrun's store (pytorch#135712)."""
    from cxr.distributed import _process_group_store

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    if agent_store is None:
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", agent_store)
        _agent = torch.distributed.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)  # torchrun's
    store = _process_group_store(0, 1, timedelta(seconds=10))
    store.set("addr", "seen")
    assert isinstance(store, torch.distributed.PrefixStore) is prefixed
    if prefixed:
        assert store.underlying_store.get("cxr/restart-1/addr") == b"seen"
