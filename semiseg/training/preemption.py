"""When to stop and checkpoint: a preemption signal (SIGTERM, SIGUSR1) or the job's wall limit.

    watcher = Preemption()          # installs the handlers; watcher.signal: the name of one received
    near_job_end(300)               # SLURM_JOB_END_TIME less than 300 s away
    watcher.restore()               # the handlers found at install time, back

The controller asks both at every loop boundary; on several workers it makes them agree
(distribute.any_worker_true), so every worker stops and saves at the same step.
"""
from __future__ import annotations

import os
import signal
import time

from semiseg.training import distribute


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next loop boundary and exits 75.
    `restore()` puts back the handlers found at install time: after training, a SIGTERM must end
    the process again (test evaluation, a notebook, a caller's own handler)."""

    def __init__(self):
        self.signal = distribute.early_signal()      # one that arrived during start-up
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = distribute.handler_to_restore(sig, signal.signal(sig, self._handle))
            except ValueError:          # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            # None: installed from C, not Python; the default action is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


def job_end_time() -> float | None:
    """SLURM_JOB_END_TIME (unix seconds of the job's wall limit, set by Slurm 21.08+), else None."""
    value = os.environ.get("SLURM_JOB_END_TIME", "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def near_job_end(margin_s: float) -> bool:
    """Whether the job's wall limit is less than `margin_s` away: stop and checkpoint now, even if
    no signal comes (a missing --signal, or one sent too late to finish validation and the save)."""
    end = job_end_time()
    return end is not None and margin_s > 0 and time.time() >= end - margin_s
