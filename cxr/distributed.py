"""One code path for CPU, one GPU and multi-GPU DDP: torchrun's environment -> a DistContext value.

Launch with torchrun (no home-made launcher); plain `python` gives a single-process context:

    python train.py ...                                          # one process, CPU or one GPU
    torchrun --standalone --nproc_per_node=4 train.py ...        # DDP, nccl on GPUs
    torchrun --standalone --nproc_per_node=2 train.py --device cpu   # DDP, gloo on CPU

Example:
    >>> ctx = setup_distributed("cpu")
    >>> indices, values = gather_predictions(torch.tensor([1, 0]), torch.tensor([[0.75], [0.25]]), 2, ctx)
    >>> indices.tolist(), values.ravel().tolist()
    ([0, 1], [0.25, 0.75])
    >>> cleanup_distributed(ctx)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cxr.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: its ranks, the world size and its torch device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (a process group is initialised)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device not in DEVICE_CHOICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but CUDA is not available here; use --device cpu or --device auto")
    gpu_count = torch.cuda.device_count()
    if local_rank >= gpu_count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this node has {gpu_count}; "
            f"use torchrun --nproc_per_node={gpu_count} or fewer"
        )
    return torch.device("cuda", local_rank)


def setup_distributed(device: str = "auto", timeout: timedelta = timedelta(minutes=30)) -> DistContext:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE, init the process group when world > 1, return the context."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid torchrun environment RANK={rank} WORLD_SIZE={world_size}")
    torch_device = _resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        # Every later CUDA call (and nccl's communicator) must default to this process's GPU.
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=_process_group_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def _process_group_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """torchrun's store for init_process_group, with keys of their own for each restart of the worker group.

    torchrun's c10d rendezvous hands its own TCPStore to the workers (TORCHELASTIC_USE_AGENT_STORE) and keeps it
    across restarts, so a restarted group finds the addresses its dead predecessor published there and gloo or
    nccl connect to a closed port ("Connection refused"; pytorch/pytorch#135712). On one node every worker sees
    the same TORCHELASTIC_RESTART_COUNT, so it separates the attempts. Across nodes the counts can differ (each
    agent counts its own restarts): there launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives
    every round a new store (scripts/slurm_train.sh does).
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    single_node = _env_int("LOCAL_WORLD_SIZE", world_size) == world_size
    if shared and single_node:
        return dist.PrefixStore(f"cxr/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if shared and rank == 0 and _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0:
        print("warning: torchrun shares its rendezvous store with the workers across nodes; restarts after a lost "
              "worker can fail to connect (pytorch/pytorch#135712): launch torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)
    return store


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if one was initialised (safe to call in a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()  # numpy has no bfloat16
    return tensor.numpy()


def gather_predictions(
    indices: torch.Tensor, values: torch.Tensor, total: int, ctx: DistContext
) -> tuple[np.ndarray, np.ndarray]:
    """Gather (sample index, value row) pairs from all ranks; drop sampler padding; sort; check 0..total-1."""
    if indices.ndim != 1 or values.ndim < 1 or values.shape[0] != indices.shape[0]:
        raise ValueError(f"indices [n] and values [n, ...] must match, got {tuple(indices.shape)} and {tuple(values.shape)}")
    local_indices = _to_numpy(indices).astype(np.int64, copy=False)
    local_values = _to_numpy(values)
    if ctx.distributed:
        # all_gather_object handles ranks with different row counts and works with gloo and nccl alike.
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (local_indices, local_values))
        all_indices = np.concatenate([pair[0] for pair in gathered])
        all_values = np.concatenate([pair[1] for pair in gathered])
    else:
        all_indices, all_values = local_indices, local_values
    # np.unique returns each index's first occurrence in rank order: DistributedSampler's padding
    # repeats samples from the start of the order, so the originals win.
    unique_indices, first_positions = np.unique(all_indices, return_index=True)
    expected = np.arange(total)
    if unique_indices.shape != expected.shape or not np.array_equal(unique_indices, expected):
        missing = np.setdiff1d(expected, unique_indices)
        unexpected = np.setdiff1d(unique_indices, expected)
        raise RuntimeError(
            f"gathered predictions do not cover samples 0..{total - 1} exactly once: "
            f"{len(missing)} missing (first: {missing[:5].tolist()}), "
            f"{len(unexpected)} out of range (first: {unexpected[:5].tolist()}); "
            "every rank must pass the dataset indices its sampler yielded"
        )
    return unique_indices, all_values[first_positions]


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if any rank passes True (so all ranks stop together, none hangs)."""
    if not ctx.distributed:
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Return rank `src`'s picklable `obj` on every rank."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if not ctx.distributed:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


class RankZero:
    """Every rank-0 side effect in one place: printing, TensorBoard and progress bars; no-ops elsewhere."""

    def __init__(self, ctx: DistContext, log_dir: Path | None, enable_tensorboard: bool = True) -> None:
        self.ctx = ctx
        self.writer = None
        if ctx.is_main and log_dir is not None and enable_tensorboard:
            # Imported here so that other ranks and TensorBoard-less runs never load it.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def print(self, *args: Any) -> None:
        """Print on rank 0 only, flushed so that logs interleave correctly."""
        if self.ctx.is_main:
            print(*args, flush=True)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar to TensorBoard on rank 0."""
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def add_scalars_flat(self, scalars: Mapping[str, float], step: int, prefix: str = "") -> None:
        """Log each `name: value` as its own scalar `prefix/name` (one chart per metric)."""
        for name, value in scalars.items():
            self.add_scalar(f"{prefix}/{name}" if prefix else name, value, step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        """Log an image (tensor or array, values in [0, 1]) to TensorBoard on rank 0."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats=dataformats)

    def progress(self, iterable: Iterable, **tqdm_kwargs: Any) -> Iterable:
        """Wrap `iterable` in a tqdm bar on rank 0 (hidden when stderr is not a TTY); bare elsewhere."""
        if not self.ctx.is_main:
            return iterable
        from tqdm import tqdm

        tqdm_kwargs.setdefault("disable", None)  # None: tqdm hides itself in non-TTY logs
        tqdm_kwargs.setdefault("file", sys.stderr)
        return tqdm(iterable, **tqdm_kwargs)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _all_reduce(tensor: torch.Tensor, ctx: DistContext, op: dist.ReduceOp) -> torch.Tensor:
    if not ctx.distributed:
        return tensor
    result = tensor.detach().clone().to(ctx.device)
    dist.all_reduce(result, op=op)
    return result


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (a new tensor; the input itself in one process)."""
    return _all_reduce(tensor, ctx, dist.ReduceOp.SUM)


def min_across_ranks(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The element-wise minimum of `tensor` over all ranks (the input itself in one process)."""
    return _all_reduce(tensor, ctx, dist.ReduceOp.MIN)


def average_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Average every floating-point buffer (BatchNorm running statistics) over the ranks, in place.

    DDP runs with broadcast_buffers=False (no buffer broadcast on every forward), so each rank's running
    statistics follow its own batches; they are made equal before each validation and checkpoint. The update
    is affine in the buffers, so the average equals what a broadcast-free single trajectory would hold.
    """
    if not ctx.distributed:
        return
    buffers = [buffer for buffer in model.buffers() if buffer.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([buffer.detach().reshape(-1).to(torch.float64) for buffer in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for buffer in buffers:
        count = buffer.numel()
        buffer.copy_(flat[offset:offset + count].view_as(buffer))
        offset += count
