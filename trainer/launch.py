"""The local launcher behind `./run.sh`: N ranks of `python -m trainer ARGS` on this machine.

It exports what the DeepSpeed launcher exports (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT),
so a rank cannot tell the two apart, and it differs where a multi-day job needs it to:

- SIGTERM / SIGUSR1 to the launcher are forwarded to every rank, and the launcher WAITS for them: the ranks agree
  on a step, save a checkpoint and exit 0, and so does the launcher. (DeepSpeed's launcher answers SIGTERM by
  terminating the ranks' process trees and exiting 1 at once; to SIGUSR1 it has no handler and dies of it.) A
  signal sent to the whole process group reaches the ranks twice, which is harmless.
- No rank outlives the launcher: each rank gets SIGKILL from the kernel when the launcher dies, even by SIGKILL.
- A rank that fails ends the job: the others get ``grace`` seconds to notice (their collectives break) and are
  killed after that (at once when the failed rank's watchdog found a hung peer: exit code 3); the launcher exits
  with the failed rank's code (128 + N for a signal N).

    python -m trainer.launch --nproc 2 --master-port 29500 [--] [CONFIG] [key=value ...]
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import time

from runtime.process import DistEnv
from trainer.signals import STOP_SIGNALS, die_with_parent
from trainer.watchdog import EXIT_HUNG


def rank_env(base: dict, rank: int, nproc: int, port: int) -> dict:
    env = dict(base)
    for k in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)  # this launcher decides the ranks, not an enclosing srun step or torchrun
    env.update(DistEnv(rank, nproc, rank, nproc, "127.0.0.1", port, "facetrain").environ())
    env.update({"CROSS_RANK": "0", "CROSS_SIZE": "1", "FACETRAIN_LAUNCHER": "facetrain"})
    return env


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(args: list[str], nproc: int, port: int, grace: float = 10.0) -> int:
    me = os.getpid()
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", *args], env=rank_env(os.environ, r, nproc, port),
                              preexec_fn=functools.partial(die_with_parent, me)) for r in range(nproc)]
    received: list[str] = []

    def forward(signum, frame) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        print(f"launcher: {name} received, forwarded to the ranks; waiting for their checkpoint", file=sys.stderr,
              flush=True)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), forward)

    failed: tuple[int, int] | None = None  # (rank, code)
    failed_at = 0.0
    while True:
        codes = [p.poll() for p in procs]
        if failed is None:
            for r, c in enumerate(codes):
                if c not in (None, 0):
                    failed, failed_at = (r, exit_code(c)), time.monotonic()
                    print(f"launcher: rank {r} exited with code {failed[1]}; ending the other ranks", file=sys.stderr,
                          flush=True)
                    break
        if all(c is not None for c in codes):
            break
        # A rank's watchdog found a hung peer (EXIT_HUNG): the others will not answer, end them at once.
        if failed is not None and (failed[1] == EXIT_HUNG or time.monotonic() - failed_at > grace):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    for p in procs:
        p.wait()
    if failed is not None:
        return failed[1]
    bad = [exit_code(p.returncode) for p in procs if p.returncode != 0]
    return bad[0] if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="ranks on this machine")
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--grace", type=float, default=10.0, help="seconds the other ranks get after one failed")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="trainer arguments: [CONFIG] [key=value ...]")
    ns = parser.parse_args(argv)
    if ns.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {ns.nproc}")
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    return launch(args, ns.nproc, ns.master_port, ns.grace)


if __name__ == "__main__":
    sys.exit(main())
