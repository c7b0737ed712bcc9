"""The one error boundary: every error meant for a user derives from CxrError.

Library code raises a CxrError subclass whose message names the file, row or flag at fault and says what
to do; each entry script runs its main through `run_main`, which prints `error: <message>` once (rank 0)
and exits non-zero. Anything else is a real bug and keeps its traceback.

    def main(argv=None) -> int:
        return run_main(lambda: run(argv))
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path


class CxrError(Exception):
    """A problem the user can fix (bad input, flag, file, environment); the message says which and how."""


class ConfigError(CxrError, ValueError):
    """A flag or YAML value no run can use; the message names the flag or key."""


def is_rank_zero() -> bool:
    """True unless torchrun says this process is not rank 0 (works before any process group exists)."""
    return os.environ.get("RANK", "0") in ("", "0")


def run_main(main: Callable[[], int], error_status: int = 1) -> int:
    """Call `main`; a CxrError becomes `error: ...` on stderr (rank 0 only) and exit status `error_status`."""
    try:
        return main()
    except CxrError as error:
        if is_rank_zero():
            print(f"error: {error}", file=sys.stderr, flush=True)
        return error_status


def describe_os_error(error: OSError, path: Path | str) -> str:
    """'no space left on device / not writable: PATH' style text for a failed write."""
    where = getattr(error, "filename", None) or path
    if error.errno == errno.ENOSPC:
        return f"no space left on the device holding {where}; free some space or choose another folder"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable: {where} ({error.strerror}); choose a folder you can write to"
    return f"cannot write {where}: {error.strerror or error}"
