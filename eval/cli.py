"""What the eval commands' ``main`` functions share, written once: the parser with the model options, the start on
the launcher's ranks, the model loaded at most once, and feature files that are reused when they exist.

    parser = eval_parser("python -m eval.megaface", "MegaFace challenge 1 ...", data_help="MegaFace test pack folder")
    run = EvalRun.start(parser.parse_args(argv))    # rank, world size, device, label; the model loads on first use
    feats, reused = run.cached_features(path, FaceImages(paths), flip=True, normalize=True, desc="FaceScrub")
    out_dir = run.out_dir()                          # --out, else next to the checkpoint

The options every command shares (--weights, --network, --model-arg, --batch-size, --num-workers, --device, --out,
--label, --no-progress) are add_model_arguments' below; the embedding is eval.features.embed.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from eval.features import FeatureError, embed
from eval.tables import output_dir_for
from runtime.process import start as runtime_start

__all__ = ["add_model_arguments", "model_from_arguments", "checkpoint_label", "eval_parser", "run_label", "EvalRun"]


def add_model_arguments(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    """The options every eval command shares: which checkpoint, how to run it, where results go."""
    parser.add_argument("--weights", required=True,
                        help="backbone.pth (arcface_torch layout, needs --network) or a checkpoint directory "
                             "holding backbone.pth + config.yaml")
    parser.add_argument("--network", help="backbone name for get_model (required for a bare backbone.pth)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra get_model keyword (YAML value), e.g. num_features=512; repeatable")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per forward (per rank)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding / alignment processes per rank (0 = in the main process)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda:(LOCAL_RANK mod visible GPUs) if CUDA is available, "
                             "else cpu)")
    parser.add_argument("--out", default=None, help="folder for the results (default: next to the checkpoint)")
    parser.add_argument("--label", default=None, help="name of this model in the tables (default: checkpoint name)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # the deepspeed launcher's; LOCAL_RANK is read from the environment


def model_from_arguments(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the checkpoint named by ``args`` onto ``device`` (eval mode); SystemExit with the reason if it fails."""
    from eval.checkpoint_io import CheckpointError, load_model_for_eval

    overrides = {}
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --model-arg {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    try:
        model, model_cfg = load_model_for_eval(args.weights, args.network, **overrides)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    return model.to(device), model_cfg


def checkpoint_label(weights: str | os.PathLike) -> str:
    """A short name for a checkpoint: its folder name, or parent/stem of a weights file."""
    path = Path(weights)
    if path.is_dir():
        return path.name
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def eval_parser(
    prog: str, description: str, *, data_help: str | None = None, batch_size: int = 128
) -> argparse.ArgumentParser:
    """An eval command's parser: the model options every eval shares and, when ``data_help`` says what it names,
    a required ``--data``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_model_arguments(parser, batch_size=batch_size)
    if data_help is not None:
        parser.add_argument("--data", required=True, help=data_help)
    return parser


def run_label(args: argparse.Namespace) -> str:
    """The name of the model in the tables: ``--label``, else the checkpoint's name."""
    return args.label or checkpoint_label(args.weights)


@dataclass
class EvalRun:
    """One eval command after its arguments are parsed: this process's rank of the launcher's world, its device and
    the model's label; the model is loaded on first use (a run that reuses every feature file never loads it)."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    label: str
    _model: tuple[torch.nn.Module, dict[str, Any]] | None = None

    @classmethod
    def start(cls, args: argparse.Namespace) -> EvalRun:
        """Join the launcher's process group, if any (runtime.process.start), on ``--device``."""
        rank, world, device = runtime_start(args.device)
        return cls(args, rank, world, device, run_label(args))

    def out_dir(self) -> Path:
        """Where the results go: ``--out``, else the checkpoint folder (created if missing)."""
        return output_dir_for(self.args.weights, self.args.out)

    def model(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The checkpoint's model on this run's device and its config, loaded once."""
        if self._model is None:
            self._model = model_from_arguments(self.args, self.device)
        return self._model

    def cached_features(
        self, path: Path, images: torch.utils.data.Dataset, *, flip: bool, normalize: bool, desc: str
    ) -> tuple[np.ndarray | None, bool]:
        """Features [N, D] of ``images`` kept in the .npy file ``path``, memory-mapped on rank 0 (None on the other
        ranks), and whether they were reused.

        When ``path`` exists it is read back (its rows must match the images) and the model is not needed.
        Otherwise every rank embeds its share (eval.features.embed with ``flip``/``normalize``) and rank 0 writes
        the file: through a memmap when the model names its feature size (a million rows never sit in RAM), under
        a ``.partial.npy`` name until complete.
        """
        args = self.args
        if path.is_file():
            if self.rank != 0:
                return None, True
            feats = np.load(path, mmap_mode="r")
            print(f"reusing {desc} features {path} {feats.shape} (extracted earlier; extraction options have no "
                  f"effect)")
            if feats.shape[0] != len(images):
                raise FeatureError(f"{path}: {feats.shape[0]} rows, but the list has {len(images)} images")
            return feats, True
        model, _ = self.model()
        partial = path.with_suffix(".partial.npy")
        out = None
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            dim = getattr(model, "num_features", None)
            if dim is not None:
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(images), dim))
        t = time.perf_counter()
        feats = embed(model, images, batch_size=args.batch_size, device=self.device, flip=flip, normalize=normalize,
                      num_workers=args.num_workers, progress=False if args.no_progress else None,
                      desc=f"{desc} features", out=out)
        if self.rank != 0:
            return None, False
        print(f"embedded {desc} features of {len(images)} images in {time.perf_counter() - t:.1f} s on "
              f"{self.world} rank(s)")
        if out is None:
            np.save(partial, feats)
        else:
            out.flush()
        del feats, out
        partial.replace(path)
        return np.load(path, mmap_mode="r"), False
