"""The bottom of the house: what every room shares about a running job and imports nothing of the project.

- runtime.process — which rank am I, on which device, under which launcher (./run.sh, deepspeed, torchrun, srun);
  barriers and agreement between ranks; a clean exit;
- runtime.layout — what a run leaves on disk: the checkpoint folders and files the trainer writes and eval reads.

heads/, data/, eval/ and trainer/ import from here; nothing here imports from them (tests/test_imports.py).
"""
