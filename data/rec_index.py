"""Up-front check of a training rec, and the images-only index the DALI reader needs.

:func:`scan_images` reads the fixed-size head of every image record straight from a memory map, vectorised::

    offset+0   uint32 magic          must be 0xCED7230A
    offset+4   uint32 lrec           cflag = lrec >> 29 (0 whole record, 1 first of split parts), len = lrec & (2^29-1)
    offset+8   IRHeader 'IfQQ'       flag, label, id, id2 (24 bytes)
    offset+32  flag x float32        label vector when flag > 0 (the class is its first entry)
    then       encoded image         must start with an image signature (JPEG / PNG / ...)

and checks that every record lies inside the file and does not overlap the next one, that it starts with the magic
word, that its payload is an image, and that its label is an integer in 0..num_classes-1 (``property``). Records split
around an embedded magic word (rare) are read whole. A damaged file is reported by key and byte offset, before
training starts.

:func:`prepare_rec` runs the scan once per version of the files and caches, keyed by the files' size and mtime:
``images.idx`` (``key\\toffset`` of the image records only, file order: what ``fn.readers.mxnet`` needs, since it
serves every key of an index and the InsightFace header / identity-range records are not images) and the labels.
The user's files are never written. Concurrent ranks share the cache through a file lock. It also counts the
classes the labels use: when ``property`` names more classes than that (a num_classes above max label + 1, or
identities without an image), a warning says so, since the head allocates centres that never see a positive.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from data.recordio import MAGIC, InsightFaceRec, RecordIOError, encode_record, image_format, unpack

SCAN_VERSION = 1
log = logging.getLogger("facetrain")
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
_HEAD = 8 + 24  # part header + IRHeader


@dataclass(frozen=True)
class Problem:
    """One damaged image record."""

    key: int
    offset: int
    message: str

    def __str__(self) -> str:
        return f"key {self.key} at offset {self.offset}: {self.message}"


@dataclass
class ImageScan:
    """The image records of a rec in file order, with their labels and the problems found."""

    rec_path: str
    keys: np.ndarray  # int64 [N], sorted by offset
    offsets: np.ndarray  # int64 [N], increasing
    labels: np.ndarray  # int64 [N]; -1 where the record is damaged
    num_classes: int | None  # from property, when there is one
    num_problems: int = 0
    problems: list[Problem] = field(default_factory=list)  # the first max_problems of them

    @property
    def ok(self) -> bool:
        return self.num_problems == 0

    def check(self) -> None:
        """Raise :class:`RecordIOError` naming the first damaged record (and how many there are)."""
        if self.num_problems:
            more = f" (and {self.num_problems - 1} more damaged records)" if self.num_problems > 1 else ""
            raise RecordIOError(f"{self.rec_path}: {self.problems[0]}{more}; "
                                f"run `python -m data.tools.inspect` on the folder for the full list")


class _Collector:
    def __init__(self, max_problems: int) -> None:
        self.max_problems = max_problems
        self.count = 0
        self.items: list[Problem] = []

    def add(self, key: int, offset: int, message: str) -> None:
        self.count += 1
        if len(self.items) < self.max_problems:
            self.items.append(Problem(int(key), int(offset), message))


def _gather(mm: np.ndarray, pos: np.ndarray, nbytes: int) -> np.ndarray:
    """Bytes mm[p : p + nbytes] for every p, as a [n, nbytes] uint8 array (positions must be in range)."""
    return np.ascontiguousarray(mm[pos[:, None] + np.arange(nbytes, dtype=np.int64)])


def _read(mm: np.ndarray, pos: np.ndarray, rows: np.ndarray, dtype: str) -> np.ndarray:
    """The little-endian 4-byte ``dtype`` ('<u4' or '<f4') at pos[i] for the rows where ``rows`` is set, else 0."""
    out = np.zeros(pos.size, dtype=np.float64 if dtype == "<f4" else np.int64)
    sel = np.flatnonzero(rows)
    if sel.size:
        out[sel] = _gather(mm, pos[sel], 4).view(dtype)[:, 0]
    return out


def scan_images(rec: InsightFaceRec, max_problems: int = 100, progress: bool = False,
                chunk: int = 1 << 20) -> ImageScan:
    """Check every image record of ``rec`` (see the module docstring); never raises for damaged records, it lists
    them (:meth:`ImageScan.check` raises)."""
    reader = rec.reader
    rec_path, size = reader.rec_path, reader.file_size
    keys = np.asarray(rec.image_keys, dtype=np.int64)
    offsets = reader.offsets_of(keys)
    order = np.argsort(offsets, kind="stable")
    keys, offsets = keys[order], offsets[order]
    n = keys.size
    num_classes = rec.property[0] if rec.property else None
    labels = np.full(n, -1, dtype=np.int64)
    ends = np.full(n, -1, dtype=np.int64)  # byte after each record, -1 where unknown
    found = _Collector(max_problems)
    mm = np.memmap(rec_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    bar = _progress(n, f"checking {Path(rec_path).name}", progress)
    try:
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            _scan_chunk(rec, mm, size, keys[lo:hi], offsets[lo:hi], labels[lo:hi], ends[lo:hi], num_classes, found)
            bar.update(hi - lo)
    finally:
        bar.close()
        del mm
    # A record must end before the next one starts: the DALI reader sizes a record by the distance to the next offset.
    for i in np.flatnonzero((ends[:-1] >= 0) & (ends[:-1] > offsets[1:])):
        found.add(keys[i], offsets[i], f"record runs to byte {int(ends[i])}, past the start of key {int(keys[i + 1])} "
                                       f"at offset {int(offsets[i + 1])} (overlapping records: wrong .idx?)")
    return ImageScan(rec_path, keys, offsets, labels, num_classes, found.count, found.items)


def _scan_chunk(rec: InsightFaceRec, mm: np.ndarray, size: int, keys: np.ndarray, offsets: np.ndarray,
                labels_out: np.ndarray, ends_out: np.ndarray, num_classes: int | None, found: _Collector) -> None:
    ok = np.ones(keys.size, dtype=bool)

    def reject(mask: np.ndarray, message) -> None:
        for i in np.flatnonzero(mask & ok):
            found.add(keys[i], offsets[i], message(i))
        ok[mask] = False

    reject(offsets + _HEAD > size,
           lambda i: f"truncated record: its {_HEAD}-byte head runs past the end of the file ({size} bytes)")
    magic = _read(mm, offsets, ok, "<u4")
    reject(magic != MAGIC, lambda i: f"wrong magic 0x{int(magic[i]):08X}, expected 0x{MAGIC:08X} (not the start of a "
                                     f"record: a wrong .idx or a damaged .rec)")
    lrec = _read(mm, offsets + 4, ok, "<u4")
    cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
    reject(cflag > 1, lambda i: f"part flag cflag={int(cflag[i])} marks a continuation part, expected the start of a "
                                f"record (a wrong .idx?)")
    split = ok & (cflag == 1)
    ok &= cflag == 0  # records split around an embedded magic word are read whole below
    end = offsets + 8 + ((length + 3) & ~3)
    reject(end > size, lambda i: f"truncated record: it needs bytes up to {int(end[i])}, the file has {size}")
    flag = _read(mm, offsets + 8, ok, "<u4")
    reject(length < 24 + 4 * flag, lambda i: f"payload of {int(length[i])} bytes is too short for its IRHeader "
                                             f"(flag={int(flag[i])} needs {24 + 4 * int(flag[i])})")
    value = _read(mm, np.where(flag > 0, offsets + 32, offsets + 12), ok, "<f4")  # class = first label
    image_at = offsets + _HEAD + 4 * flag
    image_len = length - 24 - 4 * flag
    sig = np.zeros((keys.size, 4), dtype=np.uint8)
    has4 = ok & (image_len >= 4)
    sig[has4] = _gather(mm, image_at[has4], 4)
    is_image = has4 & (((sig[:, 0] == 0xFF) & (sig[:, 1] == 0xD8) & (sig[:, 2] == 0xFF))  # JPEG
                       | ((sig[:, 0] == 0x89) & (sig[:, 1] == 0x50) & (sig[:, 2] == 0x4E) & (sig[:, 3] == 0x47)))  # PNG

    def head(i: int, nbytes: int) -> bytes:
        return bytes(mm[image_at[i]: image_at[i] + max(0, min(nbytes, int(image_len[i])))])

    for i in np.flatnonzero(has4 & ~is_image):  # rarer formats: look at up to 12 bytes
        is_image[i] = image_format(head(i, 12)) is not None
    reject(~is_image, lambda i: f"not an image record (flag={int(flag[i])}, label={value[i]:g}, payload of "
                                f"{int(image_len[i])} bytes starting {head(i, 8).hex() or 'empty'}); a header or "
                                f"identity-range record where an image was expected?")
    for i in np.flatnonzero(split):
        parsed = _read_split(rec, int(keys[i]), int(offsets[i]))
        if isinstance(parsed, str):
            found.add(keys[i], offsets[i], parsed)
            continue
        value[i], end[i] = parsed
        ok[i] = True
    _check_labels(value, ok, keys, offsets, num_classes, found)
    labels_out[ok] = value[ok].astype(np.int64)
    ends_out[ok] = end[ok]


def _read_split(rec: InsightFaceRec, key: int, offset: int) -> tuple[float, int] | str:
    """(label value, end byte) of a record split in parts, or a problem message."""
    try:
        payload = rec.reader.read_at(offset, key)
        header, data = unpack(payload)
    except RecordIOError as e:
        return str(e).split(f"offset {offset}: ", 1)[-1]
    if image_format(data[:12]) is None:
        return f"not an image record (flag={header.flag}, payload of {len(data)} bytes starting {data[:8].hex()})"
    value = header.label if header.flag == 0 else header.label[0]
    return float(value), offset + len(encode_record(payload))


def _check_labels(values: np.ndarray, ok: np.ndarray, keys: np.ndarray, offsets: np.ndarray,
                  num_classes: int | None, found: _Collector) -> None:
    finite = np.isfinite(values)
    integral = finite & (values == np.floor(np.where(finite, values, 0)))
    bad = ok & ~integral
    for i in np.flatnonzero(bad):
        found.add(keys[i], offsets[i], f"label {values[i]!r} is not an integer")
    ok &= ~bad
    bad = ok & (values < 0)
    for i in np.flatnonzero(bad):
        found.add(keys[i], offsets[i], f"label {int(values[i])} is negative")
    ok &= ~bad
    if num_classes is not None:
        bad = ok & (values >= num_classes)
        for i in np.flatnonzero(bad):
            found.add(keys[i], offsets[i], f"label {int(values[i])} is out of range, property says "
                                           f"num_classes={num_classes}")
        ok &= ~bad


def same_label_neighbours(labels: np.ndarray) -> float:
    """Fraction of neighbouring records (file order) with the same label."""
    labels = labels[labels >= 0]
    return float(np.mean(labels[1:] == labels[:-1])) if labels.size > 1 else 0.0


def looks_grouped(labels: np.ndarray) -> bool:
    """Whether the file is stored identity by identity: more than twice the same-label neighbours of a random order
    (sum over classes of (n_c / N)^2, about 1/num_classes) and more than half of the most possible,
    (N - classes) / (N - 1), reached when each identity is contiguous."""
    labels = labels[labels >= 0]
    if labels.size < 2:
        return False
    counts = np.bincount(labels)
    random_order = float(np.sum((counts / labels.size) ** 2))
    most = (labels.size - np.count_nonzero(counts)) / (labels.size - 1)
    return same_label_neighbours(labels) > max(2 * random_order, 0.5 * most)


# --------------------------------------------------------------------------------------------------------------------
# The cached, checked view of a rec the loaders start from
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedRec:
    """A checked training set: its files, its image records in file order, labels, classes and image size."""

    root: Path
    rec_path: Path
    image_index: Path  # images-only ``key\toffset`` index (file order) for fn.readers.mxnet
    keys: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    num_classes: int
    image_size: tuple[int, int]  # (height, width)
    classes_used: int = 0  # distinct labels among the images
    max_label: int = -1

    @property
    def num_images(self) -> int:
        return int(self.keys.size)

    @property
    def classes_without_images(self) -> int:
        """Classes of 0..num_classes-1 that no image carries (their head centres never see a positive)."""
        return self.num_classes - self.classes_used


def default_cache_dir() -> Path:
    """``$FACETRAIN_CACHE``, else ``$XDG_CACHE_HOME/facetrain``, else ``~/.cache/facetrain``."""
    if os.environ.get("FACETRAIN_CACHE"):
        return Path(os.environ["FACETRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "facetrain"


def _fingerprint(rec: InsightFaceRec) -> dict:
    def stat(path: str) -> list:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]

    prop = rec.root / "property"
    return {"version": SCAN_VERSION, "rec": stat(rec.reader.rec_path), "idx": stat(rec.reader.idx_path),
            "property": prop.read_text(errors="replace").strip() if prop.is_file() else None}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (flock); without lock support, no lock."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: ranks may scan concurrently, the writes stay atomic
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare_rec(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                progress: bool = False, warn: bool = True) -> PreparedRec:
    """Check ``root/{train.rec, train.idx, property}`` (cached per file version) and return the checked view.

    Raises :class:`RecordIOError` naming the file and record for a damaged set (see :func:`scan_images`), or when
    the first image's decoded size disagrees with ``property``. With ``warn``, logs (``facetrain`` logger) when
    classes have no image (:func:`unused_classes_warning`).
    """
    rec = InsightFaceRec(root)
    if len(rec) == 0:
        raise RecordIOError(f"{rec.reader.rec_path}: holds no image records")
    fingerprint = _fingerprint(rec)
    digest = hashlib.sha256(json.dumps(fingerprint["rec"][0]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache / f"{rec.root.resolve().name}-{digest}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecordIOError(f"cache folder {cache} cannot be created ({e.strerror}); point $FACETRAIN_CACHE or "
                            f"cache_dir at a writable folder") from None
    scan_file, index_file = cache / "scan.npz", cache / "images.idx"
    with _locked(cache / "lock"):
        arrays = _load_scan(scan_file, fingerprint) if index_file.is_file() else None
        if arrays is None:
            scan = scan_images(rec, progress=progress)
            scan.check()
            arrays = {"keys": scan.keys, "offsets": scan.offsets, "labels": scan.labels}
            lines = "".join(f"{k}\t{o}\n" for k, o in zip(scan.keys.tolist(), scan.offsets.tolist()))
            _atomic_write(index_file, lines.encode("ascii"))
            buf = io.BytesIO()
            np.savez(buf, fingerprint=np.array(json.dumps(fingerprint)), **arrays)
            _atomic_write(scan_file, buf.getvalue())
    labels = arrays["labels"]
    num_classes = rec.property[0] if rec.property else int(labels.max()) + 1
    image_size = _checked_image_size(rec)
    prepared = PreparedRec(root=rec.root, rec_path=Path(rec.reader.rec_path), image_index=index_file,
                           keys=arrays["keys"], offsets=arrays["offsets"], labels=labels, num_classes=num_classes,
                           image_size=image_size, classes_used=int(np.count_nonzero(np.bincount(labels))),
                           max_label=int(labels.max()))
    message = unused_classes_warning(prepared, rec.root / "property" if rec.property else None)
    if warn and message:
        log.warning(message)
    return prepared


def unused_classes_warning(prepared: PreparedRec, property_path: Path | None) -> str | None:
    """The warning for classes without images (None when every class has one): names the file that sets
    num_classes, the counts, and what it costs."""
    if prepared.classes_without_images <= 0:
        return None
    c, used, top = prepared.num_classes, prepared.classes_used, prepared.max_label
    source = f"{property_path} says num_classes={c}" if property_path else \
        f"{prepared.rec_path} (no property file) has labels up to {top}, so num_classes={c}"
    if property_path and c > top + 1:
        fix = f"if the labels are right, set num_classes to {top + 1} in {property_path.name}"
        if used < top + 1:
            fix += f" ({top + 1 - used} labels below {top} are still unused: relabel the identities 0..{used - 1})"
    else:
        fix = f"relabel the identities 0..{used - 1} (data.tools.pack numbers them without gaps)"
    return (f"{source}, but the images use {used} distinct labels, the largest {top}: {c - used} classes have no "
            f"image, so the head allocates {c - used} class centres that never see a positive (they only act as "
            f"negatives and take memory); {fix}")


def _load_scan(path: Path, fingerprint: dict) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["fingerprint"])) != fingerprint:
                return None
            return {k: z[k] for k in ("keys", "offsets", "labels")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # missing or unreadable cache: rebuild


def _checked_image_size(rec: InsightFaceRec) -> tuple[int, int]:
    """(height, width): from property, confirmed on the first image (catches a wrong property up front)."""
    from PIL import Image

    _, data = rec.read(0)
    where = f"{rec.reader.rec_path}: key {int(rec.image_keys[0])}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            actual = (im.height, im.width)
    except (OSError, ValueError) as e:
        raise RecordIOError(f"{where}: image cannot be decoded ({e})") from None
    if rec.property and tuple(rec.property[1:]) != actual:
        raise RecordIOError(f"{where}: image is {actual[0]}x{actual[1]} (HxW), but {rec.root / 'property'} says "
                            f"{rec.property[1]}x{rec.property[2]}")
    return actual


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="rec", unit_scale=True)
    return _NoBar()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
