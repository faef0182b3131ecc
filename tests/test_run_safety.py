"""The pieces that keep a long run's work: checkpoint rotation and stale saves, safe loading, the run lock, the
watchdog's verdicts (with its clock driven by the test)."""
import json
import os
import random
import socket

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.runlock import RunLock, RunLockError
from trainer.watchdog import Watchdog


# --- rotation, stale saves --------------------------------------------------------------------------------------------
def make_ckpts(root, tags, latest):
    for t in tags:
        (root / t).mkdir(parents=True)
    (root / "latest").write_text(latest + "\n")


def test_prune_keeps_the_newest_of_each_kind_and_never_the_one_latest_names(tmp_path):
    make_ckpts(tmp_path, ["epoch_0001", "epoch_0002", "epoch_0003", "step_0000005", "step_0000009", "step_0000013"],
               "step_0000005")
    deleted = checkpoint.prune(tmp_path, keep=2, keep_steps=1)
    assert sorted(p.name for p in deleted) == ["epoch_0001", "step_0000009"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0002", "epoch_0003", "latest", "step_0000005",
                                                          "step_0000013"]
    assert checkpoint.prune(tmp_path, keep=0, keep_steps=None) == []  # 0 / None keep everything


def test_stale_tmp_folders_of_an_interrupted_save_are_removed(tmp_path):
    make_ckpts(tmp_path, ["epoch_0001", ".tmp-epoch_0002", ".tmp-step_0000012"], "epoch_0001")
    (tmp_path / ".tmp-epoch_0002" / "head").mkdir()
    removed = checkpoint.remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-epoch_0002", ".tmp-step_0000012"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001", "latest"]


def test_non_finite_tensors_are_named_wherever_they_sit():
    state = {"a": torch.ones(2), "b": {"c": torch.tensor([1.0, float("nan")]), "d": [torch.zeros(1),
                                                                                     torch.tensor(float("inf"))]},
             "n": torch.tensor([1, 2]), "x": 3}
    assert checkpoint.non_finite_tensors(state) == ["b.c", "b.d[1]"]


# --- safe loading -----------------------------------------------------------------------------------------------------
def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # a cached gaussian in numpy's state
    state = checkpoint._rng_state()
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = (random.random(), np.random.normal(), torch.rand(1))
    checkpoint._set_rng_state(checkpoint.safe_load(tmp_path / "s.pt")["rng"])
    assert (random.random(), np.random.normal(), torch.rand(1)) == expected


def test_head_files_of_the_previous_format_with_numpy_rng_still_load(tmp_path):
    old = {"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(old, tmp_path / "old.pt")
    loaded = checkpoint.safe_load(tmp_path / "old.pt")
    checkpoint._set_rng_state(loaded["rng"])
    assert np.array_equal(loaded["rng"]["numpy"][1], old["rng"]["numpy"][1])


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"evil\.pt: cannot be read as a checkpoint without running "
                                                         r"code.*posix\.system"):
        checkpoint.safe_load(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(checkpoint.CheckpointError, match=r"missing\.pt: file not found"):
        checkpoint.safe_load(tmp_path / "missing.pt")


def test_meta_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"meta\.json: not valid JSON"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"epoch": 1, "world_size": 2}))
    with pytest.raises(checkpoint.CheckpointError, match=r"meta\.json: key 'num_classes' missing"):
        checkpoint.read_meta(tmp_path)


