"""The run monitor: TensorBoard events read back with TensorBoard's own reader, metrics.csv, curves.png, the resolved
config, resume, optional wandb, and log lines with levels."""
import csv
import logging
import struct

import pytest

from tests.monitor_tags import assert_scalar_tags
from trainer.config import load_config
from trainer.monitor import CURVE_PANELS, Monitor, plot_curves, read_csv, write_resolved_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cfg(**monitor):
    c = load_config("configs/demo.yaml")
    c["monitor"].update(monitor)
    return c


def results(acc: float, t_star: float, t_learned: float | None):
    rows = []
    for target in ("synth_lfw", "synth_cfp"):
        learned = {} if t_learned is None else {"t_uss": {"threshold": t_learned, "accuracy": acc - 0.05}}
        rows.append({"target": target, "accuracy_mean": acc, "accuracy_std": 0.02,
                     "fold_accuracies": [acc] * 10, "uniform_accuracy": acc + 0.01,
                     "uniform_cosine_threshold": t_star,
                     "thresholds": {"best_threshold": t_star, "best_accuracy": acc + 0.01, "pairs": 1000,
                                    "learned": learned}})
    return rows


def feed(m: Monitor, steps=range(2, 21, 2), evals=(0, 10, 20)):
    for step in steps:
        m.scalars(step, {"loss": 40.0 - step, "lr": 0.1 / step, "samples_per_s": 200.0, "skipped_steps": 0,
                         "loss_s2c": 30.0 - step, "loss_s2s": 10.0, "t_uss": 0.9 - step / 100,
                         "b_uss": 64 * (0.9 - step / 100), "memory_filled": 1.0, "cuda_max_memory_gb": None,
                         "flag": True})
    for step in evals:
        m.evaluation(step, results(0.6 + step / 100, 0.7 - step / 100, None if step == 0 else 0.9 - step / 100))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_tensorboard_csv_and_curves_hold_every_named_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    m = Monitor(cfg(), tmp_path, rank=0, steps_per_epoch=10)
    m.start(0)
    feed(m)
    curves = m.write_curves()
    m.close()

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert_scalar_tags(tags, ("accuracy", "accuracy_std", "fold_0", "fold_9", "best_single_accuracy",
                              "best_single_threshold", "t_uss", "accuracy_at_t_uss", "t_uss_minus_t*"))
    assert "train/cuda_max_memory_gb" not in tags and "train/flag" not in tags  # None and bool are not scalars
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(2, 21, 2)) and loss[0].value == pytest.approx(38.0)
    t_star = acc.Scalars("eval/synth_lfw/best_single_threshold")
    assert [(e.step, round(e.value, 4)) for e in t_star] == [(0, 0.7), (10, 0.6), (20, 0.5)]
    gap = acc.Scalars("eval/synth_lfw/t_uss_minus_t*")
    assert [e.step for e in gap] == [10, 20] and gap[-1].value == pytest.approx(0.7 - 0.5)

    rows = read_csv(tmp_path / "metrics.csv")
    assert {r["name"] for r in rows} == tags
    lr = [r for r in rows if r["name"] == "train/lr"]
    assert len(lr) == 10 and float(lr[-1]["epoch"]) == pytest.approx(2.0) and float(lr[0]["value"]) == 0.05

    assert curves == tmp_path / "curves.png"
    w, h = png_size(curves)
    assert w >= 1000 and h >= 700


def test_curve_panels_are_drawn_with_and_without_data(tmp_path):
    m = Monitor(cfg(tensorboard=False, csv=False), tmp_path, rank=0, steps_per_epoch=10)
    feed(m)
    assert plot_curves(m.history, tmp_path / "a.png") == list(CURVE_PANELS)
    assert CURVE_PANELS == ("loss", "learning rate", "verification accuracy",
                            "learned threshold t vs t* (held-out pairs)")
    png_size(tmp_path / "a.png")
    # A loss without a learned threshold and a run without verification data still get all four panels.
    empty = Monitor(cfg(tensorboard=False, csv=False), tmp_path / "b", rank=0, steps_per_epoch=10)
    empty.scalars(1, {"loss": 3.0, "lr": 0.1})
    assert plot_curves(empty.history, tmp_path / "b.png") == list(CURVE_PANELS)
    png_size(tmp_path / "b.png")
    assert not (tmp_path / "b" / "metrics.csv").exists() and not (tmp_path / "b" / "tensorboard").exists()


