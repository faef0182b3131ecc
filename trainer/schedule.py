"""Per-step learning rate: linear warm-up, then polynomial decay to 0 or step decay at epoch milestones."""
from __future__ import annotations


def lr_at(step: int, *, base_lr: float, total_steps: int, steps_per_epoch: int, type: str = "poly",
          warmup_epochs: float = 0.0, power: float = 2.0, milestones: list | tuple = (), gamma: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    warm-up: lr = base · (step + 1) / warmup_steps for step < warmup_steps (arcface_torch's PolyScheduler).
    poly:    lr = base · (1 − (step − warmup) / (total − warmup))^power afterwards.
    step:    lr = base · gamma^(number of milestones ≤ current epoch), epochs counted from 0.
    """
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if type == "poly":
        span = max(total_steps - warmup, 1)
        return base_lr * max(1.0 - (step - warmup) / span, 0.0) ** power
    if type == "step":
        epoch = step // max(steps_per_epoch, 1)
        return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    raise ValueError(f"schedule.type: unknown schedule {type!r} (expected poly or step)")


def schedule_from_config(cfg: dict, steps_per_epoch: int, total_steps: int):
    s = cfg["schedule"]
    kw = dict(base_lr=cfg["optim"]["lr"], total_steps=total_steps, steps_per_epoch=steps_per_epoch, type=s["type"],
              warmup_epochs=s["warmup_epochs"], power=s["power"], milestones=s["milestones"], gamma=s["gamma"])
    return lambda step: lr_at(step, **kw)
