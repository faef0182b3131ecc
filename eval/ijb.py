"""IJB-B / IJB-C: 1:1 template verification and 1:N identification, the protocol of insightface's IJB scripts.

Data layout (insightface's IJB release; ``--data`` is the folder holding IJBB/ and/or IJBC/, or that folder itself):

    IJBC/loose_crop/1.jpg ...                    face images, not aligned
    IJBC/meta/ijbc_name_5pts_score.txt           "1.jpg x1 y1 … x5 y5 faceness" (one line per image)
    IJBC/meta/ijbc_face_tid_mid.txt              "1.jpg template_id media_id"  (same images, same order)
    IJBC/meta/ijbc_template_pair_label.txt       "template_1 template_2 label" (label 1 = same subject)
    IJBC/meta/ijbc_1N_gallery_G1.csv, …_G2.csv, ijbc_1N_probe_mixed.csv   (optional, 1:N; IJB-B: S1/S2)
                                                 CSV with a header naming TEMPLATE_ID and SUBJECT_ID

Protocol:
1. each image is decoded and aligned onto the ArcFace template from its 5 points as the field's scripts do
   (OpenCV decode, skimage's similarity fit, cv2.warpAffine: eval.align) and embedded as f(img) + f(flipped img)
   by the one embedding pipeline (eval.features.embed);
2. optional: L2-normalise each image feature (off by default: the norm carries quality), then weight it by its
   detector faceness score (on by default);
3. media pooling: the mean over the frames of one media (video) within a template; template = the SUM of its media
   features, L2-normalised;
4. 1:1 — cosine score of every listed pair (:func:`score_pairs`, vectorised), TAR at FAR 1e-6 … 1e-1 from the ROC
   (eval.roc); 1:N — every probe template against each gallery, rank-1/5/10 of the mated probes and TPIR at FPIR.

Results (JSON, CSV, ROC PNG, the image features as .npy for re-scoring) go next to the checkpoint unless --out.

CLI: ``python -m eval.ijb --weights PATH [--network NAME] --data DIR --subset IJBC`` (``--help``); under torchrun
each rank embeds a slice of the images and rank 0 scores.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from eval.cli import EvalRun, eval_parser
from eval.features import FaceImages, l2_normalize
from eval.roc import (
    DEFAULT_FARS,
    RocCurve,
    allowed_false_accepts,
    far_label,
    per_far,
    plot_roc,
    roc_curve,
    tar_at_far,
)
from eval.tables import format_table, percent, write_results

__all__ = [
    "SUBSETS",
    "IJBError",
    "IJBMeta",
    "find_subset_dir",
    "read_ijb_meta",
    "read_1n_protocol",
    "template_features",
    "score_pairs",
    "verification_1to1",
    "identification_1n",
    "evaluate_ijb",
    "main",
]

# meta file names per subset; the 1:N galleries are S1/S2 in IJB-B and G1/G2 in IJB-C
SUBSETS: dict[str, dict[str, Any]] = {
    "IJBB": {"prefix": "ijbb", "galleries": ("S1", "S2"), "title": "IJB-B"},
    "IJBC": {"prefix": "ijbc", "galleries": ("G1", "G2"), "title": "IJB-C"},
}
DEFAULT_FPIRS = (0.01, 0.1)
DEFAULT_RANKS = (1, 5, 10)
_ROWS_PER_CHUNK = 1 << 20  # rows parsed per round: bounds the memory of the csv module's lists of strings
_PROBES_PER_CHUNK = 2048


class IJBError(ValueError):
    """A missing or malformed IJB meta file (names the file, line and what was expected)."""


# --------------------------------------------------------------------------------------------------- meta files


@dataclass
class IJBMeta:
    """The 1:1 protocol of one subset: per-image arrays (same order as the meta files) and the template pairs."""

    subset: str
    subset_dir: Path
    image_names: list[str]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2]
    faceness: np.ndarray  # float32 [N]
    pair_t1: np.ndarray  # int64 [P]
    pair_t2: np.ndarray  # int64 [P]
    pair_label: np.ndarray  # bool [P]

    @property
    def image_paths(self) -> list[Path]:
        crops = self.subset_dir / "loose_crop"
        return [crops / name for name in self.image_names]


def find_subset_dir(root: str | Path, subset: str) -> Path:
    """``root/IJBC`` (or ``root`` itself when it is the subset folder): the folder holding meta/ and loose_crop/."""
    subset = subset.upper()
    if subset not in SUBSETS:
        raise IJBError(f"unknown subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    root = Path(root)
    for candidate in (root / subset, root):
        if (candidate / "meta").is_dir():
            return candidate
    raise IJBError(f"{root}: no {subset}/meta folder (nor meta/ directly inside): expected insightface's IJB layout")


def _first_bad_line(path: Path, num_fields: int, delimiter: str) -> tuple[int, str]:
    """Line number and text of the first non-blank line without ``num_fields`` fields (slow path, errors only)."""
    with open(path, newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = next(csv.reader([line.strip()], delimiter=delimiter, skipinitialspace=True))
            if len(fields) != num_fields:
                return lineno, line.rstrip("\n")
    return -1, ""


def _read_columns(path: Path, num_fields: int, delimiter: str = " ") -> Iterator[list[list[str]]]:
    """Rows of a delimited file, parsed by the csv module, in chunks: yields lists of rows (lists of strings).

    Blank lines and one trailing empty field (a trailing space) are tolerated; a row with another number of
    fields raises IJBError naming the line.
    """
    if not path.is_file():
        raise IJBError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, skipinitialspace=True)
        while rows := list(itertools.islice(reader, _ROWS_PER_CHUNK)):
            if set(map(len, rows)) != {num_fields}:  # rare: repair, or find the line to blame
                rows = [r[:num_fields] if len(r) == num_fields + 1 and r[-1] == "" else r for r in rows if r]
                if rows and set(map(len, rows)) != {num_fields}:
                    lineno, text = _first_bad_line(path, num_fields, delimiter)
                    raise IJBError(
                        f"{path}:{lineno}: expected {num_fields} fields separated by {delimiter!r}, got {text!r}"
                    )
            if rows:
                yield rows


def _to_numbers(path: Path, rows: list[list[str]], first_column: int, dtype: type) -> np.ndarray:
    """Columns first_column… of ``rows`` as a numeric [len(rows), k] array; IJBError naming a non-number."""
    fields = rows if first_column == 0 else (r[first_column:] for r in rows)
    flat = list(itertools.chain.from_iterable(fields))
    try:
        return np.array(flat, dtype=dtype).reshape(len(rows), -1)
    except ValueError:
        for r in rows:
            for value in r[first_column:]:
                try:
                    dtype(value)
                except ValueError:
                    raise IJBError(f"{path}: value {value!r} in row {r} is not a valid {dtype.__name__}") from None
        raise


def _read_named_rows(path: Path, num_fields: int, dtype: type) -> tuple[list[str], np.ndarray]:
    """Image names (column 0) and the numbers after them [N, num_fields - 1] of a meta file; IJBError when empty."""
    names, values = [], []
    for rows in _read_columns(path, num_fields):
        names.extend(r[0] for r in rows)
        values.append(_to_numbers(path, rows, 1, dtype))
    if not names:
        raise IJBError(f"{path}: empty")
    return names, np.concatenate(values)


def _read_face_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, ids = _read_named_rows(path, 3, int)
    ids = ids.astype(np.int64)
    return names, ids[:, 0], ids[:, 1]


def _read_5pts_score(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, values = _read_named_rows(path, 12, float)
    if not np.isfinite(values).all():
        raise IJBError(f"{path}: landmarks and scores must be finite numbers")
    return names, values[:, :10].reshape(-1, 5, 2).astype(np.float32), values[:, 10].astype(np.float32)


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template pair file (15.66M lines for IJB-C): numpy's C parser (~17x the csv module); when it fails or
    finds another number of columns, the csv reader reads it again to name the bad line."""
    if not path.is_file():
        raise IJBError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file: numpy warns, we raise below
            pairs = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        pairs = None
    if pairs is None or pairs.shape[1] != 3:
        parts = [_to_numbers(path, rows, 0, np.int64) for rows in _read_columns(path, 3)]
        pairs = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
    if not len(pairs):
        raise IJBError(f"{path}: no pairs")
    labels = pairs[:, 2]
    if not np.isin(labels, (0, 1)).all():
        bad = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0])
        raise IJBError(f"{path}: pair {bad + 1} has label {labels[bad]}, expected 0 or 1")
    return pairs[:, 0], pairs[:, 1], labels.astype(bool)


