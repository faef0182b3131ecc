"""DeepSpeed around the backbone only; the class-sharded head and its optimizer live beside it.

The head must not be all-reduced or ZeRO-partitioned (each rank owns different classes), so it never enters the
engine. The backbone's SGD is a client optimizer handed to DeepSpeed; the learning rate of both is set per step by
trainer.schedule.

Precision: `model.precision` (auto = bf16 on GPUs with bf16 tensor cores, fp16 on older ones) runs the trunk under
bf16 or fp16 autocast with fp32 weights and an fp32 fc/BN1d tail, as arcface_torch does; fp16's dynamic loss scale is
the trainer's own (trainer/guard.py: unscaled with the non-finite check, the whole step skipped on overflow).
DeepSpeed's own fp16/bf16 modes would cast the weights, tail included, to 16 bits, and fp16 would hand the head
loss-scaled gradients; both are refused here with a message saying so.
"""
from __future__ import annotations

from pathlib import Path

import torch

import backbones
from runtime.process import rank_world
from trainer.config import PRECISIONS, REPO_ROOT, ConfigError, read_json


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


def load_ds_config(cfg: dict, world_size: int) -> dict:
    """ds_config.json, checked and completed from the YAML (batch sizes, ZeRO stage, clipping).

    The batch sizes come from the YAML (train.batch_size per rank x ``world_size``): a file that states
    ``train_micro_batch_size_per_gpu`` or ``train_batch_size`` must agree with it (or say "auto"), and
    ``gradient_accumulation_steps`` may only be 1; anything else is a :class:`ConfigError` naming the file and key.
    """
    path = Path(cfg["deepspeed"]["config"])
    if not path.is_absolute():
        path = REPO_ROOT / path
    ds = read_json(path, ConfigError, f"deepspeed.config: file not found: {path}")
    for key in ("fp16", "bf16"):
        if ds.get(key, {}).get("enabled", False) not in (False, "false"):
            raise ConfigError(
                f"{path}: `{key}.enabled` must be false. This trainer runs the trunk under bf16 autocast with fp32 "
                f"weights (model.precision: auto|bf16|fp16|fp32) so the fc/BN1d tail and the sharded head stay fp32; "
                f"DeepSpeed's {key} mode would cast all weights" + (
                    " and hand the head loss-scaled gradients." if key == "fp16" else "."))
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the `{key}` section: the optimizer and the lr schedule are set in the "
                              f"YAML (optim:, schedule:) so the backbone and the sharded head share them")
    gas = ds.get("gradient_accumulation_steps", 1)
    if gas != "auto" and gas != 1:
        raise ConfigError(f"{path}: gradient_accumulation_steps={gas!r} is not supported: the partial-FC head samples "
                          f"its classes per micro-batch; raise train.batch_size or use more ranks instead")
    B = cfg["train"]["batch_size"]
    from_yaml = {"train_micro_batch_size_per_gpu": (B, f"train.batch_size={B} per rank"),
                 "train_batch_size": (B * world_size, f"train.batch_size={B} per rank x {world_size} ranks = "
                                                      f"{B * world_size}")}
    for key, (want, said) in from_yaml.items():
        if key in ds and ds[key] != "auto" and (isinstance(ds[key], bool) or ds[key] != want):
            raise ConfigError(f"{path}: `{key}` is {ds[key]!r}, but the YAML says {said}. The YAML sets the batch "
                              f"sizes: remove `{key}` from {path.name} (or make it {want}), or change "
                              f"train.batch_size")
    ds["train_micro_batch_size_per_gpu"] = B
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = B * world_size
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg["deepspeed"]["zero_stage"] is not None:
        zero["stage"] = cfg["deepspeed"]["zero_stage"]
    if zero.get("stage", 0) not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={zero.get('stage')}: use 0, 1 or 2 (stage 3 partitions "
                          f"parameters, which a 65M-parameter backbone does not need)")
    if zero.get("stage", 0) > 0:
        ds["zero_allow_untested_optimizer"] = True  # SGD is a client optimizer
    if cfg["deepspeed"]["gradient_clipping"] is not None:
        ds["gradient_clipping"] = float(cfg["deepspeed"]["gradient_clipping"])
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def build_engine(backbone: torch.nn.Module, cfg: dict, world_size: int):
    """(engine, client SGD optimizer). The optimizer's param_groups carry the lr that the schedule sets."""
    import deepspeed

    ds_config = load_ds_config(cfg, world_size)
    o = cfg["optim"]
    params = [p for p in backbone.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    engine, _, _, _ = deepspeed.initialize(model=backbone, optimizer=sgd, config=ds_config,
                                           dist_init_required=False)
    return engine, sgd


def set_lr(lr: float, *optimizers) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DeepSpeed, unlike DDP's broadcast_buffers, leaves each rank with running statistics of its own batches. Before
    an evaluation or a checkpoint every rank takes the mean, so the sharded evaluation and the saved backbone.pth
    describe one model. Training is unaffected: BatchNorm uses batch statistics in train mode.
    """
    world = rank_world()[1]
    if world == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
