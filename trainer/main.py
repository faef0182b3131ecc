"""Entry point of one rank: parse `[CONFIG] [key=value ...]`, train, and print where everything went."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from trainer.config import DEFAULT_CONFIG, ConfigError, load_config

USAGE = """python -m trainer [CONFIG.yaml] [key=value ...]

Trains with CONFIG (default: configs/demo.yaml, the synthetic CPU demo) and the dotted overrides, e.g.
    python -m trainer configs/demo.yaml train.epochs=2 head.sample_rate=0.5
Usually started through ./run.sh, which launches one such process per GPU (or 2 on CPU)."""


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    # The deepspeed launcher inserts --local_rank=N; LOCAL_RANK in the environment already says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        raise SystemExit(0)
    config = DEFAULT_CONFIG
    if argv and "=" not in argv[0]:
        config = Path(argv[0])
        argv = argv[1:]
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config file, got: {' '.join(bad)}")
    return config, argv


def summary_table(history: list[tuple[str, list[dict]]]) -> str:
    """Held-out accuracy at the first and the last evaluation of the run, side by side."""
    from prettytable import PrettyTable
    if not history:
        return "(no verification data configured)"
    first, last = history[0], history[-1]
    columns = [first] if first is last else [first, last]
    table = PrettyTable(["target", *[f"{label} acc %" for label, _ in columns],
                         f"best single threshold acc % ({last[0]})"])
    rows = {label: {r["target"]: r for r in results} for label, results in columns}
    for r in last[1]:
        cells = []
        for label, _ in columns:
            c = rows[label].get(r["target"])
            cells.append(f"{c['accuracy_mean'] * 100:.2f} ± {c['accuracy_std'] * 100:.2f}" if c else "-")
        table.add_row([r["target"], *cells, f"{r['uniform_accuracy'] * 100:.2f}"])
    lines = [table.get_string(title="held-out verification")]
    for r in last[1]:
        rep = r.get("thresholds")
        if rep:
            learned = "; ".join(f"learned {k} = {v['threshold']:.3f} gives {100 * v['accuracy']:.2f}%"
                                for k, v in rep["learned"].items()) or "this loss learns no threshold"
            lines.append(f"{r['target']}: best single cosine threshold on held-out pairs {rep['best_threshold']:.3f} "
                         f"({100 * rep['best_accuracy']:.2f}%); {learned}")
    return "\n".join(lines)


def clear_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and where: printed as one line, without a traceback."""
    from data.recordio import RecordIOError
    from heads import HeadConfigError
    from trainer.checkpoint import CheckpointError
    from trainer.guard import NonFiniteError
    from trainer.runlock import RunLockError
    return ConfigError, CheckpointError, RunLockError, NonFiniteError, RecordIOError, HeadConfigError


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from trainer.train import train
    try:
        result = train(cfg)
    except clear_errors() as e:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        print(f"rank {rank}: error: {e}", file=sys.stderr, flush=True)
        return 1
    if result["rank"] == 0:
        out = Path(result["output"])
        if result["stopped_by_signal"]:
            print(f"stopped by {result['stopped_by_signal']} after step {result['global_step']}; continue with "
                  f"the same command and train.resume=auto")
        print(summary_table(result["eval"]))
        print(f"trained {result['global_step']} steps in {result['train_seconds']:.0f}s "
              f"(whole job {time.perf_counter() - t0:.0f}s)")
        print(f"checkpoint: {out / 'checkpoints'} (newest named in checkpoints/latest)")
        print(f"log:        {out / 'train.log'}")
    return 0
