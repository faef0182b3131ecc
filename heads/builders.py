"""Every loss family, registered under its config name with its keys and defaults (heads/registry.py).

Sample-to-class families (``head.loss``); every one reads the partial-FC keys
    scale, sample_rate (1.0), interclass_filtering_threshold (0 = off), straight_through (false), init_std (0.01)
plus its own:
    softmax       -                       (normalised softmax, no margin)
    cosface       margin 0.4              s (cos_y - m); scale 64
    arcface       margin 0.5              s cos(theta_y + m); straight_through: arcface_torch's gradient
    combined      margin [m1, m2, m3]     s (cos(m1 theta + m2) - m3), any values (heads/margins.py)
    uce           margin 0.4 (a number: CosFace style; [m1, m2, m3]: combined), neg_weight 1.0 (l),
                  bias_init null (log(10 C r)), diverse false (one bias per class), clamp true; scale 64
    gb_cosface    margin 0.16, alpha 0.15, pv_momentum 0.01, pv_clamp [0.5, 0.7]; scale 32

Sample-to-sample terms (``head.s2s``), keys prefixed ``s2s_``, plus ``s2c_weight`` (1.0):
    uss           s2s_scale 64, s2s_margin 0.1, s2s_clamp true, s2s_weight 1, s2s_start_epoch 1, s2s_combine sum
    s2s_bce       the same keys (per-class biases)
    s2s_softmax   s2s_scale 64, s2s_margin 0.1, s2s_weight 1, s2s_start_epoch 1, s2s_combine sum
    epl           s2s_scale 64, s2s_k 0.7, s2s_init feature | noise, s2s_weight 1, s2s_start_epoch 3,
                  s2s_combine mean

Presets (``head.loss`` names standing for several keys): see ``PRESET_TABLE`` below.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from heads.epl import EPL
from heads.gb_cosface import GBCosFace
from heads.margins import CombinedMargin
from heads.memory import PROTOTYPE_INITS
from heads.partial_fc import PartialFC
from heads.partition import ClassPartition
from heads.protocol import Head
from heads.registry import (
    HeadConfigError,
    choice,
    flag,
    integer,
    number,
    read_options,
    register_head,
    register_preset,
    register_s2s,
)
from heads.sample_to_sample import S2SBCE, USS, S2SSoftmax
from heads.uce import UniformBCE

COMBINE = ("sum", "mean")
_MARGIN_DEFAULT = {"softmax": None, "cosface": 0.4, "arcface": 0.5, "combined": None}


def _pfc_defaults(scale: float = 64.0, **more: Any) -> dict[str, Any]:
    return {"scale": scale, "sample_rate": 1.0, "interclass_filtering_threshold": 0.0, "straight_through": False,
            "init_std": 0.01, **more}


def _pfc_kwargs(o: dict) -> dict[str, Any]:
    """PartialFC's constructor arguments from the common keys, checked."""
    return {"scale": number("scale", o["scale"], low=0, low_open=True),
            "sample_rate": number("sample_rate", o["sample_rate"], low=0, high=1),
            "interclass_filtering_threshold": number("interclass_filtering_threshold",
                                                     o["interclass_filtering_threshold"], low=0, high=1),
            "init_std": number("init_std", o["init_std"], low=0, low_open=True)}


def _combined(value: Any, straight_through: bool) -> CombinedMargin:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise HeadConfigError(f"head.margin: expected [m1, m2, m3], got {value!r}")
    m1, m2, m3 = (number(f"margin[{i}]", v) for i, v in enumerate(value))
    if m1 <= 0:
        raise HeadConfigError(f"head.margin[0]: m1 must be > 0, got {m1}")
    return CombinedMargin(m1, m2, m3, straight_through)


def _margin(loss: str, value: Any, straight_through: bool) -> CombinedMargin:
    if loss == "softmax":
        if value is not None:
            raise HeadConfigError(f"head.margin: loss 'softmax' takes no margin, got {value!r} (use cosface, "
                                  f"arcface or combined)")
        return CombinedMargin(straight_through=straight_through)
    if loss == "combined":
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise HeadConfigError(f"head.margin: loss 'combined' needs [m1, m2, m3], got {value!r}")
        return _combined(value, straight_through)
    m = number("margin", value)
    return CombinedMargin(1.0, 0.0, m, straight_through) if loss == "cosface" else \
        CombinedMargin(1.0, m, 0.0, straight_through)


# --- sample-to-class ------------------------------------------------------------------------------------------------
def _margin_softmax_builder(loss: str):
    def build(options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
              seed: int) -> Head:
        o = read_options(loss, options, _pfc_defaults(margin=_MARGIN_DEFAULT[loss]))
        margin = _margin(loss, o["margin"], flag("straight_through", o["straight_through"]))
        return PartialFC(partition, embedding_size, margin=margin, seed=seed, **_pfc_kwargs(o))
    return build


for _loss in ("softmax", "cosface", "arcface", "combined"):
    register_head(_loss)(_margin_softmax_builder(_loss))


@register_head("uce")
def build_uce(options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
              seed: int) -> Head:
    o = read_options("uce", options, _pfc_defaults(margin=0.4, neg_weight=1.0, bias_init=None, diverse=False,
                                                   clamp=True))
    straight = flag("straight_through", o["straight_through"])
    margin = _combined(o["margin"], straight) if isinstance(o["margin"], (list, tuple)) else \
        CombinedMargin(1.0, 0.0, number("margin", o["margin"]), straight)
    bias_init = None if o["bias_init"] is None else number("bias_init", o["bias_init"])
    return UniformBCE(partition, embedding_size, margin=margin, seed=seed, **_pfc_kwargs(o),
                      neg_weight=number("neg_weight", o["neg_weight"], low=0), bias_init=bias_init,
                      diverse=flag("diverse", o["diverse"]), clamp=flag("clamp", o["clamp"]))


