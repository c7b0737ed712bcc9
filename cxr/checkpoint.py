"""Checkpoints: one schema, atomic save, strict weights_only load, the unwrapped model.

The training checkpoint's schema lives here alone: `build_checkpoint` makes it from the live objects,
`restore_checkpoint` puts it back, and `load_checkpoint` checks its `schema_version` (an older or newer
file is a clear error naming both versions). Only rank 0 saves.

    state = build_checkpoint(model, optimizer, scheduler, scaler, config=config.to_dict(), phase=2,
                             counters=counters, val_aurocs=aurocs)       # counters: COUNTER_KEYS
    save_epoch_checkpoints(state, run_dir, improved=True)     # last.pt, and best.pt as a link to the same bytes
    state = load_checkpoint(resolve_checkpoint_path("runs/exp1"))   # a run directory -> its last.pt
    counters = restore_checkpoint(state, model, optimizer, scheduler, scaler)

No RNG state is stored: every random stream of a run is re-seeded from (seed, rank, epoch) at the start
of each epoch, per sample and per step (cxr.seeding), which is what makes resume exact, on one process or
many, at an epoch boundary or from the `position` inside an epoch that a preempted run saved.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr.errors import CxrError, describe_os_error

SCHEMA_VERSION = 3  # 1: the first release (no version field, RNG states); 2: one schema; 3: + position in the epoch
REQUIRED_KEYS = ("model", "config")
# `epoch` counts finished epochs; `position` is the progress inside the next one ({} at an epoch boundary;
# after a preemption: batches consumed, optimizer steps, images, seconds and the partial loss sums).
COUNTER_KEYS = ("epoch", "global_step", "best_metric", "best_epoch", "bad_epochs", "history", "position")
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


class CheckpointError(CxrError, RuntimeError):
    """A checkpoint file exists but cannot or must not be loaded."""


class CheckpointWriteError(CxrError, OSError):
    """A checkpoint could not be written (full disk, read-only folder); the previous file is intact."""


class CheckpointMissingError(CxrError, FileNotFoundError):
    """No checkpoint where one was asked for; the message says what to pass instead."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    temp_path = _write_temp(state, path)
    with _cleaned_up_on_failure(temp_path, path):
        os.replace(temp_path, path)
    _fsync_directory(path.parent)
    return path


@contextmanager
def _cleaned_up_on_failure(temp_path: Path, where: Path) -> Iterator[None]:
    """Remove `temp_path` if the block fails; an OSError becomes a CheckpointWriteError naming `where`."""
    try:
        yield
    except OSError as error:
        temp_path.unlink(missing_ok=True)
        raise CheckpointWriteError(describe_os_error(error, where)) from error
    except BaseException:  # also Ctrl-C: never leave a temporary file behind
        temp_path.unlink(missing_ok=True)
        raise


