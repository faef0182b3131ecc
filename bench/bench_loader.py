"""Loader throughput: the DALI pipeline against the torch reader on one synthetic rec, and on a GPU machine the
GPU pipeline against what R100 training consumes.

    python -m bench.bench_loader                                   # CPU: torch reader vs DALI CPU pipeline
    python -m bench.bench_loader --out bench/results/loader_cpu.md # also write the table (machine named)

The rec: ``--unique`` synthetic faces (data.synthetic, JPEG quality 95, ~7 KB each like MS1MV3's), repeated with
distinct labels up to ``--images`` records, shuffled, cached in ``--data``. Decoding cost depends on the bytes, not
on their being unique, and the file sits in the page cache either way.

Per loader: images/s over whole epochs (W = 1 rank, batch ``--batch``), counted from the first batch of each epoch
(pipeline build and first batch reported apart as "start"). Where CUDA exists, also: the DALI pipeline decoding on
the GPU (``device="mixed"``), the torch reader feeding the GPU, the pixel difference between nvJPEG and PIL on the
same records, and R100 (bf16 autocast, SGD) training images/s at the same batch: the ratio says whether the loader
keeps up. If DALI cannot run on the GPU, the failure is reported and the torch path is measured there. DALI is
optional: where it does not import, its rows are skipped and the output says so (the torch reader is measured).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from prettytable import PrettyTable, TableStyle

from data.loader import TrainData, build_loader
from data.rec_index import default_cache_dir
from data.recordio import write_insightface_rec


def _render(identity: int) -> list[bytes]:
    from data.synthetic import encode_jpeg, identity_params, render_identity_images

    images = render_identity_images(identity_params(0, identity), 16, np.random.default_rng([0, identity]))
    return [encode_jpeg(im, 95) for im in images]


def make_rec(root: Path, images: int, unique: int, workers: int) -> Path:
    """A shuffled, header-less rec of ``images`` records cycling through ``unique`` rendered faces (cached)."""
    folder = root / f"synthetic_{images}_{unique}"
    if (folder / "train.rec").is_file():
        return folder
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        faces = [b for chunk in pool.map(_render, range(-(-unique // 16))) for b in chunk][:unique]
    order = np.random.default_rng(0).permutation(images)
    num_classes = max(1, images // 64)
    write_insightface_rec(folder, ((int(i) % num_classes, faces[int(i) % unique]) for i in order), num_classes,
                          (112, 112), with_header=False)
    return folder


def measure(data: TrainData, epochs: int) -> dict:
    """images/s over ``epochs`` epochs, from each epoch's first batch on; mean start (build + first batch) time."""
    steady_images, steady_s, starts = 0, 0.0, []
    for epoch in range(epochs):
        data.set_epoch(epoch)
        t0 = time.perf_counter()
        first = None
        for images, labels in data:
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
            if first is None:
                first = time.perf_counter()
                starts.append(first - t0)
                continue
            steady_images += images.shape[0]
        steady_s += time.perf_counter() - first
    data.close()
    return {"images_per_s": steady_images / steady_s, "start_s": float(np.mean(starts))}


def r100_consumption(device: torch.device, batch: int, steps: int = 30) -> float:
    """R100 training images/s: bf16 autocast forward, fp32 head-free loss, backward, SGD step."""
    from backbones import get_model

    model = get_model("r100", num_features=512, autocast_dtype="bf16").to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 112, 112, device=device)
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - t0)


def pixel_difference(root: Path, cache: Path, device: torch.device, batch: int) -> tuple[float, float]:
    """Max and mean |DALI - torch reader| in grey levels on the same records (fixed order, no flip)."""
    from data.dataset import RecordDataset
    from data.recordio import InsightFaceRec

    data = build_loader("dali", root, batch, 0, 1, 0, device, cache_dir=cache, flip=False, shuffle=False)
    images = next(iter(data))[0].float().cpu()
    data.close()
    ds = RecordDataset(InsightFaceRec(root), flip=False, seed=0)
    ref = torch.stack([ds[i][0] for i in range(batch)])
    levels = (images - ref).abs() * 127.5
    return float(levels.max()), float(levels.mean())


