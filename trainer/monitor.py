"""What a run shows while it runs: TensorBoard events, metrics.csv and (optionally) Weights & Biases, all fed by rank 0
through one object, and curves.png (loss, lr, verification accuracy, learned threshold against t*) after every
evaluation and at the end.

The training loop hands the monitor plain Python numbers it already read on a log step (loss.item() and the head's
statistics of that step) and the tables of an evaluation: the monitor itself never touches a device tensor, so it
adds no host sync to a training step. Other ranks get a monitor that does nothing.

Scalar names (TensorBoard tags, the `name` column of metrics.csv, wandb keys):

    train/loss, train/lr, train/samples_per_s, train/skipped_steps, and each scalar the head logs on that step:
    train/loss_s2c, train/loss_s2s (the two terms of an embedded loss), train/t_uss, train/b_uss, train/t_uce,
    train/b_uce, train/p_v, train/memory_filled, train/accuracy, train/num_sampled; train/cuda_max_memory_gb on CUDA
    eval/<target>/accuracy (mean over the 10 folds), eval/<target>/accuracy_std, eval/<target>/fold_<k>,
    eval/<target>/best_single_accuracy, eval/<target>/best_single_threshold (t*), and per learned threshold <t>
    (t_uss, t_uce, p_v): eval/<target>/<t> (its value), eval/<target>/accuracy_at_<t>, eval/<target>/<t>_minus_t*

Steps are optimizer steps (global_step); metrics.csv also carries the epoch (step / steps per epoch) and the time.
On resume the rows after the resumed step are dropped from metrics.csv, TensorBoard is told to purge them, and the
curves continue the earlier rows.
"""
from __future__ import annotations

import csv
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from runtime.layout import CONFIG_FILE
from trainer.config import ConfigError, dump_config

CSV_NAME = "metrics.csv"
CURVES_NAME = "curves.png"
TENSORBOARD_DIR = "tensorboard"
CSV_FIELDS = ("step", "epoch", "name", "value", "time")
WANDB_MODES = ("offline", "online", "disabled")
LEARNED = ("t_uss", "t_uce", "p_v")  # learned cosine thresholds the heads report
CURVE_PANELS = ("loss", "learning rate", "verification accuracy", "learned threshold t vs t* (held-out pairs)")


