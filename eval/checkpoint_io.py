"""Build a backbone for evaluation from any checkpoint: ours or an arcface_torch ``backbone.pth``.

Accepted (the folders and files are runtime/layout.py's, the layout the trainer writes):
- a file: an arcface_torch-style ``backbone.pth`` state dict — the network name must be given;
- a run folder (OUTPUT, holding checkpoints/latest): its newest complete checkpoint;
- a directory holding ``backbone.pth`` + ``config.yaml`` (our checkpoints): the YAML has a top-level ``model:``
  mapping whose ``name`` is the network. Its other keys hold constructor arguments (``num_features``, ``dropout``)
  beside the trainer's runtime settings (``precision``, ``loss_scale``, ``compile``, ...): the keys the network's
  constructor takes are passed to it, the others are left to the trainer; ``model.kwargs`` (the tiny family's
  widths/depths) is passed whole, so a wrong key there is an error.

Eval depends on backbones only, never on trainer internals: the YAML is read here, plainly.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
import yaml

import backbones
from runtime.layout import BACKBONE_FILE, CONFIG_FILE, CheckpointError, checkpoint_folder

__all__ = ["CheckpointError", "read_model_config", "load_model_for_eval"]


def read_model_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """``{"name": network, **constructor arguments}`` from the ``model:`` mapping of a config.yaml (see the module
    docstring for which keys are constructor arguments)."""
    path = Path(config_path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: expected a top-level 'model:' mapping")
    model = dict(cfg["model"])
    extra = model.pop("kwargs", None) or {}  # the trainer's `model.kwargs:` (tiny-family widths/depths)
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: key 'model.kwargs' must be a mapping, got {extra!r}")
    name = model.pop("name", None)
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: key 'model.name' must name the network (a non-empty string)")
    constructor = backbones.MODELS.get(name)
    if constructor is None:
        raise CheckpointError(f"{path}: model.name {name!r} is not a known network; valid: "
                              f"{', '.join(backbones.MODELS)}")
    accepted = set(inspect.signature(constructor).parameters)
    return {"name": name, **{k: v for k, v in model.items() if k in accepted}, **extra}


def load_model_for_eval(
    weights: str | os.PathLike, network: str | None = None, **overrides: Any
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Return (model in eval mode on CPU with weights loaded strictly, model config ``{"name": ..., **kwargs}``).

    ``overrides`` are extra ``get_model`` kwargs; they win over config.yaml's. ``network``, if given for a
    checkpoint directory, must agree with its config.
    """
    path = checkpoint_folder(weights)  # a run folder: its newest checkpoint
    if path.is_dir():
        config_path, weights_path = path / CONFIG_FILE, path / BACKBONE_FILE
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise CheckpointError(f"{path}: checkpoint directory has no {needed.name}")
        model_cfg = read_model_config(config_path)
        if network is not None and network != model_cfg["name"]:
            raise CheckpointError(
                f"{path}: --network {network!r} disagrees with model.name {model_cfg['name']!r} in {config_path}"
            )
        source = str(config_path)
    elif path.is_file():
        if network is None:
            raise CheckpointError(f"{path}: a bare backbone weights file needs the network name (--network)")
        model_cfg, weights_path, source = {"name": network}, path, "--network"
    else:
        raise CheckpointError(f"{path}: no such checkpoint file or directory")

    name = model_cfg["name"]
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    kwargs.update(overrides)
    try:
        model = backbones.get_model(name, **kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: cannot build network {name!r} with {kwargs}: {e}") from None
    try:
        backbones.load_backbone_weights(model, str(weights_path))
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{weights_path}: weights do not fit network {name!r} {kwargs}: {e}") from None
    model.eval()
    return model, {"name": name, **kwargs}
