"""The training loop: data -> DeepSpeed(backbone) -> sharded head -> backward -> steps -> logs, eval, checkpoints."""
from __future__ import annotations

import math
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
from trainer.engine import average_buffers, build_engine, set_lr
from trainer.log import Meter, setup_logging
from trainer.schedule import schedule_from_config


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> str | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return "bf16"
    return None


def build_backbone(cfg: dict, device: torch.device) -> torch.nn.Module:
    m = cfg["model"]
    return backbones.get_model(m["name"], num_features=m["num_features"], dropout=m["dropout"],
                               autocast_dtype=autocast_dtype(m["precision"], device), **m["kwargs"]).to(device)


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


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM's preemption and `--signal=USR1@120`) ask for a checkpoint and a clean stop.

    A signal reaches the ranks at different moments, so the flag is only read at log steps, where every rank is at
    the same step: an all-reduce MAX makes them agree, then all save the step checkpoint together and exit 0;
    `train.resume=auto` continues from it (mid-epoch, exactly)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        import signal
        self.signal_name: str | None = None
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        import signal
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return bool(flag.item() > 0)

    def restore(self) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def format_logs(logs: dict) -> str:
    """The head's scalar logs (accuracy, learned thresholds, ...) as `name value` pairs."""
    parts = []
    for k, v in logs.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
        elif isinstance(v, int):
            parts.append(f"{k} {v}")
    return "  ".join(parts)


class Evaluator:
    """Verification during training: every rank embeds a contiguous slice of each bin's images, rank 0 gathers them,
    scores the pairs and logs the table (eval.verification's protocol; the decoded bins are kept between calls)."""

    def __init__(self, cfg: dict, device: torch.device, log, rank: int, world_size: int):
        self.paths = bin_paths(cfg)
        self.device, self.log, self.rank, self.world_size = device, log, rank, world_size
        self.history: list[tuple[str, list[dict]]] = []
        self._bins: list | None = None

    def __call__(self, model: torch.nn.Module, label: str, learned: dict | None = None) -> None:
        """`learned`: the loss's learned cosine thresholds (t = b/s, p_v), reported beside the best single one."""
        if not self.paths:
            return
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


def train(cfg: dict) -> dict:
    env = distributed.detect()
    device = distributed.pick_device(env)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (torch.get_num_threads()) // max(env.local_world_size, 1)))
    distributed.init(env, device)
    output = Path(cfg["output"])
    log = setup_logging(output, env.rank)
    log.info(f"rank {env.rank}/{env.world_size} via {env.launcher} on {device}; output {output}")
    ok = False
    try:
        result = _train(cfg, env, device, output, log)
        ok = True
        return result
    finally:
        distributed.shutdown(synchronize=ok)


def _train(cfg: dict, env, device, output: Path, log) -> dict:
    from data.loader import build_loader

    seed_everything(cfg["seed"] + env.rank)
    prepare_data(cfg, env, log)
    d, t = cfg["data"], cfg["train"]
    data = build_loader(d["loader"], d["root"], t["batch_size"], env.rank, env.world_size, cfg["seed"], device,
                        num_workers=d["num_workers"], flip=d["flip"], augment=d["augment"],
                        cache_dir=d["cache_dir"], progress=env.rank == 0)
    try:
        return _train_with(cfg, env, device, output, log, data)
    finally:
        data.close()


