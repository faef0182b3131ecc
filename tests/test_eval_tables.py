"""Paper tables: runs' eval results beside the published numbers, in each paper's layout."""

from __future__ import annotations

import csv
import json

import pytest

from eval import tables


def ijb_json(tar_1e4: float, tar_1e5: float, subset: str = "IJBC") -> dict:
    return {"kind": "ijb", "subset": subset, "verification": {
        "tar_at_far": {"1e-06": 0.5, "1e-05": tar_1e5, "1e-04": tar_1e4},
        "tar_at_far_insightface": {"1e-06": 0.51, "1e-05": tar_1e5 + 0.001, "1e-04": tar_1e4 + 0.002}}}


def write_run(folder, ijb=None, verification=None, megaface=None, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    if ijb is not None:
        (folder / "eval_ijbc.json").write_text(json.dumps(ijb))
    if verification is not None:
        results = [{"target": t, "pairs": 6000, "accuracy_mean": a, "accuracy_std": 0.01}
                   for t, a in verification.items()]
        (folder / "eval_verification.json").write_text(json.dumps({"weights": "x", "results": results}))
    if megaface is not None:
        (folder / "eval_megaface.json").write_text(json.dumps(megaface))
    for name, data in (extra or {}).items():
        (folder / name).write_text(json.dumps(data))
    return folder


def test_unitsface_table5_layout(tmp_path):
    run = write_run(tmp_path / "cosface_r50", ijb=ijb_json(0.5665, 0.1130),
                    verification={"lfw": 0.9936, "cfp_fp": 0.9730, "agedb_30": 0.9498},
                    extra={"meta.json": {"epoch": 3}})  # the trainer's meta.json is not an eval result: ignored
    header, rows = tables.paper_table(tables.LAYOUTS["unitsface-table5"], [tables.load_run(str(run))])
    assert header == ["method", "source", "MR-All", "IJB-C 1e-4", "IJB-C 1e-5", "LFW", "CFP-FP", "AgeDB"]
    assert rows[1] == ["CosFace (R50, CASIA)", "UniTSFace T5", "45.12", "56.65", "11.30", "99.36", "97.30", "94.98"]
    assert rows[-1] == ["cosface_r50", "ours", "—", "56.65", "11.30", "99.36", "97.30", "94.98"]
    assert len(rows) == len(tables.LAYOUTS["unitsface-table5"].published) + 1


def test_rule_labels_missing_metrics_and_run_folders(tmp_path):
    ckpt = write_run(tmp_path / "run" / "checkpoints" / "epoch_0007", ijb=ijb_json(0.9, 0.8))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("epoch_0007\n")  # the trainer's pointer file
    only_bins = write_run(tmp_path / "other", verification={"lfw": 0.99})
    runs = [tables.load_run(f"mine={tmp_path / 'run'}"), tables.load_run(str(only_bins))]
    _, rows = tables.paper_table(tables.LAYOUTS["ijbc"], runs, far_rule="insightface")
    assert rows[-2] == ["mine", "ours", "51.00", "80.10", "90.20"]
    assert rows[-1] == ["other", "ours", "—", "—", "—"]
    _, rows = tables.paper_table(tables.LAYOUTS["ijbc"], runs[:1], far_rule="le")
    assert rows[-1] == ["mine", "ours", "50.00", "80.00", "90.00"]
    assert runs[0].sources == [str(ckpt / "eval_ijbc.json")]


def test_megaface_and_ablation_layouts(tmp_path):
    mega = {"kind": "megaface", "identification": {"rank": {"1": 0.8123}},
            "verification": {"tar_at_far": {"1e-06": 0.9}}}
    run = write_run(tmp_path / "uss", megaface=mega, ijb=ijb_json(0.8956, 0.5), verification={"lfw": 0.994})
    _, rows = tables.paper_table(tables.LAYOUTS["megaface"], [tables.load_run(str(run / "eval_megaface.json"))])
    assert rows[0] == ["UniTSFace (CASIA)", "UniTSFace", "77.41", "93.50"]
    assert rows[-1] == ["uss", "ours", "81.23", "90.00"]
    _, rows = tables.paper_table(tables.LAYOUTS["unitsface-ablation"], [tables.load_run(str(run))])
    assert rows[-1] == ["uss", "ours", "—", "89.56", "99.40"]


def test_cli_prints_and_writes(tmp_path, capsys):
    run = write_run(tmp_path / "a", ijb=ijb_json(0.97, 0.95))
    header, rows = tables.main([f"A={run}", "--layout", "ijbc", "--out", str(tmp_path / "tables")])
    printed = capsys.readouterr().out
    assert "IJB-C 1:1 verification" in printed and "GB-CosFace reports gains" in printed
    with open(tmp_path / "tables" / "paper_table_ijbc.csv", newline="") as f:
        assert list(csv.reader(f)) == [header] + rows
    saved = json.loads((tmp_path / "tables" / "paper_table_ijbc.json").read_text())
    assert saved["rows"][-1] == ["A", "ours", "50.00", "95.00", "97.00"] and saved["far_rule"] == "le"


def test_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="no such folder or JSON file"):
        tables.load_run(str(tmp_path / "absent"))
    empty = write_run(tmp_path / "empty", extra={"meta.json": {"epoch": 1}})
    with pytest.raises(SystemExit, match="no eval results found"):
        tables.load_run(str(empty))
    (empty / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json: not a readable JSON file"):
        tables.load_run(str(empty))


def test_write_results_and_output_dir(tmp_path):
    weights = tmp_path / "w" / "backbone.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    assert tables.output_dir_for(weights) == weights.parent
    assert tables.output_dir_for(weights.parent) == weights.parent
    assert tables.output_dir_for(weights, tmp_path / "elsewhere").is_dir()
    json_path, csv_path = tables.write_results(tmp_path, "x", {"a": 1}, ["h1", "h2"], [[1, "b"]])
    assert json.loads(json_path.read_text()) == {"a": 1} and csv_path.read_text().splitlines() == ["h1,h2", "1,b"]


def test_compare_prints_ours_minus_the_paper(tmp_path, capsys):
    run = write_run(tmp_path / "uss", ijb=ijb_json(0.9012, 0.8100),
                    verification={"lfw": 0.9950, "cfp_fp": 0.9700})
    header, rows = tables.main([f"uss={run}", "--layout", "unitsface-table5", "--compare", "uss=CosFace+USS",
                                "--out", str(tmp_path / "t")])
    printed = capsys.readouterr().out
    # published: UniTSFace = CosFace+USS (R50, CASIA) 50.28 | 89.84 | 82.64 | 99.41 | 97.35 | 95.13
    assert rows[-2] == ["uss", "ours", "—", "90.12", "81.00", "99.50", "97.00", "—"]
    assert rows[-1] == ["Δ uss − UniTSFace = CosFace+USS (R50, CASIA)", "ours − paper",
                        "—", "+0.28", "-1.64", "+0.09", "-0.35", "—"]
    assert "Δ uss − UniTSFace = CosFace+USS (R50, CASIA)" in printed
    saved = json.loads((tmp_path / "t" / "paper_table_unitsface-table5.json").read_text())
    assert saved["compare"] == {"uss": "CosFace+USS"} and saved["rows"][-1] == rows[-1]
    # a row number works too; a run without --compare gets no difference row
    other = write_run(tmp_path / "other", ijb=ijb_json(0.5, 0.1))
    _, rows = tables.paper_table(tables.LAYOUTS["ijbc"], [tables.load_run(str(run)), tables.load_run(str(other))],
                                 compare={"other": "7"})
    assert rows[-3][0] == "uss" and rows[-2][0] == "other"
    assert rows[-1] == ["Δ other − ArcFace (R100, MS1MV3)", "ours − paper", "—", "-85.02", "-46.85"]


def test_compare_errors_name_the_rows(tmp_path):
    run = write_run(tmp_path / "a", ijb=ijb_json(0.9, 0.8))
    layout = tables.LAYOUTS["unitsface-table5"]
    with pytest.raises(SystemExit, match=r"matches 5 published rows; .*1 = ArcFace \(R50, CASIA\); 2 = CosFace"):
        tables.paper_table(layout, [tables.load_run(str(run))], compare={"a": "R"})
    with pytest.raises(SystemExit, match=r"matches no published rows"):
        tables.paper_table(layout, [tables.load_run(str(run))], compare={"a": "SphereFace"})
    with pytest.raises(SystemExit, match=r"this layout has rows 1..5"):
        tables.paper_table(layout, [tables.load_run(str(run))], compare={"a": "9"})
    with pytest.raises(SystemExit, match=r"no run is labelled 'b'"):
        tables.paper_table(layout, [tables.load_run(str(run))], compare={"b": "1"})
    with pytest.raises(SystemExit, match=r"expected RUN=ROW"):
        tables.main([str(run), "--compare", "a", "--out", str(tmp_path)])


def test_percent_cells():
    assert [tables.percent(v) for v in (0.0, 0.12345, 1.0, None)] == ["0.00", "12.35", "100.00", "-"]
