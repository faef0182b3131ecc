"""MegaFace challenge 1: FaceScrub probes against up to 1M distractors — rank-1 identification and TAR@FAR=1e-6,
computed here (no devkit binary), in chunks of distractors so a million of them never sit in one score matrix.

Data layout (insightface's MegaFace test pack, images already aligned to 112x112; ``--data`` is its folder):

    facescrub_lst       "Identity_Name/image.png" per line, relative to facescrub_images/ (identity = folder)
    megaface_lst        "a1/a2/image.jpg" per line, relative to megaface_images/
    facescrub_noises.txt, megaface_noises.txt    optional noise lists ('#' comments): FaceScrub image file names
                        whose label is wrong; distractor paths ("a1/a2/image.jpg", or tab-separated with the path
                        last) that show a FaceScrub identity

Features: f(img) + f(flipped img), L2-normalised (as insightface's gen_megaface, through eval.features.embed);
scores are cosines.

How the numbers follow the devkit's definitions. The devkit binary (``Identification``, run by the devkit's
``run_experiment.py``) is not available, so the two numbers are computed here from their definitions:
- [MF16] I. Kemelmacher-Shlizerman, S. Seitz, D. Miller, E. Brossard, "The MegaFace Benchmark: 1 Million Faces for
  Recognition at Scale", CVPR 2016, Sec. 3: identification with distractors — each image of a FaceScrub identity is
  in turn put into the gallery with the distractors and searched for with each other image of that identity;
  verification — same-identity FaceScrub pairs against FaceScrub × distractor pairs, TAR at FAR = 1e-6;
- the devkit's README (``devkit/experiments/run_experiment.py``): it scores a probe–distractor matrix
  (``facescrub_megaface_*.bin``) and a probe–probe matrix (``facescrub_facescrub_*.bin``) and writes the CMC and
  the ROC from those two matrices (``cmc_facescrub_megaface_*_{size}_{set}.json``) for each set size;
- insightface's ``recognition/_evaluation_/megaface/remove_noises.py`` (the "refined" lists): a listed FaceScrub
  image gets its identity's centre, normalise(Σ clean features + uniform(±0.001) noise); a listed distractor gets
  a 513th dimension of 100, which keeps it in the set but farther from every probe than anything else.

Here, with s = cosine (for unit vectors the L2 distance the devkit ranks by is √(2 − 2s): the same order):
- identification: for every identity and every ordered pair (p, q) of its images, rank = 1 + #(distractors d with
  s(p, d) > s(p, q)); rank-k rate = fraction of ordered pairs with rank ≤ k (rank-1 = the CMC's first point). Only
  each probe's top-k distractor scores are needed: they are kept across chunks.
- verification: positives = unordered same-identity probe pairs, negatives = every probe × every distractor,
  N = P·M; TAR@FAR by rule "le" (eval.roc): v = the (⌊FAR·N⌋+1)-th largest negative, kept as a running top-k
  across chunks; TAR = #(positives > v)/P — the best TAR of a threshold with at most ⌊FAR·N⌋ false accepts (the
  devkit's exact ROC sampling lives in its binary; this is the operating point the definition asks for).
- noise lists: a listed distractor is out of reach, as insightface makes it — it never outranks a mate and is
  never a false accept, but still counts in N (the set keeps its size); a listed FaceScrub image gets its
  identity's centre normalise(mean of the clean features) ("centre", insightface's rule without its ±0.001 random
  jitter, so runs repeat exactly) or is dropped ("drop").

CLI: ``python -m eval.megaface --weights PATH --data DIR [--facescrub-noises F --megaface-noises F]``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from eval.cli import EvalRun, eval_parser
from eval.features import FaceImages, l2_normalize
from eval.roc import allowed_false_accepts, per_far, tar_from_top_negatives
from eval.tables import format_table, percent, write_results

__all__ = [
    "MegaFaceError",
    "MegaFaceSet",
    "read_megaface_set",
    "read_noise_list",
    "facescrub_noise_mask",
    "megaface_noise_mask",
    "clean_probe_features",
    "megaface_metrics",
    "main",
]

DEFAULT_FARS = (1e-6,)
DEFAULT_RANKS = (1, 5, 10)


class MegaFaceError(ValueError):
    """A missing or malformed MegaFace list, or features that do not fit it."""


@dataclass
class MegaFaceSet:
    probe_names: list[str]  # facescrub_lst entries "Identity/image.png"
    probe_identities: np.ndarray  # int64 [P]: index into identity_names
    identity_names: list[str]
    distractor_names: list[str]  # megaface_lst entries
    facescrub_root: Path
    megaface_root: Path

    @property
    def probe_paths(self) -> list[Path]:
        return [self.facescrub_root / n for n in self.probe_names]

    @property
    def distractor_paths(self) -> list[Path]:
        return [self.megaface_root / n for n in self.distractor_names]


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise MegaFaceError(f"{path}: no such list file")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise MegaFaceError(f"{path}: empty list")
    return names


def read_megaface_set(
    root: str | Path,
    facescrub_lst: str | Path | None = None,
    megaface_lst: str | Path | None = None,
    facescrub_root: str | Path | None = None,
    megaface_root: str | Path | None = None,
    max_distractors: int | None = None,
) -> MegaFaceSet:
    """Read the two lists (defaults: ROOT/facescrub_lst, ROOT/megaface_lst, images under ROOT/*_images)."""
    root = Path(root)
    fs_lst = Path(facescrub_lst) if facescrub_lst else root / "facescrub_lst"
    mf_lst = Path(megaface_lst) if megaface_lst else root / "megaface_lst"
    probes = _read_list(fs_lst)
    identities = []
    for lineno, name in enumerate(probes, 1):
        parts = Path(name).parts
        if len(parts) < 2:
            raise MegaFaceError(f"{fs_lst}:{lineno}: {name!r} must be 'Identity/image' (the identity is the folder)")
        identities.append(parts[-2])
    identity_names, probe_identities = np.unique(np.array(identities), return_inverse=True)
    distractors = _read_list(mf_lst)
    if max_distractors is not None:
        if max_distractors > len(distractors):
            raise MegaFaceError(f"{mf_lst}: {len(distractors)} distractors listed, {max_distractors} asked for")
        distractors = distractors[:max_distractors]
    return MegaFaceSet(
        probes,
        probe_identities.astype(np.int64),
        [str(n) for n in identity_names],
        distractors,
        Path(facescrub_root) if facescrub_root else root / "facescrub_images",
        Path(megaface_root) if megaface_root else root / "megaface_images",
    )


def read_noise_list(path: str | Path) -> set[str]:
    """Entries of a noise list: one per line, '#' comments and blank lines skipped, tab-separated → last field."""
    path = Path(path)
    if not path.is_file():
        raise MegaFaceError(f"{path}: no such noise list")
    out = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.add(line.split("\t")[-1].strip())
    return out


def facescrub_noise_mask(probe_names: Sequence[str], noises: set[str]) -> np.ndarray:
    """Probes whose image file name (the last path component) is listed."""
    return np.array([Path(n).name in noises for n in probe_names], dtype=bool)


def megaface_noise_mask(distractor_names: Sequence[str], noises: set[str]) -> np.ndarray:
    """Distractors whose last three path components ("a1/a2/image.jpg", insightface's key) are listed."""
    return np.array(["/".join(Path(n).parts[-3:]) in noises for n in distractor_names], dtype=bool)


def clean_probe_features(
    feats: torch.Tensor, identities: np.ndarray, noisy: np.ndarray, policy: str = "centre"
) -> tuple[torch.Tensor, np.ndarray]:
    """Apply the FaceScrub noise list to L2-normalised probe features; returns (features, identities).

    "centre": a noisy probe's feature becomes normalise(mean of its identity's clean features) (insightface's
    remove_noises; an identity with no clean image keeps its features). "drop": noisy probes are removed.
    """
    noisy = np.asarray(noisy, dtype=bool)
    identities = np.asarray(identities)
    if policy == "drop":
        keep = torch.from_numpy(~noisy)
        return feats[keep.to(feats.device)], identities[~noisy]
    if policy != "centre":
        raise MegaFaceError(f"unknown FaceScrub noise policy {policy!r}; expected 'centre' or 'drop'")
    feats = feats.clone()
    for ident in np.unique(identities[noisy]):
        members = identities == ident
        clean = members & ~noisy
        if clean.any():
            centre = l2_normalize(feats[torch.from_numpy(clean)].mean(0, keepdim=True))
            feats[torch.from_numpy(members & noisy)] = centre
    return feats, identities


@torch.no_grad()
def megaface_metrics(
    probe_feats: torch.Tensor,
    probe_identities: np.ndarray,
    distractor_feats: np.ndarray,
    out_of_reach: np.ndarray | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
    fars: Sequence[float] = DEFAULT_FARS,
    chunk_rows: int = 16384,
    progress: bool = False,
) -> dict[str, Any]:
    """Identification rank-k and verification TAR@FAR (see the module docstring) in one pass over the distractors.

    ``probe_feats`` [P, D] must be L2-normalised (its device is used for the products); ``distractor_feats``
    [M, D] may be a memmap and is normalised chunk by chunk; ``out_of_reach`` [M] bool marks listed distractors:
    never scored (below every probe score), still counted in N = P·M.
    Memory: one [P, chunk_rows] score block, [P, max(ranks)] and the ⌊max(FAR)·P·M⌋+1 largest negatives.
    """
    ids = np.asarray(probe_identities)
    p = probe_feats.shape[0]
    device = probe_feats.device
    x = probe_feats.float()
    m_total = distractor_feats.shape[0]
    keep = np.ones(m_total, dtype=bool) if out_of_reach is None else ~np.asarray(out_of_reach, dtype=bool)
    if keep.shape != (m_total,):
        raise MegaFaceError(f"out_of_reach has shape {keep.shape}, expected ({m_total},) for the distractors")
    num_neg = p * m_total
    k_rank = max(ranks)
    k_neg = min(num_neg, allowed_false_accepts(max(fars), num_neg) + 1)
    top_d = torch.full((p, k_rank), -math.inf, device=device)
    top_neg = torch.full((k_neg,), -math.inf, device=device)
    starts = range(0, m_total, chunk_rows)
    for start in tqdm(starts, desc="distractor chunks", unit="chunk", disable=not progress, dynamic_ncols=True):
        rows = keep[start : start + chunk_rows]
        if not rows.any():
            continue
        d = torch.from_numpy(np.asarray(distractor_feats[start : start + chunk_rows])[rows]).to(device).float()
        s = x @ l2_normalize(d).T  # [P, c]
        top_d = torch.topk(torch.cat([top_d, s], 1), k_rank, dim=1).values
        top_neg = torch.topk(torch.cat([top_neg, s.flatten()]), k_neg).values

    probe_scores = (x @ x.T).cpu().double()
    same = torch.from_numpy(ids[:, None] == ids[None, :]) & ~torch.eye(p, dtype=torch.bool)
    # identification over ordered pairs (probe p, mate q): rank = 1 + #(distractors above s(p, q))
    pi, qi = torch.nonzero(same, as_tuple=True)
    mate = probe_scores[pi, qi]
    above = (top_d.cpu().double()[pi] > mate[:, None]).sum(1)
    rank_rates = {str(k): float((above < k).double().mean()) if len(mate) else None for k in ranks}
    # verification over unordered positive pairs
    upper = torch.triu(same, diagonal=1)
    pos = probe_scores[upper].numpy()
    tars, thresholds = tar_from_top_negatives(pos, top_neg.cpu().double().numpy(), num_neg, fars)
    return {
        "probes": p,
        "identities": int(len(np.unique(ids))),
        "distractors": m_total,
        "distractors_out_of_reach": int(m_total - keep.sum()),
        "identification": {"ordered_pairs": int(len(mate)), "rank": rank_rates},
        "verification": {
            "positive_pairs": int(pos.size),
            "negative_pairs": num_neg,
            "tar_at_far": per_far(fars, tars),
            "thresholds": per_far(fars, thresholds),
        },
    }


# ----------------------------------------------------------------------------------------------------- the CLI


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = eval_parser(
        "python -m eval.megaface",
        "MegaFace challenge 1: rank-1 identification and TAR@FAR=1e-6 of FaceScrub probes against the distractor set, "
        "chunked (no devkit binary).",
        data_help="MegaFace test pack folder (facescrub_lst, megaface_lst, facescrub_images/, megaface_images/)",
    )
    parser.add_argument("--facescrub-lst", default=None)
    parser.add_argument("--megaface-lst", default=None)
    parser.add_argument("--facescrub-root", default=None)
    parser.add_argument("--megaface-root", default=None)
    parser.add_argument("--facescrub-noises", default=None, help="FaceScrub noise list (e.g. facescrub_noises.txt)")
    parser.add_argument("--megaface-noises", default=None, help="distractor noise list (e.g. megaface_noises.txt)")
    parser.add_argument("--noise-policy", choices=("centre", "drop"), default="centre",
                        help="what to do with listed FaceScrub images (centre = insightface's rule)")
    parser.add_argument("--max-distractors", type=int, default=None,
                        help="use the first N distractors of the list (the devkit's set sizes: 10 ... 1000000)")
    parser.add_argument("--fars", type=float, nargs="+", default=list(DEFAULT_FARS))
    parser.add_argument("--chunk-rows", type=int, default=16384, help="distractors scored per chunk")
    parser.add_argument("--features-dir", default=None,
                        help="where the feature .npy files are reused from / written to (default: OUT)")
    args = parser.parse_args(argv)

    run = EvalRun.start(args)
    data = read_megaface_set(args.data, args.facescrub_lst, args.megaface_lst, args.facescrub_root,
                             args.megaface_root, args.max_distractors)
    out_dir = run.out_dir()
    feat_dir = Path(args.features_dir) if args.features_dir else out_dir
    t0 = time.perf_counter()
    probe_path = feat_dir / "megaface_facescrub_features.npy"
    distractor_path = feat_dir / f"megaface_distractor_features_{len(data.distractor_names)}.npy"
    probes, _ = run.cached_features(probe_path, FaceImages(data.probe_paths), flip=True, normalize=True,
                                    desc="FaceScrub")
    distractors, _ = run.cached_features(distractor_path, FaceImages(data.distractor_paths), flip=True,
                                         normalize=True, desc="MegaFace distractors")
    if run.rank != 0:
        return None
    t1 = time.perf_counter()

    probe_feats = l2_normalize(torch.from_numpy(np.array(probes, dtype=np.float32)).to(run.device))
    identities = data.probe_identities
    noise: dict[str, Any] = {"policy": args.noise_policy}
    if args.facescrub_noises:
        noisy = facescrub_noise_mask(data.probe_names, read_noise_list(args.facescrub_noises))
        probe_feats, identities = clean_probe_features(probe_feats, identities, noisy, args.noise_policy)
        noise["facescrub_listed_in_set"] = int(noisy.sum())
    noisy_d = None
    if args.megaface_noises:
        noisy_d = megaface_noise_mask(data.distractor_names, read_noise_list(args.megaface_noises))
        noise["distractors_listed_in_set"] = int(noisy_d.sum())
    result = megaface_metrics(probe_feats, identities, distractors, noisy_d, DEFAULT_RANKS, args.fars,
                              args.chunk_rows, progress=not args.no_progress and sys.stderr.isatty())
    result.update({"kind": "megaface", "weights": str(args.weights), "label": run.label, "noise": noise,
                   "features": {"facescrub": str(probe_path), "distractors": str(distractor_path)},
                   "seconds": {"features": t1 - t0, "scoring": time.perf_counter() - t1}})

    header = ["method", "distractors"] + [f"rank-{k}" for k in DEFAULT_RANKS] + \
             [f"TAR@FAR={f}" for f in result["verification"]["tar_at_far"]]
    rows = [[run.label, result["distractors"]]
            + [percent(result["identification"]["rank"][str(k)]) for k in DEFAULT_RANKS]
            + [percent(v) for v in result["verification"]["tar_at_far"].values()]]
    refined = " (refined lists)" if args.facescrub_noises or args.megaface_noises else ""
    print(format_table(header, rows, f"MegaFace challenge 1{refined} (%)"))
    json_path, csv_path = write_results(out_dir, "eval_megaface", result, header, rows)
    print(f"results written to:\n  {json_path}\n  {csv_path}\n  features: {probe_path}, {distractor_path}")
    return result


if __name__ == "__main__":
    main()
