"""Backbones behind one factory: `get_model(name, **kwargs)`, weight loading, and a MAC counter.

    model = get_model("r50", num_features=512, autocast_dtype="bf16")
    load_backbone_weights(model, "backbone.pth")      # arcface_torch's file, strict
    count_macs(model)                                 # ~6.3e9 for r50 at 1x3x112x112
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from backbones.iresnet import (
    IBasicBlock,
    IResNet,
    iresnet18,
    iresnet34,
    iresnet50,
    iresnet100,
    iresnet200,
    iresnet_tiny,
)

__all__ = [
    "MODELS",
    "BackboneError",
    "BackboneWeightsError",
    "IBasicBlock",
    "IResNet",
    "get_model",
    "list_models",
    "load_backbone_weights",
    "check_state_dict",
    "count_macs",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "r18": iresnet18,
    "r34": iresnet34,
    "r50": iresnet50,
    "r100": iresnet100,
    "r200": iresnet200,
    "iresnet_tiny": iresnet_tiny,
}


class BackboneError(ValueError):
    """A backbone was asked for by a wrong name or with wrong arguments."""


class BackboneWeightsError(ValueError):
    """A weights file could not be loaded into a backbone (names the file and what did not match)."""


def list_models() -> list[str]:
    """Names `get_model` accepts."""
    return list(MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered under `name` with the constructor's keyword arguments.

    All models take num_features (512), dropout (0.0) and autocast_dtype (None | "fp32" | "bf16" | "fp16");
    "iresnet_tiny" also takes depths, widths, stem_width, stem_stride and input_size.
    """
    if name not in MODELS:
        raise BackboneError(f"unknown backbone {name!r}; valid names: {', '.join(MODELS)}")
    constructor = MODELS[name]
    accepted = list(inspect.signature(constructor).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise BackboneError(f"backbone {name!r} got unknown argument(s) {unknown}; accepted: {', '.join(accepted)}")
    return constructor(**kwargs)


# ----------------------------------------------------------------------------------------------- weight loading

MODULE_PREFIX = "module."
_MAX_LISTED = 10


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}): {', '.join(shown)}{more}"


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DataParallel / DDP "module." prefix when every key carries it."""
    if state and all(k.startswith(MODULE_PREFIX) for k in state):
        return {k[len(MODULE_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def _load_failure_reason(exc: Exception) -> str:
    """A one-line reason from torch.load's (long, multi-line) error, without its advice to drop weights_only."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        detail = " ".join(detail.split()).split(" Please use ", 1)[0]
        return f"not a plain tensor pickle: {detail}"
    detail = " ".join(text.split()).split(". ", 1)[0][:200]
    return f"{type(exc).__name__}: {detail}" if detail else f"{type(exc).__name__} (empty or truncated file?)"


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise BackboneWeightsError listing missing, unexpected and shape-mismatched keys of `state` vs `model`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} (model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: state_dict does not match the backbone ({type(model).__name__}):"]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unexpected:
            lines.append(_listing("unexpected keys", unexpected))
        if mismatched:
            lines.append(_listing("shape mismatches", mismatched))
        raise BackboneWeightsError("\n".join(lines))


def load_backbone_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain state_dict file (arcface_torch's backbone.pth, optionally "module."-prefixed) strictly.

    The file is read with torch.load(weights_only=True) onto the CPU; values are copied into the model's own
    parameters (its device and dtype are kept). Returns the model.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: no such weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, IndexError)
        raise BackboneWeightsError(
            f"{path}: cannot be read as a torch state_dict with weights_only=True ({_load_failure_reason(exc)})"
        ) from exc
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(f"{path}: expected a state_dict (dict of name -> tensor), got {type(obj).__name__}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise BackboneWeightsError(
            f"{path}: expected a plain state_dict (str -> tensor), but these entries are not tensors "
            f"(a training checkpoint rather than backbone weights?):\n{_listing('entries', not_tensors)}"
        )
    state = _strip_module_prefix(obj)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------- MAC counting


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 112, 112)) -> int:
    """Forward multiply-accumulates of the conv and linear layers for one input of `input_size` (bias adds excluded).

    conv:   MACs = out.numel() * (in_channels / groups) * prod(kernel_size)
    linear: MACs = out.numel() * in_features
    Runs one no-grad forward in eval mode on a zero input on the model's device; the training mode is restored.
    """
    total = 0

    def conv_hook(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def linear_hook(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
