"""Inspect and verify a training rec: what it holds and whether every record is sound.

    python -m data.tools.inspect ROOT [--decode] [--workers N] [--max-problems 20] [--json]

Reports the layout (InsightFace header or not, images, identity-range records), ``property``, the label range and
images per identity, the classes of ``property`` without an image, and the file order (the fraction of neighbouring
records with the same label: near 1 for a set stored identity by identity, which DALI cannot shuffle well;
~1/num_classes once shuffled). Checks every
image record's structure (truncation, magic word, overlaps, non-image payloads, labels vs property); with
``--decode`` also decodes every image (in worker processes) and checks its size against ``property``.

Exit status: 0 sound, 1 damaged records found, 2 the files cannot be opened at all (e.g. an index offset past the
end of the .rec).
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data.rec_index import looks_grouped, same_label_neighbours, scan_images
from data.recordio import InsightFaceRec, RecordIOError
from data.tools.cli import REC_FOLDER, tool_parser

_worker_rec: InsightFaceRec | None = None


def _init_worker(root: str) -> None:
    global _worker_rec
    _worker_rec = InsightFaceRec(root)


def _decode_chunk(positions: list[int]) -> list[tuple[int, str]]:
    """(key, problem) for the images at ``positions`` that do not decode or have the wrong size."""
    from PIL import Image

    rec = _worker_rec
    assert rec is not None
    problems = []
    for i in positions:
        key = int(rec.image_keys[i])
        try:
            _, data = rec.read(i)
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB").load()
                size = (im.height, im.width)
        except RecordIOError as e:
            problems.append((key, str(e).split(": ", 1)[-1]))
            continue
        except Exception as e:  # noqa: BLE001 - any decoder failure is a finding, not a crash
            problems.append((key, f"undecodable image ({type(e).__name__}: {e})"))
            continue
        if rec.property and size != tuple(rec.property[1:]):
            problems.append((key, f"image is {size[0]}x{size[1]} (HxW), property says "
                                  f"{rec.property[1]}x{rec.property[2]}"))
    return problems


def decode_all(root: str | os.PathLike, workers: int = 0, progress: bool = False, skip_keys: np.ndarray | None = None,
               chunk: int = 256) -> list[tuple[int, str]]:
    """Decode every image of the rec at ``root`` but ``skip_keys``; (key, problem) for each that fails, by key."""
    rec = InsightFaceRec(root)
    positions = np.arange(len(rec))
    if skip_keys is not None and skip_keys.size:
        positions = positions[~np.isin(rec.image_keys, skip_keys)]
    chunks = [positions[lo:lo + chunk].tolist() for lo in range(0, positions.size, chunk)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=positions.size, desc="decoding", unit="img", unit_scale=True)
    problems: list[tuple[int, str]] = []
    if workers > 0:
        with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(str(root),)) as pool:
            for found, part in zip(pool.imap(_decode_chunk, chunks), chunks):
                problems += found
                if bar is not None:
                    bar.update(len(part))
    else:
        _init_worker(str(root))
        for part in chunks:
            problems += _decode_chunk(part)
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    return sorted(problems)


def inspect_rec(root: str | os.PathLike, decode: bool = False, workers: int = 0, max_problems: int = 20,
                progress: bool = False) -> dict:
    """A report of the rec at ``root`` as a JSON-able dict (see the module docstring). Raises RecordIOError when
    the files cannot be opened."""
    rec = InsightFaceRec(root)
    scan = scan_images(rec, max_problems=max_problems, progress=progress)
    total = len(rec.reader)
    header = rec.header is not None
    report: dict = {
        "root": str(root),
        "rec_bytes": rec.reader.file_size,
        "index_records": total,
        "header": header,
        "images": len(rec),
        "other_records": total - len(rec) - int(header),  # identity ranges in the InsightFace layout
        "property": list(rec.property) if rec.property else None,
    }
    labels = scan.labels[scan.labels >= 0]
    if labels.size:
        per_class = np.bincount(labels)
        present = per_class[per_class > 0]
        report["labels"] = {"min": int(labels.min()), "max": int(labels.max()), "distinct": int(present.size),
                            "images_per_identity": {"min": int(present.min()), "median": float(np.median(present)),
                                                    "max": int(present.max())}}
        if rec.property:  # identities without an image: head centres that never see a positive
            report["classes_without_images"] = rec.property[0] - int(present.size)
        report["same_label_neighbours"] = same_label_neighbours(scan.labels)
        report["order"] = "grouped by identity: shuffle it for DALI (python -m data.tools.shuffle)" \
            if looks_grouped(scan.labels) else "mixed (fine for DALI)"
    problems = [{"key": p.key, "offset": p.offset, "problem": p.message} for p in scan.problems]
    report["damaged_records"] = scan.num_problems
    if decode:
        found = decode_all(root, workers, progress, skip_keys=scan.keys[scan.labels < 0])  # damaged: listed above
        report["undecodable_records"] = len(found)
        problems += [{"key": k, "problem": m} for k, m in found[:max_problems]]
    report["problems"] = problems
    report["ok"] = scan.ok and not report.get("undecodable_records")
    return report


def _print_report(r: dict) -> None:
    print(f"{r['root']}: {r['rec_bytes']:,} bytes, {r['index_records']:,} index records")
    print(f"  layout      {'InsightFace header, ' if r['header'] else 'no header, '}{r['images']:,} images, "
          f"{r['other_records']:,} identity-range records")
    prop = r["property"]
    described = "num_classes=%d, %dx%d (HxW)" % tuple(prop) if prop else "none (num_classes = max label + 1)"
    print(f"  property    {described}")
    if "labels" in r:
        lab, per = r["labels"], r["labels"]["images_per_identity"]
        print(f"  labels      {lab['min']}..{lab['max']}, {lab['distinct']:,} identities with images, "
              f"{per['min']}/{per['median']:g}/{per['max']} images per identity (min/median/max)")
        if r.get("classes_without_images"):
            print(f"  classes     {r['classes_without_images']:,} of property's {prop[0]:,} have no image: the head "
                  f"allocates centres for them that never see a positive")
        print(f"  order       {r['same_label_neighbours']:.1%} of neighbouring records share a label: {r['order']}")
    print(f"  damaged     {r['damaged_records']:,} records")
    if "undecodable_records" in r:
        print(f"  undecodable {r['undecodable_records']:,} images")
    for p in r["problems"]:
        where = f"key {p['key']}" + (f" at offset {p['offset']}" if "offset" in p else "")
        print(f"    {where}: {p['problem']}")
    print("OK" if r["ok"] else "PROBLEMS FOUND")


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser("inspect", __doc__, "Exit status: 0 sound, 1 damaged records, 2 files unreadable.")
    parser.add_argument("root", type=Path, help=REC_FOLDER)
    parser.add_argument("--decode", action="store_true", help="also decode every image and check its size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes for --decode (default: all cores; 0 = in this process)")
    parser.add_argument("--max-problems", type=int, default=20, help="problems listed (default 20)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = inspect_rec(args.root, args.decode, max(0, args.workers), args.max_problems, progress=True)
    except RecordIOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
