"""Result tables: writing one eval's results (prettytable, CSV, JSON), and the papers' tables with our runs beside
the published numbers.

    python -m eval.tables runs/cosface_casia runs/unitsface_casia --layout unitsface-table5
    python -m eval.tables ours=runs/a/checkpoints/epoch_0027 --layout ijbc --far-rule insightface
    python -m eval.tables uss=runs/u --layout unitsface-table5 --compare uss="CosFace+USS"   # + a row ours − paper

Each run argument is a folder holding eval results (the ``eval_*.json`` files the eval commands write next to a
checkpoint, and the JSON of ``python -m eval.verification --json``), or one such JSON file; ``NAME=PATH`` names the
row. A folder with a ``checkpoints/latest`` inside (a run folder) is read there. Metrics an eval did not produce —
and MR-All, which only the online MFR benchmark computes — print as "—".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prettytable import PrettyTable

from runtime.layout import checkpoint_folder

__all__ = [
    "format_table",
    "percent",
    "output_dir_for",
    "write_results",
    "Layout",
    "LAYOUTS",
    "RunResults",
    "load_run",
    "metric_value",
    "paper_table",
    "published_row",
    "main",
]

MISSING = "—"


# --------------------------------------------------------------------------------------- one eval's result files


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A prettytable string of ``rows`` under ``header``."""
    table = PrettyTable(list(header))
    if title:
        table.title = title
    for row in rows:
        table.add_row(list(row))
    return table.get_string()


def percent(value: float | None) -> str:
    """A fraction as a table cell in percent, two decimals; "-" when there is no value."""
    return "-" if value is None else f"{100 * value:.2f}"