def read_ijb_meta(root: str | Path, subset: str, with_pairs: bool = True) -> IJBMeta:
    """Read and cross-check the 1:1 meta files of ``subset`` (see the module docstring for the layout).

    ``with_pairs=False`` skips the pair list (15.6M lines for IJB-C): enough for extracting features.
    """
    subset = subset.upper()
    subset_dir = find_subset_dir(root, subset)
    prefix, meta = SUBSETS[subset]["prefix"], subset_dir / "meta"
    tid_path = meta / f"{prefix}_face_tid_mid.txt"
    pts_path = meta / f"{prefix}_name_5pts_score.txt"
    names, templates, medias = _read_face_tid_mid(tid_path)
    pts_names, landmarks, faceness = _read_5pts_score(pts_path)
    if pts_names != names:
        if len(pts_names) != len(names) or set(pts_names) != set(names):
            missing = sorted(set(names) - set(pts_names))[:3]
            raise IJBError(
                f"{pts_path}: lists {len(pts_names)} images, {tid_path} lists {len(names)}; they must list the same "
                f"images" + (f" (no landmarks for e.g. {missing})" if missing else "")
            )
        if len(set(names)) != len(names):
            raise IJBError(f"{tid_path}: image names repeat and the two files are in different orders")
        where = {n: i for i, n in enumerate(pts_names)}
        order = np.array([where[n] for n in names])
        landmarks, faceness = landmarks[order], faceness[order]
    pair_t1 = pair_t2 = np.zeros(0, dtype=np.int64)
    pair_label = np.zeros(0, dtype=bool)
    if with_pairs:
        pairs_path = meta / f"{prefix}_template_pair_label.txt"
        pair_t1, pair_t2, pair_label = _read_pairs(pairs_path)
        known = np.unique(templates)
        for side, t in (("first", pair_t1), ("second", pair_t2)):
            unknown = ~np.isin(t, known)
            if unknown.any():
                i = int(np.flatnonzero(unknown)[0])
                raise IJBError(f"{pairs_path}: pair {i + 1}: {side} template {t[i]} has no image in {tid_path}")
    return IJBMeta(subset, subset_dir, names, templates, medias, landmarks, faceness, pair_t1, pair_t2, pair_label)


