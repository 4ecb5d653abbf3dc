"""Stopping a training run cleanly: SIGINT / SIGTERM finish the step, save, exit 128 + signal.

Both trainers: the first signal sets a flag the loop checks after each step; the loop saves a
checkpoint and returns `exit_status()` (130 for Ctrl-C, 143 for SIGTERM: the shell's
convention, so a script can tell a finished run, 0, from a stopped one). A second Ctrl-C means
"now": it raises KeyboardInterrupt without saving.
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Context manager: installs the handlers (main thread only), restores them on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: the user means it
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step",
              file=sys.stderr, flush=True)

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def exit_status(self) -> int:
        return 128 + int(self.signum or 0)

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def ignore_stop_signals(_worker_id=None) -> None:
    """DataLoader worker_init_fn. Ctrl-C reaches the whole process group, and torchrun signals
    its workers' groups: data workers must not die before the trainer has finished its step and
    saved. They exit with the trainer (DataLoader shuts them down; a watchdog ends them if the
    trainer is killed)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
