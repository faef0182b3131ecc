"""What the eval commands' ``main`` functions share, written once: the parser with the model options, the start on
the launcher's ranks, the model loaded at most once, and feature files that are reused when they exist.

    parser = eval_parser("python -m eval.megaface", "MegaFace challenge 1 ...", data_help="MegaFace test pack folder")
    run = EvalRun.start(parser.parse_args(argv))    # rank, world size, device, label; the model loads on first use
    feats, reused = run.cached_features(path, FaceImages(paths), flip=True, normalize=True, desc="FaceScrub")
    out_dir = run.out_dir()                          # --out, else next to the checkpoint

The options themselves (--weights, --network, --model-arg, --batch-size, --num-workers, --device, --out, --label,
--no-progress) are eval.features.add_model_arguments'; the embedding is eval.features.embed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.features import (
    FeatureError,
    add_model_arguments,
    checkpoint_label,
    embed,
    model_from_arguments,
)
from eval.tables import output_dir_for
from runtime.process import start as runtime_start

__all__ = ["eval_parser", "run_label", "EvalRun"]


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