def _read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) of a 1:N list: one row per image, so templates repeat; each must keep 1 subject."""
    if not path.is_file():
        raise IJBError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().upper() for h in next(reader, [])]
        try:
            t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        except ValueError:
            raise IJBError(f"{path}: header {header} must name the columns TEMPLATE_ID and SUBJECT_ID") from None
        pairs = []
        for lineno, row in enumerate(reader, 2):
            if not row or not "".join(row).strip():
                continue
            try:
                pairs.append((int(row[t_col]), int(row[s_col])))
            except (IndexError, ValueError):
                raise IJBError(f"{path}:{lineno}: expected integer TEMPLATE_ID and SUBJECT_ID, got {row}") from None
    if not pairs:
        raise IJBError(f"{path}: no rows")
    arr = np.unique(np.array(pairs, dtype=np.int64), axis=0)
    templates, first = np.unique(arr[:, 0], return_index=True)
    if len(templates) != len(arr):
        dup = arr[np.flatnonzero(np.diff(arr[:, 0]) == 0)[0], 0]
        raise IJBError(f"{path}: template {dup} is listed with more than one SUBJECT_ID")
    return templates, arr[first, 1]


def read_1n_protocol(subset_dir: Path, subset: str) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{gallery name: (templates, subjects)} plus "probe"; None when the subset has no 1:N files."""
    prefix, galleries = SUBSETS[subset]["prefix"], SUBSETS[subset]["galleries"]
    meta = subset_dir / "meta"
    files = {g: meta / f"{prefix}_1N_gallery_{g}.csv" for g in galleries}
    files["probe"] = meta / f"{prefix}_1N_probe_mixed.csv"
    if not any(p.exists() for p in files.values()):
        return None
    return {name: _read_1n_csv(path) for name, path in files.items()}


