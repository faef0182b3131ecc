"""Signals as clusters deliver them: SIGTERM / SIGUSR1 ask for a checkpoint and a clean stop; a rank dies with its
launcher.

SLURM's preemption and `scancel` send SIGTERM to every process of a job step (ranks, their loader workers, the
launcher); `--signal=USR1@180` sends SIGUSR1 before the time limit; the DeepSpeed launcher forwards SIGTERM. Each
reaches the ranks at a different moment, so the handler only sets a flag: trainer/guard.py folds it into the
step's agreement (an all-reduce MAX), every rank then saves the same step's checkpoint and exits 0. Loader workers
ignore both signals (data/dataset.py), so they never die before their rank has decided.
"""
from __future__ import annotations

import ctypes
import os
import signal

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionFlag:
    """Installed in every rank: records the first SIGTERM / SIGUSR1; ``restore`` puts the old handlers back."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def die_with_parent(parent_pid: int) -> None:
    """Linux: deliver SIGKILL to this process when its parent (the launcher, ``parent_pid``) dies, however it dies.

    For ``subprocess.Popen(preexec_fn=...)``: set between fork and exec, kept across exec. If the launcher died
    before this ran, the process ends at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup still ends its ranks
        return
    if os.getppid() != parent_pid:
        os._exit(1)
