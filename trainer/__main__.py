"""`python -m trainer [CONFIG.yaml] [key=value ...]` — one rank of a training run (see run.sh for launching)."""
from trainer.main import main

if __name__ == "__main__":
    raise SystemExit(main())
