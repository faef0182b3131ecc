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


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def stop_with_parent() -> None:
    """Linux: SIGTERM to this rank when its parent dies — under the DeepSpeed launcher, which dies of a SIGUSR1 it
    has no handler for (and exits at once on SIGTERM), the orphaned ranks then save a checkpoint and stop instead of
    training on unattended."""
    parent = os.getppid()
    if _set_parent_death_signal(signal.SIGTERM) and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before the request took effect


def die_with_parent(parent_pid: int) -> None:
    """Linux: deliver SIGKILL to this process when its parent (the launcher, ``parent_pid``) dies, however it dies.

    For ``subprocess.Popen(preexec_fn=...)``: set between fork and exec, kept across exec. If the launcher died
    before this ran, the process ends at once.
    """
    if not _set_parent_death_signal(signal.SIGKILL):
        return  # not Linux: the launcher's own cleanup still ends its ranks
    if os.getppid() != parent_pid:
        os._exit(1)
