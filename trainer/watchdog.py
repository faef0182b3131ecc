"""Hung or dead ranks end the job within a bound, with the ranks named — instead of idling every GPU for the
collectives' 30-minute timeout.

Every rank runs a small thread that writes a heartbeat file, OUTPUT/.heartbeat/rank_00003, every ``interval``
seconds: the step the rank's loop last reached, a beat counter, host and PID. The same thread reads every rank's
file. Only changes are compared, each against this rank's own monotonic clock, so hosts need no common time:

- a rank whose beat counter has not moved for ``timeout`` seconds stopped answering (SIGSTOP, a dead node, a
  process stuck without releasing Python's lock); a rank blocked in a collective still beats, since gloo and NCCL
  wait outside the GIL;
- while the loop is training (not evaluating or saving), ranks that all beat but whose lowest step has not moved for
  ``timeout`` seconds are stuck (e.g. a stalled file system read): the ranks at that lowest step are named.

Either way every live rank logs one message naming the rank(s), the last step each reached and for how long, and
ends its process with exit code 3 (EXIT_HUNG); the launcher then ends the rest. No checkpoint is written, so the one
`latest` names (from before the hang) stays the newest. The output folder is shared by all ranks (checkpoints need
it), so the files are visible everywhere; their number is the rank count, read every ``interval`` seconds.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

EXIT_HUNG = 3


class Watchdog:
    def __init__(self, output: Path, rank: int, world_size: int, timeout: float,
                 on_hang: Callable[[str], None], interval: float | None = None,
                 on_beat: Callable[[], None] | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"train.hang_timeout_s must be > 0, got {timeout}")
        self.folder = Path(output) / ".heartbeat"
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self.interval = float(interval) if interval else min(max(self.timeout / 6.0, 0.5), 30.0)
        self.on_hang, self.on_beat = on_hang, on_beat
        self.step = -1
        self.training = False  # the no-progress rule applies only inside the training loop
        self._beat = 0
        self._stop = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (beat, monotonic time it last changed)
        self._progress: tuple[int, float] | None = None  # (lowest step, when it last changed)
        self._thread: threading.Thread | None = None
        self.host = socket.gethostname()

    # --- called by the training loop (no I/O) -------------------------------------------------------------------
    def progress(self, step: int) -> None:
        self.step = int(step)

    def phase(self, training: bool) -> None:
        self.training = bool(training)
        self._progress = None

    # --- the thread ----------------------------------------------------------------------------------------------
    def start(self) -> Watchdog:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name="facetrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _file(self, rank: int) -> Path:
        return self.folder / f"rank_{rank:05d}"

    def _write(self) -> None:
        self._beat += 1
        tmp = self.folder / f".rank_{self.rank:05d}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"rank": self.rank, "beat": self._beat, "step": self.step, "host": self.host,
                                   "pid": os.getpid(), "training": self.training}))
        os.replace(tmp, self._file(self.rank))

    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads(self._file(rank).read_text())
        except (OSError, ValueError):
            return None  # not written yet, or replaced while reading: the next round sees it

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
                if self.on_beat is not None:
                    self.on_beat()
                verdict = self.check(time.monotonic())
            except OSError:
                continue  # a file system hiccup: try again next round (a lasting one is a hang of its own)
            if verdict:
                self.on_hang(verdict)
                return

    def check(self, now: float) -> str | None:
        """One round over every rank's file; a message naming the hung ranks, or None."""
        states = {r: self._read(r) for r in range(self.world_size)}
        silent = []
        for r, st in states.items():
            beat = None if st is None else st.get("beat")
            prev = self._seen.get(r)
            if prev is None or prev[0] != beat:
                self._seen[r] = (beat, now)
            elif now - prev[1] >= self.timeout:
                silent.append(r)
        if silent:
            return self._message(silent, states, now, "stopped answering (no heartbeat)")
        if not self.training:
            return None
        steps = {r: st.get("step", -1) for r, st in states.items() if st is not None and st.get("training")}
        if len(steps) < self.world_size:
            self._progress = None  # someone is evaluating or saving: no progress rule now
            return None
        lowest = min(steps.values())
        if self._progress is None or self._progress[0] != lowest:
            self._progress = (lowest, now)
            return None
        if now - self._progress[1] >= self.timeout:
            stuck = [r for r, s in steps.items() if s == lowest]
            return self._message(stuck, states, now, f"made no step for {now - self._progress[1]:.0f}s")
        return None

    def _message(self, ranks: list[int], states: dict, now: float, what: str) -> str:
        parts = []
        for r in ranks:
            st = states.get(r) or {}
            since = now - self._seen[r][1] if r in self._seen else float("nan")
            where = f"{st.get('host', '?')} pid {st.get('pid', '?')}"
            parts.append(f"rank {r} ({where}) last reached step {st.get('step', 'unknown')}, "
                         f"last heartbeat {since:.0f}s ago")
        return (f"rank(s) {', '.join(map(str, ranks))} {what} within train.hang_timeout_s={self.timeout:g}: "
                f"{'; '.join(parts)}. Ending the job (exit {EXIT_HUNG}); the newest checkpoint is from before the "
                f"hang: continue with train.resume=auto")
