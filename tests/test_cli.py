"""The command line explains itself: `./run.sh --help` answers at once from one process (no rank, no launcher),
`./run.sh list` names every loss, backbone and recipe with one line each."""
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_sh(*args, timeout=120):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(k, None)
    t0 = time.perf_counter()
    p = subprocess.run([str(REPO / "run.sh"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return p, time.perf_counter() - t0


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["configs/demo.yaml", "train.epochs=2", "--help"], ["help"]])
def test_help_answers_at_once_without_starting_a_rank(args):
    p, seconds = run_sh(*args, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("usage: ./run.sh") == 1  # one process printed it, not one per rank
    assert "./run.sh list" in p.stdout and "train.resume=auto" in p.stdout and "tensorboard" in p.stdout
    assert "launcher" not in p.stdout + p.stderr and "rank 0" not in p.stdout + p.stderr
    assert seconds < 2.0, f"./run.sh {' '.join(args)} took {seconds:.1f}s"


def test_help_imports_neither_torch_nor_deepspeed():
    import sys
    p = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['trainer', '--help']\n"
                        "try:\n    runpy.run_module('trainer', run_name='__main__')\nexcept SystemExit as e:\n"
                        "    assert e.code == 0, e.code\n"
                        "print(sorted(m for m in ('torch', 'deepspeed', 'numpy') if m in sys.modules))"],
                       cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_list_names_every_loss_backbone_and_recipe():
    import backbones
    import heads
    p, _ = run_sh("list")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    names = {line.split()[0] for line in lines if line.startswith("  ")}
    recipes = {f.stem for f in (REPO / "configs").glob("*.yaml")} - {"base"}
    for name in [*heads.loss_names(), *heads.S2S_TERMS, *backbones.list_models(), *recipes]:
        assert name in names, name
    assert all(len(line) <= 120 for line in lines)
    assert "(no description)" not in p.stdout and "(no header comment)" not in p.stdout
    tiny = next(line for line in lines if line.split()[:1] == ["iresnet_tiny"])
    assert tiny.split()[1] == "1.8M"  # counted from the model (meta device), not written down


def test_every_registered_name_has_a_description():
    import backbones
    import heads
    from trainer.catalog import BACKBONES, LOSSES, S2S_TERMS
    assert sorted(LOSSES) == sorted(heads.loss_names())
    assert sorted(S2S_TERMS) == sorted(heads.S2S_TERMS)
    assert sorted(BACKBONES) == sorted(backbones.list_models())


def test_a_bad_override_still_names_the_key_and_a_stray_word_is_refused():
    from trainer.main import main
    assert main(["configs/demo.yaml", "train.epochz=3"]) == 2
    assert main(["configs/demo.yaml", "lst"]) == 2


def _sandbox(tmp_path, source: str):
    """run.sh, pyproject.toml and requirements.txt of this checkout beside one test file, with this .venv."""
    import shutil
    for name in ("run.sh", "pyproject.toml", "requirements.txt"):
        shutil.copy2(REPO / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_one.py").write_text(source)
    return tmp_path


def test_the_test_command_lints_first_and_a_violation_fails_it(tmp_path):
    box = _sandbox(tmp_path, "import os\nimport sys\n\n\ndef test_ok():\n    assert sys\n")  # os: unused (F401)
    p = subprocess.run([str(box / "run.sh"), "test", "-q", "-p", "no:cacheprovider"], cwd=box, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert "F401" in p.stdout + p.stderr and "ruff check failed" in p.stderr
    assert "passed" not in p.stdout  # pytest never started

    (box / "tests" / "test_one.py").write_text("import sys\n\n\ndef test_ok():\n    assert sys\n")
    p = subprocess.run([str(box / "run.sh"), "test", "-q", "-p", "no:cacheprovider"], cwd=box, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("1 passed")  # pytest's summary stays the last line


def test_the_code_base_is_clean_under_its_lint_rules():
    p = subprocess.run([str(REPO / ".venv" / "bin" / "ruff"), "check", "--output-format", "concise", "."], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
