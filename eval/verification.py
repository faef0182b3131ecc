"""1:1 verification on InsightFace ``.bin`` pair sets — the protocol of insightface's verification.py.

- embedding(img) = f(img) + f(horizontally flipped img), L2-normalised; inputs normalised (x/255 − 0.5)/0.5;
- score of pair k = squared L2 distance between embeddings 2k and 2k+1 (for unit vectors d² = 2 − 2·cos);
- the pair is called "same" when d² < t; 10 contiguous folds (no shuffle), t picked on the 9 training folds from the
  grid 0, 0.01, …, 3.99 (best accuracy, first on ties), applied to the held-out fold; mean ± std over folds;
- plus the "uniform threshold" accuracy: the best accuracy ONE threshold reaches on all pairs (an upper bound on the
  10-fold number, and the quantity a deployed system with one global threshold cares about).

CLI: ``python -m eval.verification --weights PATH [--network NAME] --bins DIR|FILE ... [--json OUT]``; under a
launcher (torchrun, deepspeed) every rank embeds a contiguous slice of the images and rank 0 scores and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from prettytable import PrettyTable
from tqdm import tqdm

from data.verification_bin import VerificationBinError, load_bin_images

__all__ = [
    "THRESHOLDS",
    "extract_embeddings",
    "fold_slices",
    "evaluate_pairs",
    "uniform_threshold_accuracy",
    "embed_sharded",
    "verify_loaded",
    "verify_bins",
    "format_table",
    "main",
]

THRESHOLDS = np.arange(0.0, 4.0, 0.01)  # insightface's grid: 400 values 0.00 … 3.99


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


@torch.no_grad()
def extract_embeddings(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    desc: str = "embed",
) -> np.ndarray:
    """Flip-summed, L2-normalised embeddings of uint8 images [M, 3, H, W] → float32 array [M, D].

    ``device`` defaults to the device of the model's first parameter. The model runs in eval mode under no_grad and
    is put back in its previous mode afterwards. ``progress=None`` shows a bar only on a terminal.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [M, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    chunks = []
    try:
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not _show_progress(progress), leave=False):
            x = images[start : start + batch_size].to(device=device, non_blocking=True).float()
            x = (x / 255.0 - 0.5) / 0.5
            emb = model(x).float() + model(torch.flip(x, dims=[3])).float()
            chunks.append(emb.cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to embed")
    emb = torch.cat(chunks).double()
    emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return emb.float().numpy()


def fold_slices(n: int, nfolds: int) -> list[slice]:
    """Contiguous folds without shuffle; the first n % nfolds folds get one extra item (sklearn KFold's split)."""
    if not 2 <= nfolds <= n:
        raise ValueError(f"need 2 <= nfolds <= number of pairs, got nfolds={nfolds} for {n} pairs")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def _grid_accuracies(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of the rule "same iff dist < t" for every t, by counting (no [T, n] matrix)."""
    pos = np.sort(dist[same])
    neg = np.sort(dist[~same])
    true_accepts = np.searchsorted(pos, thresholds, side="left")  # positives with d < t
    true_rejects = neg.size - np.searchsorted(neg, thresholds, side="left")  # negatives with d >= t
    return (true_accepts + true_rejects) / dist.size


def uniform_threshold_accuracy(dist: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Best accuracy of a single cut "same iff dist < t" over ALL pairs, exact, in O(n log n).

    Sort once; cutting after the k smallest distances accepts those k pairs. acc(k) = (positives among the first k
    + negatives among the rest) / n. Only cuts between two distinct values (and the two ends) are realisable.
    Returns (accuracy, threshold t) with t the midpoint of the gap that realises the best cut.
    """
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    n = dist.size
    if n == 0:
        raise ValueError("no pairs")
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    pos_before = np.concatenate([[0], np.cumsum(same[order])])  # positives among the first k, k = 0..n
    k = np.arange(n + 1)
    neg_after = (n - same.sum()) - (k - pos_before)
    acc = (pos_before + neg_after) / n
    realisable = np.ones(n + 1, dtype=bool)
    realisable[1:n] = d[:-1] < d[1:]  # a cut inside a run of equal distances cannot be made
    acc = np.where(realisable, acc, -1.0)
    best = int(np.argmax(acc))
    if best == 0:
        t = float(d[0])  # nothing is strictly below the smallest distance
    elif best == n:
        t = float(np.nextafter(d[-1], np.inf))
    else:
        t = float((d[best - 1] + d[best]) / 2)
    return float(acc[best]), t


def evaluate_pairs(emb: np.ndarray, issame: Sequence[bool] | np.ndarray, nfolds: int = 10) -> dict[str, Any]:
    """Verification accuracy of embeddings [2N, D] (pair k = rows 2k, 2k+1) against ``issame`` [N].

    Returns accuracy_mean/std over folds, fold_accuracies, best_threshold (mean of per-fold picks, squared L2),
    uniform_accuracy with uniform_threshold (squared L2) and uniform_cosine_threshold (= 1 − t/2, unit vectors).
    """
    emb = np.asarray(emb, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.size:
        raise ValueError(f"embeddings must be [2N, D] for N={same.size} pairs, got shape {emb.shape}")
    dist = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)

    fold_acc, fold_thr = [], []
    for test in fold_slices(same.size, nfolds):
        train = np.ones(same.size, dtype=bool)
        train[test] = False
        best = int(np.argmax(_grid_accuracies(dist[train], same[train], THRESHOLDS)))  # first max on ties
        fold_thr.append(THRESHOLDS[best])
        fold_acc.append(float(_grid_accuracies(dist[test], same[test], THRESHOLDS[best : best + 1])[0]))

    uni_acc, uni_thr = uniform_threshold_accuracy(dist, same)
    return {
        "pairs": int(same.size),
        "accuracy_mean": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_accuracies": fold_acc,
        "best_threshold": float(np.mean(fold_thr)),
        "uniform_accuracy": uni_acc,
        "uniform_threshold": uni_thr,
        "uniform_cosine_threshold": 1.0 - uni_thr / 2.0,
    }


def embed_sharded(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    desc: str = "embed",
) -> np.ndarray | None:
    """:func:`extract_embeddings` split over the ranks of the default process group: each rank embeds its contiguous
    slice, rank 0 receives all of them in order ([M, D]); other ranks get None. One process: all images, here."""
    import torch.distributed as dist

    from eval.features import dist_rank_world, rank_slice

    rank, world = dist_rank_world()
    local = extract_embeddings(model, images[rank_slice(images.shape[0], rank, world)], batch_size, device,
                               progress, desc)
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return np.concatenate(parts) if rank == 0 else None


def verify_loaded(
    model: torch.nn.Module,
    path: str | Path,
    images: torch.Tensor,
    issame: np.ndarray,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    nfolds: int = 10,
    progress: bool | None = None,
) -> dict[str, Any] | None:
    """Verification of already decoded bin images (sharded over ranks); the result dict on rank 0, else None."""
    emb = embed_sharded(model, images, batch_size, device, progress, desc=Path(path).stem)
    if emb is None:
        return None
    return {"target": Path(path).stem, "path": str(path), **evaluate_pairs(emb, issame, nfolds)}


def verify_bins(
    model: torch.nn.Module,
    bin_paths: Sequence[str | Path],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    nfolds: int = 10,
    image_size: tuple[int, int] = (112, 112),
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` on each bin; one result dict per bin (``target`` = file stem, ``path``, metrics) on rank 0
    (an empty list on the other ranks of a process group, which embed their share of the images)."""
    results = []
    for path in bin_paths:
        images, issame = load_bin_images(path, image_size)
        r = verify_loaded(model, path, images, issame, batch_size, device, nfolds, progress)
        if r is not None:
            results.append(r)
    return results


def format_table(results: Sequence[dict[str, Any]], title: str = "verification") -> str:
    """A prettytable of verification results (accuracies in %)."""
    table = PrettyTable(["target", "pairs", "accuracy % (mean ± std)", "best threshold", "uniform-threshold acc %"])
    table.title = title
    for r in results:
        table.add_row(
            [
                r["target"],
                r["pairs"],
                f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
                f"{r['best_threshold']:.3f}",
                f"{100 * r['uniform_accuracy']:.2f} (cos > {r['uniform_cosine_threshold']:.3f})",
            ]
        )
    return table.get_string()


def _expand_bins(items: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.bin"))
            if not found:
                raise SystemExit(f"error: --bins {p}: directory holds no *.bin file")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise SystemExit(f"error: --bins {p}: no such file or directory")
    return paths


def _parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --model-arg {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from eval.checkpoint_io import CheckpointError, load_model_for_eval

    parser = argparse.ArgumentParser(
        prog="python -m eval.verification",
        description="Verification accuracy (10-fold, flip-summed embeddings) of a backbone on InsightFace .bin sets.",
    )
    parser.add_argument("--weights", required=True, help="backbone.pth (arcface_torch layout) or a checkpoint dir "
                        "holding backbone.pth + config.yaml")
    parser.add_argument("--network", help="backbone name for get_model (required for a bare backbone.pth)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra get_model keyword (YAML value), e.g. num_features=512; repeatable")
    parser.add_argument("--bins", nargs="+", required=True, help="directories (all *.bin inside) and/or .bin files")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--nfolds", type=int, default=10)
    parser.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher's
    args = parser.parse_args(argv)

    from eval.features import init_distributed_from_env

    bins = _expand_bins(args.bins)
    rank, _, device = init_distributed_from_env(args.device)
    try:
        model, model_cfg = load_model_for_eval(args.weights, args.network, **_parse_model_args(args.model_arg))
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    model.to(device)
    try:
        results = verify_bins(model, bins, args.batch_size, device, args.nfolds,
                              progress=False if args.no_progress else None)
    except VerificationBinError as e:
        raise SystemExit(f"error: {e}") from None
    if rank != 0:
        return results
    print(format_table(results, title=f"{model_cfg['name']} @ {args.weights}"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"weights": str(args.weights), "model": model_cfg,
                                                   "results": results}, indent=2))
        print(f"results written to {args.json_out}")
    return results


if __name__ == "__main__":
    main()
