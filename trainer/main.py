"""Entry point of one rank: parse `[CONFIG] [key=value ...]`, train, and print where everything went.

`--help` and `list` answer at once, without a rank or a process group (./run.sh sends them here before launching);
--help imports nothing heavy."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from trainer.config import DEFAULT_CONFIG, ConfigError, load_config

USAGE = """usage: ./run.sh [CONFIG.yaml] [key=value ...]   train (default CONFIG: configs/demo.yaml: the synthetic demo)
       ./run.sh list                            the losses, backbones and recipes, one line each
       ./run.sh test [pytest args ...]          lint (ruff) + the test suite (what CI runs)
       ./run.sh eval COMMAND [args ...]         verification | ijb | megaface | onnx | tables (each has --help)
       ./run.sh python [args ...]               the project's Python (python -m data.tools.pack --help, ...)
       ./run.sh --help                          this text

Training launches one rank per local GPU (2 on a machine without GPU; NPROC=N overrides). Under
`deepspeed --no_python ./run.sh ...` or `srun ./run.sh ...` each task is a rank and runs
`python -m trainer [CONFIG.yaml] [key=value ...]` itself.

key=value overrides any key of configs/base.yaml by its dotted name (loss=NAME is short for head.loss=NAME):
    ./run.sh loss=uce train.epochs=8                         the demo with another loss, longer
    ./run.sh configs/demo_threshold.yaml                     the demo trained until the learned threshold settles
    ./run.sh configs/unitsface_r50_casia.yaml data.root=/data/casia data.val_root=/data/casia
An unknown key is an error naming the nearest valid one.

The run's folder (key `output`) gets config.yaml (the resolved configuration, at start), train.log, metrics.csv,
tensorboard/ (tensorboard --logdir OUTPUT/tensorboard), curves.png (after each evaluation and at the end) and
checkpoints/. The same command with train.resume=auto continues a stopped run."""


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    # The deepspeed launcher inserts --local_rank=N; LOCAL_RANK in the environment already says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        raise SystemExit(0)
    if argv[:1] == ["list"]:
        from trainer.catalog import format_catalog
        print(format_catalog())
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


def _rank_label() -> str:
    from runtime.process import LaunchError, detect
    try:
        return str(detect().rank)
    except LaunchError:
        return "?"


def clear_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and where: printed as one line, without a traceback."""
    from data.recordio import RecordIOError
    from heads import HeadConfigError
    from runtime.layout import CheckpointError
    from runtime.process import LaunchError
    from trainer.guard import NonFiniteError
    from trainer.runlock import RunLockError
    return ConfigError, CheckpointError, RunLockError, NonFiniteError, RecordIOError, HeadConfigError, LaunchError


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(config, overrides)
    except SystemExit as e:  # --help, list
        return int(e.code or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cfg["_overrides"] = list(overrides)  # written into OUTPUT/config.yaml's header (keys with _ are not config)
    from trainer.train import train
    try:
        result = train(cfg)
    except clear_errors() as e:
        rank = _rank_label()
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
        if result.get("curves"):
            print(f"curves:     {result['curves']}")
        if result.get("tensorboard"):
            print(f"tensorboard --logdir {result['tensorboard']}")
        if result.get("warnings"):
            print(f"warnings:   {result['warnings']} (lines marked WARNING in train.log)")
    return 0
