"""One rank's training run: set-up (rank, device, lock, logs, watchdog, data), then the loop.

The loop, in the order data flows (README "One step, file by file"): the loader's batch -> DeepSpeed(backbone)
-> the class-sharded head (heads/) -> backward -> the step guard (trainer/guard.py: one agreed verdict, the step's
only host sync) -> both optimizers -> logs; checkpoints (trainer/checkpoint.py) at epoch ends, every N steps or
minutes, and on a stop signal; verification (trainer/evaluation.py) between epochs. Where the run stands, and where
a resumed one starts, is trainer/position.py's.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

import heads
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from runtime import process
from runtime.layout import LATEST, checkpoints_dir
from trainer import checkpoint, distributed
from trainer.engine import average_buffers, build_backbone, build_engine, head_config, resolve_precision, set_lr
from trainer.evaluation import Evaluator
from trainer.guard import StepFlags, StepGuard
from trainer.log import Meter, level_counts, setup_logging
from trainer.monitor import LEARNED, TENSORBOARD_DIR, Monitor, cuda_memory_gb, write_resolved_config
from trainer.position import CheckpointClock, Position
from trainer.runlock import RunLock, RunLockError
from trainer.schedule import schedule_from_config
from trainer.signals import PreemptionFlag, stop_with_parent
from trainer.watchdog import EXIT_HUNG, Watchdog


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def prepare_data(cfg: dict, env: process.DistEnv, log) -> None:
    """Generate the synthetic demo data on rank 0 when `data.synthetic` is set and train.rec is missing."""
    root = Path(cfg["data"]["root"])
    syn = cfg["data"]["synthetic"]
    if syn is not None and env.rank == 0 and not (root / "train.rec").is_file():
        from data.synthetic import make_dataset
        t0 = time.perf_counter()
        log.info(f"writing synthetic identities to {root} ...")
        summary = make_dataset(root, **{"progress": False, **syn})
        log.info(f"synthetic data ready in {time.perf_counter() - t0:.1f}s: {summary['train']['images']} images of "
                 f"{summary['train']['num_ids']} identities, verification bins {', '.join(summary['val']['bins'])}")
    process.barrier()
    if not (root / "train.rec").is_file():
        raise FileNotFoundError(f"data.root={root}: no train.rec there (expected train.rec, train.idx, property)")


def scalar_logs(logs: dict) -> dict[str, float | int]:
    """The head's one-element logs (accuracy, learned thresholds, loss terms, ...) as Python numbers. Reads device
    tensors: call it on log steps only (they already read the loss)."""
    out: dict[str, float | int] = {}
    for k, v in logs.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if isinstance(v, (float, int)) and not isinstance(v, bool):
            out[k] = v
    return out


def format_logs(logs: dict) -> str:
    """The head's scalar logs as `name value` pairs (tensors or numbers, as scalar_logs returns them)."""
    parts = []
    for k, v in scalar_logs(logs).items():
        parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)


def take_lock(lock: RunLock, env, force: bool) -> str | None:
    """Rank 0 locks the output folder; every rank learns whether it could (one all-reduce)."""
    error, warning = None, None
    if env.rank == 0:
        try:
            warning = lock.acquire(force=force)
        except RunLockError as e:
            error = e
    if process.agree_any(error is not None) and error is None:
        error = RunLockError(f"rank 0 could not lock {lock.path} (its message names the holder)")
    if error is not None:
        raise error
    return warning


def write_status(state: str, rank: int) -> None:
    """For batch scripts: rank 0 writes finished | stopped | failed to $FACETRAIN_STATUS_FILE when it is set
    (scripts/slurm.sbatch requeues the job when the run stopped on a signal before its end)."""
    path = os.environ.get("FACETRAIN_STATUS_FILE")
    if path and rank == 0:
        try:
            Path(path).write_text(state + "\n")
        except OSError:
            pass


