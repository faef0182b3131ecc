"""`python -m trainer [CONFIG.yaml] [key=value ...]` — one rank of a training run (see run.sh for launching).
`python -m trainer --help` answers without importing torch; `python -m trainer list` prints the catalog."""
import sys

from trainer.main import main

if __name__ == "__main__":
    code = main()
    if "torch" not in sys.modules:  # --help, a config error: nothing distributed ever started
        sys.exit(code)
    from runtime.process import exit_process

    exit_process(code)
