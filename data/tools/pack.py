"""Pack an image folder tree, one folder per identity, into an InsightFace training set.

    python -m data.tools.pack SRC OUT [--size 112x112] [--workers N] [--quality 95] [--resize] [--reencode]
                              [--shuffle [--seed S]] [--no-header] [--skip-bad]

``SRC/<identity>/<image>``: identities are the sub-folders of SRC in sorted name order, labelled 0, 1, ...; their
images (.jpg .jpeg .png .bmp .webp .tif .tiff, sorted by name) become records. OUT receives train.rec, train.idx,
property ("num_classes,height,width") and identities.tsv (label, folder, images).

Every image is decoded in a pool of worker processes (so a damaged file is found now, not in training). A JPEG of
the right size is stored as its original bytes; anything else (PNG, CMYK, another size with --resize) is encoded as
JPEG at --quality. Faces are expected aligned already: a wrong size is an error unless --resize.

Default layout: InsightFace's (header record, images grouped by identity, identity-range records), readable by
arcface_torch and mxnet tools. --shuffle writes the images in a seeded random order instead (header without
identity ranges, or none with --no-header): the order DALI's reader needs, without a second pass by
``data.tools.shuffle``.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data.recordio import RecordIOError, write_insightface_rec
from data.tools.cli import progress_bar, tool_parser

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class PackError(ValueError):
    """The source tree or one of its images cannot be packed."""


@dataclass(frozen=True)
class EncodeOptions:
    size: tuple[int, int]  # (height, width)
    quality: int = 95
    resize: bool = False
    reencode: bool = False


def list_identities(src: Path) -> list[tuple[str, list[Path]]]:
    """(folder name, sorted image paths) per identity folder of ``src``, folders in sorted order, empty ones left
    out."""
    if not src.is_dir():
        raise PackError(f"{src}: not a directory (expected one sub-folder of images per identity)")
    identities = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if images:
            identities.append((folder.name, images))
    if not identities:
        raise PackError(f"{src}: no identity folders with images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return identities


def encode_image(path: Path, options: EncodeOptions) -> bytes:
    """The bytes to store for the image at ``path``: its own JPEG bytes when usable as they are, else a new JPEG."""
    from PIL import Image

    height, width = options.size
    try:
        with Image.open(path) as im:
            im.load()
            fmt, mode, actual = im.format, im.mode, (im.height, im.width)
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PackError(f"{path}: cannot be decoded as an image ({e})") from None
    if fmt == "JPEG" and mode in ("RGB", "L") and actual == (height, width) and not options.reencode:
        return path.read_bytes()
    if actual != (height, width):
        if not options.resize:
            raise PackError(f"{path}: image is {actual[0]}x{actual[1]} (HxW), expected {height}x{width}; align faces "
                            f"to that size first, or pass --resize")
        rgb = rgb.resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=options.quality)
    return buf.getvalue()


def _encode_task(task: tuple[str, int, EncodeOptions]) -> tuple[int, bytes | None, str]:
    """Worker: (label, bytes, "") or (label, None, error message); never raises, so the parent names the file."""
    path, label, options = task
    try:
        return label, encode_image(Path(path), options), ""
    except PackError as e:
        return label, None, str(e)


def pack(src: str | os.PathLike, out: str | os.PathLike, size: tuple[int, int] = (112, 112), workers: int = 0,
         quality: int = 95, resize: bool = False, reencode: bool = False, shuffle: bool = False, seed: int = 0,
         with_header: bool = True, skip_bad: bool = False, progress: bool = False) -> dict:
    """Pack ``src`` into ``out`` (see the module docstring); ``workers=0`` encodes in this process.
    Returns a summary dict (images, classes, skipped files)."""
    src, out = Path(src), Path(out)
    identities = list_identities(src)
    options = EncodeOptions(size=tuple(size), quality=quality, resize=resize, reencode=reencode)
    tasks = [(str(p), label, options) for label, (_, images) in enumerate(identities) for p in images]
    if shuffle:
        tasks = [tasks[i] for i in np.random.default_rng(seed).permutation(len(tasks))]
    skipped: list[str] = []
    packed = np.zeros(len(identities), dtype=np.int64)  # images written per label

    def samples(results: Iterator[tuple[int, bytes | None, str]]) -> Iterator[tuple[int, bytes]]:
        for label, data, error in progress_bar(results, "packing", total=len(tasks), enabled=progress):
            if data is None:
                if not skip_bad:
                    raise PackError(f"{error} (pass --skip-bad to leave such files out)")
                skipped.append(error)
                continue
            packed[label] += 1
            yield label, data

    try:
        if workers > 0:
            with mp.get_context("fork").Pool(workers) as pool:
                summary = write_insightface_rec(out, samples(pool.imap(_encode_task, tasks, chunksize=16)),
                                                len(identities), options.size, with_header=with_header,
                                                identity_ranges=not shuffle)
        else:
            summary = write_insightface_rec(out, samples(map(_encode_task, tasks)), len(identities), options.size,
                                            with_header=with_header, identity_ranges=not shuffle)
    except RecordIOError as e:
        raise PackError(str(e)) from None
    lines = [f"{label}\t{name}\t{packed[label]}\n" for label, (name, _) in enumerate(identities)]
    (out / "identities.tsv").write_text("label\tfolder\timages\n" + "".join(lines), encoding="utf-8")
    return {"images": summary.num_images, "classes": summary.num_classes, "identities_with_images":
            summary.num_identities, "skipped": skipped, "out": str(out)}


def parse_size(text: str) -> tuple[int, int]:
    """'112x112' or '112' -> (height, width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or min(parts) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW or S (positive integers), got {text!r}") from None
    return parts[0], parts[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser("pack", __doc__, "Example: python -m data.tools.pack /data/faces_aligned /data/myset "
                                          "--workers 16 --shuffle",
                         src="folder with one sub-folder of images per identity",
                         out="output folder for train.rec, train.idx, property, identities.tsv")
    parser.add_argument("--size", type=parse_size, default=(112, 112), help="image size HxW (default 112x112)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="encoding processes (default: all cores; 0 = in this process)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default 95)")
    parser.add_argument("--resize", action="store_true", help="scale images of another size instead of failing")
    parser.add_argument("--reencode", action="store_true", help="re-encode JPEGs too (default: keep their bytes)")
    parser.add_argument("--shuffle", action="store_true", help="write the images in a random order (for DALI)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    parser.add_argument("--no-header", action="store_true", help="no InsightFace header record: images are keys 0..N-1")
    parser.add_argument("--skip-bad", action="store_true", help="leave undecodable / wrong-size images out, listing "
                                                                 "them, instead of stopping at the first")
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    try:
        result = pack(args.src, args.out, args.size, max(0, args.workers), args.quality, args.resize, args.reencode,
                      args.shuffle, args.seed, not args.no_header, args.skip_bad, progress=True)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in result["skipped"]:
        print(f"skipped: {line}", file=sys.stderr)
    skipped = f", {len(result['skipped'])} skipped" if result["skipped"] else ""
    print(f"{result['out']}: {result['images']} images of {result['classes']} identities"
          f"{', shuffled' if args.shuffle else ''}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
