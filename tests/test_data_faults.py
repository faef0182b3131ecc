"""Faults a multi-day job meets in its data, on real rec files: job signals reaching DataLoader workers, JPEGs torn
in the middle (replaced, counted, logged, limited), the record keys of a batch, and a property naming more classes
than the labels use."""
from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from data.dataset import JOB_SIGNALS, RecordDataset
from data.loader import TorchTrainData, build_loader
from data.rec_index import prepare_rec
from data.recordio import InsightFaceRec, RecordIOError, write_insightface_rec
from data.tools.inspect import decode_all

H, W = 32, 40
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
N = 24
TORN = (5, 6, 15, 23)  # positions of JPEGs cut in half (5 and 6 in a row; 23 is the last: its replacement wraps)
WRONG_SIZE = (20,)
BAD = TORN + WRONG_SIZE


def face(i: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A textured RGB picture that differs per ``i`` and is left/right asymmetric."""
    y, x = np.mgrid[0:size[0], 0:size[1]]
    rng = np.random.default_rng(i)
    img = np.stack([(37 * i + 3 * x) % 256, (5 * y + 9 * i) % 256, (x * y + 11 * i) % 256], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_set(root: Path, torn=(), wrong_size=(), n: int = N) -> Path:
    """InsightFace layout (header: image keys are positions + 1); image i has label i, so a label names its image."""
    samples = []
    for i in range(n):
        data = jpeg(face(i, (H, W + 4) if i in wrong_size else (H, W)))
        samples.append((i, data[:len(data) // 2] if i in torn else data))  # a JPEG torn in the middle
    write_insightface_rec(root, samples, num_classes=n, image_size=(H, W))
    return root


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    return write_set(tmp_path_factory.mktemp("damaged"), TORN, WRONG_SIZE)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return write_set(tmp_path_factory.mktemp("clean"))


class Records(logging.Handler):
    """The ``facetrain`` logger's records, whatever the test session did to that logger's propagation."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture()
def warnings_logged():
    logger = logging.getLogger("facetrain")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def replacement(i: int) -> int:
    """The position that serves position ``i`` of the damaged set: the next one that is not damaged, wrapping."""
    while i in BAD:
        i = (i + 1) % N
    return i


def epoch(data, e: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    data.set_epoch(e)
    data.set_start_step(start)
    return [(x.clone(), y.clone(), data.batch_keys()) for x, y in data]


# ---------------------------------------------------------------------------------------------------- damaged images
def test_torn_jpegs_pass_the_up_front_check_and_inspect_lists_them(damaged, tmp_path):
    prep = prepare_rec(damaged, cache_dir=tmp_path / "cache")  # structurally sound: signature, magic, bounds
    assert prep.num_images == N
    found = decode_all(damaged)
    assert [key for key, _ in found] == [i + 1 for i in sorted(BAD)]
    assert all("truncated" in problem.lower() for key, problem in found if key - 1 in TORN)


def test_damaged_images_are_replaced_by_the_next_decodable_one(damaged, warnings_logged):
    ds = RecordDataset(InsightFaceRec(damaged), flip=False, seed=0)
    assert ds.bad.limit == 100  # the default
    for i in range(N):
        x, y = ds[i]
        j = replacement(i)
        assert int(y) == j, i  # the replacement's label comes with it
        want = (torch.from_numpy(np.array(Image.open(io.BytesIO(ds.rec.read(j)[1])))).permute(2, 0, 1).float()
                / 255 - 0.5) / 0.5
        assert torch.equal(x, want), i
    assert replacement(5) == replacement(6) == 7 and replacement(23) == 0 and replacement(20) == 21
    assert ds.bad.count == len(BAD) and sorted(ds.bad.positions()) == sorted(BAD)
    messages = warnings_logged.messages
    assert len(messages) == len(BAD)  # each damaged image once
    rec = str(damaged / "train.rec")
    for i in BAD:
        key, offset = i + 1, ds.rec.reader.offset(i + 1)
        line = next(m for m in messages if f": key {key} at offset {offset}: " in m)
        assert line.startswith(rec)
        j = replacement(i)
        assert f"replaced by key {j + 1} at offset {ds.rec.reader.offset(j + 1)} (label {j})" in line
        assert "data.max_bad_images=100" in line
        if i in TORN:
            assert "image cannot be decoded (OSError: " in line and "truncated" in line.lower()
        else:
            assert f"image is {H}x{W + 4} (HxW), expected {H}x{W} from {damaged / 'property'}" in line
    ds[5], ds[23]  # met again: served the same way, neither counted nor logged again
    assert ds.bad.count == len(BAD) and len(warnings_logged.messages) == len(BAD)


def test_workers_share_the_count_and_give_the_in_process_batches(damaged, tmp_path):
    """With 2 workers the batches are the in-process ones (full, deterministic); the count the workers keep in
    shared memory is what the rank sees (the rank itself decoded nothing)."""
    kw = dict(cache_dir=tmp_path / "cache", max_bad_images=len(BAD))
    ref = build_loader("torch", damaged, 4, 1, 2, 7, CPU, num_workers=0, **kw)
    data = build_loader("torch", damaged, 4, 1, 2, 7, CPU, num_workers=2, **kw)
    try:
        for e in range(2):  # the second epoch meets the same images: the count stays (each image counts once)
            got, want = epoch(data, e), epoch(ref, e)
            assert len(got) == data.steps_per_epoch == N // 8
            for (x, y, keys), (u, v, ref_keys) in zip(got, want):
                assert x.shape == (4, 3, H, W) and torch.equal(x, u) and torch.equal(y, v)
                assert not set(y.tolist()) & set(BAD)
                assert keys == ref_keys == [label + 1 for label in y.tolist()]  # the keys of what was served
        assert data.dataset.bad.count == ref.dataset.bad.count > 0
        assert sorted(data.dataset.bad.positions()) == sorted(ref.dataset.bad.positions())
    finally:
        data.close()


def test_more_damaged_images_than_allowed_stop_the_run(damaged, tmp_path):
    rec = str(damaged / "train.rec").replace(".", r"\.")
    for limit, workers in [(len(BAD) - 1, 2), (0, 0)]:
        data = build_loader("torch", damaged, 4, 0, 1, 0, CPU, num_workers=workers, cache_dir=tmp_path / "cache",
                            max_bad_images=limit)
        try:
            with pytest.raises(RecordIOError) as e:
                for _ in range(3):
                    epoch(data, 0)
        finally:
            data.close()
        message = str(e.value)
        assert data.dataset.bad.count == limit + 1  # the workers' count, read in the rank
        import re
        assert re.search(rf"{rec}: {limit + 1} damaged images met, more than data.max_bad_images={limit}; the last: "
                         rf"key \d+ at offset \d+: image (cannot be decoded|is {H}x{W + 4})", message), message
        assert f"python -m data.tools.inspect {damaged} --decode" in message
        assert "allow more with data.max_bad_images=N" in message
    with pytest.raises(ValueError, match="max_bad_images must be >= 0, got -1"):
        build_loader("torch", damaged, 4, 0, 1, 0, CPU, cache_dir=tmp_path / "cache", max_bad_images=-1)


def test_a_set_without_any_decodable_image_names_the_file(tmp_path):
    write_set(tmp_path / "set", torn=range(4), n=4)
    ds = RecordDataset(InsightFaceRec(tmp_path / "set"), flip=False, seed=0, max_bad_images=10)
    with pytest.raises(RecordIOError, match=r"set/train\.rec: no image of the 4 decodes; the last: key 4 at "
                                            r"offset \d+; run `python -m data.tools.inspect .*set --decode`"):
        ds[0]


def test_dali_stops_at_a_torn_jpeg_naming_the_record_the_tool_and_the_torch_reader(damaged, tmp_path):
    data = build_loader("dali", damaged, 4, 0, 1, 0, CPU, num_workers=1, cache_dir=tmp_path / "cache",
                        shuffle=False)
    with pytest.raises(RecordIOError) as e:
        epoch(data, 0)
    message = str(e.value)
    assert message.startswith(f"{damaged / 'train.rec'}: DALI pipeline failed at epoch 0 step 1 ")
    offset = InsightFaceRec(damaged).reader.offset(TORN[0] + 1)
    assert f"key {TORN[0] + 1} at offset {offset}: " in message  # DALI's message gave the sample's byte offset
    assert "DALI cannot skip a damaged image" in message
    assert f"python -m data.tools.inspect {damaged} --decode" in message and "data.loader=torch" in message


# ---------------------------------------------------------------------------------------------------- batch keys
def test_torch_batch_keys_are_the_records_of_the_batch_just_yielded(clean, tmp_path):
    data = build_loader("torch", clean, 3, 0, 2, 5, CPU, num_workers=1, flip=False, cache_dir=tmp_path / "cache")
    assert isinstance(data, TorchTrainData) and data.batch_keys() == []
    rec = InsightFaceRec(clean)
    try:
        batches = epoch(data, 1)
        assert len(batches) == N // 6
        for x, y, keys in batches:
            assert keys == [label + 1 for label in y.tolist()]  # label i is the image of key i + 1
            for image, key in zip(x, keys):
                want = RecordDataset(rec, flip=False, seed=0)[key - 1][0]
                assert torch.equal(image, want)
        order = [k for _, _, keys in batches for k in keys]
        assert len(set(order)) == len(order)
        assert [keys for _, _, keys in epoch(data, 1, start=2)] == [keys for _, _, keys in batches[2:]]  # resumed
        assert [keys for _, _, keys in epoch(data, 2)] != [keys for _, _, keys in batches]  # another epoch
    finally:
        data.close()


def test_dali_batch_keys_come_from_the_readers_source_info(clean, tmp_path):
    data = build_loader("dali", clean, 4, 1, 2, 3, CPU, num_workers=1, flip=False, cache_dir=tmp_path / "cache",
                        shuffle_buffer=4)
    assert data.batch_keys() == []
    rec = InsightFaceRec(clean)
    seen = []
    for x, y, keys in epoch(data, 0):
        assert keys == [label + 1 for label in y.tolist()]
        for image, key in zip(x, keys):
            want = RecordDataset(rec, flip=False, seed=0)[key - 1][0]
            assert float((image - want).abs().max()) * 127.5 <= 2.0  # JPEG decoder tolerance
        seen += keys
    assert len(seen) == 4 * (N // 8)
    data._last = (4, 2, torch.zeros(4, 8, dtype=torch.uint8))  # a source info that names no record
    assert data.batch_keys() == "epoch 4, step 2 of shard 1/2"  # rank 1 reads shard (1 + 4) mod 2


# ---------------------------------------------------------------------------------------------------- property
@pytest.mark.parametrize("num_classes, labels, expected", [
    (15, range(12), ["says num_classes=15, but the images use 12 distinct labels, the largest 11: 3 classes have no "
                     "image, so the head allocates 3 class centres that never see a positive",
                     "set num_classes to 12 in property"]),
    (6, [0, 1, 1, 3, 5, 5], ["says num_classes=6, but the images use 4 distinct labels, the largest 5: 2 classes",
                             "relabel the identities 0..3"]),
    (9, [0, 2, 4], ["num_classes=9, but the images use 3 distinct labels, the largest 4: 6 classes",
                    "set num_classes to 5 in property (2 labels below 4 are still unused: relabel the identities "
                    "0..2)"]),
    (12, range(12), []),
])
def test_property_with_more_classes_than_the_labels_use_warns(tmp_path, warnings_logged, num_classes, labels,
                                                              expected):
    labels = list(labels)
    write_insightface_rec(tmp_path / "set", [(c, jpeg(face(i))) for i, c in enumerate(labels)], num_classes,
                          (H, W), with_header=False)
    prep = prepare_rec(tmp_path / "set", cache_dir=tmp_path / "cache")
    assert (prep.num_classes, prep.classes_used, prep.max_label) == (num_classes, len(set(labels)), max(labels))
    if not expected:
        assert warnings_logged.messages == []
        return
    [message] = warnings_logged.messages
    assert message.startswith(f"{tmp_path / 'set' / 'property'} says num_classes={num_classes}")
    for part in expected:
        assert part in message
    prepare_rec(tmp_path / "set", cache_dir=tmp_path / "cache")  # from the cache: the same warning
    assert warnings_logged.messages == [message, message]
    prepare_rec(tmp_path / "set", cache_dir=tmp_path / "cache", warn=False)
    build_loader("torch", tmp_path / "set", 1, 1, 2, 0, CPU, num_workers=0, cache_dir=tmp_path / "cache")  # rank 1
    assert len(warnings_logged.messages) == 2
    build_loader("torch", tmp_path / "set", 1, 0, 2, 0, CPU, num_workers=0, cache_dir=tmp_path / "cache")  # rank 0
    assert len(warnings_logged.messages) == 3


def test_gaps_without_property_warn_naming_the_rec(tmp_path, warnings_logged):
    write_insightface_rec(tmp_path / "set", [(c, jpeg(face(c))) for c in (0, 3, 3, 1)], 4, (H, W),
                          with_header=False)
    (tmp_path / "set" / "property").unlink()
    prep = prepare_rec(tmp_path / "set", cache_dir=tmp_path / "cache")
    assert prep.num_classes == 4 and prep.classes_used == 3
    [message] = warnings_logged.messages
    assert message.startswith(f"{tmp_path / 'set' / 'train.rec'} (no property file) has labels up to 3, so "
                              f"num_classes=4, but the images use 3 distinct labels")


# ---------------------------------------------------------------------------------------------------- job signals
def threads_taking(pid: int, signals) -> int:
    """Threads of process ``pid`` that do not block all of ``signals`` (from /proc)."""
    bits = sum(1 << (int(s) - 1) for s in signals)
    count = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        count += (blocked & bits) != bits
    return count


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def send(sig: int, pids: list[int]) -> None:
    """``sig`` to ``pids`` from another process, as scancel / the DeepSpeed launcher do (the sender is not the
    workers' parent: a signal from the parent itself is the rank stopping its worker)."""
    subprocess.run([sys.executable, "-c", f"import os, sys; [os.kill(int(p), {int(sig)}) for p in sys.argv[1:]]",
                    *map(str, pids)], check=True)


def test_workers_survive_sigterm_and_sigusr1_and_the_epoch_completes(clean, tmp_path):
    """Signals sent to the workers alone: they survive, and pass them on to their rank (this process here), which
    decides (the trainer: a checkpoint and a clean stop)."""
    ref = epoch(build_loader("torch", clean, 2, 0, 1, 1, CPU, num_workers=0, cache_dir=tmp_path / "cache"), 0)
    data = build_loader("torch", clean, 2, 0, 1, 1, CPU, num_workers=2, cache_dir=tmp_path / "cache")
    received: list[str] = []
    previous = {s: signal.signal(s, lambda n, f: received.append(signal.Signals(n).name)) for s in JOB_SIGNALS}
    try:
        before = {p.pid for p in psutil.Process().children()}
        data.set_epoch(0)
        batches = iter(data)
        got = [next(batches)]
        workers = [p.pid for p in psutil.Process().children() if p.pid not in before]
        assert len(workers) == 2
        for pid in workers:  # blocked in every thread but the one waiting for them in sigwaitinfo (the kernel
            # unblocks the awaited signals while it waits), so torch's SIGTERM handler and SIGUSR1's default never run.
            # A worker that has not served a batch yet may still be starting that thread: wait for it (at most 20 s).
            deadline = time.monotonic() + 20
            while len(os.listdir(f"/proc/{pid}/task")) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(os.listdir(f"/proc/{pid}/task")) >= 2 and threads_taking(pid, JOB_SIGNALS) <= 1
        send(signal.SIGTERM, workers)
        send(signal.SIGUSR1, workers)
        time.sleep(0.5)
        got += list(batches)
        assert all(alive(pid) for pid in workers)
        assert len(got) == len(ref) == N // 2
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v, _) in zip(got, ref))
        assert len(epoch(data, 1)) == N // 2  # the persistent workers serve the next epoch too
        assert sorted(set(received)) == ["SIGTERM", "SIGUSR1"]  # passed on to the rank
    finally:
        data.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert not any(alive(pid) for pid in workers)


RANK = textwrap.dedent("""
    import os, signal, sys
    import psutil, torch
    from data.loader import build_loader
    root, cache, end = sys.argv[1:4]
    got = []
    for s in (signal.SIGTERM, signal.SIGUSR1):  # the rank takes the job signals (as the trainer does)
        signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
    data = build_loader("torch", root, 2, 0, 1, 0, torch.device("cpu"), num_workers=2, cache_dir=cache)
    data.set_epoch(0)
    batches = iter(data)
    n = len([next(batches)])
    print("workers", *[p.pid for p in psutil.Process().children()], flush=True)
    sys.stdin.readline()
    n += sum(1 for _ in batches)
    print("done", n, *sorted(set(got)), flush=True)
    if end == "kill":
        sys.stdin.readline()  # killed here
    elif end == "os_exit":
        os._exit(0)
    # else: a normal interpreter exit with the workers running (multiprocessing terminates them from the rank)
""")


@pytest.mark.parametrize("end", ["exit", "os_exit", "kill"])
def test_the_whole_job_signalled_the_rank_finishes_and_its_workers_end_with_it(clean, tmp_path, end):
    """The launcher's view: SIGTERM and SIGUSR1 to the rank and all its workers. The rank finishes its epoch; its
    workers end with it, whether it exits normally (no hang), through os._exit, or is killed."""
    prepare_rec(clean, cache_dir=tmp_path / "cache")
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    rank = subprocess.Popen([sys.executable, str(script), str(clean), str(tmp_path / "cache"), end], env=env,
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        line = rank.stdout.readline().split()
        assert line[:1] == ["workers"], (line, rank.stderr.read() if rank.poll() is not None else "")
        workers = [int(p) for p in line[1:]]
        assert len(workers) == 2
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            send(sig, [rank.pid, *workers])
        time.sleep(0.5)
        rank.stdin.write("go\n")
        rank.stdin.flush()
        assert rank.stdout.readline().split() == ["done", str(N // 2), "SIGTERM", "SIGUSR1"]
        if end == "kill":
            rank.kill()
        out, err = rank.communicate(timeout=60)
        assert rank.returncode == (-signal.SIGKILL if end == "kill" else 0), err
        assert "killed by signal" not in err
        deadline = time.monotonic() + 15  # torch's watchdog looks at the parent every 5 s
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), "a worker outlived its rank"
    finally:
        for pid in [rank.pid, *workers]:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        rank.wait()