def train(cfg: dict) -> dict:
    env = process.detect()
    device = process.pick_device(env)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (torch.get_num_threads()) // max(env.local_world_size, 1)))
    # From the first moment: a stop signal during set-up is kept and honoured at the first step (exit 0, not death).
    preempt = PreemptionFlag()
    if env.launcher == "deepspeed":
        stop_with_parent()  # the DeepSpeed launcher gone (SIGUSR1 kills it): save and stop, not train on alone
    distributed.init(env, device)
    output = Path(cfg["output"])
    t = cfg["train"]
    lock = RunLock(output, stale_after=t["hang_timeout_s"])
    ok = False
    watchdog = None
    try:
        lock_warning = take_lock(lock, env, t["force_unlock"])
        log = setup_logging(output, env.rank)
        if lock_warning:
            log.warning(lock_warning)
        log.info(f"rank {env.rank}/{env.world_size} via {env.launcher} on {device}; output {output}")
        if env.rank == 0:
            write_resolved_config(cfg, output, cfg.get("_overrides", ()))

        def hung(message: str) -> None:
            log.error(message)
            lock.release()
            process.abort_process(EXIT_HUNG)

        watchdog = Watchdog(output, env.rank, env.world_size, t["hang_timeout_s"], on_hang=hung,
                            on_beat=lock.refresh if env.rank == 0 else None).start()
        result = _train(cfg, env, device, output, log, watchdog, preempt)
        counts = level_counts(log)
        result["warnings"] = counts.warnings if counts else 0
        ok = True
        write_status("stopped" if result["stopped_by_signal"] else "finished", env.rank)
        return result
    except BaseException:
        write_status("failed", env.rank)
        raise
    finally:
        preempt.restore()
        if watchdog is not None:
            watchdog.stop()
        lock.release()
        process.shutdown(synchronize=ok)


def _train(cfg: dict, env, device, output: Path, log, watchdog: Watchdog, preempt: PreemptionFlag) -> dict:
    from data.loader import build_loader

    seed_everything(cfg["seed"] + env.rank)
    if env.rank == 0:
        for stale in checkpoint.remove_stale_tmp(checkpoints_dir(output)):
            log.warning(f"removed {stale}: left by a save that was interrupted (the checkpoint before it is intact)")
    prepare_data(cfg, env, log)
    d, t = cfg["data"], cfg["train"]
    data = build_loader(d["loader"], d["root"], t["batch_size"], env.rank, env.world_size, cfg["seed"], device,
                        num_workers=d["num_workers"], flip=d["flip"], augment=d["augment"],
                        cache_dir=d["cache_dir"], progress=env.rank == 0, max_bad_images=d["max_bad_images"])
    monitor = Monitor(cfg, output, env.rank, data.steps_per_epoch, log)
    try:
        return Run(cfg, env, device, output, log, data, watchdog, preempt, monitor).loop()
    finally:
        monitor.close()
        data.close()



