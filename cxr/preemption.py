"""Stop requests from the cluster: SIGTERM / SIGUSR1 become a flag that the step loop polls, never an exception.

    with StopSignals() as stop:            # installs the handlers; restores the old ones on exit
        train_one_epoch(..., stop_requested=stop.requested)
    if stop.requested():
        ...write a resumable checkpoint...; return PREEMPTED_EXIT_CODE

SLURM sends SIGTERM (or the `--signal` asked for, e.g. USR1) before a time limit or a preemption, and torchrun
forwards SIGTERM to its workers when it is itself stopped. Every rank finishes its current step; the ranks agree
at the next check (cxr.engine) and rank 0 writes last.pt with the position inside the epoch. A signal during
validation or a checkpoint write only sets the flag: the write completes, then the run stops.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

# Exit status of a run stopped by a signal after writing a resumable checkpoint (75 = EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGUSR1 set a flag (and name the signal) instead of killing."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals, self.received = signals, None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, _: FrameType | None) -> None:
        self.received = signal.Signals(number).name

    def requested(self) -> bool:
        """True once a stop signal arrived on this process."""
        return self.received is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_: Any) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
