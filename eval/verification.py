"""1:1 verification on InsightFace ``.bin`` pair sets — the protocol of insightface's verification.py.

- embedding(img) = f(img) + f(horizontally flipped img), L2-normalised; inputs normalised (x/255 − 0.5)/0.5;
- score of pair k = squared L2 distance between embeddings 2k and 2k+1 (for unit vectors d² = 2 − 2·cos);
- the pair is called "same" when d² < t; 10 contiguous folds (no shuffle), t picked on the 9 training folds from the
  grid 0, 0.01, …, 3.99 (best accuracy, first on ties), applied to the held-out fold; mean ± std over folds;
- plus the "uniform threshold" accuracy: the best accuracy ONE threshold reaches on all pairs (an upper bound on the
  10-fold number, and the quantity a deployed system with one global threshold cares about).

Embeddings come from the one pipeline, eval.features.embed (normalize=True); this module holds the protocol.

CLI: ``python -m eval.verification --weights PATH [--network NAME] --bins DIR|FILE ... [--targets lfw ...]``;
every ``*.bin`` of a folder is evaluated, and one that cannot be used (damaged, undecodable, wrong image size, not
among ``--targets``) is skipped and named with the reason. Under a launcher (torchrun, deepspeed, srun) every rank
embeds a contiguous slice of the images and rank 0 scores, prints and writes ``eval_verification.json/.csv`` next
to the checkpoint (or in ``--out``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data.verification_bin import VerificationBinError, load_bin_images
from eval.cli import EvalRun, eval_parser
from eval.features import embed
from eval.tables import format_table as format_rows
from eval.tables import percent, write_results

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
    "select_bins",
    "main",
]

THRESHOLDS = np.arange(0.0, 4.0, 0.01)  # insightface's grid: 400 values 0.00 … 3.99


def extract_embeddings(*args: Any, **kwargs: Any) -> np.ndarray:
    """:func:`embed_sharded` (same arguments) with every image embedded in this process, whatever the process
    group: float32 [M, D] of uint8 images [M, 3, H, W] (eval.features.embed with normalize=True, sharded=False)."""
    return embed_sharded(*args, **kwargs, sharded=False)


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
    sharded: bool = True,
) -> np.ndarray | None:
    """Flip-summed, L2-normalised embeddings float32 [M, D] of uint8 images [M, 3, H, W], split over the ranks of
    the default process group (eval.features.embed with normalize=True): each rank embeds its contiguous slice,
    rank 0 receives all of them in order; other ranks get None."""
    return embed(model, images, batch_size=batch_size, device=device, flip=True, normalize=True, progress=progress,
                 desc=desc, sharded=sharded)


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
    target = Path(path).stem
    emb = embed_sharded(model, images, batch_size, device, progress, desc=target)
    if emb is None:
        return None
    return {"target": target, "path": str(path), **evaluate_pairs(emb, issame, nfolds)}


def verify_bins(
    model: torch.nn.Module,
    bin_paths: Sequence[str | Path],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    nfolds: int = 10,
    image_size: tuple[int, int] = (112, 112),
    progress: bool | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` on each bin; one result dict per bin (``target`` = file stem, ``path``, metrics) on rank 0
    (an empty list on the other ranks of a process group, which embed their share of the images).

    A bin that cannot be read or decoded raises VerificationBinError — or, when a list ``skipped`` is given, is
    appended to it as ``{"path", "reason"}`` and left out (every rank reads every bin, so all skip the same ones).
    """
    results = []
    for path in bin_paths:
        try:
            images, issame = load_bin_images(path, image_size)
        except VerificationBinError as e:
            if skipped is None:
                raise
            skipped.append({"path": str(path), "reason": str(e).removeprefix(f"{path}: ")})
            continue
        r = verify_loaded(model, path, images, issame, batch_size, device, nfolds, progress)
        if r is not None:
            results.append(r)
    return results


def _table_rows(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    header = ["target", "pairs", "accuracy % (mean ± std)", "best threshold", "uniform-threshold acc %"]
    rows = [[r["target"], r["pairs"], f"{percent(r['accuracy_mean'])} ± {percent(r['accuracy_std'])}",
             f"{r['best_threshold']:.3f}",
             f"{percent(r['uniform_accuracy'])} (cos > {r['uniform_cosine_threshold']:.3f})"] for r in results]
    return header, rows


def format_table(results: Sequence[dict[str, Any]], title: str = "verification") -> str:
    """A prettytable of verification results (accuracies in %), through eval.tables.format_table."""
    return format_rows(*_table_rows(results), title)


def select_bins(items: Sequence[str], targets: Sequence[str] | None = None) -> tuple[list[Path], list[dict[str, str]]]:
    """The bins to evaluate and the ones skipped (``{"path", "reason"}``).

    ``items``: folders (each ``*.bin`` inside) and files. With ``targets`` (file stems such as lfw, cfp_fp), a bin
    of a folder that is not among them is skipped; a target found nowhere, a missing path or a folder without bins
    is an error (SystemExit naming it).
    """
    paths: list[Path] = []
    skipped: list[dict[str, str]] = []
    wanted = set(targets or ())
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.bin"))
            if not found:
                raise SystemExit(f"error: --bins {p}: directory holds no *.bin file")
            for f in found:
                if wanted and f.stem not in wanted:
                    skipped.append({"path": str(f), "reason": f"not among --targets {' '.join(targets)}"})
                else:
                    paths.append(f)
        elif p.is_file():
            paths.append(p)
        else:
            raise SystemExit(f"error: --bins {p}: no such file or directory")
    missing = sorted(wanted - {f.stem for f in paths})
    if missing:
        raise SystemExit(f"error: --targets {' '.join(missing)}: no such .bin among --bins {' '.join(items)}")
    return paths, skipped


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = eval_parser(
        "python -m eval.verification",
        "Verification accuracy (10-fold, flip-summed embeddings) of a backbone on InsightFace .bin sets.",
        batch_size=64,
    )
    parser.add_argument("--bins", nargs="+", required=True, help="directories (all *.bin inside) and/or .bin files")
    parser.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                        help="evaluate only these bins of the folders (file stems, e.g. lfw cfp_fp agedb_30)")
    parser.add_argument("--nfolds", type=int, default=10)
    parser.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    bins, skipped = select_bins(args.bins, args.targets)
    explicit = {str(Path(b)) for b in args.bins if Path(b).is_file()}
    run = EvalRun.start(args)
    model, model_cfg = run.model()
    unusable: list[dict[str, str]] = []
    results = verify_bins(model, bins, args.batch_size, run.device, args.nfolds,
                          progress=False if args.no_progress else None, skipped=unusable)
    for s in unusable:
        if s["path"] in explicit:  # a file named on the command line must be usable
            raise SystemExit(f"error: {s['path']}: {s['reason']}")
    skipped += unusable
    if not results and run.rank == 0:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
        raise SystemExit(f"error: no usable verification bin ({reasons})")
    if run.rank != 0:
        return results
    print(format_table(results, title=f"{model_cfg['name']} @ {args.weights}"))
    if skipped:
        print(f"skipped {len(skipped)} bin(s):")
        for s in skipped:
            print(f"  {s['path']}: {s['reason']}")
    data = {"kind": "verification", "weights": str(args.weights), "label": run.label, "model": model_cfg,
            "results": results, "skipped": skipped}
    json_path, csv_path = write_results(run.out_dir(), "eval_verification", data, *_table_rows(results))
    written = [json_path, csv_path]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(data, indent=2) + "\n")
        written.append(Path(args.json_out))
    print("results written to " + ", ".join(map(str, written)))
    return results

if __name__ == "__main__":
    main()
