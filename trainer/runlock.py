"""One run per output folder: a lock file naming its holder, refreshed while the run lives.

Two runs on one folder (a requeued job overlapping the old one, a second terminal) would overwrite each other's
checkpoints and interleave train.log. Rank 0 creates OUTPUT/run.lock exclusively before anything is written; it
holds host, PID, start time and SLURM job id, and the run's watchdog thread touches it every few seconds. It is
removed on every exit the process survives (normal end, error, preemption, the watchdog's abort).

A lock left by a process that could not remove it (SIGKILL, a dead node) is stale, and is taken over with a warning
when its holder is provably gone: on this host, its PID no longer runs; on another host, the file has not been
touched for ``stale_after`` seconds (train.hang_timeout_s). Anything else refuses the start, naming the holder;
``train.force_unlock=true`` takes the lock over regardless.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"


class RunLockError(RuntimeError):
    """Another run holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, output: Path, stale_after: float) -> None:
        self.path = Path(output) / LOCK_NAME
        self.stale_after = float(stale_after)
        self.held = False
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job": os.environ.get("SLURM_JOB_ID")}

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _why_stale(self, holder: dict) -> str | None:
        """Why the holder is provably gone, or None."""
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"its process {holder['pid']} on this host is gone"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        if age >= self.stale_after:
            return f"no heartbeat for {age:.0f}s (train.hang_timeout_s={self.stale_after:g})"
        return None

    def acquire(self, force: bool = False) -> str | None:
        """Take the lock; returns a warning when a stale (or forced) lock was taken over, raises RunLockError when
        a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.record)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self.holder() or {}
            why = self._why_stale(holder)
            desc = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                    f"{holder.get('started', '?')}" + (f", SLURM job {holder['slurm_job']}"
                                                        if holder.get("slurm_job") else ""))
            if why is None and not force:
                try:
                    age = f"{time.time() - self.path.stat().st_mtime:.0f}s ago"
                except OSError:
                    age = "unknown"
                raise RunLockError(
                    f"{self.path}: another run holds this output folder ({desc}; last heartbeat {age}). Two runs "
                    f"on one folder would overwrite each other's checkpoints and log. Wait for it to end, use "
                    f"another `output`, or, if that run is gone (its node died), start with train.force_unlock=true "
                    f"(a lock without heartbeat for train.hang_timeout_s={self.stale_after:g}s is taken over by "
                    f"itself)") from None
            tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(data)
            os.replace(tmp, self.path)
            self.held = True
            return f"{self.path}: took over the lock of {desc}: " + (why or "train.force_unlock=true")
        with os.fdopen(fd, "w") as f:
            f.write(data)
        self.held = True
        return None

    def refresh(self) -> None:
        if self.held:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        holder = self.holder()
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