def write_resolved_config(cfg: dict, output: Path, overrides: Iterable[str] = ()) -> Path:
    """OUTPUT/config.yaml: the configuration this run resolved (base <- recipe <- overrides), written at start."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    header = ["# The resolved configuration of this run (every key; written at its start)."]
    if cfg.get("_config_path"):
        header.append(f"# config: {cfg['_config_path']}")
    overrides = list(overrides)
    if overrides:
        header.append(f"# overrides: {' '.join(overrides)}")
    path = output / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text("\n".join(header) + "\n" + dump_config(cfg))
    tmp.replace(path)
    return path


def _options(cfg: dict) -> dict:
    m = cfg.get("monitor")
    if not isinstance(m, Mapping):
        raise ConfigError("config key `monitor`: expected a mapping (tensorboard, csv, wandb, ...) as in "
                          "configs/base.yaml")
    if m.get("wandb_mode") not in WANDB_MODES:
        raise ConfigError(f"config key `monitor.wandb_mode`: expected one of {', '.join(WANDB_MODES)}, "
                          f"got {m.get('wandb_mode')!r}")
    return dict(m)


class History:
    """Every scalar of the run as (step, epoch, value) per name; what curves.png is drawn from."""

    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)

    def add(self, step: int, epoch: float, name: str, value: float) -> None:
        self.series[name].append((int(step), float(epoch), float(value)))

    def get(self, name: str) -> list[tuple[int, float, float]]:
        return self.series.get(name, [])

    def names(self) -> list[str]:
        return sorted(self.series)

    def targets(self) -> list[str]:
        return sorted({n.split("/")[1] for n in self.series if n.startswith("eval/") and n.count("/") >= 2})


def read_csv(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Rows of a metrics.csv (dicts of the CSV_FIELDS), only those with step <= up_to_step when given."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{path}: expected the columns {', '.join(CSV_FIELDS)}, got {reader.fieldnames}")
        for r in reader:
            if up_to_step is None or int(r["step"]) <= up_to_step:
                rows.append(r)
    return rows


class Monitor:
    """Rank 0's sink for scalars: TensorBoard, metrics.csv, wandb (each switched in the `monitor:` config section),
    plus the in-memory history behind curves.png. Call ``start(global_step)`` once the resume point is known."""

    def __init__(self, cfg: dict, output: Path, rank: int, steps_per_epoch: int, log=None) -> None:
        self.opts = _options(cfg)
        self.cfg, self.output, self.rank, self.log = cfg, Path(output), rank, log
        self.active = rank == 0
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.history = History()
        self.tb = self.wandb_run = None
        self._csv_file = self._csv = None
        self.started = False
        if self.active and self.opts["tensorboard"]:
            try:
                import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
            except ImportError:
                raise ConfigError("config key `monitor.tensorboard`: true needs the tensorboard package (pinned in "
                                  "requirements.txt; ./run.sh installs it); or set monitor.tensorboard=false") from None
        if self.active and self.opts["wandb"]:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("config key `monitor.wandb`: true needs the wandb package, which is optional "
                                  "(.venv/bin/pip install wandb); or set monitor.wandb=false") from None

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self, global_step: int) -> None:
        """Open the sinks. On a resumed run (global_step > 0) the earlier rows up to global_step are kept (and fill
        the curves), later ones are dropped: those steps are trained again."""
        if not self.active or self.started:
            return
        self.started = True
        self.output.mkdir(parents=True, exist_ok=True)
        csv_path = self.output / CSV_NAME
        earlier: list[dict] = []
        if global_step > 0 and csv_path.is_file():
            try:
                earlier = read_csv(csv_path, up_to_step=global_step)
            except (ValueError, KeyError, OSError) as e:
                self._warn(f"monitor: {csv_path} unreadable ({e}); the curves start at step {global_step}")
                earlier = []
            for r in earlier:
                self.history.add(int(r["step"]), float(r["epoch"]), r["name"], float(r["value"]))
        if self.opts["csv"]:
            self._csv_file = open(csv_path, "w", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS)
            self._csv.writeheader()
            self._csv.writerows(earlier)
            self._csv_file.flush()
        if self.opts["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(self.output / TENSORBOARD_DIR),
                                    purge_step=global_step + 1 if global_step > 0 else None,
                                    flush_secs=30)
        if self.opts["wandb"]:
            import wandb
            self.wandb_run = wandb.init(project=self.opts["wandb_project"], mode=self.opts["wandb_mode"],
                                        dir=str(self.output), name=self.output.name, resume="allow",
                                        config={k: v for k, v in self.cfg.items() if not k.startswith("_")})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = self._csv = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def _warn(self, message: str) -> None:
        if self.log is not None:
            self.log.warning(message)

    # -- scalars -----------------------------------------------------------------------------------------------------
    def scalars(self, step: int, values: Mapping[str, Any], group: str = "train") -> None:
        """Record ``values`` (name -> Python number) under ``group/`` at ``step``; non-numbers are ignored."""
        if not self.active:
            return
        if not self.started:
            self.start(0)
        epoch = step / self.steps_per_epoch
        now = time.time()
        clean = {}
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            clean[f"{group}/{name}"] = float(v)
        for tag, v in clean.items():
            self.history.add(step, epoch, tag, v)
            if self.tb is not None:
                self.tb.add_scalar(tag, v, global_step=step, walltime=now)
            if self._csv is not None:
                self._csv.writerow({"step": step, "epoch": f"{epoch:.6g}", "name": tag, "value": repr(v),
                                    "time": f"{now:.3f}"})
        if self._csv_file is not None:
            self._csv_file.flush()
        if self.wandb_run is not None and clean:
            self.wandb_run.log({**clean, "epoch": epoch}, step=step)

    def evaluation(self, step: int, results: list[dict]) -> None:
        """One evaluation's per-target results (the trainer's Evaluator rows: evaluate_pairs' keys + `thresholds`)."""
        if not self.active:
            return
        values: dict[str, float] = {}
        for r in results:
            target = r["target"]
            values[f"{target}/accuracy"] = r["accuracy_mean"]
            values[f"{target}/accuracy_std"] = r["accuracy_std"]
            for k, acc in enumerate(r.get("fold_accuracies", [])):
                values[f"{target}/fold_{k}"] = acc
            rep = r.get("thresholds")
            if rep:
                values[f"{target}/best_single_accuracy"] = rep["best_accuracy"]
                values[f"{target}/best_single_threshold"] = rep["best_threshold"]
                for name, row in rep["learned"].items():
                    values[f"{target}/{name}"] = row["threshold"]
                    values[f"{target}/accuracy_at_{name}"] = row["accuracy"]
                    values[f"{target}/{name}_minus_t*"] = row["threshold"] - rep["best_threshold"]
            else:
                values[f"{target}/best_single_accuracy"] = r["uniform_accuracy"]
                values[f"{target}/best_single_threshold"] = r["uniform_cosine_threshold"]
        self.scalars(step, values, group="eval")
        if self.tb is not None:
            self.tb.flush()

    # -- the picture -------------------------------------------------------------------------------------------------
    def write_curves(self) -> Path | None:
        """curves.png beside train.log (rank 0, when monitor.curves is on); None elsewhere or when nothing was
        logged. A failure to draw is a warning, never the end of a run."""
        if not self.active or not self.opts["curves"] or not self.history.series:
            return None
        path = self.output / CURVES_NAME
        try:
            plot_curves(self.history, path, title=str(self.output.name))
        except Exception as e:  # noqa: BLE001  (a picture must not fail a finished training run)
            self._warn(f"monitor: could not draw {path}: {type(e).__name__}: {e}")
            return None
        return path


