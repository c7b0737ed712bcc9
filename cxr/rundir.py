"""The run directory: chosen once, safe to restart into, unsafe to overwrite by accident.

    run = open_run_dir(config, ctx, resuming=False)   # rank 0 takes the lock; every rank gets the same path
    ...
    run.close()                                        # releases the lock (also released if the process dies)

- A fresh run refuses a folder that already holds checkpoints (resume it, or pass --overwrite).
- While a run lives, rank 0 holds an exclusive lock on RUN/.lock (an OS file lock, so a killed run leaves no
  stale lock: the next run simply takes it over); a second run on the same folder is refused with the owner's PID.
- Temporary files that a killed checkpoint write left behind (`.*.tmp`) are removed on the next start.
- Without --out, torchrun's rendezvous id names the folder (runs/<id>), so a restarted group finds it again.
- RUN/metrics.jsonl: one JSON line per epoch, rewritten atomically; a redone epoch replaces its line.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cxr.checkpoint import BEST_NAME, LAST_NAME
from cxr.distributed import DistContext, broadcast_object
from cxr.errors import CxrError, describe_os_error

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected against a second writer
    fcntl = None

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"


class RunDirError(CxrError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class OutputWriteError(CxrError):
    """An output file or folder could not be written (full disk, read-only folder); the message names it."""


@dataclass
class RunDir:
    """A run directory and, on rank 0, the open lock file that holds it."""

    path: Path
    _lock_handle: object | None = None

    def close(self) -> None:
        """Release the lock (no-op on other ranks or when already released)."""
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the descriptor releases the flock
            self._lock_handle = None


def _take_lock(run_dir: Path):
    if fcntl is None:
        return None
    handle = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown process"
        handle.close()
        raise RunDirError(f"run directory {run_dir} is in use by {owner}; wait for that run to end, or choose another "
                          "--out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _remove_temp_files(run_dir: Path) -> list[str]:
    removed = []
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def default_run_dir(environ: dict | None = None) -> str:
    """runs/<torchrun rendezvous id> under torchrun (the same on every restart of the group), else ''.

    '' lets rank 0 pick runs/<timestamp>. torchrun's default id 'none' (no --standalone, no --rdzv-id) names
    nothing: a restarted group could not find its folder, so that case is refused with what to pass.
    """
    environ = os.environ if environ is None else environ
    run_id = environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return str(Path("runs") / run_id)
    if int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        raise RunDirError("torchrun restarted this group but the run has no folder to continue in: pass --out DIR "
                          "(or torchrun --rdzv-id ID, or --standalone) so that every restart finds its checkpoints")
    return ""


def append_metrics(run_dir: Path, record: dict) -> None:
    """Add one epoch's line to RUN/metrics.jsonl atomically; lines of that epoch or later (a redone epoch) go."""
    path = Path(run_dir) / METRICS_NAME
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("epoch", 0) < record["epoch"]:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # not a record of ours; the file is rewritten without it
    kept.append(json.dumps(record))
    write_text_checked(path, "\n".join(kept) + "\n")


def open_run_dir(config, ctx: DistContext, resuming: bool, log=print) -> RunDir:
    """Pick (rank 0), check, lock and prepare the run directory; writes config.yaml. Same path on every rank."""
    error = None
    handle = None
    if ctx.is_main:
        if not config.out:
            config.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        run_dir = Path(config.out)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = _take_lock(run_dir)
            existing = [name for name in (LAST_NAME, BEST_NAME) if (run_dir / name).exists()]
            if existing and not resuming and not getattr(config, "overwrite", False):
                raise RunDirError(f"run directory {run_dir} already holds {' and '.join(existing)} of another run; resume it "
                                  f"with --resume {run_dir}, choose another --out, or pass --overwrite to replace it")
            removed = _remove_temp_files(run_dir)
            if removed:
                log(f"removed {len(removed)} unfinished temporary file(s) of an interrupted checkpoint write: {', '.join(removed)}")
            write_text_checked(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        except (RunDirError, OSError) as problem:
            if handle is not None:
                handle.close()
                handle = None
            error = str(problem) if isinstance(problem, RunDirError) else describe_os_error(problem, run_dir)
    if ctx.distributed:  # every rank must agree on the directory chosen by rank 0, and stop together
        config.out, error = broadcast_object((config.out, error), ctx)
    if error:
        raise RunDirError(error)
    return RunDir(Path(config.out), handle)


def write_text_checked(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file + rename); OSError propagates for the caller to describe."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def writable_folder(path: Path) -> Path:
    """Create `path` and prove it writable now, before any work is done."""
    probe = path / ".write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OutputWriteError(describe_os_error(error, path)) from error
    return path
