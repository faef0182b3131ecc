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


def test_head_benchmark_refuses_several_ranks_on_cuda(capsys):
    with pytest.raises(SystemExit):
        bench_heads.main(["--device", "cuda", "--world-size", "2"])
    assert "--device cuda measures one GPU" in capsys.readouterr().err


CUDA_CALLS = ("is_available", "device_count", "get_device_name", "get_device_properties", "init", "_lazy_init",
              "set_device", "current_device", "synchronize", "reset_peak_memory_stats", "max_memory_allocated",
              "memory_allocated", "mem_get_info")


def test_cuda_benchmark_never_touches_cuda_in_the_parent_and_spawns_its_ranks(monkeypatch, capsys):
    """"Cannot re-initialize CUDA in forked subprocess": the parent must not initialise CUDA before its ranks start,
    and the ranks must be spawned. Here every torch.cuda entry point of the parent is watched; without a GPU the
    spawned probe rank reports that there is none (with one, the benchmark runs)."""
    import multiprocessing

    import torch

    from bench import ranks
    called, methods = [], []
    for name in CUDA_CALLS:
        if hasattr(torch.cuda, name):
            monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: called.append(_n))
    real_get_context = multiprocessing.get_context
    monkeypatch.setattr(ranks.mp, "get_context", lambda method=None: methods.append(method) or real_get_context(method))
    try:
        rows = bench_heads.main(["--device", "cuda", "--settings", "2000:0.5", "--families", "cosface", "--steps", "1",
                                 "--dim", "32", "--batch", "16", "--world-size", "1"])
        assert rows and rows[0]["family"] == "cosface"  # a GPU was there
    except SystemExit:
        assert "no CUDA device is visible to torch" in capsys.readouterr().err
    assert called == []  # the parent made no torch.cuda call
    assert methods and set(methods) == {"spawn"}
