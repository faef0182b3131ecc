"""bench/bench_loader.py measures what is there: without DALI it runs the torch reader and says what it skipped."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BLOCK_DALI_AND_RUN = """
import sys
sys.modules["nvidia.dali"] = None  # `import nvidia.dali` now raises ImportError, as where DALI is not installed
from bench import bench_loader
bench_loader.main(sys.argv[1:])
"""


def test_loader_benchmark_runs_without_dali_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "loader.md"
    args = ["--images", "192", "--unique", "16", "--batch", "32", "--epochs", "1", "--workers", "1",
            "--data", str(tmp_path / "data"), "--out", str(out)]
    run = subprocess.run([sys.executable, "-c", BLOCK_DALI_AND_RUN, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DALI is not importable here (ModuleNotFoundError" in run.stdout and "skipped" in run.stdout
    text = out.read_text()
    assert "torch reader (PIL, DataLoader)" in text and "DALI pipeline" not in text
    assert "DALI not installed" in text  # the machine line
