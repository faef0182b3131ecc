"""Heads picked by name from the config's ``head:`` section.

``build_head(cfg, num_classes, embedding_size, partition, seed)``:

1. ``cfg["loss"]`` names a sample-to-class family (registered with ``@register_head``) or a PRESET, a named recipe
   that fills in defaults (``unitsface`` = ``loss: cosface`` + ``s2s: uss``); keys given in cfg win.
2. ``cfg["s2s"]`` (optional) names a sample-to-sample memory term (``@register_s2s``); its keys start with
   ``s2s_``, plus ``s2c_weight``. The head is then an EmbeddedLoss (heads/embedded.py) around the two.

Each builder reads its own keys with ``read_options``: unknown keys and bad values raise HeadConfigError naming the
key (``head.<key>``). None values mean "the loss's default".

Keys of every head, read here: ``matmul_precision`` (fp32 | tf32 | bf16, default fp32: the precision of the head's
[N, D] x [D, K] products, heads/precision.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from heads.partition import ClassPartition
from heads.precision import MATMUL_PRECISIONS, set_matmul_precision
from heads.protocol import Head

HeadBuilder = Callable[[dict, int, int, ClassPartition, int], Head]
S2SBuilder = Callable[[dict, int, int, ClassPartition, int], tuple[nn.Module, dict]]
HEADS: dict[str, HeadBuilder] = {}
S2S_TERMS: dict[str, S2SBuilder] = {}
PRESETS: dict[str, dict[str, Any]] = {}
COMPOSITE_KEYS = ("s2c_weight",)


class HeadConfigError(ValueError):
    """A head config key that is unknown or has a bad value."""


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator: ``builder(options, num_classes, embedding_size, partition, seed) -> Head`` under ``name``.

    ``options`` is the config without its ``loss`` key (and without the s2s keys). The head must implement the
    Head protocol (heads/protocol.py); build_head checks it.
    """
    def add(builder: HeadBuilder) -> HeadBuilder:
        if name in HEADS or name in PRESETS:
            raise HeadConfigError(f"head loss {name!r} is registered twice")
        HEADS[name] = builder
        return builder
    return add


def register_s2s(name: str) -> Callable[[S2SBuilder], S2SBuilder]:
    """Decorator: ``builder(s2s_options, ...) -> (MemoryTerm, {"weight", "start_epoch", "combine"})``."""
    def add(builder: S2SBuilder) -> S2SBuilder:
        if name in S2S_TERMS:
            raise HeadConfigError(f"head s2s term {name!r} is registered twice")
        S2S_TERMS[name] = builder
        return builder
    return add


def register_preset(name: str, keys: dict[str, Any]) -> None:
    """A loss name that stands for a set of head keys (must name a registered ``loss``)."""
    if name in HEADS or name in PRESETS:
        raise HeadConfigError(f"head loss {name!r} is registered twice")
    if keys.get("loss") not in HEADS:
        raise HeadConfigError(f"preset {name!r}: its loss {keys.get('loss')!r} is not registered")
    PRESETS[name] = dict(keys)


def loss_names() -> list[str]:
    return sorted(HEADS) + sorted(PRESETS)


def build_head(cfg: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
               seed: int) -> Head:
    """The head that ``cfg`` describes, for this rank's ``partition`` of ``num_classes`` classes (a Head,
    heads/protocol.py)."""
    if not isinstance(cfg, dict):
        raise HeadConfigError(f"head config must be a mapping, got {type(cfg).__name__}")
    if "loss" not in cfg:
        raise HeadConfigError(f"head config needs key 'loss' (one of {loss_names()})")
    loss = cfg["loss"]
    if not isinstance(loss, str) or (loss not in HEADS and loss not in PRESETS):
        raise HeadConfigError(f"head.loss: unknown loss {loss!r}, expected one of {loss_names()}")
    if not isinstance(partition, ClassPartition) or partition.num_classes != num_classes:
        raise HeadConfigError(f"build_head: the partition must cover num_classes={num_classes}, got {partition!r}")
    options = {k: v for k, v in cfg.items() if k != "loss" and v is not None}
    if loss in PRESETS:
        preset = PRESETS[loss]
        options = {**{k: v for k, v in preset.items() if k != "loss"}, **options}
        loss = preset["loss"]
    s2s = options.pop("s2s", None)
    precision = choice("matmul_precision", options.pop("matmul_precision", "fp32"), MATMUL_PRECISIONS)
    head = _build(loss, s2s, options, num_classes, embedding_size, partition, seed)
    if not isinstance(head, Head) or not isinstance(head, nn.Module):
        raise TypeError(f"head loss {loss!r}: its builder returned a {type(head).__name__}, not an nn.Module with "
                        f"the Head protocol's forward, set_epoch, learned_thresholds, per_class_buffers, partition "
                        f"(heads/protocol.py)")
    set_matmul_precision(head, precision)
    return head


def _build(loss: str, s2s: Any, options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
           seed: int) -> Head:
    composite = {k: options.pop(k) for k in COMPOSITE_KEYS if k in options}
    s2s_options = {k: options.pop(k) for k in list(options) if k.startswith("s2s_")}
    if s2s is None:
        stray = sorted(composite) + sorted(s2s_options)
        if stray:
            raise HeadConfigError(f"head.{stray[0]}: only used with a sample-to-sample term; set head.s2s (one of "
                                  f"{sorted(S2S_TERMS)})")
        return HEADS[loss](options, num_classes, embedding_size, partition, seed)
    if not isinstance(s2s, str) or s2s not in S2S_TERMS:
        raise HeadConfigError(f"head.s2s: unknown sample-to-sample term {s2s!r}, expected one of {sorted(S2S_TERMS)}")
    from heads.embedded import EmbeddedLoss  # imported here: embedded.py imports the head modules

    s2c = HEADS[loss](options, num_classes, embedding_size, partition, seed)
    term, how = S2S_TERMS[s2s](s2s_options, num_classes, embedding_size, partition, seed)
    s2c_weight = number("s2c_weight", composite.get("s2c_weight", 1.0), low=0)
    try:
        return EmbeddedLoss(s2c, term, s2c_weight=s2c_weight, s2s_weight=how["weight"],
                            start_epoch=how["start_epoch"], combine=how["combine"])
    except ValueError as e:
        raise HeadConfigError(f"head: {e}") from None


def read_options(loss: str, options: dict, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``options`` (None = default); a key not in ``defaults`` is an error naming it."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise HeadConfigError(f"head.{unknown[0]}: not a key of {loss!r} (its keys: "
                              f"{', '.join(sorted(defaults))})")
    return {**defaults, **{k: v for k, v in options.items() if v is not None}}


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


def integer(key: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HeadConfigError(f"head.{key}: expected an integer, got {value!r}")
    if low is not None and value < low:
        raise HeadConfigError(f"head.{key}: must be >= {low}, got {value!r}")
    return value


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise HeadConfigError(f"head.{key}: expected true or false, got {value!r}")
    return value


def choice(key: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise HeadConfigError(f"head.{key}: expected one of {', '.join(options)}, got {value!r}")
    return value