# --- the run lock -----------------------------------------------------------------------------------------------------
def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    a, b = RunLock(tmp_path, stale_after=600), RunLock(tmp_path, stale_after=600)
    assert a.acquire() is None
    holder = json.loads((tmp_path / "run.lock").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    with pytest.raises(RunLockError, match=rf"another run holds this output folder \(host {holder['host']}, pid "
                                           rf"{os.getpid()}.*train\.force_unlock=true"):
        b.acquire()
    a.release()
    assert not (tmp_path / "run.lock").exists()
    assert b.acquire() is None
    b.release()


def test_a_lock_whose_holder_is_gone_is_taken_over_and_force_takes_any(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 4321, "started": "before"}))
    mine = RunLock(tmp_path, stale_after=600)
    assert "its process 4198625 on this host is gone" in mine.acquire()
    mine.release()
    lock.write_text(json.dumps({"host": "node-17", "pid": 99, "started": "before"}))  # another host, fresh heartbeat
    with pytest.raises(RunLockError, match="host node-17, pid 99"):
        RunLock(tmp_path, stale_after=600).acquire()
    old = lock.stat().st_mtime - 700
    os.utime(lock, (old, old))  # no heartbeat for 700 s
    taker = RunLock(tmp_path, stale_after=600)
    assert "no heartbeat for 7" in taker.acquire()
    taker.release()
    lock.write_text(json.dumps({"host": "node-17", "pid": 99}))
    forced = RunLock(tmp_path, stale_after=600)
    assert "train.force_unlock=true" in forced.acquire(force=True)
    forced.release()


# --- the watchdog's verdicts ------------------------------------------------------------------------------------------
def beat(dog: Watchdog, rank: int, beat: int, step: int, training: bool = True) -> None:
    dog.folder.mkdir(parents=True, exist_ok=True)
    (dog.folder / f"rank_{rank:05d}").write_text(json.dumps({"rank": rank, "beat": beat, "step": step, "host": "h",
                                                             "pid": 100 + rank, "training": training}))


def test_a_silent_rank_is_named_after_the_timeout_and_not_before(tmp_path):
    dog = Watchdog(tmp_path, rank=0, world_size=3, timeout=10, on_hang=lambda m: None)
    for r in range(3):
        beat(dog, r, 1, 5)
    assert dog.check(0.0) is None
    for t in (4.0, 9.0):
        beat(dog, 0, int(t), 5 + int(t))
        beat(dog, 2, int(t), 5 + int(t))
        assert dog.check(t) is None  # rank 1 silent for 9 s < 10
    beat(dog, 0, 20, 30)
    beat(dog, 2, 20, 30)
    message = dog.check(10.5)
    assert message.startswith("rank(s) 1 stopped answering (no heartbeat) within train.hang_timeout_s=10")
    assert "rank 1 (h pid 101) last reached step 5, last heartbeat 10s ago" in message


def test_ranks_that_beat_but_make_no_step_are_named_only_while_training(tmp_path):
    dog = Watchdog(tmp_path, rank=0, world_size=2, timeout=10, on_hang=lambda m: None)
    dog.phase(True)
    for t in range(0, 30, 2):
        beat(dog, 0, t, 7)          # rank 0 waits at step 7 in a collective
        beat(dog, 1, t, 6)          # rank 1 never finishes step 7
        verdict = dog.check(float(t))
        if t < 10:
            assert verdict is None, t
        else:
            assert verdict.startswith("rank(s) 1 made no step for"), verdict
            assert "last reached step 6" in verdict
            break
    else:
        raise AssertionError("no verdict")
    dog = Watchdog(tmp_path / "b", rank=0, world_size=2, timeout=10, on_hang=lambda m: None)
    dog.phase(True)
    for t in range(0, 40, 2):
        beat(dog, 0, t, 7, training=False)  # evaluating or saving: long, legitimately without a step
        beat(dog, 1, t, 7, training=False)
        assert dog.check(float(t)) is None


def test_the_thread_writes_heartbeats_and_calls_back_on_a_hang(tmp_path):
    verdicts = []
    dog = Watchdog(tmp_path, rank=0, world_size=2, timeout=0.6, interval=0.1, on_hang=verdicts.append).start()
    try:
        dog.progress(3)
        import time
        deadline = time.time() + 10
        while not verdicts and time.time() < deadline:
            time.sleep(0.05)
    finally:
        dog.stop()
    assert json.loads((tmp_path / ".heartbeat" / "rank_00000").read_text())["step"] == 3
    assert verdicts and verdicts[0].startswith("rank(s) 1 stopped answering")  # rank 1 never wrote a file
