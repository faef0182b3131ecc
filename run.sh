#!/usr/bin/env bash
# The one entry for people and clusters.
#   ./run.sh [CONFIG.yaml] [key=value ...]   train (default: configs/demo.yaml, the synthetic CPU demo); launches one
#                                            rank per GPU (2 on a machine without GPU) through trainer/launch.py
#   ./run.sh --help | list                   usage | the losses, backbones and recipes (no rank is started)
#   ./run.sh test [pytest args ...]          lint (ruff check, its configuration in pyproject.toml), then the tests
#   ./run.sh eval COMMAND [args ...]         python -m eval: verification | ijb | megaface | onnx | tables (--help)
#   ./run.sh python [args ...]               the project's Python, for the tools (python -m data.synthetic --help ...)
# As the program of `deepspeed --no_python ./run.sh ...` or of `srun ./run.sh ...` it notices that it already is a
# rank (RANK, or an srun step's SLURM_PROCID) and runs the trainer directly. NPROC=N overrides the process count.
# The first use creates .venv inside the repository and installs requirements.txt into it.
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(pwd)
PY="$REPO/.venv/bin/python"

ensure_venv() {
  # Reinstall when requirements.txt changed since the last install; flock keeps concurrent ranks from racing.
  if [ -x "$PY" ] && cmp -s requirements.txt .venv/.installed-requirements 2>/dev/null; then return; fi
  exec 9>"$REPO/.venv.lock"
  flock 9
  if ! { [ -x "$PY" ] && cmp -s requirements.txt .venv/.installed-requirements 2>/dev/null; }; then
    echo "run.sh: installing requirements into .venv (first use, about a minute) ..." >&2
    [ -x "$PY" ] || python3 -m venv .venv
    "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
    cp requirements.txt .venv/.installed-requirements
  fi
  flock -u 9
}

is_rank() {
  [ -n "${RANK:-}" ] && return 0
  # srun sets SLURM_STEP_NUM_TASKS for the tasks of a job step; the batch script itself is not a step.
  [ -n "${SLURM_PROCID:-}" ] && [ -n "${SLURM_STEP_NUM_TASKS:-}" ] && [ "${FACETRAIN_NOT_A_RANK:-0}" != 1 ] && return 0
  return 1
}

nproc_local() {
  if [ -n "${NPROC:-}" ]; then echo "$NPROC"; return; fi
  local n
  n=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if [ "$n" -gt 0 ]; then echo "$n"; else echo 2; fi
}

ensure_venv
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-}" in
  test)
    shift
    # Lint first (rules in pyproject.toml): a violation fails the command before any test runs.
    "$PY" -m ruff check --quiet . || { echo "run.sh test: ruff check failed (lint is part of the tests)" >&2; exit 1; }
    exec "$PY" -m pytest "$@"
    ;;
  list|help)
    exec "$PY" -m trainer "$@"
    ;;
  eval)
    shift
    exec "$PY" -m eval "$@"
    ;;
  python)
    shift
    exec "$PY" "$@"
    ;;
esac

for arg in "$@"; do
  # Usage at once, from one process: not through the launcher (which would start every rank to print it).
  case "$arg" in -h|--help) exec "$PY" -m trainer --help ;; esac
done

if is_rank; then
  exec "$PY" -m trainer "$@"
fi

N=$(nproc_local)
PORT=${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PATH="$REPO/.venv/bin:$PATH"
# trainer/launch.py: the DeepSpeed launcher's environment, plus signals forwarded and waited for (preemption saves).
exec "$PY" -m trainer.launch --nproc "$N" --master-port "$PORT" -- "$@"
