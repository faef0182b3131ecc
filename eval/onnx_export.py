"""ONNX export of a backbone, checked against torch and by an MFR-style self-check.

MFR (the masked-face / multi-race benchmark behind the papers' "MR-All" column) is an online benchmark: one submits
an ONNX model and its server computes the numbers. This module makes the file and checks, offline, what its
submission checker checks, plus what that checker only assumes:

- export: input "input" float32 [batch, 3, 112, 112] with a symbolic batch dimension, output "embedding"
  [batch, 512]; the graph expects images normalised (x − 127.5)/127.5 (= our training's (x/255 − 0.5)/0.5);
- against torch: onnxruntime and torch on the same random inputs (batch sizes 1 and 5), compared after
  L2-normalisation (max abs difference ≤ 1e-4) and relative to the largest output;
- MFR-style: one 4-D input, 112x112, dynamic batch; one output of ≤ 512 dims (its per-track limit); ≥ 8 graph
  nodes; file ≤ 1 GiB; no weight narrower than 32 bits; the input normalisation MFR will apply (it assumes
  (x − 127.5)/127.5 unless the first 8 node names start with Sub/_minus and Mul/_mul/Div — then it feeds raw pixels)
  agrees with the model's; a batch of 32 copies of a face-like image gives finite, mutually equal embeddings equal
  to the single-image one; latency of one image = the 6th fastest of 50 runs (MFR's statistic), reported, and
  failed only against ``--max-ms`` (MFR times on its own GPU: a CPU number here is for information).

CLI: ``python -m eval.onnx_export --weights PATH [--network NAME] [--onnx OUT.onnx]``; ``--check-only F.onnx``
runs the MFR-style checks on an existing file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from eval.tables import format_table

__all__ = [
    "OnnxCheckError",
    "CheckReport",
    "export_onnx",
    "compare_with_torch",
    "mfr_self_check",
    "face_like_image",
    "main",
]

INPUT_NAME, OUTPUT_NAME = "input", "embedding"
MFR_MAX_FEATURE_DIM = 512
MFR_MAX_SIZE_MB = 1024
MFR_MIN_NODES = 8
MFR_TIMING_RUNS, MFR_TIMING_RANK = 50, 5  # MFR reports sorted(costs)[5] of 50 runs
TOLERANCE = 1e-4


class OnnxCheckError(RuntimeError):
    """The export could not be made, or a check could not run at all."""


@dataclass
class CheckReport:
    """Named checks with a verdict and a detail each; ``ok`` when every check passed."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append((name, bool(passed), detail))
        return bool(passed)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)

    def table(self, title: str) -> str:
        return format_table(["check", "result", "detail"],
                            [[n, "pass" if p else "FAIL", d] for n, p, d in self.checks], title)


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise OnnxCheckError("onnxruntime is not installed (pip install onnxruntime==1.31.1)") from e
    return onnxruntime