def test_other_ranks_write_nothing(tmp_path):
    m = Monitor(cfg(), tmp_path, rank=1, steps_per_epoch=10)
    m.start(0)
    feed(m)
    assert m.write_curves() is None
    m.close()
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_keeps_the_rows_before_its_step_and_purges_the_later_ones(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    first = Monitor(cfg(), tmp_path, rank=0, steps_per_epoch=10)
    first.start(0)
    feed(first, steps=range(1, 16), evals=(10,))  # logged up to step 15; the last checkpoint was at step 10
    first.close()
    again = Monitor(cfg(), tmp_path, rank=0, steps_per_epoch=10)
    again.start(10)
    feed(again, steps=range(11, 21), evals=(20,))
    again.close()
    steps = [int(r["step"]) for r in read_csv(tmp_path / "metrics.csv") if r["name"] == "train/loss"]
    assert steps == list(range(1, 21))  # 11..15 of the first run dropped, written once by the resumed one
    assert [p[0] for p in again.history.get("train/loss")] == list(range(1, 21))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))


def test_monitor_switches_are_checked_and_wandb_stays_optional(tmp_path, monkeypatch):
    from trainer.config import ConfigError
    c = cfg()
    c["monitor"]["wandb_mode"] = "sometimes"
    with pytest.raises(ConfigError, match="monitor.wandb_mode"):
        Monitor(c, tmp_path, rank=0, steps_per_epoch=1)
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"monitor.wandb.*optional"):
        Monitor(cfg(wandb=True), tmp_path, rank=0, steps_per_epoch=1)
    Monitor(cfg(wandb=True), tmp_path, rank=1, steps_per_epoch=1)  # other ranks never import it
    m = Monitor(cfg(), tmp_path, rank=0, steps_per_epoch=1)  # wandb off: never imported
    m.start(0)
    m.close()


def test_the_resolved_config_is_written_and_loads_back_to_the_same_run(tmp_path):
    c = load_config("configs/demo.yaml", ["train.epochs=7", "loss=uce"])
    path = write_resolved_config(c, tmp_path, ["train.epochs=7", "loss=uce"])
    text = path.read_text()
    assert "# config: configs/demo.yaml" in text and "# overrides: train.epochs=7 loss=uce" in text
    again = load_config(path)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    assert strip(again) == strip(c) and again["train"]["epochs"] == 7 and again["head"]["loss"] == "uce"


def test_log_lines_carry_their_level_and_warnings_are_counted(tmp_path, capsys):
    from trainer.log import level_counts, setup_logging
    log = setup_logging(tmp_path, rank=0)
    log.info("epoch 0 step 1/2  loss 1.0")
    log.warning("head resharded from 2 to 1 ranks")
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0].split()[1:3] == ["INFO", "epoch"] and lines[1].split()[1:3] == ["WARNING", "head"]
    assert "\033[" not in capsys.readouterr().out  # not a terminal: no colour codes
    assert level_counts(log).warnings == 1
    other = setup_logging(tmp_path / "r1", rank=1)
    other.info("not shown")
    other.warning("seen")
    out = capsys.readouterr().out
    assert "not shown" not in out and "WARNING [rank 1] seen" in out
    assert not (tmp_path / "r1" / "train.log").exists()
    logging.getLogger("facetrain").handlers.clear()


def test_metrics_csv_with_other_columns_is_refused_by_name(tmp_path):
    bad = tmp_path / "metrics.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows([["a", "b"], [1, 2]])
    with pytest.raises(ValueError, match="metrics.csv: expected the columns step, epoch, name, value, time"):
        read_csv(bad)