# ------------------------------------------------------------------------------------------------ the protocol


def template_features(
    feats: np.ndarray | torch.Tensor,
    templates: np.ndarray,
    medias: np.ndarray,
    faceness: np.ndarray | None = None,
    normalize_images: bool = False,
) -> tuple[np.ndarray, torch.Tensor]:
    """Pool image features [N, D] into L2-normalised template features; returns (sorted template ids, [T, D]).

    x_i = feats_i (/‖feats_i‖ if normalize_images) (· faceness_i if given);
    media feature = mean of x_i over the images of one (template, media); template = Σ of its media features,
    then L2-normalised (a template whose sum is 0 stays 0). Vectorised with index_add (no loop over templates).
    """
    if isinstance(feats, np.ndarray):
        feats = np.require(feats, np.float32, ["C", "W"])  # copies a read-only memmap; torch wants writable memory
    x = torch.as_tensor(feats, dtype=torch.float32)
    if x.dim() != 2 or x.shape[0] != len(templates) or len(medias) != len(templates):
        raise ValueError(f"features {tuple(x.shape)} must be [N, D] for N={len(templates)} template/media ids")
    if normalize_images:
        x = l2_normalize(x)
    if faceness is not None:
        x = x * torch.as_tensor(faceness, dtype=torch.float32, device=x.device)[:, None]
    keys = np.stack([np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)], axis=1)
    media_keys, media_of_image = np.unique(keys, axis=0, return_inverse=True)
    media_of_image = torch.as_tensor(media_of_image.reshape(-1), device=x.device)
    media_sum = x.new_zeros(len(media_keys), x.shape[1]).index_add_(0, media_of_image, x)
    media_count = torch.bincount(media_of_image, minlength=len(media_keys)).to(x.dtype)
    media_mean = media_sum / media_count[:, None]
    template_ids, template_of_media = np.unique(media_keys[:, 0], return_inverse=True)
    template_of_media = torch.as_tensor(template_of_media.reshape(-1), device=x.device)
    t = x.new_zeros(len(template_ids), x.shape[1]).index_add_(0, template_of_media, media_mean)
    return template_ids, l2_normalize(t)