def output_dir_for(weights: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Where an eval writes: ``out`` if given, else the checkpoint folder (a run folder's newest one; the weights
    file's folder)."""
    if out is not None:
        path = Path(out)
    else:
        w = checkpoint_folder(weights)
        path = w if w.is_dir() else w.parent
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(
    out_dir: Path, stem: str, data: dict[str, Any] | None, header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> tuple[Path | None, Path]:
    """Write ``data`` as ``stem.json`` (if given) and the table as ``stem.csv``; returns both paths."""
    json_path = None
    if data is not None:
        json_path = out_dir / f"{stem}.json"
        json_path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return json_path, csv_path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ------------------------------------------------------------------------------------------- our runs' metrics


@dataclass
class RunResults:
    """The eval results found for one run: per kind, the parsed JSON (verification: target -> accuracy)."""

    label: str
    ijb: dict[str, dict[str, Any]] = field(default_factory=dict)  # subset (IJBB/IJBC) -> eval_ijb* JSON
    megaface: dict[str, Any] | None = None
    verification: dict[str, float] = field(default_factory=dict)  # target (lfw, cfp_fp, agedb_30) -> accuracy
    sources: list[str] = field(default_factory=list)


def _classify(data: Any, run: RunResults, path: Path) -> bool:
    if not isinstance(data, dict):
        return False
    if data.get("kind") == "ijb" and "verification" in data:
        run.ijb[str(data.get("subset", "IJBC")).upper()] = data
    elif data.get("kind") == "megaface":
        run.megaface = data
    elif isinstance(data.get("results"), list) and all(
        isinstance(r, dict) and "target" in r and "accuracy_mean" in r for r in data["results"]
    ):
        for r in data["results"]:
            run.verification[str(r["target"])] = float(r["accuracy_mean"])
    else:
        return False
    run.sources.append(str(path))
    return True


def load_run(spec: str) -> RunResults:
    """Results of one run argument: ``PATH`` or ``NAME=PATH`` (a folder of eval JSON files, or one JSON file)."""
    name, sep, path_text = spec.partition("=")
    if not sep:
        name, path_text = "", spec
    path = Path(path_text)
    default_label = path.name
    path = checkpoint_folder(path)  # a run folder: its newest checkpoint
    if path.is_dir():
        files = sorted(path.glob("*.json"))
    elif path.is_file():
        files, default_label = [path], path.parent.name
    else:
        raise SystemExit(f"error: {spec}: no such folder or JSON file")
    run = RunResults(label=name or default_label)
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {file}: not a readable JSON file ({e})") from None
        _classify(data, run, file)
    if not run.sources:
        raise SystemExit(f"error: {spec}: no eval results found (expected eval_*.json files or a verification JSON)")
    return run


def metric_value(run: RunResults, metric: str, far_rule: str = "le") -> float | None:
    """A metric in percent, or None when the run has no result for it.

    Metric names: ``ijbc@1e-04`` / ``ijbb@1e-05`` (TAR@FAR), ``lfw`` / ``cfp_fp`` / ``agedb_30`` (accuracy),
    ``megaface_rank1``, ``megaface@1e-06`` (TAR@FAR), ``mr_all`` (online only: always None).
    """
    if metric.startswith(("ijbb@", "ijbc@")):
        subset, far = metric.split("@")
        data = run.ijb.get(subset.upper())
        key = "tar_at_far" if far_rule == "le" else "tar_at_far_insightface"
        value = None if data is None else data["verification"].get(key, {}).get(far)
    elif metric == "megaface_rank1":
        value = None if run.megaface is None else run.megaface.get("identification", {}).get("rank", {}).get("1")
    elif metric.startswith("megaface@"):
        far = metric.split("@")[1]
        value = None if run.megaface is None else run.megaface.get("verification", {}).get("tar_at_far", {}).get(far)
    elif metric == "mr_all":
        value = None
    else:
        value = run.verification.get(metric)
    return None if value is None else 100.0 * float(value)


# ----------------------------------------------------------------------------------------- the papers' layouts


@dataclass(frozen=True)
class Layout:
    """A paper table: column titles, the metric behind each, the published rows (percent; None = not reported)."""

    title: str
    columns: tuple[tuple[str, str], ...]  # (column title, metric name for metric_value)
    published: tuple[tuple[str, str, tuple[float | None, ...]], ...]  # (method, source, values per column)
    notes: tuple[str, ...] = ()


LAYOUTS: dict[str, Layout] = {
    "unitsface-table5": Layout(
        title="UniTSFace Table 5 — MR-All (TAR@1e-6), IJB-C TAR@FAR, verification accuracy (%)",
        columns=(("MR-All", "mr_all"), ("IJB-C 1e-4", "ijbc@1e-04"), ("IJB-C 1e-5", "ijbc@1e-05"),
                 ("LFW", "lfw"), ("CFP-FP", "cfp_fp"), ("AgeDB", "agedb_30")),
        published=(
            ("ArcFace (R50, CASIA)", "UniTSFace T5", (42.21, 48.49, 9.18, 99.31, 97.07, 94.51)),
            ("CosFace (R50, CASIA)", "UniTSFace T5", (45.12, 56.65, 11.30, 99.36, 97.30, 94.98)),
            ("UniTSFace = CosFace+USS (R50, CASIA)", "UniTSFace T5", (50.28, 89.84, 82.64, 99.41, 97.35, 95.13)),
            ("UniTSFace (R50, WebFace4M)", "UniTSFace T5", (89.65, 97.03, 95.18, 99.80, 99.04, 97.93)),
            ("UniTSFace (R200, WebFace42M)", "UniTSFace T5", (98.16, 97.99, 97.00, 99.83, 99.47, 98.71)),
        ),
        notes=("MR-All is computed only by the online MFR benchmark (submit the ONNX export: python -m "
               "eval.onnx_export); it shows — for our runs.",),
    ),
    "unitsface-ablation": Layout(
        title="UniTSFace ablation (R50, CASIA) — MR-All, IJB-C TAR@1e-4, LFW (%)",
        columns=(("MR-All", "mr_all"), ("IJB-C 1e-4", "ijbc@1e-04"), ("LFW", "lfw")),
        published=(
            ("L_soft", "UniTSFace abl.", (26.34, 76.88, 98.80)),
            ("L_bce", "UniTSFace abl.", (8.91, 39.19, 92.60)),
            ("L_uss (m=0)", "UniTSFace abl.", (38.43, 72.20, 99.40)),
            ("L_soft-m", "UniTSFace abl.", (38.11, 83.60, 99.18)),
            ("L_uss-m (m=0.1)", "UniTSFace abl.", (42.55, 83.92, 99.46)),
            ("ArcFace+USS", "UniTSFace abl.", (48.92, 89.56, 99.40)),
        ),
    ),
    "ijbc": Layout(
        title="IJB-C 1:1 verification, TAR (%) at FAR",
        columns=(("IJB-C 1e-6", "ijbc@1e-06"), ("IJB-C 1e-5", "ijbc@1e-05"), ("IJB-C 1e-4", "ijbc@1e-04")),
        published=(
            ("UniTSFace (R50, CASIA)", "UniTSFace T5", (None, 82.64, 89.84)),
            ("UniTSFace (R50, WebFace4M)", "UniTSFace T5", (None, 95.18, 97.03)),
            ("UniTSFace (R200, WebFace42M)", "UniTSFace T5", (None, 97.00, 97.99)),
            ("EPL (R50, CASIA)", "EPL README", (None, 83.38, 90.13)),
            ("EPL (R50, WebFace4M)", "EPL README", (None, 95.18, 97.01)),
            ("EPL (R100, WebFace12M)", "EPL README", (None, 96.43, 97.60)),
            ("ArcFace (R100, MS1MV3)", "arcface_torch", (None, 95.02, 96.85)),
            ("CosFace (R100, Glint360K)", "arcface_torch", (None, 96.38, 97.55)),
            ("CosFace PFC-0.2 (R100, WebFace42M)", "arcface_torch", (None, 96.31, 97.70)),
        ),
        notes=("GB-CosFace reports gains over CosFace, not absolute numbers: +1.58 / +0.57 / +0.28 at "
               "1e-6 / 1e-5 / 1e-4 (arXiv), +5.30 / +0.70 / +0.36 (ACCV).",),
    ),
    "megaface": Layout(
        title="MegaFace challenge 1 (1M distractors) — Rank-1 identification, TAR@FAR=1e-6 (%)",
        columns=(("Rank-1", "megaface_rank1"), ("TAR@1e-6", "megaface@1e-06")),
        published=(
            ("UniTSFace (CASIA)", "UniTSFace", (77.41, 93.50)),
            ("UniTSFace (Glint360K)", "UniTSFace", (85.01, 97.85)),
            ("UniTSFace (refined lists)", "UniTSFace", (99.27, 99.19)),
        ),
        notes=("'refined' = with the noise lists (python -m eval.megaface --facescrub-noises/--megaface-noises).",),
    ),
}


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _fmt_diff(ours: float | None, paper: float | None) -> str:
    return MISSING if ours is None or paper is None else f"{ours - paper:+.2f}"


def published_row(layout: Layout, spec: str) -> int:
    """Index of the published row ``spec`` names: its number (1 = the first) or a unique, case-insensitive part of
    its method name. SystemExit listing the rows when it names none or several."""
    listing = "; ".join(f"{i + 1} = {method}" for i, (method, _, _) in enumerate(layout.published))
    if spec.strip().isdigit():
        index = int(spec) - 1
        if 0 <= index < len(layout.published):
            return index
        raise SystemExit(f"error: --compare row {spec}: this layout has rows 1..{len(layout.published)} ({listing})")
    hits = [i for i, (method, _, _) in enumerate(layout.published) if spec.lower() in method.lower()]
    if len(hits) != 1:
        which = "no" if not hits else f"{len(hits)}"
        raise SystemExit(f"error: --compare row {spec!r} matches {which} published rows; give its number or a "
                         f"unique part of its name ({listing})")
    return hits[0]


def paper_table(
    layout: Layout, runs: Sequence[RunResults], far_rule: str = "le", compare: dict[str, str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the published rows first, then one row per run (our numbers), each followed — when
    ``compare`` maps its label to a published row (see :func:`published_row`) — by the difference ours − paper."""
    header = ["method", "source"] + [title for title, _ in layout.columns]
    rows = [[method, source] + [_fmt(v) for v in values] for method, source, values in layout.published]
    compare = dict(compare or {})
    unknown = sorted(set(compare) - {run.label for run in runs})
    if unknown:
        raise SystemExit(f"error: --compare {unknown[0]}=...: no run is labelled {unknown[0]!r} "
                         f"(runs: {', '.join(run.label for run in runs) or 'none'})")
    for run in runs:
        ours = [metric_value(run, metric, far_rule) for _, metric in layout.columns]
        rows.append([run.label, "ours"] + [_fmt(v) for v in ours])
        if run.label in compare:
            method, _, paper = layout.published[published_row(layout, compare[run.label])]
            rows.append([f"Δ {run.label} − {method}", "ours − paper"] + [_fmt_diff(o, v) for o, v in zip(ours, paper)])
    return header, rows


def main(argv: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    parser = argparse.ArgumentParser(
        prog="python -m eval.tables",
        description="Gather the eval results of several runs into a paper's table, published numbers beside ours.",
    )
    parser.add_argument("runs", nargs="*", help="run/checkpoint folders or eval JSON files; NAME=PATH names a row")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="unitsface-table5")
    parser.add_argument("--far-rule", choices=("le", "insightface"), default="le",
                        help="which TAR@FAR of the IJB results to show (see eval.roc)")
    parser.add_argument("--compare", action="append", default=[], metavar="RUN=ROW",
                        help="also print the difference ours − paper of run RUN (its label) against published row "
                             "ROW (its number, 1 = first, or a unique part of its method name); repeatable")
    parser.add_argument("--out", default=".", help="folder for paper_table_<layout>.csv/.json (default: .)")
    args = parser.parse_args(argv)

    layout = LAYOUTS[args.layout]
    runs = [load_run(spec) for spec in args.runs]
    compare = {}
    for item in args.compare:
        label, sep, row = item.partition("=")
        if not sep or not label or not row:
            raise SystemExit(f"error: --compare {item!r}: expected RUN=ROW, e.g. ours=2 or ours=\"CosFace (R50\"")
        compare[label] = row
    header, rows = paper_table(layout, runs, args.far_rule, compare)
    print(format_table(header, rows, layout.title))
    for note in layout.notes:
        print(f"note: {note}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"layout": args.layout, "title": layout.title, "far_rule": args.far_rule, "compare": compare,
            "header": header, "rows": rows,
            "notes": list(layout.notes), "sources": {run.label: run.sources for run in runs}}
    json_path, csv_path = write_results(out_dir, f"paper_table_{args.layout}", data, header, rows)
    print(f"table written to {csv_path} and {json_path}")
    return header, rows


if __name__ == "__main__":
    main()
