"""bench/bench_heads.py runs end to end on a small problem (2 gloo ranks) and reports what its table claims."""
import pytest

from bench import bench_heads


@pytest.mark.multirank
def test_head_benchmark_runs_and_reports_ratios_and_the_memory_term_floor(tmp_path, capsys):
    out = tmp_path / "heads.txt"
    rows = bench_heads.main(["--settings", "4000:0.5", "--families", "unitsface", "arcface", "--steps", "1",
                             "--dim", "32", "--batch", "16", "--out", str(out)])
    by_family = {r["family"]: r for r in rows}
    assert list(by_family) == ["cosface", "unitsface", "arcface"]  # CosFace first: the reference column
    assert by_family["cosface"]["ratio"] is None
    uss, arc = by_family["unitsface"], by_family["arcface"]
    assert uss["ratio"] > 0 and uss["floor"] > 1.0  # the floor adds two matmuls to CosFace's step
    assert arc["floor"] is None  # no memory term, no floor
    assert uss["state_mb"] > by_family["cosface"]["state_mb"]  # the memory rows are one more shard-sized table
    text = out.read_text()
    assert "command: python -m bench.bench_heads --settings 4000:0.5" in text and "floor" in text.splitlines()[3]


def test_head_benchmark_refuses_cuda_without_a_gpu_or_with_several_ranks(capsys):
    import torch
    args = ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda", "--world-size", "2"]
    with pytest.raises(SystemExit):
        bench_heads.main(args)
    assert "--device cuda" in capsys.readouterr().err