def _rows_of(template_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    rows = np.searchsorted(template_ids, wanted)
    rows = np.clip(rows, 0, len(template_ids) - 1)
    missing = template_ids[rows] != wanted
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise IJBError(f"{what} #{i + 1}: template {wanted[i]} has no image in the face_tid_mid list")
    return rows


def score_pairs(
    feats: torch.Tensor, rows: np.ndarray, cols: np.ndarray, tile: int = 1024, dense_fraction: float = 0.1
) -> np.ndarray:
    """⟨feats[rows[k]], feats[cols[k]]⟩ for every pair k, float32 [P] — no Python loop over pairs.

    The template×template plane is cut into tile×tile blocks (tile rounded down to a power of two) and the pairs
    are sorted by (block, row) with one integer sort. Per block, both feature slices (2·tile·D floats) stay in
    cache and the block's pairs are scored at once: a dense block (pairs ≥ dense_fraction of its cells) by one GEMM
    and a lookup, a sparse one by a sampled dense-dense product (torch.sparse.sampled_addmm on a CSR pattern: only
    the listed cells are computed).
    """
    feats = torch.as_tensor(feats)
    n = feats.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if rows.shape != cols.shape or rows.ndim != 1:
        raise ValueError(f"rows and cols must be 1-D of equal length, got {rows.shape} and {cols.shape}")
    if rows.size == 0:
        return np.zeros(0, dtype=np.float32)
    if rows.min() < 0 or cols.min() < 0 or rows.max() >= n or cols.max() >= n:
        raise ValueError(f"pair indices must lie in [0, {n})")
    shift = max(0, min(tile, n).bit_length() - 1)  # the tile side is a power of two: r // tile = r >> shift
    tile, mask = 1 << shift, (1 << shift) - 1
    blocks = math.ceil(n / tile)
    index_dtype = torch.int32 if blocks * blocks * tile < 2**31 else torch.int64
    r = torch.from_numpy(rows).to(index_dtype)
    c = torch.from_numpy(cols).to(index_dtype)
    key = r >> shift  # key = (block (row block, col block), row within the block), built in place
    key *= blocks
    key += c >> shift
    key <<= shift
    key |= r & mask
    key, order = torch.sort(key, stable=True)  # one integer sort (radix) of all pairs
    local_row = key & mask  # sorted by row within each block, as CSR wants
    local_col = torch.index_select(c & mask, 0, order)
    bounds = torch.searchsorted(key >> shift, torch.arange(blocks * blocks + 1, dtype=index_dtype)).tolist()
    del key, r, c
    device = feats.device
    scores = torch.empty(rows.size, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        for b in range(blocks * blocks):
            s, e = bounds[b], bounds[b + 1]
            if s == e:
                continue
            bi, bj = divmod(b, blocks)
            a_feats = feats[bi * tile : (bi + 1) * tile].float()
            b_feats = feats[bj * tile : (bj + 1) * tile].float()
            lr, lc = local_row[s:e].to(device), local_col[s:e].to(device)
            if e - s >= dense_fraction * a_feats.shape[0] * b_feats.shape[0]:
                scores[s:e] = (a_feats @ b_feats.T)[lr.long(), lc.long()].cpu()
            else:
                crow = torch.zeros(a_feats.shape[0] + 1, dtype=index_dtype, device=device)
                crow[1:] = torch.cumsum(torch.bincount(lr, minlength=a_feats.shape[0]), 0)
                pattern = torch.sparse_csr_tensor(
                    crow, lc, torch.zeros(e - s, dtype=torch.float32, device=device),
                    size=(a_feats.shape[0], b_feats.shape[0]), check_invariants=False,
                )
                scores[s:e] = torch.sparse.sampled_addmm(pattern, a_feats, b_feats.T, beta=0.0).values().cpu()
    return torch.empty_like(scores).index_copy_(0, order, scores).numpy()


def verification_1to1(
    template_ids: np.ndarray,
    template_feats: torch.Tensor,
    pair_t1: np.ndarray,
    pair_t2: np.ndarray,
    pair_label: np.ndarray,
    fars: Sequence[float] = DEFAULT_FARS,
) -> tuple[np.ndarray, RocCurve, dict[str, Any]]:
    """Cosine scores of the template pairs, their ROC and TAR@FAR under both rules (see eval.roc)."""
    scores = score_pairs(
        template_feats,
        _rows_of(template_ids, np.asarray(pair_t1), "pair"),
        _rows_of(template_ids, np.asarray(pair_t2), "pair"),
    )
    curve = roc_curve(scores, pair_label)
    result = {
        "pairs": int(len(scores)),
        "positive_pairs": curve.num_pos,
        "negative_pairs": curve.num_neg,
        "tar_at_far": per_far(fars, tar_at_far(curve, fars, "le")),
        "tar_at_far_insightface": per_far(fars, tar_at_far(curve, fars, "insightface")),
    }
    return scores, curve, result


def identification_1n(
    probe_feats: torch.Tensor,
    probe_subjects: np.ndarray,
    gallery_feats: torch.Tensor,
    gallery_subjects: np.ndarray,
    ranks: Sequence[int] = DEFAULT_RANKS,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
) -> dict[str, Any]:
    """Open-set identification of probe templates against one gallery (features L2-normalised, scores = cosine).

    A probe is mated when its subject is in the gallery. Its mate score m = best score over the gallery templates of
    its subject; rank = 1 + #(other-subject gallery templates scoring > m). CMC(k) = mean over mated probes of
    [rank ≤ k]. Open set: a non-mated probe raises a false alarm when its best score exceeds t; for FPIR target f at
    most ⌊f·N_nonmated⌋ may, so t = the (⌊f·N⌋+1)-th largest non-mated best score, and
    TPIR(f) = mean over mated probes of [rank = 1 and m > t].
    """
    probe_subjects = np.asarray(probe_subjects)
    gallery_subjects = np.asarray(gallery_subjects)
    if len(gallery_subjects) == 0 or len(probe_subjects) == 0:
        raise ValueError(f"need probes and gallery templates, got {len(probe_subjects)} and {len(gallery_subjects)}")
    mate_score = np.empty(len(probe_subjects))
    others_above = np.empty(len(probe_subjects), dtype=np.int64)
    best_score = np.empty(len(probe_subjects))
    for start in range(0, len(probe_subjects), _PROBES_PER_CHUNK):  # bounds the [probes, gallery] score block
        stop = start + _PROBES_PER_CHUNK
        scores = (probe_feats[start:stop].float() @ gallery_feats.float().T).cpu().double().numpy()
        same = probe_subjects[start:stop, None] == gallery_subjects[None, :]
        mate_score[start:stop] = np.where(same, scores, -np.inf).max(axis=1)
        others_above[start:stop] = (np.where(same, -np.inf, scores) > mate_score[start:stop, None]).sum(axis=1)
        best_score[start:stop] = scores.max(axis=1)
    mated = np.isin(probe_subjects, gallery_subjects)
    rank = others_above[mated] + 1
    result: dict[str, Any] = {
        "mated_probes": int(mated.sum()),
        "nonmated_probes": int((~mated).sum()),
        "gallery_templates": int(len(gallery_subjects)),
        "rank": {str(k): float((rank <= k).mean()) if rank.size else None for k in ranks},
    }
    best_nonmated = np.sort(best_score[~mated])[::-1]
    tpir, thresholds = {}, {}
    for f in fpirs:
        label = far_label(f)
        if best_nonmated.size == 0 or rank.size == 0:
            tpir[label], thresholds[label] = None, None
            continue
        k = allowed_false_accepts(f, best_nonmated.size)
        t = best_nonmated[k] if k < best_nonmated.size else -np.inf
        tpir[label] = float(((rank == 1) & (mate_score[mated] > t)).mean())
        thresholds[label] = float(t)
    result["tpir_at_fpir"] = tpir
    result["fpir_thresholds"] = thresholds
    return result


def _identification(
    meta: IJBMeta, template_ids: np.ndarray, template_feats: torch.Tensor, protocol: dict, fpirs: Sequence[float]
) -> dict[str, Any]:
    """1:N for every gallery of the subset, plus the pooled rank rates and the mean TPIR over the galleries."""
    probe_templates, probe_subjects = protocol["probe"]
    probe_feats = template_feats[torch.from_numpy(_rows_of(template_ids, probe_templates, "1:N probe template"))]
    out: dict[str, Any] = {}
    for g in SUBSETS[meta.subset]["galleries"]:
        g_templates, g_subjects = protocol[g]
        g_feats = template_feats[torch.from_numpy(_rows_of(template_ids, g_templates, f"1:N gallery {g} template"))]
        out[g] = identification_1n(probe_feats, probe_subjects, g_feats, g_subjects, DEFAULT_RANKS, fpirs)
    per = [out[g] for g in SUBSETS[meta.subset]["galleries"]]
    mated = sum(p["mated_probes"] for p in per)
    out["all"] = {
        "mated_probes": mated,
        "rank": {
            str(k): (sum(p["rank"][str(k)] * p["mated_probes"] for p in per if p["mated_probes"]) / mated
                     if mated else None)
            for k in DEFAULT_RANKS
        },
        "tpir_at_fpir": {
            label: (float(np.mean([p["tpir_at_fpir"][label] for p in per]))
                    if all(p["tpir_at_fpir"][label] is not None for p in per) else None)
            for label in map(far_label, fpirs)
        },
    }
    return out


def evaluate_ijb(
    meta: IJBMeta,
    image_feats: np.ndarray,
    *,
    faceness: bool = True,
    normalize_images: bool = False,
    fars: Sequence[float] = DEFAULT_FARS,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
    one_to_n: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], RocCurve]:
    """Everything after feature extraction: pooling, 1:1 verification and (if its files exist) 1:N.

    Template features are scored on ``device``; should that fail (e.g. an unsupported sparse kernel on a GPU),
    the scoring is redone on the CPU with a warning, so a long extraction is never lost at the last step.
    """
    if image_feats.shape[0] != len(meta.image_names):
        raise IJBError(f"{image_feats.shape[0]} feature rows for the {len(meta.image_names)} images of {meta.subset}")
    t0 = time.perf_counter()
    template_ids, tfeats = template_features(
        image_feats, meta.templates, meta.medias, meta.faceness if faceness else None, normalize_images
    )
    t1 = time.perf_counter()

    def score(feats: torch.Tensor) -> tuple[np.ndarray, RocCurve, dict[str, Any]]:
        return verification_1to1(template_ids, feats, meta.pair_t1, meta.pair_t2, meta.pair_label, fars)

    scored = tfeats.to(device)  # tfeats itself stays where it was pooled (the CPU, for numpy features)
    try:
        _, curve, verification = score(scored)
    except RuntimeError as e:
        if scored.device.type == "cpu":
            raise
        warnings.warn(f"scoring on {scored.device} failed ({e}); scoring on the CPU instead")
        scored = tfeats.cpu()  # pooled on the CPU: no copy back from the device that just failed
        _, curve, verification = score(scored)
    t2 = time.perf_counter()
    result: dict[str, Any] = {
        "subset": meta.subset,
        "images": len(meta.image_names),
        "templates": int(len(template_ids)),
        "protocol": {"flip": True, "faceness": faceness, "normalize_images": normalize_images,
                     "pooling": "media mean, template sum, L2", "score": "cosine"},
        "verification": verification,
        "seconds": {"pooling": t1 - t0, "scoring_and_roc": t2 - t1},
    }
    protocol = read_1n_protocol(meta.subset_dir, meta.subset) if one_to_n else None
    if protocol is not None:
        result["identification"] = _identification(meta, template_ids, scored, protocol, fpirs)
    return result, curve


# ----------------------------------------------------------------------------------------------------- the CLI


def _verification_rows(label: str, result: dict[str, Any], rule: str) -> tuple[list[str], list[list[Any]]]:
    key = "tar_at_far" if rule == "le" else "tar_at_far_insightface"
    tars = result["verification"][key]
    header = ["method"] + [f"TAR@FAR={k}" for k in tars]
    return header, [[label] + [percent(v) for v in tars.values()]]


def _identification_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    ident = result["identification"]
    galleries = [g for g in ident if g != "all"] + ["all"]
    fp_labels = list(ident["all"]["tpir_at_fpir"])
    header = ["gallery", "mated probes"] + [f"rank-{k}" for k in DEFAULT_RANKS] + [f"TPIR@FPIR={f}" for f in fp_labels]

    rows = []
    for g in galleries:
        r = ident[g]
        rows.append([g if g != "all" else "all (pooled / mean)", r["mated_probes"]]
                    + [percent(r["rank"][str(k)]) for k in DEFAULT_RANKS]
                    + [percent(r["tpir_at_fpir"][f]) for f in fp_labels])
    return header, rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = eval_parser(
        "python -m eval.ijb",
        "IJB-B/IJB-C 1:1 verification (TAR@FAR) and 1:N identification of a backbone, insightface's protocol: "
        "5-point alignment, flip-sum features, faceness weighting, media/template pooling.",
        data_help="folder holding IJBB/ and IJBC/ (insightface layout), or one subset folder itself",
    )
    parser.add_argument("--subset", default="IJBC", type=str.upper, choices=sorted(SUBSETS))
    parser.add_argument("--no-flip", action="store_true", help="features of the image only (no flip sum)")
    parser.add_argument("--no-faceness", action="store_true", help="do not weight images by detector faceness")
    parser.add_argument("--normalize-images", action="store_true",
                        help="L2-normalise each image feature before pooling (insightface's 'N1')")
    parser.add_argument("--far-rule", choices=("le", "insightface"), default="le",
                        help="TAR@FAR shown in the table: best TAR with FAR <= target (le), or insightface's nearest "
                             "ROC point (both are saved in the JSON)")
    parser.add_argument("--no-1n", action="store_true", help="skip 1:N identification even if its files exist")
    parser.add_argument("--features", default=None,
                        help="image features .npy: reused if it exists (skips extraction), else written there "
                             "(default: OUT/<subset>_features.npy)")
    args = parser.parse_args(argv)

    run = EvalRun.start(args)
    meta = read_ijb_meta(args.data, args.subset, with_pairs=run.rank == 0)  # only rank 0 scores
    out_dir = run.out_dir()
    stem = args.subset.lower()
    features_path = Path(args.features) if args.features else out_dir / f"{stem}_features.npy"
    label = run.label
    feats, reused = run.cached_features(features_path, FaceImages(meta.image_paths, meta.landmarks),
                                        flip=not args.no_flip, normalize=False, desc="image")
    if run.rank != 0:
        return None

    result, curve = evaluate_ijb(meta, np.asarray(feats), faceness=not args.no_faceness,
                                 normalize_images=args.normalize_images, one_to_n=not args.no_1n, device=run.device)
    result["protocol"]["flip"] = "as when the reused features were extracted" if reused else not args.no_flip
    result.update({"kind": "ijb", "weights": str(args.weights), "label": label, "features": str(features_path)})
    title = SUBSETS[args.subset]["title"]
    roc_path = plot_roc({label: curve}, out_dir / f"roc_{stem}.png", title=f"{title} 1:1 verification")
    result["roc_png"] = str(roc_path)

    header, rows = _verification_rows(label, result, args.far_rule)
    tables = [format_table(header, rows, f"{title} 1:1 verification, TAR (%) at FAR — rule '{args.far_rule}'")]
    json_path, csv_path = write_results(out_dir, f"eval_{stem}", result, header, rows)
    written = [json_path, csv_path, roc_path]
    if "identification" in result:
        header_n, rows_n = _identification_rows(result)
        tables.append(format_table(header_n, rows_n, f"{title} 1:N identification (%)"))
        written.append(write_results(out_dir, f"eval_{stem}_1n", None, header_n, rows_n)[1])
    print("\n".join(tables))
    print("results written to:\n  " + "\n  ".join(map(str, written)) + f"\n  image features: {features_path}")
    return result


if __name__ == "__main__":
    main()