@register_head("gb_cosface")
def build_gb_cosface(options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
                     seed: int) -> Head:
    o = read_options("gb_cosface", options, _pfc_defaults(scale=32.0, margin=0.16, alpha=0.15, pv_momentum=0.01,
                                                          pv_clamp=[0.5, 0.7]))
    flag("straight_through", o["straight_through"])  # accepted; a CosFace margin has the gradient of cos_y anyway
    clamp = o["pv_clamp"]
    if not isinstance(clamp, (list, tuple)) or len(clamp) != 2:
        raise HeadConfigError(f"head.pv_clamp: expected [low, high], got {clamp!r}")
    low, high = number("pv_clamp[0]", clamp[0], low=-1, high=1), number("pv_clamp[1]", clamp[1], low=-1, high=1)
    if low > high:
        raise HeadConfigError(f"head.pv_clamp: low must be <= high, got {clamp!r}")
    return GBCosFace(partition, embedding_size, margin=CombinedMargin(1.0, 0.0, number("margin", o["margin"])),
                     seed=seed, **_pfc_kwargs(o), alpha=number("alpha", o["alpha"], low=0, high=1),
                     pv_momentum=number("pv_momentum", o["pv_momentum"], low=0, high=1), pv_clamp=(low, high))


# --- sample-to-sample -----------------------------------------------------------------------------------------------
def _how(o: dict) -> dict[str, Any]:
    return {"weight": number("s2s_weight", o["s2s_weight"], low=0),
            "start_epoch": integer("s2s_start_epoch", o["s2s_start_epoch"], low=0),
            "combine": choice("s2s_combine", o["s2s_combine"], COMBINE)}


def _bce_term_builder(name: str, term_class: type):
    def build(options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
              seed: int) -> tuple[nn.Module, dict]:
        o = read_options(name, options, {"s2s_scale": 64.0, "s2s_margin": 0.1, "s2s_clamp": True,
                                         "s2s_weight": 1.0, "s2s_start_epoch": 1, "s2s_combine": "sum"})
        term = term_class(partition, embedding_size, scale=number("s2s_scale", o["s2s_scale"], low=0, low_open=True),
                          margin=number("s2s_margin", o["s2s_margin"]), clamp=flag("s2s_clamp", o["s2s_clamp"]))
        return term, _how(o)
    return build


register_s2s("uss")(_bce_term_builder("uss", USS))
register_s2s("s2s_bce")(_bce_term_builder("s2s_bce", S2SBCE))


@register_s2s("s2s_softmax")
def build_s2s_softmax(options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
                      seed: int) -> tuple[nn.Module, dict]:
    o = read_options("s2s_softmax", options, {"s2s_scale": 64.0, "s2s_margin": 0.1, "s2s_weight": 1.0,
                                              "s2s_start_epoch": 1, "s2s_combine": "sum"})
    term = S2SSoftmax(partition, embedding_size, scale=number("s2s_scale", o["s2s_scale"], low=0, low_open=True),
                      margin=number("s2s_margin", o["s2s_margin"]))
    return term, _how(o)


@register_s2s("epl")
def build_epl(options: dict, num_classes: int, embedding_size: int, partition: ClassPartition,
              seed: int) -> tuple[nn.Module, dict]:
    o = read_options("epl", options, {"s2s_scale": 64.0, "s2s_k": 0.7, "s2s_init": "feature", "s2s_weight": 1.0,
                                      "s2s_start_epoch": 3, "s2s_combine": "mean"})
    term = EPL(partition, embedding_size, scale=number("s2s_scale", o["s2s_scale"], low=0, low_open=True),
               k=number("s2s_k", o["s2s_k"]), init=choice("s2s_init", o["s2s_init"], PROTOTYPE_INITS), seed=seed)
    return term, _how(o)


# --- presets: one loss name per paper method ------------------------------------------------------------------------
PRESET_TABLE: dict[str, dict[str, Any]] = {
    "unitsface": {"loss": "cosface", "s2s": "uss"},            # UniTSFace: CosFace(0.4) + USS(0.1), USS from epoch 1
    "arcface_uss": {"loss": "arcface", "s2s": "uss"},          # UniTSFace ablation: ArcFace + USS
    "cosface_s2s_softmax": {"loss": "cosface", "s2s": "s2s_softmax"},  # UniTSFace: s2s softmax, embedded
    "cosface_s2s_bce": {"loss": "cosface", "s2s": "s2s_bce"},  # UniTSFace: s2s BCE (per-class biases), embedded
    "epl": {"loss": "cosface", "s2s": "epl"},                  # EPL: CosFace + prototypes, from epoch 3, averaged
    "arcface_epl": {"loss": "arcface", "s2s": "epl"},          # EPL's ArcFace_EPL
    "uce_epl": {"loss": "uce", "s2s": "epl"},                  # EPL's UniFace_EPL
    "uce_diverse": {"loss": "uce", "diverse": True},           # UniFace: one bias per class
}
for _name, _keys in PRESET_TABLE.items():
    register_preset(_name, _keys)
