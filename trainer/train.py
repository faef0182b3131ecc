"""The training loop: data -> DeepSpeed(backbone) -> sharded head -> backward -> steps -> logs, eval, checkpoints."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import backbones
import heads
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from trainer import checkpoint, distributed
from trainer.config import ConfigError
from trainer.engine import average_buffers, build_engine, set_lr
from trainer.guard import StepGuard
from trainer.log import Meter, level_counts, setup_logging
from trainer.monitor import LEARNED, Monitor, cuda_memory_gb, write_resolved_config
from trainer.runlock import RunLock, RunLockError
from trainer.schedule import schedule_from_config
from trainer.signals import PreemptionFlag, stop_with_parent
from trainer.watchdog import EXIT_HUNG, Watchdog


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_for(capability: tuple[int, int] | None) -> str:
    """`model.precision: auto`: bf16 on GPUs with bf16 tensor cores (compute capability 8.0+: A100, H100, ...), fp16
    with a dynamic loss scale below (V100, T4: bf16 there is emulated, far slower), fp32 without a GPU."""
    if capability is None:
        return "fp32"
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return precision_for(torch.cuda.get_device_capability(device) if device.type == "cuda" else None)


def build_backbone(cfg: dict, device: torch.device, precision: str) -> torch.nn.Module:
    """The backbone on `device`; on CUDA with cudnn.benchmark (fixed 112x112 input) and, when asked, channels_last
    memory and torch.compile (in place: parameter names, and so checkpoints, stay as they are)."""
    m = cfg["model"]
    model = backbones.get_model(m["name"], num_features=m["num_features"], dropout=m["dropout"],
                                autocast_dtype=None if precision == "fp32" else precision, **m["kwargs"]).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(m["cudnn_benchmark"])
        if m["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
    if m["compile"]:
        model.compile()
    return model


def head_config(cfg: dict) -> dict:
    """The head section without unset (null) keys: the loss then uses its own default for them."""
    return {k: v for k, v in cfg["head"].items() if v is not None}


def prepare_data(cfg: dict, env: distributed.DistEnv, log) -> None:
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
    _barrier()
    if not (root / "train.rec").is_file():
        raise FileNotFoundError(f"data.root={root}: no train.rec there (expected train.rec, train.idx, property)")


def bin_paths(cfg: dict) -> list[Path]:
    d = cfg["data"]
    if d["val_root"] is None:
        return []
    root = Path(d["val_root"])
    if d["val_targets"]:
        paths = [root / f"{name}.bin" for name in d["val_targets"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data.val_targets: verification files not found: {', '.join(missing)}")
        return paths
    return sorted(root.glob("*.bin"))


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


class Evaluator:
    """Verification during training: every rank embeds a contiguous slice of each bin's images, rank 0 gathers them,
    scores the pairs and logs the table (eval.verification's protocol; the decoded bins are kept between calls)."""

    def __init__(self, cfg: dict, device: torch.device, log, rank: int, world_size: int):
        self.paths = bin_paths(cfg)
        self.device, self.log, self.rank, self.world_size = device, log, rank, world_size
        self.history: list[tuple[str, list[dict]]] = []
        self._bins: list | None = None

    def __call__(self, model: torch.nn.Module, label: str, learned: dict | None = None) -> list[dict] | None:
        """`learned`: the loss's learned cosine thresholds (t = b/s, p_v), reported beside the best single one.
        Returns the per-target results on rank 0 (None elsewhere or without verification data)."""
        if not self.paths:
            return None
        from data.verification_bin import load_bin_images
        from eval.uniform_threshold import format_threshold_report, pair_cosines, threshold_report
        from eval.verification import embed_sharded, evaluate_pairs, format_table
        if self._bins is None:
            self._bins = [(p, *load_bin_images(p)) for p in self.paths]
        results = []
        for path, images, issame in self._bins:
            emb = embed_sharded(model, images, batch_size=128, device=self.device, progress=False)
            if emb is not None:  # rank 0
                report = threshold_report(*pair_cosines(emb, issame), learned)
                results.append({"target": Path(path).stem, "path": str(path), **evaluate_pairs(emb, issame),
                                "thresholds": report})
        if self.rank == 0:
            self.history.append((label, results))
            lines = [format_threshold_report(r["thresholds"], title=r["target"]) for r in results]
            self.log.info("\n" + format_table(results, title=f"verification: {label}") + "\n" + "\n".join(lines))
            return results
        return None


def take_lock(lock: RunLock, env, force: bool) -> str | None:
    """Rank 0 locks the output folder; every rank learns whether it could (one all-reduce)."""
    error, warning = None, None
    if env.rank == 0:
        try:
            warning = lock.acquire(force=force)
        except RunLockError as e:
            error = e
    if dist.is_initialized() and env.world_size > 1:
        flag = torch.tensor([1.0 if (env.rank == 0 and error is not None) else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and flag.item() > 0:
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
    env = distributed.detect()
    device = distributed.pick_device(env)
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
            distributed.abort_process(EXIT_HUNG)

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
        distributed.shutdown(synchronize=ok)


def _train(cfg: dict, env, device, output: Path, log, watchdog: Watchdog, preempt: PreemptionFlag) -> dict:
    from data.loader import build_loader

    seed_everything(cfg["seed"] + env.rank)
    ckpt_root = output / "checkpoints"
    if env.rank == 0:
        for stale in checkpoint.remove_stale_tmp(ckpt_root):
            log.warning(f"removed {stale}: left by a save that was interrupted (the checkpoint before it is intact)")
    prepare_data(cfg, env, log)
    d, t = cfg["data"], cfg["train"]
    data = build_loader(d["loader"], d["root"], t["batch_size"], env.rank, env.world_size, cfg["seed"], device,
                        num_workers=d["num_workers"], flip=d["flip"], augment=d["augment"],
                        cache_dir=d["cache_dir"], progress=env.rank == 0, max_bad_images=d["max_bad_images"])
    monitor = Monitor(cfg, output, env.rank, data.steps_per_epoch, log)
    try:
        return _train_with(cfg, env, device, output, log, data, watchdog, preempt, monitor)
    finally:
        monitor.close()
        data.close()


class CheckpointClock:
    """Periodic step checkpoints: every `steps` optimizer steps and/or `minutes` of wall time (rank 0's clock,
    agreed through the step guard). 0 switches either off."""

    def __init__(self, steps: int, minutes: float, rank: int) -> None:
        if steps < 0 or minutes < 0:
            raise ValueError(f"train.checkpoint_every_steps / _minutes must be >= 0, got {steps} / {minutes}")
        self.steps, self.seconds, self.rank = int(steps), float(minutes) * 60.0, rank
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()

    def time_due(self) -> bool:
        return self.rank == 0 and self.seconds > 0 and time.monotonic() - self.t0 >= self.seconds

    def step_due(self, global_step: int) -> bool:
        return self.steps > 0 and global_step % self.steps == 0


def _train_with(cfg: dict, env, device, output: Path, log, data, watchdog: Watchdog,
                preempt: PreemptionFlag, monitor: Monitor) -> dict:
    t = cfg["train"]
    num_classes = data.num_classes
    precision = resolve_precision(cfg["model"]["precision"], device)
    backbone = build_backbone(cfg, device, precision)
    partition = ClassPartition(num_classes, env.world_size, env.rank)
    head = heads.build_head(head_config(cfg), num_classes=num_classes, embedding_size=cfg["model"]["num_features"],
                            partition=partition, seed=cfg["seed"]).to(device)
    engine, backbone_opt = build_engine(backbone, cfg, env.world_size)
    o = cfg["optim"]
    head_opt = HeadOptimizer(head, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])

    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_per_epoch * t["epochs"]
    if t["max_steps"] is not None:
        total_steps = min(total_steps, t["max_steps"])
    lr_of = schedule_from_config(cfg, steps_per_epoch, steps_per_epoch * t["epochs"])
    ckpt_root = output / "checkpoints"
    global_batch = env.world_size * t["batch_size"]
    start_epoch, global_step, start_step_in_epoch = 0, 0, 0
    resumed_guard_state: dict = {}
    channels_last = device.type == "cuda" and bool(cfg["model"]["channels_last"])
    if t["resume"] is not None:
        folder = checkpoint.resolve(t["resume"], output)
        if folder is not None:
            meta = checkpoint.load(folder, engine=engine, head=head, head_opt=head_opt, rank=env.rank,
                                   world_size=env.world_size, zero_stage=engine.zero_optimization_stage(),
                                   num_classes=num_classes, log=log.warning)
            resumed_guard_state = meta.pop("trainer_state", {})
            # Positions are kept in samples: with another rank count the global batch, and so the step, differ.
            start_epoch = meta["epoch"]
            samples_in_epoch = meta.get("samples_in_epoch", 0)
            start_step_in_epoch = samples_in_epoch // global_batch
            if samples_in_epoch % global_batch:
                log.warning(f"resume: {samples_in_epoch} samples of epoch {start_epoch} were seen with a global batch "
                            f"of {meta['global_batch']}; continuing from sample {start_step_in_epoch * global_batch}")
            global_step = start_epoch * steps_per_epoch + start_step_in_epoch
            log.info(f"resumed from {folder} at epoch {start_epoch}, step {global_step}")
        else:
            log.info("train.resume=auto: no checkpoint yet, starting fresh")

    log.info(f"precision {precision}" + (f" (model.precision=auto on {device})" if cfg["model"]["precision"] == "auto"
                                          else "") + (f", dynamic loss scale from {cfg['model']['loss_scale']:g}"
                                                      if precision == "fp16" else ""))
    log.info(f"{num_classes} classes, {data.num_images} images ({type(data).__name__}), {env.world_size} ranks x "
             f"{t['batch_size']} = {global_batch} per step, {steps_per_epoch} steps/epoch, {t['epochs']} epochs; "
             f"head: {cfg['head']['loss']} sample_rate={cfg['head']['sample_rate']} "
             f"({partition.num_local} classes on this rank)")
    monitor.start(global_step)
    evaluator = Evaluator(cfg, device, log, env.rank, env.world_size)

    learned_seen: set[str] = set()  # learned thresholds the loss has reported on a log step (USS: from epoch 1)

    def evaluate(label: str) -> None:
        learned = {k: v for k, v in head.learned_thresholds().items() if k in learned_seen}
        results = evaluator(engine.module, label, learned)
        if results is not None:
            monitor.evaluation(global_step, results)
            monitor.write_curves()

    if t["eval_before"] and start_epoch == 0 and global_step == 0:
        evaluate("before training")

    def save(tag: str, epoch: int, step_in_epoch: int) -> None:
        complete = step_in_epoch == steps_per_epoch
        meta = {"epoch": epoch + 1 if complete else epoch, "step_in_epoch": 0 if complete else step_in_epoch,
                "samples_in_epoch": 0 if complete else step_in_epoch * global_batch, "global_batch": global_batch,
                "global_step": global_step, "num_classes": num_classes, "loss": last_loss,
                "zero_stage": engine.zero_optimization_stage(), "skipped_steps": guard.skipped_total}
        watchdog.phase(False)
        average_buffers(engine.module)  # one set of BatchNorm statistics for the checkpoint and the evaluation
        path = checkpoint.save(ckpt_root, tag, engine=engine, head=head, head_opt=head_opt, cfg=cfg, meta=meta,
                               rank=env.rank, world_size=env.world_size, keep=t["keep_checkpoints"],
                               keep_steps=t["keep_step_checkpoints"], trainer_state=guard.state_dict())
        clock.reset()
        log.info(f"checkpoint written: {path}")

    meter = Meter(global_batch, total_steps)
    last_loss = float("nan")
    guard = StepGuard(engine, head, head_opt, max_consecutive=t["max_nonfinite_steps"],
                      loss_scale=cfg["model"]["loss_scale"] if precision == "fp16" else None)
    guard.load_state_dict(resumed_guard_state)
    clock = CheckpointClock(t["checkpoint_every_steps"], t["checkpoint_every_minutes"], env.rank)
    engine.train()
    t_train = time.perf_counter()
    done = global_step >= total_steps
    stopped = False
    saved_at = global_step
    for epoch in range(start_epoch, t["epochs"]):
        if done:
            break
        data.set_epoch(epoch)
        data.set_start_step(start_step_in_epoch if epoch == start_epoch else 0)
        if hasattr(head, "set_epoch"):
            head.set_epoch(epoch)  # losses with start epochs (UniTSFace's USS from 1, EPL from 3)
        watchdog.phase(True)
        for images, labels in data:  # already on the device
            lr = lr_of(global_step)
            set_lr(lr, backbone_opt, head_opt)
            log_step = (global_step + 1) % t["log_every"] == 0 or global_step + 1 == total_steps
            heads.set_collect_stats(head, log_step)  # accuracy, memory fill: computed on log steps only
            guard.before_forward()
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            embeddings = engine(images)
            loss, logs = head(embeddings, labels)
            engine.backward(guard.scale_loss(loss))
            flags = guard.agree(loss, stop=preempt.requested, checkpoint=clock.time_due())  # the step's host sync
            applied = guard.apply(flags)
            global_step += 1
            meter.tick()
            watchdog.progress(global_step)
            where = f"epoch {epoch}, step {global_step}"
            if not applied:
                if guard.scale is not None and guard.consecutive == 0:
                    log.info(f"{where}: fp16 gradient overflow, step skipped on every rank; loss scale now "
                             f"{float(guard.scale):g}")
                else:
                    log.warning(f"{where}: non-finite loss or gradients (loss {loss.item():.4g}); step skipped on "
                                f"every rank, nothing applied ({guard.consecutive} in a row, {guard.skipped_total} "
                                f"in total)")
                guard.check_consecutive(where, data.batch_keys())
            elif log_step:
                last_loss = loss.item()
                sps, hours = meter.report(global_step)
                values = scalar_logs(logs)  # log steps only: their statistics were computed for this step
                learned_seen.update(k for k in values if k in LEARNED)
                skipped = f"  skipped {guard.skipped_total}" if guard.skipped_total else ""
                log.info(f"epoch {epoch} step {global_step}/{total_steps}  loss {last_loss:.4f}  lr {lr:.5f}  "
                         f"{sps:.1f} samples/s  ETA {hours * 60:.1f} min  {format_logs(values)}{skipped}")
                monitor.scalars(global_step, {"loss": last_loss, "lr": lr, "samples_per_s": sps,
                                              "skipped_steps": guard.skipped_total, **values,
                                              "cuda_max_memory_gb": cuda_memory_gb(device)})
            step_in_epoch = global_step - epoch * steps_per_epoch
            if global_step >= total_steps:  # the end: a stop asked for now changes nothing
                done = True
                break
            if flags.stop:
                log.warning(f"signal {preempt.signal_name or 'on another rank'}: saving a checkpoint at step "
                            f"{global_step} and stopping")
                done = stopped = True
                break
            if (flags.checkpoint or clock.step_due(global_step)) and step_in_epoch < steps_per_epoch:
                save(f"step_{global_step:07d}", epoch, step_in_epoch)
                saved_at = global_step
                watchdog.phase(True)
        step_in_epoch = global_step - epoch * steps_per_epoch
        complete = step_in_epoch == steps_per_epoch
        if global_step != saved_at or complete:
            save(f"epoch_{epoch + 1:04d}" if complete else f"step_{global_step:07d}", epoch, step_in_epoch)
            saved_at = global_step
        if stopped:
            break
        if t["eval_every_epoch"] or done or epoch + 1 == t["epochs"]:
            evaluate(f"after epoch {epoch + 1}")
    guard.txn.close()
    train_s = time.perf_counter() - t_train
    if guard.skipped_total:
        log.warning(f"{guard.skipped_total} non-finite step(s) were skipped in this run")
    curves = monitor.write_curves()
    return {"output": str(output), "checkpoint": str(ckpt_root / "latest"), "global_step": global_step,
            "curves": None if curves is None else str(curves),
            "tensorboard": str(output / "tensorboard") if monitor.tb is not None else None,
            "last_loss": last_loss, "eval": evaluator.history, "train_seconds": train_s, "rank": env.rank,
            "stopped_by_signal": (preempt.signal_name or "a signal on another rank") if stopped else None,
            "skipped_steps": guard.skipped_total}