class Run:
    """One rank's run once the data is there: the model parts, where training stands, and the loop."""

    def __init__(self, cfg: dict, env: process.DistEnv, device: torch.device, output: Path, log, data,
                 watchdog: Watchdog, preempt: PreemptionFlag, monitor: Monitor) -> None:
        self.cfg, self.t, self.env, self.device, self.output, self.log = cfg, cfg["train"], env, device, output, log
        self.data, self.watchdog, self.preempt, self.monitor = data, watchdog, preempt, monitor
        t, m, o = cfg["train"], cfg["model"], cfg["optim"]
        self.num_classes = data.num_classes
        self.precision = resolve_precision(m["precision"], device)
        backbone = build_backbone(cfg, device, self.precision)
        self.partition = ClassPartition(self.num_classes, env.world_size, env.rank)
        self.head: heads.Head = heads.build_head(head_config(cfg), num_classes=self.num_classes,
                                                 embedding_size=m["num_features"], partition=self.partition,
                                                 seed=cfg["seed"]).to(device)
        self.engine, self.backbone_opt = build_engine(backbone, cfg, env.world_size)
        self.head_opt = HeadOptimizer(self.head, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        spe = data.steps_per_epoch
        self.total_steps = spe * t["epochs"] if t["max_steps"] is None else min(spe * t["epochs"], t["max_steps"])
        self.lr_of = schedule_from_config(cfg, spe, spe * t["epochs"])
        self.channels_last = device.type == "cuda" and bool(m["channels_last"])
        self.ckpt_root = checkpoints_dir(output)
        self.pos, guard_state = self.resume(Position(spe, env.world_size * t["batch_size"]))
        self.saved_at = self.pos.global_step
        self.describe()
        monitor.start(self.pos.global_step)
        self.evaluator = Evaluator(cfg, device, log, env.rank)
        if t["eval_before"] and self.pos.at_start:
            self.evaluate("before training")
        self.meter = Meter(self.pos.global_batch, self.total_steps)
        self.last_loss = float("nan")
        self.guard = StepGuard(self.engine, self.head, self.head_opt, max_consecutive=t["max_nonfinite_steps"],
                               loss_scale=m["loss_scale"] if self.precision == "fp16" else None)
        self.guard.load_state_dict(guard_state)
        self.clock = CheckpointClock(t["checkpoint_every_steps"], t["checkpoint_every_minutes"], env.rank)

    def loop(self) -> dict:
        pos, t, data, head = self.pos, self.t, self.data, self.head
        self.engine.train()
        t_train = time.perf_counter()
        done, stopped = pos.global_step >= self.total_steps, False
        for epoch in range(pos.epoch, t["epochs"]):
            if done:
                break
            data.set_epoch(epoch)
            data.set_start_step(pos.begin_epoch(epoch))
            head.set_epoch(epoch)  # losses with start epochs (UniTSFace's USS from 1, EPL from 3)
            self.watchdog.phase(True)
            for images, labels in data:  # already on the device
                flags = self.step(images, labels)
                if pos.global_step >= self.total_steps:  # the end: a stop asked for now changes nothing
                    done = True
                    break
                if flags.stop:
                    self.log.warning(f"signal {self.preempt.signal_name or 'on another rank'}: saving a checkpoint "
                                     f"at step {pos.global_step} and stopping")
                    done = stopped = True
                    break
                if (flags.checkpoint or self.clock.step_due(pos.global_step)) and not pos.epoch_complete:
                    self.save()
                    self.watchdog.phase(True)
            if pos.global_step != self.saved_at or pos.epoch_complete:
                self.save()
            if stopped:
                break
            if t["eval_every_epoch"] or done or epoch + 1 == t["epochs"]:
                self.evaluate(f"after epoch {epoch + 1}")
        return self.finish(time.perf_counter() - t_train, stopped)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepFlags:
        """One optimizer step on every rank, or one skipped on every rank (the guard's agreed verdict)."""
        pos, guard = self.pos, self.guard
        lr = self.lr_of(pos.global_step)
        set_lr(lr, self.backbone_opt, self.head_opt)
        log_step = (pos.global_step + 1) % self.t["log_every"] == 0 or pos.global_step + 1 == self.total_steps
        heads.set_collect_stats(self.head, log_step)  # accuracy, memory fill: computed on log steps only
        guard.before_forward()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss, logs = self.head(self.engine(images), labels)
        self.engine.backward(guard.scale_loss(loss))
        flags = guard.agree(loss, stop=self.preempt.requested, checkpoint=self.clock.time_due())  # the host sync
        applied = guard.apply(flags)
        pos.global_step += 1
        self.meter.tick()
        self.watchdog.progress(pos.global_step)
        if not applied:
            self.report_skip(loss)
        elif log_step:
            self.report(loss, lr, logs)
        return flags

    # ---------------------------------------------------------------------------------------- the loop's units
    def resume(self, fresh: Position) -> tuple[Position, dict]:
        """(the position to start from, the step guard's saved state): train.resume's checkpoint, or ``fresh``."""
        if self.t["resume"] is None:
            return fresh, {}
        folder = checkpoint.resolve(self.t["resume"], self.output)
        if folder is None:
            self.log.info("train.resume=auto: no checkpoint yet, starting fresh")
            return fresh, {}
        meta = checkpoint.load(folder, engine=self.engine, head=self.head, head_opt=self.head_opt,
                               rank=self.env.rank, world_size=self.env.world_size,
                               zero_stage=self.engine.zero_optimization_stage(), num_classes=self.num_classes,
                               log=self.log.warning)
        pos = Position.resumed(meta, fresh.steps_per_epoch, fresh.global_batch, self.log)
        self.log.info(f"resumed from {folder} at epoch {pos.epoch}, step {pos.global_step}")
        return pos, meta.pop("trainer_state", {})

    def describe(self) -> None:
        m, t, env, data = self.cfg["model"], self.t, self.env, self.data
        self.log.info(f"precision {self.precision}"
                      + (f" (model.precision=auto on {self.device})" if m["precision"] == "auto" else "")
                      + (f", dynamic loss scale from {m['loss_scale']:g}" if self.precision == "fp16" else ""))
        self.log.info(f"{self.num_classes} classes, {data.num_images} images ({type(data).__name__}), "
                      f"{env.world_size} ranks x {t['batch_size']} = {self.pos.global_batch} per step, "
                      f"{data.steps_per_epoch} steps/epoch, {t['epochs']} epochs; head: {self.cfg['head']['loss']} "
                      f"sample_rate={self.cfg['head']['sample_rate']} ({self.partition.num_local} classes on this "
                      f"rank)")

    def report(self, loss: torch.Tensor, lr: float, logs: dict) -> None:
        """A log step: the log line and the monitor's scalars."""
        pos, guard = self.pos, self.guard
        self.last_loss = loss.item()
        sps, hours = self.meter.report(pos.global_step)
        values = scalar_logs(logs)  # log steps only: their statistics were computed for this step
        self.evaluator.learned_seen.update(k for k in values if k in LEARNED)
        skipped = f"  skipped {guard.skipped_total}" if guard.skipped_total else ""
        self.log.info(f"epoch {pos.epoch} step {pos.global_step}/{self.total_steps}  loss {self.last_loss:.4f}  "
                      f"lr {lr:.5f}  {sps:.1f} samples/s  ETA {hours * 60:.1f} min  {format_logs(values)}{skipped}")
        self.monitor.scalars(pos.global_step, {"loss": self.last_loss, "lr": lr, "samples_per_s": sps,
                                               "skipped_steps": guard.skipped_total, **values,
                                               "cuda_max_memory_gb": cuda_memory_gb(self.device)})

    def report_skip(self, loss: torch.Tensor) -> None:
        """A step the guard skipped on every rank: an fp16 overflow, or non-finite values (K in a row abort)."""
        guard, where = self.guard, f"epoch {self.pos.epoch}, step {self.pos.global_step}"
        if guard.scale is not None and guard.consecutive == 0:
            self.log.info(f"{where}: fp16 gradient overflow, step skipped on every rank; loss scale now "
                          f"{float(guard.scale):g}")
        else:
            self.log.warning(f"{where}: non-finite loss or gradients (loss {loss.item():.4g}); step skipped on every "
                             f"rank, nothing applied ({guard.consecutive} in a row, {guard.skipped_total} in total)")
        guard.check_consecutive(where, self.data.batch_keys())

    def save(self) -> None:
        """A checkpoint at the current position (collective), with one set of BatchNorm statistics."""
        meta = {**self.pos.meta(), "num_classes": self.num_classes, "loss": self.last_loss,
                "zero_stage": self.engine.zero_optimization_stage(), "skipped_steps": self.guard.skipped_total}
        self.watchdog.phase(False)
        average_buffers(self.engine.module)  # one set of BatchNorm statistics for the checkpoint and the evaluation
        path = checkpoint.save(self.ckpt_root, self.pos.tag(), engine=self.engine, head=self.head,
                               head_opt=self.head_opt, cfg=self.cfg, meta=meta, rank=self.env.rank,
                               world_size=self.env.world_size, keep=self.t["keep_checkpoints"],
                               keep_steps=self.t["keep_step_checkpoints"], trainer_state=self.guard.state_dict())
        self.clock.reset()
        self.saved_at = self.pos.global_step
        self.log.info(f"checkpoint written: {path}")

    def evaluate(self, label: str) -> None:
        results = self.evaluator(self.engine.module, label, self.head.learned_thresholds())
        if results is not None:
            self.monitor.evaluation(self.pos.global_step, results)
            self.monitor.write_curves()

    def finish(self, train_s: float, stopped: bool) -> dict:
        guard = self.guard
        guard.txn.close()
        if guard.skipped_total:
            self.log.warning(f"{guard.skipped_total} non-finite step(s) were skipped in this run")
        curves = self.monitor.write_curves()
        return {"output": str(self.output), "checkpoint": str(self.ckpt_root / LATEST),
                "global_step": self.pos.global_step, "curves": None if curves is None else str(curves),
                "tensorboard": str(self.output / TENSORBOARD_DIR) if self.monitor.tb is not None else None,
                "last_loss": self.last_loss, "eval": self.evaluator.history, "train_seconds": train_s,
                "rank": self.env.rank, "skipped_steps": guard.skipped_total,
                "stopped_by_signal": (self.preempt.signal_name or "a signal on another rank") if stopped else None}