def _write_temp(state: dict[str, Any], path: Path) -> Path:
    """torch.save `state` into a fsynced temporary file beside `path`; returns the temporary path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointWriteError(describe_os_error(error, path.parent)) from error
    # The temp file must live in the same directory: os.replace is atomic only within one filesystem.
    # os.open with 0o666 honours the umask (tempfile would make the checkpoint private, mode 0600).
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise CheckpointWriteError(describe_os_error(error, path)) from error
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # a full disk shows up here, as torch's "unexpected pos" or ENOSPC
        temp_path.unlink(missing_ok=True)
        raise CheckpointWriteError(describe_os_error(error, path)) from error
    except RuntimeError as error:
        temp_path.unlink(missing_ok=True)
        if "unexpected pos" in str(error) or "failed writing" in str(error):
            raise CheckpointWriteError(f"cannot write {path}: no space left on the device (or a write failed: {error}); "
                                       "free some space; the previous checkpoint is intact") from error
        raise
    except BaseException:  # also Ctrl-C: never leave a half-written temp file behind
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


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
        raise CheckpointMissingError(
            f"checkpoint {path} does not exist; pass a .pt file written by train.py or a run directory"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        operand = re.search(r"Unsupported (operand \S+)", text)
        if unsafe or operand:
            what = unsafe.group(1) if unsafe else f"pickle {operand.group(1)}"
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects ({what}) that could run code when loaded, "
                "so it was NOT loaded; cxr only loads plain tensors and containers (weights_only=True). Do not open "
                "it with unrestricted unpickling (torch.load(..., weights_only=False)) unless you trust its source; "
                "checkpoints written by train.py never need that"
            ) from None
        raise _corrupt_error(path, error) from error
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from error
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
    version = state.get("schema_version", 1)
    if version != SCHEMA_VERSION:
        age = "an older" if isinstance(version, int) and version < SCHEMA_VERSION else "a newer"
        raise CheckpointError(
            f"{path} uses checkpoint schema version {version!r}, this code reads version {SCHEMA_VERSION}: it was written "
            f"by {age} version of cxr; use that version of cxr, or retrain"
        )
    return state


def build_checkpoint(model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, *, config: dict[str, Any],
                     phase: int, counters: dict[str, Any], val_aurocs: Any = (), class_names: Any = None) -> dict[str, Any]:
    """The training checkpoint (schema SCHEMA_VERSION) from the live objects; tensors copied to CPU."""
    from cxr.labels import FINDINGS

    missing = [key for key in COUNTER_KEYS if key not in counters]
    if missing:
        raise ValueError(f"build_checkpoint: counters lack {missing}")
    return {"schema_version": SCHEMA_VERSION, "model": model_state_for_saving(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "phase": int(phase), "config": dict(config), "class_names": list(class_names or FINDINGS),
            "val_aurocs": [float(value) for value in val_aurocs], **{key: counters[key] for key in COUNTER_KEYS}}


def restore_checkpoint(checkpoint: dict[str, Any], model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                       scaler: Any = None) -> dict[str, Any]:
    """Load model, optimizer, scheduler and scaler state from `checkpoint`; returns its counters."""
    unwrap_model(model).load_state_dict(checkpoint["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None:
            target.load_state_dict(checkpoint[name])
    return {key: checkpoint[key] for key in COUNTER_KEYS}


def save_epoch_checkpoints(state: dict[str, Any], run_dir: str | os.PathLike, improved: bool) -> None:
    """Write `last.pt` and, when `improved`, make `best.pt` the same file, serialized once.

    Order: the new checkpoint is written to a temporary file and made durable; `best.pt` is replaced by a hard
    link to it (a copy where links are not supported), then the temporary file becomes `last.pt`. A kill at any
    point leaves two loadable files, and `best.pt` is never older than the best recorded in `last.pt`.
    """
    run_dir = Path(run_dir)
    temp_path = _write_temp(state, run_dir / LAST_NAME)
    with _cleaned_up_on_failure(temp_path, run_dir):
        if improved:
            best_temp = run_dir / f".{BEST_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                os.link(temp_path, best_temp)
            except OSError:
                shutil.copyfile(temp_path, best_temp)
                _fsync_file(best_temp)
            os.replace(best_temp, run_dir / BEST_NAME)
        os.replace(temp_path, run_dir / LAST_NAME)
    _fsync_directory(run_dir)


def _corrupt_error(path: Path, error: BaseException) -> CheckpointError:
    text = str(error)
    if "WeightsUnpickler error:" in text:  # never quote torch's advice to retry with weights_only=False
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    detail = text.splitlines()[0][:200] if text else type(error).__name__
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


def resolve_checkpoint_path(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint file as is; a run directory -> its last.pt (for --resume)."""
    path = Path(path_or_run_dir)
    if path.is_file():
        return path
    if path.is_dir():
        last = path / LAST_NAME
        if not last.is_file():
            raise CheckpointMissingError(
                f"run directory {path} has no {LAST_NAME} (no epoch finished yet?); pass a checkpoint file instead"
            )
        return last
    raise CheckpointMissingError(f"{path} is neither a checkpoint file nor a run directory")


def find_latest_best(runs_root: str | os.PathLike = "runs") -> Path:
    """The most recently written `<runs_root>/*/best.pt`."""
    candidates = [path for path in Path(runs_root).glob(f"*/{BEST_NAME}") if path.is_file()]
    if not candidates:
        raise CheckpointMissingError(
            f"no {runs_root}/*/{BEST_NAME} found; train first: python train.py (or pass --checkpoint PATH)"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)