def dali_version() -> tuple[str | None, str]:
    """(DALI's version, "") when it imports, else (None, why not)."""
    try:
        import nvidia.dali
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install: either way DALI is not measured
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
    return str(nvidia.dali.__version__), ""


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{platform.node()}: {cpu}, {len(os.sched_getaffinity(0))} cores usable"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    version, _ = dali_version()
    return text + f"; torch {torch.__version__}, " + (f"DALI {version}" if version else "DALI not installed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="records in the rec (default 4096 CPU, 32768 GPU)")
    parser.add_argument("--unique", type=int, default=512, help="distinct rendered faces (default 512)")
    parser.add_argument("--batch", type=int, default=128, help="batch size per rank (default 128)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader (default 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker processes / DALI threads to try (default: 1 and all cores)")
    parser.add_argument("--data", type=Path, default=default_cache_dir() / "bench",
                        help="where the synthetic rec is cached (default: the facetrain cache folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as markdown here")
    parser.add_argument("--note", action="append", default=[], help="a line to add under the results (repeatable)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0))
    images = args.images or (32768 if gpu else 4096)
    workers = args.workers or sorted({1, cores})
    root = make_rec(args.data, images, args.unique, cores)
    cache = args.data / "cache"
    cpu = torch.device("cpu")
    rows: list[tuple[str, str, int, dict]] = []
    version, why = dali_version()
    notes = []
    if version is None:
        notes.append(f"DALI is not importable here ({why}): its rows (CPU pipeline" + (", GPU mixed decode, nvJPEG vs "
                     "PIL pixels" if gpu else "") + ") were skipped; the torch reader was measured")
        print(notes[-1], flush=True)
    for w in workers:
        rows.append(("torch reader (PIL, DataLoader)", "cpu", w,
                     measure(build_loader("torch", root, args.batch, 0, 1, 0, cpu, w, cache_dir=cache), args.epochs)))
        if version is not None:
            rows.append(("DALI pipeline (device_id=None)", "cpu", w,
                         measure(build_loader("dali", root, args.batch, 0, 1, 0, cpu, w, cache_dir=cache),
                                 args.epochs)))
    consumption = None
    if gpu:
        dev = torch.device("cuda", 0)
        gpu_workers = max(workers)
        if version is not None:
            try:
                rows.append(("DALI pipeline (decode mixed)", "cuda", gpu_workers,
                             measure(build_loader("dali", root, args.batch, 0, 1, 0, dev, gpu_workers,
                                                  cache_dir=cache), args.epochs)))
                peak, mean = pixel_difference(root, cache, dev, args.batch)
                notes.append(f"nvJPEG vs PIL on the same {args.batch} records: max {peak:.1f}, mean {mean:.3f} grey "
                             f"levels")
            except Exception as e:  # noqa: BLE001 - report and fall back to the torch path, as the issue asks
                notes.append(f"DALI on the GPU failed ({type(e).__name__}: {str(e).splitlines()[0]}); torch path "
                             f"only")
        rows.append(("torch reader (PIL, DataLoader)", "cuda", gpu_workers,
                     measure(build_loader("torch", root, args.batch, 0, 1, 0, dev, gpu_workers, cache_dir=cache),
                             args.epochs)))
        consumption = r100_consumption(dev, args.batch)
        notes.append(f"R100 training (bf16 autocast, SGD, batch {args.batch}) consumes {consumption:.0f} images/s")
    table = PrettyTable(["loader", "device", "workers", "images/s", "start s"]
                        + (["vs R100 training"] if consumption else []))
    for name, device, w, m in rows:
        row = [name, device, w, f"{m['images_per_s']:.0f}", f"{m['start_s']:.2f}"]
        if consumption:
            row.append(f"{m['images_per_s'] / consumption:.2f}x")
        table.add_row(row)
    rate = {(name.split()[0], device, w): m["images_per_s"] for name, device, w, m in rows}
    if version is not None:
        notes.insert(0, "DALI CPU / torch reader on the CPU: " + ", ".join(
            f"{rate['DALI', 'cpu', w] / rate['torch', 'cpu', w]:.2f}x at {w} worker(s)" for w in workers))
    header = (f"- Machine: {machine()}\n- Rec: {images} records of 112x112 JPEG (q95, {args.unique} distinct "
              f"synthetic faces), batch {args.batch}, 1 rank, {args.epochs} epochs per loader\n- workers: DataLoader "
              f"processes for the torch reader, pipeline num_threads for DALI (its reader and executor threads "
              f"come on top)")
    print(header)
    print(table)
    notes += args.note
    for note in notes:
        print(note)
    if args.out:
        table.set_style(TableStyle.MARKDOWN)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Loader throughput\n\n{header}\n\n{table.get_string()}\n\n"
                            + "".join(f"- {note}\n" for note in notes)
                            + f"\nCommand: `python -m bench.bench_loader --out {args.out}`\n")


if __name__ == "__main__":
    main()
