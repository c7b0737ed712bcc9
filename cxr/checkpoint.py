"""Checkpoints: atomic save, strict weights_only load, unwrapped model state, RNG state for resume.

A checkpoint is a dict of plain tensors and containers with at least `model` (state dict) and
`config` (the run's config as a dict); only rank 0 should save it.

Example (rank 0 saves; any process loads):

    state = {"model": model_state_for_saving(model), "config": config.to_dict(),
             "optimizer": optimizer.state_dict(), "rng": capture_rng_state(), "epoch": epoch}
    save_checkpoint(state, run_dir / "last.pt")
    state = load_checkpoint(resolve_checkpoint_path("runs/exp1"))   # a run directory -> its last.pt
    unwrap_model(model).load_state_dict(state["model"])
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr.errors import CxrError

REQUIRED_KEYS = ("model", "config")
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


class CheckpointError(CxrError, RuntimeError):
    """A checkpoint file exists but cannot or must not be loaded."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file must live in the same directory: os.replace is atomic only within one filesystem.
    # os.open with 0o666 honours the umask (tempfile would make the checkpoint private, mode 0600).
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:  # also Ctrl-C: never leave a half-written temp file behind
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on power loss; not supported on every OS/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a cxr checkpoint with weights_only=True; raise a clear error for missing/corrupt/unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass a .pt file written by train.py or a run directory"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects ({unsafe.group(1)}) that would run "
                "code when loaded; cxr only loads plain tensors and containers (weights_only=True). "
                "Re-save it from a trusted environment with only tensors, dicts, lists, numbers and strings."
            ) from None
        raise _corrupt_error(path, error) from error
    except OSError:
        raise  # permission problems and the like already name the path
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        raise _corrupt_error(path, error) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a cxr checkpoint: it holds a {type(state).__name__}, not a dict")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a cxr checkpoint: missing keys {missing} (found {sorted(map(str, state))}); "
            "use a best.pt or last.pt written by train.py"
        )
    return state


def _corrupt_error(path: Path, error: BaseException) -> CheckpointError:
    detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return CheckpointError(
        f"cannot read checkpoint {path}: the file is truncated, corrupt or not written by torch.save "
        f"({type(error).__name__}: {detail}); use another checkpoint (e.g. best.pt) or copy the file again"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel/DataParallel (`.module`) and torch.compile (`._orig_mod`), any nesting."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict, every tensor detached and copied to CPU (never aliasing live ones)."""
    state = unwrap_model(model).state_dict()
    # copy=True: a CPU model's state_dict shares storage with its parameters ("best = state_dict()" bug).
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) RNG states as tensors/ints/lists, loadable with weights_only."""
    version, mt_state, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        # numpy's state holds a uint32 ndarray, which weights_only cannot unpickle: store an int64 tensor.
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what capture_rng_state saved (CUDA states for as many devices as both sides have).

    Under DDP, rank 0's state restored on every rank would make all ranks draw the same numbers:
    restore it on a single process only, or re-seed with seed_everything(seed + epoch, rank).
    """
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for device_index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device_index)


def resolve_checkpoint_path(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint file as is; a run directory -> its last.pt (for --resume)."""
    path = Path(path_or_run_dir)
    if path.is_file():
        return path
    if path.is_dir():
        last = path / LAST_NAME
        if not last.is_file():
            raise FileNotFoundError(
                f"run directory {path} has no {LAST_NAME} (no epoch finished yet?); pass a checkpoint file instead"
            )
        return last
    raise FileNotFoundError(f"{path} is neither a checkpoint file nor a run directory")


def find_latest_best(runs_root: str | os.PathLike = "runs") -> Path:
    """The most recently written `<runs_root>/*/best.pt`."""
    candidates = [path for path in Path(runs_root).glob(f"*/{BEST_NAME}") if path.is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"no {runs_root}/*/{BEST_NAME} found; train first: python train.py (or pass --checkpoint PATH)"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)
