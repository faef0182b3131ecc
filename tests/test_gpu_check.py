"""bench/gpu_check.py's dry run: every part of the GPU check at tiny sizes on the CPU, as CI runs it."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_on_the_cpu_and_writes_one_table(tmp_path):
    out = tmp_path / "gpu_check.txt"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout[-4000:], run.stderr[-4000:])
    text = out.read_text()
    assert text.startswith("facetrain GPU check on cpu (dry run") and "machine:" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    header, rows = rows[0], rows[1:]
    assert header == ["part", "case", "result", "check"]
    parts = {r[0] for r in rows}
    assert parts == {"exactness", "syncs", "r100", "head", "trainer"}
    exact = [r for r in rows if r[0] == "exactness"]
    assert len(exact) == 12 and all(r[3] == "ok" for r in exact)
    assert all("fp32" in r[2] and "bf16" in r[2] for r in exact)
    syncs = [r for r in rows if r[0] == "syncs"]
    assert len(syncs) == 24 and all(r[2].startswith("0 per step") and r[3] == "ok" for r in syncs)
    r100 = [r for r in rows if r[0] == "r100"]
    assert [r[1].split(": ")[-1] for r in r100] == ["as shipped", "+ channels_last", "+ torch.compile"]
    assert all("img/s" in r[2] for r in r100)
    head = [r for r in rows if r[0] == "head"]
    assert len(head) == 16 and sum("dense-gradient" in r[1] for r in head) == 4 and all(" ms" in r[2] for r in head)
    (trainer,) = [r for r in rows if r[0] == "trainer"]
    if importlib.util.find_spec("deepspeed") is None:
        assert trainer[2].startswith("skipped: deepspeed")
    else:
        assert trainer[3] == "ok" and "trained 2 steps" in trainer[2] and "->" in trainer[2]