def _session(path: str | os.PathLike):
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(
    model: torch.nn.Module, path: str | os.PathLike, image_size: int = 112, opset: int = 17
) -> Path:
    """Write ``model`` (eval mode, on CPU, fp32) as ONNX with a dynamic batch dimension; returns the path.

    Uses torch's TorchScript-based exporter (``dynamo=False``): it needs no extra package and IResNet is a plain
    feed-forward graph. The model is copied, so its device and mode are untouched.
    """
    import copy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).float().cpu().eval()
    if hasattr(net, "autocast_dtype"):
        net.autocast_dtype = None  # the exported graph is fp32 end to end (MFR refuses narrower weights)
    example = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            net, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    return path


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@torch.no_grad()
def compare_with_torch(
    model: torch.nn.Module, path: str | os.PathLike, batch_sizes: Sequence[int] = (1, 5), image_size: int = 112,
    seed: int = 0,
) -> dict[str, float]:
    """Max differences between onnxruntime and torch (fp32, CPU) on random normalised inputs.

    ``max_abs_normalised``: max |a/‖a‖ − b/‖b‖| over all outputs; ``max_rel``: max |a − b| / max |b|.
    """
    import copy

    net = copy.deepcopy(model).float().cpu().eval()
    if hasattr(net, "autocast_dtype"):
        net.autocast_dtype = None
    session = _session(path)
    gen = torch.Generator().manual_seed(seed)
    worst_norm, worst_rel = 0.0, 0.0
    for b in batch_sizes:
        x = torch.rand(b, 3, image_size, image_size, generator=gen) * 2 - 1
        ref = net(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise OnnxCheckError(f"{path}: batch {b}: onnxruntime output {got.shape}, torch {ref.shape}")
        worst_norm = max(worst_norm, float(np.abs(_normalised(got) - _normalised(ref)).max()))
        worst_rel = max(worst_rel, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return {"max_abs_normalised": worst_norm, "max_rel": worst_rel}


def face_like_image(size: int = 112) -> np.ndarray:
    """A deterministic uint8 [size, size, 3] RGB test image: a skin-toned oval with dark eyes and mouth."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size, 3), (90, 110, 130), dtype=np.float64)
    face = ((xx - 0.5) / 0.33) ** 2 + ((yy - 0.52) / 0.42) ** 2 < 1
    img[face] = (205, 160, 135)
    for cx, cy, rx, ry in ((0.34, 0.46, 0.07, 0.035), (0.66, 0.46, 0.07, 0.035), (0.5, 0.8, 0.13, 0.04)):
        img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1] = (60, 40, 40)
    return img.astype(np.uint8)


def _mfr_assumed_normalisation(graph) -> tuple[float, float, str]:
    """MFR's rule: (mean, std) it feeds the model, from the names of the first 8 nodes (no pixel_norm.txt)."""
    names = [node.name for node in graph.node[:MFR_MIN_NODES]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul", "Div")) for n in names)
    if has_sub and has_mul:
        return 0.0, 1.0, "first nodes look like in-graph normalisation: MFR feeds raw pixels"
    return 127.5, 127.5, "MFR feeds (x - 127.5) / 127.5"


def mfr_self_check(
    path: str | os.PathLike,
    expected_mean: float = 127.5,
    expected_std: float = 127.5,
    max_feature_dim: int = MFR_MAX_FEATURE_DIM,
    max_ms: float | None = None,
    image: np.ndarray | None = None,
) -> CheckReport:
    """The checks listed in the module docstring; never raises for a bad model, records a FAIL instead."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    report = CheckReport()
    if not report.add("file", path.is_file(), str(path)):
        return report
    size_mb = path.stat().st_size / 2**20
    report.add("model size", size_mb <= MFR_MAX_SIZE_MB, f"{size_mb:.2f} MB (MFR limit {MFR_MAX_SIZE_MB} MB)")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        session = _session(path)
    except Exception as e:  # onnx / onnxruntime raise many types for a broken file
        report.add("loads", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return report
    report.add("loads", True, "onnx.checker and onnxruntime accept it")

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if not report.add("one input", len(inputs) == 1, f"{[i.name for i in inputs]}"):
        return report
    shape = list(inputs[0].shape)
    report.add("input rank 4, 3 channels", len(shape) == 4 and shape[1] == 3, f"input shape {shape}")
    report.add("input 112x112", shape[2:] == [112, 112], f"H, W = {shape[2:]}")
    report.add("dynamic batch", len(shape) == 4 and isinstance(shape[0], str),
               f"batch dimension {shape[0]!r} (must be symbolic)")
    report.add("one output", len(outputs) == 1, f"{[o.name for o in outputs]}")
    report.add("graph size", len(proto.graph.node) >= MFR_MIN_NODES, f"{len(proto.graph.node)} nodes")
    narrow = [init.name for init in proto.graph.initializer if numpy_helper.to_array(init).dtype.itemsize < 4]
    report.add("weights >= 32 bit", not narrow, "all initializers fp32 or wider" if not narrow
               else f"{len(narrow)} narrower, e.g. {narrow[:3]}")
    mean, std, how = _mfr_assumed_normalisation(proto.graph)
    report.add("normalisation", (mean, std) == (expected_mean, expected_std),
               f"{how}; the model expects (x - {expected_mean}) / {expected_std}")
    if not report.ok:
        return report

    img = face_like_image() if image is None else image
    blob = ((img.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]
    name_in, name_out = inputs[0].name, outputs[0].name
    single = session.run([name_out], {name_in: blob})[0]
    report.add("output shape", single.ndim == 2 and single.shape[0] == 1,
               f"{list(single.shape)} for one image")
    dim = single.shape[-1]
    report.add("feature dim", dim <= max_feature_dim, f"{dim} (MFR limit {max_feature_dim})")
    batch = session.run([name_out], {name_in: np.repeat(blob, 32, axis=0)})[0]
    finite = bool(np.isfinite(batch).all() and np.isfinite(single).all())
    report.add("no NaN/inf", finite, "batch of 32 and single image finite" if finite else "non-finite outputs")
    if finite:
        spread = float(np.abs(_normalised(batch) - _normalised(single)).max())
        report.add("batch = single", spread <= TOLERANCE, f"max |normalised difference| {spread:.2e} over 32 copies")
    costs = []
    for _ in range(MFR_TIMING_RUNS):
        t = time.perf_counter()
        session.run([name_out], {name_in: blob})
        costs.append(time.perf_counter() - t)
    ms = sorted(costs)[MFR_TIMING_RANK] * 1000
    report.info["latency_ms"] = ms
    report.info["feature_dim"] = int(dim)
    report.info["size_mb"] = size_mb
    limit = "no limit given" if max_ms is None else f"limit {max_ms} ms"
    report.add("latency (1 image)", max_ms is None or ms <= max_ms,
               f"{ms:.2f} ms on this machine's CPU, 6th fastest of {MFR_TIMING_RUNS} ({limit})")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from eval.cli import add_model_arguments, model_from_arguments, run_label

    parser = argparse.ArgumentParser(
        prog="python -m eval.onnx_export",
        description="Export a backbone to ONNX (dynamic batch, 112x112 -> 512), compare it with torch through "
                    "onnxruntime and run MFR-style submission checks.",
    )
    if "--check-only" in (argv if argv is not None else sys.argv[1:]):
        parser.add_argument("--check-only", required=True, metavar="ONNX", help="check an existing .onnx file")
        parser.add_argument("--max-ms", type=float, default=None)
        args = parser.parse_args(argv)
        report = mfr_self_check(args.check_only, max_ms=args.max_ms)
        print(report.table(f"MFR-style self-check of {args.check_only}"))
        return 0 if report.ok else 1

    add_model_arguments(parser)
    parser.add_argument("--onnx", default=None, help="output file (default: OUT/<label>.onnx next to the checkpoint)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--max-ms", type=float, default=None, help="fail the latency check above this (ms)")
    args = parser.parse_args(argv)

    from eval.tables import output_dir_for, write_results

    model, model_cfg = model_from_arguments(args, torch.device("cpu"))
    out_dir = output_dir_for(args.weights, args.out)
    label = run_label(args)
    onnx_path = Path(args.onnx) if args.onnx else out_dir / f"{Path(label).name}.onnx"
    export_onnx(model, onnx_path, opset=args.opset)
    diff = compare_with_torch(model, onnx_path)
    report = mfr_self_check(onnx_path, max_ms=args.max_ms)
    report.checks.insert(0, ("onnxruntime vs torch", diff["max_abs_normalised"] <= TOLERANCE,
                             f"max |normalised diff| {diff['max_abs_normalised']:.2e}, "
                             f"max relative diff {diff['max_rel']:.2e} (batches 1 and 5)"))
    print(report.table(f"ONNX export of {label} -> {onnx_path}"))
    rows = [[n, "pass" if p else "FAIL", d] for n, p, d in report.checks]
    data = {"kind": "onnx", "weights": str(args.weights), "model": model_cfg, "onnx": str(onnx_path),
            "ok": report.ok, "comparison": diff, "checks": [dict(zip(("check", "passed", "detail"), c))
                                                            for c in report.checks], **report.info}
    json_path, csv_path = write_results(out_dir, "eval_onnx", data, ["check", "result", "detail"], rows)
    print(f"{'all checks passed' if report.ok else 'SOME CHECKS FAILED'}; written: {onnx_path}, {json_path}, "
          f"{csv_path}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
