"""`python -m trainer [CONFIG.yaml] [key=value ...]` — one rank of a training run (see run.sh for launching)."""
from trainer.distributed import exit_process
from trainer.main import main

if __name__ == "__main__":
    exit_process(main())