# -- curves.png ------------------------------------------------------------------------------------------------------
def _xy(points: list[tuple[int, float, float]]) -> tuple[list[float], list[float]]:
    return [p[1] for p in points], [p[2] for p in points]


def plot_curves(history: History, path: Path, title: str = "") -> list[str]:
    """Draw the four panels (CURVE_PANELS) of ``history`` against epochs into ``path`` (PNG, headless Agg canvas);
    returns the panel titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ax_loss, ax_lr, ax_acc, ax_thr = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    for ax, name in zip((ax_loss, ax_lr, ax_acc, ax_thr), CURVE_PANELS):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)

    loss_names = ["train/loss"] + [n for n in history.names() if n.startswith("train/loss_")]
    for name in loss_names:
        if history.get(name):
            ax_loss.plot(*_xy(history.get(name)), label=name.split("/", 1)[1], lw=1.2)
    _legend_or_note(ax_loss, "no training step logged")

    if history.get("train/lr"):
        ax_lr.plot(*_xy(history.get("train/lr")), color="tab:purple", lw=1.2)
    else:
        _note(ax_lr, "no training step logged")

    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:gray", "tab:olive"]
    targets = history.targets()
    for i, target in enumerate(targets):
        c = colors[i % len(colors)]
        acc = history.get(f"eval/{target}/accuracy")
        if acc:
            x, y = _xy(acc)
            ax_acc.plot(x, [100 * v for v in y], "o-", color=c, label=f"{target} (10-fold)", ms=4)
        best = history.get(f"eval/{target}/best_single_accuracy")
        if best:
            x, y = _xy(best)
            ax_acc.plot(x, [100 * v for v in y], "s--", color=c, alpha=0.6, ms=3, label=f"{target} best single t*")
        for t in LEARNED:
            at = history.get(f"eval/{target}/accuracy_at_{t}")
            if at:
                x, y = _xy(at)
                ax_acc.plot(x, [100 * v for v in y], "^:", color=c, ms=4, label=f"{target} at learned {t}")
        star = history.get(f"eval/{target}/best_single_threshold")
        if star:
            ax_thr.plot(*_xy(star), "o--", color=c, ms=4, label=f"t* {target}")
    if targets:
        ax_acc.set_ylabel("accuracy %")
    _legend_or_note(ax_acc, "no verification data (data.val_root)")

    learned_any = False
    for t, c in zip(LEARNED, ("black", "tab:cyan", "tab:olive")):
        pts = history.get(f"train/{t}")
        if pts:
            learned_any = True
            ax_thr.plot(*_xy(pts), "-", color=c, lw=1.5, label=f"learned {t} (train log)")
    ax_thr.set_ylabel("cosine")
    if not learned_any and targets:
        ax_thr.text(0.02, 0.02, "this loss learns no threshold", transform=ax_thr.transAxes, fontsize=9)
    _legend_or_note(ax_thr, "no verification data and no learned threshold")
    if title:
        fig.suptitle(title)
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return [ax.get_title() for ax in (ax_loss, ax_lr, ax_acc, ax_thr)]


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def _legend_or_note(ax, note: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    else:
        _note(ax, note)


def cuda_memory_gb(device) -> float | None:
    """Peak allocated CUDA memory of this rank in GiB (the allocator's counter: no device sync); None on CPU."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 30
