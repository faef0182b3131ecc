"""Heads: the class-sharded part of the network and its losses, picked by name from the config.

``build_head(cfg, num_classes, embedding_size, partition, seed)`` looks ``cfg["loss"]`` up in a registry; a loss
family adds itself with ``@register_head("name")``. Each builder reads its own keys with ``read_options`` (unknown
keys and bad values raise HeadConfigError naming the key).

Margin-softmax heads (heads/partial_fc.py), keys and defaults:
    scale 64, sample_rate 1.0, interclass_filtering_threshold 0 (off), straight_through False, init_std 0.01,
    margin: softmax none | cosface 0.4 | arcface 0.5 | combined [m1, m2, m3] (required; any values, see margins.py).
``straight_through`` (ArcFace family): arcface_torch's margin without gradient; for softmax/CosFace it changes
nothing (their margin has the gradient of cos_y already).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from heads.margins import CombinedMargin
from heads.partial_fc import PartialFC
from heads.partition import ClassPartition

HeadBuilder = Callable[[dict, int, int, ClassPartition, int], nn.Module]
HEADS: dict[str, HeadBuilder] = {}


class HeadConfigError(ValueError):
    """A head config key that is unknown or has a bad value."""


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator: ``builder(options, num_classes, embedding_size, partition, seed) -> nn.Module`` under ``name``.

    ``options`` is the config without its ``loss`` key.
    """
    def add(builder: HeadBuilder) -> HeadBuilder:
        if name in HEADS:
            raise HeadConfigError(f"head loss {name!r} is registered twice")
        HEADS[name] = builder
        return builder
    return add


def build_head(cfg: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
               seed: int) -> nn.Module:
    """The head that ``cfg["loss"]`` names, for this rank's ``partition`` of ``num_classes`` classes."""
    if not isinstance(cfg, dict):
        raise HeadConfigError(f"head config must be a mapping, got {type(cfg).__name__}")
    if "loss" not in cfg:
        raise HeadConfigError(f"head config needs key 'loss' (one of {sorted(HEADS)})")
    loss = cfg["loss"]
    if loss not in HEADS:
        raise HeadConfigError(f"head.loss: unknown loss {loss!r}, expected one of {sorted(HEADS)}")
    if not isinstance(partition, ClassPartition) or partition.num_classes != num_classes:
        raise HeadConfigError(f"build_head: the partition must cover num_classes={num_classes}, got {partition!r}")
    options = {k: v for k, v in cfg.items() if k != "loss"}
    return HEADS[loss](options, num_classes, embedding_size, partition, seed)


def read_options(loss: str, options: dict, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``options``; a key not in ``defaults`` is an error naming it."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise HeadConfigError(f"head.{unknown[0]}: not a key of loss {loss!r} (its keys: "
                              f"{', '.join(['loss'] + sorted(defaults))})")
    return {**defaults, **options}


def number(key: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    """A finite real within [low, high] (low excluded when ``low_open``), else HeadConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HeadConfigError(f"head.{key}: expected a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise HeadConfigError(f"head.{key}: must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise HeadConfigError(f"head.{key}: must be <= {high}, got {value!r}")
    return float(value)


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise HeadConfigError(f"head.{key}: expected true or false, got {value!r}")
    return value


_MARGIN_DEFAULT = {"softmax": None, "cosface": 0.4, "arcface": 0.5, "combined": None}


def _margin(loss: str, value: Any, straight_through: bool) -> CombinedMargin:
    if loss == "softmax":
        if value is not None:
            raise HeadConfigError(f"head.margin: loss 'softmax' takes no margin, got {value!r} (use cosface, "
                                  f"arcface or combined)")
        return CombinedMargin(straight_through=straight_through)
    if loss == "combined":
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise HeadConfigError(f"head.margin: loss 'combined' needs [m1, m2, m3], got {value!r}")
        m1, m2, m3 = (number(f"margin[{i}]", v) for i, v in enumerate(value))
        if m1 <= 0:
            raise HeadConfigError(f"head.margin[0]: m1 must be > 0, got {m1}")
        return CombinedMargin(m1, m2, m3, straight_through)
    m = number("margin", value)
    return CombinedMargin(1.0, 0.0, m, straight_through) if loss == "cosface" else \
        CombinedMargin(1.0, m, 0.0, straight_through)


def _margin_softmax_builder(loss: str) -> HeadBuilder:
    def build(options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
              seed: int) -> nn.Module:
        o = read_options(loss, options, {"scale": 64.0, "margin": _MARGIN_DEFAULT[loss], "sample_rate": 1.0,
                                         "interclass_filtering_threshold": 0.0, "straight_through": False,
                                         "init_std": 0.01})
        margin = _margin(loss, o["margin"], flag("straight_through", o["straight_through"]))
        return PartialFC(partition, embedding_size, margin=margin,
                         scale=number("scale", o["scale"], low=0, low_open=True),
                         sample_rate=number("sample_rate", o["sample_rate"], low=0, high=1),
                         interclass_filtering_threshold=number("interclass_filtering_threshold",
                                                               o["interclass_filtering_threshold"], low=0, high=1),
                         init_std=number("init_std", o["init_std"], low=0, low_open=True), seed=seed)
    return build


for _loss in ("softmax", "cosface", "arcface", "combined"):
    register_head(_loss)(_margin_softmax_builder(_loss))

__all__ = ["HEADS", "HeadConfigError", "build_head", "register_head", "read_options", "number", "flag",
           "ClassPartition", "PartialFC", "CombinedMargin"]