def _train_with(cfg: dict, env, device, output: Path, log, data) -> dict:
    d, t = cfg["data"], cfg["train"]
    num_classes = data.num_classes
    backbone = build_backbone(cfg, device)
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
    start_epoch, global_step, start_step_in_epoch = 0, 0, 0
    if t["resume"] is not None:
        folder = checkpoint.resolve(t["resume"], output)
        if folder is not None:
            meta = checkpoint.load(folder, engine=engine, head=head, head_opt=head_opt, rank=env.rank,
                                   world_size=env.world_size,
                                   zero_stage=engine.zero_optimization_stage(), log=log.info)
            if meta["num_classes"] != num_classes:
                raise checkpoint.CheckpointError(f"{folder}: written for {meta['num_classes']} classes, the data has "
                                                 f"{num_classes}")
            # Positions are kept in samples: with another rank count the global batch, and so the step, differ.
            global_batch = env.world_size * t["batch_size"]
            start_epoch = meta["epoch"]
            samples_in_epoch = meta.get("samples_in_epoch", 0)
            start_step_in_epoch = samples_in_epoch // global_batch
            if samples_in_epoch % global_batch:
                log.info(f"resume: {samples_in_epoch} samples of epoch {start_epoch} were seen with a global batch of "
                         f"{meta['global_batch']}; continuing from sample {start_step_in_epoch * global_batch}")
            global_step = start_epoch * steps_per_epoch + start_step_in_epoch
            log.info(f"resumed from {folder} at epoch {start_epoch}, step {global_step}")
        else:
            log.info("train.resume=auto: no checkpoint yet, starting fresh")

    log.info(f"{num_classes} classes, {data.num_images} images ({type(data).__name__}), {env.world_size} ranks x "
             f"{t['batch_size']} = {env.world_size * t['batch_size']} per step, {steps_per_epoch} steps/epoch, {t['epochs']} epochs; "
             f"head: {cfg['head']['loss']} sample_rate={cfg['head']['sample_rate']} "
             f"({partition.num_local} classes on this rank)")
    evaluator = Evaluator(cfg, device, log, env.rank, env.world_size)
    if t["eval_before"] and start_epoch == 0 and global_step == 0:
        evaluator(engine.module, "before training", head.learned_thresholds())

    meter = Meter(env.world_size * t["batch_size"], total_steps)
    last_loss = float("nan")
    preempt = PreemptionFlag()
    engine.train()
    t_train = time.perf_counter()
    done = global_step >= total_steps
    stopped = False
    for epoch in range(start_epoch, t["epochs"]):
        if done:
            break
        data.set_epoch(epoch)
        data.set_start_step(start_step_in_epoch if epoch == start_epoch else 0)
        if hasattr(head, "set_epoch"):
            head.set_epoch(epoch)  # losses with start epochs (UniTSFace's USS from 1, EPL from 3)
        for images, labels in data:  # already on the device
            lr = lr_of(global_step)
            set_lr(lr, backbone_opt, head_opt)
            embeddings = engine(images)
            loss, logs = head(embeddings, labels)
            engine.backward(loss)
            engine.step()
            if engine.was_step_applied():
                head_opt.step()
            head_opt.zero_grad()
            global_step += 1
            meter.tick()
            if global_step % t["log_every"] == 0 or global_step == total_steps:
                last_loss = loss.item()  # the only host sync of a step, every log_every steps
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss became {last_loss} at epoch {epoch}, step {global_step}")
                sps, hours = meter.report(global_step)
                log.info(f"epoch {epoch} step {global_step}/{total_steps}  loss {last_loss:.4f}  lr {lr:.5f}  "
                         f"{sps:.1f} samples/s  ETA {hours * 60:.1f} min  {format_logs(logs)}")
                if preempt.agreed(device):
                    log.info(f"signal {preempt.signal_name}: saving a checkpoint at step {global_step} and stopping")
                    done = stopped = True
                    break
            if global_step >= total_steps:
                done = True
                break
        step_in_epoch = global_step - epoch * steps_per_epoch
        complete = step_in_epoch == steps_per_epoch
        tag = f"epoch_{epoch + 1:04d}" if complete else f"step_{global_step:07d}"
        meta = {"epoch": epoch + 1 if complete else epoch, "step_in_epoch": 0 if complete else step_in_epoch,
                "samples_in_epoch": 0 if complete else step_in_epoch * env.world_size * t["batch_size"],
                "global_batch": env.world_size * t["batch_size"], "global_step": global_step,
                "num_classes": num_classes, "loss": last_loss}
        average_buffers(engine.module)  # one set of BatchNorm statistics for the checkpoint and the evaluation
        path = checkpoint.save(ckpt_root, tag, engine=engine, head=head, head_opt=head_opt, cfg=cfg, meta=meta,
                               rank=env.rank, world_size=env.world_size, keep=t["keep_checkpoints"])
        log.info(f"checkpoint written: {path}")
        if stopped:
            break
        if t["eval_every_epoch"] or done or epoch + 1 == t["epochs"]:
            evaluator(engine.module, f"after epoch {epoch + 1}", head.learned_thresholds())
    preempt.restore()
    train_s = time.perf_counter() - t_train
    return {"output": str(output), "checkpoint": str(ckpt_root / "latest"), "global_step": global_step,
            "last_loss": last_loss, "eval": evaluator.history, "train_seconds": train_s, "rank": env.rank,
            "stopped_by_signal": preempt.signal_name if stopped else None}
