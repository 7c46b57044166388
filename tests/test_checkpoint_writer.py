"""Checkpoint files and the checkpoint writer: a checkpoint loads memory-mapped and is saved atomically as
torch.save streams it; background writes hold the step they were taken at, stop training when they fail, keep one
step in flight in order and are waited for by a stop; a crash mid-step always leaves a step common to every
directory, and data-parallel ranks agree on the step to keep. (Interrupt and resume of whole runs:
test_reliability.py.)"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sae_stream.config import config_from_dict
from sae_stream.process import TrainingInterrupted
from sae_stream.trainer import Trainer
from tests._reliability_helpers import _batches_raising, _NullLog, _steps


class _Unsaveable:
    def __reduce__(self):
        raise RuntimeError("this object cannot be saved")


def test_load_checkpoint__maps_the_file_and_reads_what_is_used(tmp_path: Path) -> None:
    """A checkpoint loads memory-mapped (a data-parallel rank r > 0 then never reads rank 0's ring):
    the tensors are file-backed, equal to what was saved, and writing to them leaves the file as it was."""
    from sae_stream.checkpoint import load_checkpoint, save_checkpoint, sha256_file

    parts = [{"acts": torch.randn(1000, 64).bfloat16()} for _ in range(3)]
    path = save_checkpoint(tmp_path, 1, {"parts": parts, "step": 1})
    digest = sha256_file(path / "state.pt")
    state = load_checkpoint(path)
    got = state["parts"][1]["acts"]
    assert torch.equal(got, parts[1]["acts"])
    maps = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(path / "state.pt"))]
    assert any(int(a, 16) <= got.data_ptr() < int(b, 16) for a, b in maps), "not in the file's mapping"
    got.add_(1)  # copy-on-write: e.g. Adam's state, updated in place after a resume on the CPU
    assert sha256_file(path / "state.pt") == digest


def test_atomic_torch_save__streams_with_its_checksum_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    """The checkpoint file is written as torch.save streams it (no copy in memory): its sha256 is the file's, it
    loads back equal; a save that fails midway (an object that cannot be pickled, after a tensor) leaves the
    previous file whole and no temp file."""
    from sae_stream.checkpoint import atomic_torch_save, sha256_file

    path = tmp_path / "state.pt"
    state = {"ring": torch.randn(3000, 64).bfloat16(), "step": 7}
    digest = atomic_torch_save(path, state)
    assert digest == sha256_file(path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["ring"], state["ring"])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot be saved"):
        atomic_torch_save(path, {"ring": torch.randn(3000, 64), "broken": _Unsaveable()})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


# ---------------------------------------------------------------------------------------------- background writes


def _equal_trees(a: object, b: object, where: str = "state", exact: bool = True) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where} differs"
        same = torch.equal(a, b) if exact or not a.is_floating_point() else torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        assert same, f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _equal_trees(a[k], b[k], f"{where}.{k}", exact)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_trees(x, y, f"{where}[{i}]", exact)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _trainer_with(tmp_path: Path, writer: object, total_steps: int = 22) -> Trainer:
    from sae_stream.sae import build_sae

    cfg = config_from_dict({"sae": {"d_sae": 16, "architecture": "anthropic"},
                            "train": {"total_tokens": 64 * total_steps, "batch_size": 64, "log_every": 5,
                                      "checkpoint_every": 5, "keep_checkpoints": 10},
                            "resample": {"enabled": False}})
    return Trainer(build_sae(cfg.sae, 8, seed=0), cfg, tmp_path, _NullLog(), writer=writer)


def _batches(n: int = 1000, device: str = "cpu") -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randn(64, 8, generator=gen).to(device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_background_checkpoints__hold_the_step_they_were_taken_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  device: str) -> None:
    """Each background write is held back until training has gone 2 steps further (changing the weights, Adam and
    the trackers in place); the checkpoints must still equal, tensor for tensor, those a synchronous writer wrote
    of the same run, and be written off the training thread. (On CUDA, equal up to float rounding: the graphed
    step's reductions need not repeat bit for bit; 2 more Adam steps are ~1e-4 away.)"""
    import threading

    from sae_stream import checkpoint, checkpoint_writer

    reference = _trainer_with(tmp_path / "sync", checkpoint_writer.CheckpointWriter())
    reference.fit(_batches(device=device))
    trainer = _trainer_with(tmp_path / "bg", checkpoint_writer.CheckpointWriter(background=True))
    write, threads = checkpoint.save_checkpoint, set()

    def held_back(ckpt_dir: Path, step: int, state: dict, keep: int, protect: int | None) -> Path:
        deadline = time.monotonic() + 60
        while trainer.step < min(step + 2, trainer.total_steps):
            assert time.monotonic() < deadline, "training did not go on during the write"
            time.sleep(0.001)
        threads.add(threading.current_thread().name)
        return write(ckpt_dir, step, state, keep, protect)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", held_back)
    trainer.fit(_batches(device=device))
    assert _steps(tmp_path / "bg") == _steps(tmp_path / "sync") == [5, 10, 15, 20, 22]
    assert threads and all(name.startswith("sae-stream-checkpoint") for name in threads)
    for step in _steps(tmp_path / "sync"):
        name = f"checkpoints/step_{step:08d}"
        got = checkpoint.load_checkpoint(tmp_path / "bg" / name)
        want = checkpoint.load_checkpoint(tmp_path / "sync" / name)
        got["rng"] = want["rng"] = None  # torch's global RNG: this process's, drawn between the two runs
        _equal_trees(got, want, f"step {step}", exact=device == "cpu")


def test_background_checkpoints__a_failed_write_stops_training(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails on the thread is raised in the training loop by the next log step at the latest: a full
    disk as the OSError itself (naming the file), anything else as a CheckpointError naming the checkpoint; the
    earlier checkpoint stays and no staging directory is left."""
    import errno

    from sae_stream import checkpoint, checkpoint_writer

    save = checkpoint.atomic_torch_save

    def fails_at_10(path: Path, obj: dict) -> str:
        if obj["step"] == 10 and disk_full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(path, {**obj, "broken": _Unsaveable()} if obj["step"] == 10 else obj)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", fails_at_10)
    for disk_full in (True, False):
        run = tmp_path / str(disk_full)
        trainer = _trainer_with(run, checkpoint_writer.CheckpointWriter(background=True))
        if disk_full:
            with pytest.raises(OSError, match="No space left") as info:
                trainer.fit(_batches())
            assert info.value.errno == errno.ENOSPC and ".step_00000010.partial" in info.value.filename
        else:
            with pytest.raises(checkpoint.CheckpointError, match=r"step_00000010 failed: .*cannot be saved") as info:
                trainer.fit(_batches())
            assert len(str(info.value).splitlines()) == 1
        assert trainer.step in (10, 15)
        assert _steps(run) == [5] and not list((run / "checkpoints").glob(".*"))


def test_checkpoint_writer__one_step_in_flight_written_in_order(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints of one step queue behind each other; one of a new step waits until the previous step's are all
    written (so a sweep's members and stream always share a step on disk)."""
    import threading

    from sae_stream import checkpoint_writer

    release, written = threading.Event(), []

    def slow(ckpt_dir: Path, step: int, state: dict, keep: int, protect: int | None) -> Path:
        assert release.wait(60)
        written.append(Path(ckpt_dir).name)
        return Path(ckpt_dir)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", slow)
    writer = checkpoint_writer.CheckpointWriter(background=True)
    writer.save(tmp_path / "a", 1, {})
    writer.save(tmp_path / "b", 1, {})  # same step: queued, returns at once
    assert written == []
    threading.Timer(0.05, release.set).start()
    writer.save(tmp_path / "a", 2, {})  # a new step: waits for step 1's two
    assert written[:2] == ["a", "b"]
    writer.wait()
    assert written == ["a", "b", "a"]


def test_background_checkpoints__a_stop_waits_for_its_checkpoint(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM with a background writer whose writes are slow: when TrainingInterrupted reaches the caller, the
    stop's checkpoint is on disk and valid."""
    from sae_stream import checkpoint, checkpoint_writer

    write = checkpoint.save_checkpoint

    def slow(ckpt_dir: Path, step: int, state: dict, keep: int, protect: int | None) -> Path:
        time.sleep(0.3)
        return write(ckpt_dir, step, state, keep, protect)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", slow)
    trainer = _trainer_with(tmp_path, checkpoint_writer.CheckpointWriter(background=True))
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(_batches_raising(signal.SIGTERM, at=7))
    assert info.value.step == 8 and trainer.writer.pending == 0
    assert _steps(tmp_path) == [5, 8]
    checkpoint.verify_checkpoint(tmp_path / "checkpoints" / "step_00000008")


def test_background_checkpoints__next_snapshot_waits_for_the_previous_write(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A write still going when the next checkpoint is due is finished before the next snapshot is built (one
    step's snapshots in memory): the step-5 write is held until training reaches step 10."""
    from sae_stream import checkpoint, checkpoint_writer

    write, pending_at_snapshot = checkpoint.save_checkpoint, []
    writer = checkpoint_writer.CheckpointWriter(background=True)

    def held_back(ckpt_dir: Path, step: int, state: dict, keep: int, protect: int | None) -> Path:
        deadline = time.monotonic() + 60
        while trainer.step < min(step + 5, trainer.total_steps):
            assert time.monotonic() < deadline, "training did not reach the next checkpoint"
            time.sleep(0.001)
        return write(ckpt_dir, step, state, keep, protect)

    def extra_state() -> dict:
        pending_at_snapshot.append(writer.pending)
        return {}

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", held_back)
    trainer = _trainer_with(tmp_path, writer, total_steps=15)
    trainer.extra_state = extra_state
    trainer.fit(_batches())
    assert pending_at_snapshot == [0, 0, 0] and _steps(tmp_path) == [5, 10, 15]


def test_checkpoint_writer__interrupted_wait_keeps_pending_and_drain_reports(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C while waiting for the second of two writes, the first of which failed: neither the failure nor the
    write still going is forgotten; drain(), on the way out with another error, waits for the write and prints the
    failure (a full disk) instead of raising it over that error."""
    import errno
    import threading

    from sae_stream import checkpoint_writer

    fail_a, release = threading.Event(), threading.Event()

    def first_fails_second_slow(ckpt_dir: Path, step: int, state: dict, keep: int, protect: int | None) -> Path:
        if Path(ckpt_dir).name == "a":
            assert fail_a.wait(60)
            raise OSError(errno.ENOSPC, "No space left on device", str(ckpt_dir))
        assert release.wait(60)
        return Path(ckpt_dir)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", first_fails_second_slow)
    writer = checkpoint_writer.CheckpointWriter(background=True)
    writer.save(tmp_path / "a", 1, {})
    writer.save(tmp_path / "b", 1, {})
    fail_a.set()
    # a terminal's Ctrl-C is process-directed: the kernel may hand it to any thread. Here it goes to the Timer's
    # thread; the main thread, blocked in the wait, must still wake up and raise (a plain wait slept on to the end)
    # (Python's own Ctrl-C handler, as in a terminal: a shell that starts pytest in the background sets SIGINT to
    # "ignore", which Python then keeps)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.2, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT)).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            writer.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert writer.pending == 2  # a's failure, b in flight
    assert not writer._inflight[-1][2].done()  # the Ctrl-C came through while b was still being written
    release.set()
    with pytest.raises(ValueError, match="the training error"):
        try:
            raise ValueError("the training error")
        except ValueError:
            writer.drain()
            raise
    assert writer.pending == 0 and "No space left" in capsys.readouterr().err


def test_host_copy__keeps_container_types_and_copies_every_tensor() -> None:
    from collections import OrderedDict, defaultdict

    from sae_stream.checkpoint_writer import host_copy

    sd = torch.nn.Linear(3, 2).state_dict()
    tree = {"sd": sd, "dd": defaultdict(list, a=[torch.ones(2)]), "t": (torch.zeros(1), 3), "s": "x"}
    got = host_copy(tree)
    assert isinstance(got["sd"], OrderedDict) and got["sd"]._metadata == sd._metadata
    assert isinstance(got["dd"], defaultdict) and got["dd"].default_factory is list
    assert got["t"][1] == 3 and got["s"] == "x"
    for a, b in [(got["sd"]["weight"], sd["weight"]), (got["dd"]["a"][0], tree["dd"]["a"][0]),
                 (got["t"][0], tree["t"][0])]:
        assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_checkpoint_writer__a_crash_mid_step_always_leaves_a_common_step(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        background: bool) -> None:
    """A step written as two directories (a sweep's SAE and its stream; ranks alike) with keep_checkpoints=1: a crash
    after the first directory's write leaves the previous step in both. After a resume (the writer told the resumed
    step, as Trainer.resume does), a newer step a crash had left in one directory neither displaces the steps now
    written nor outlives the run passing it."""
    from sae_stream import checkpoint, checkpoint_writer
    from sae_stream.checkpoint import list_checkpoints, newest_common_step
    from sae_stream.checkpoint_writer import CheckpointWriter

    write, crash_at = checkpoint.save_checkpoint, {}

    def crashing(ckpt_dir: Path, step: int, state: dict, keep: int, protect: int | None) -> Path:
        if crash_at.get(Path(ckpt_dir).name) == step:
            raise OSError(f"killed before writing {ckpt_dir}")
        return write(ckpt_dir, step, state, keep, protect)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", crashing)
    sae, stream = tmp_path / "sae", tmp_path / "stream"

    def checkpoint_at(writer: CheckpointWriter, step: int) -> None:
        with contextlib.suppress(OSError):
            writer.make_room(step)
            for d in (sae, stream):
                writer.save(d, step, {"step": step}, keep=1)
            writer.wait()

    writer = CheckpointWriter(background=background, protect_common=True)
    for step in (1, 2):
        checkpoint_at(writer, step)
    crash_at["stream"] = 3
    checkpoint_at(writer, 3)
    assert newest_common_step([sae, stream]) == 2

    write(sae, 4, {"step": 4}, keep=5)  # a newer step left in one directory only, by another crash
    crash_at.clear()
    resumed = CheckpointWriter(background=background, protect_common=True)
    resumed.written = 2  # what Trainer.resume tells it
    checkpoint_at(resumed, 3)
    assert newest_common_step([sae, stream]) == 3  # (pruning must not take the 3 just written for the stray 4)
    checkpoint_at(resumed, 5)
    assert [p.name for p in list_checkpoints(sae)] == ["step_00000003", "step_00000005"]  # the stray 4, once passed
    crash_at["stream"] = 6
    checkpoint_at(resumed, 6)
    assert newest_common_step([sae, stream]) == 5

    # a caller that goes on after a failed write (the first directory's, at step 7): that step is not counted as
    # written, so the next step's pruning keeps 5, and a crash in step 8 still leaves it in both
    crash_at.update(sae=7, stream=8)
    for step in (7, 8):
        checkpoint_at(resumed, step)
    assert newest_common_step([sae, stream]) == 5


class _Group:
    """The data-parallel group as CheckpointWriter sees it: min_int over this rank's value and `others`' newest."""

    def __init__(self, others: int) -> None:
        self.others, self.seen = others, []

    def min_int(self, value: int) -> int:
        self.seen.append(value)
        return min(value, self.others)


def test_checkpoint_writer__agrees_on_the_step_to_keep_once_per_step(tmp_path: Path) -> None:
    """Data parallel: at each new step (not at each write of it) the writer offers its newest finished step and
    keeps the group's minimum, here a step another rank still needs (1) though this rank has written 2."""
    from sae_stream.checkpoint import list_checkpoints
    from sae_stream.checkpoint_writer import CheckpointWriter

    group = _Group(others=1)
    writer = CheckpointWriter(dist=group)
    assert writer.protect_common
    for step in (1, 2, 3):
        writer.make_room(step)  # (the trainer's call before it builds the snapshot)
        for d in ("sae", "stream"):
            writer.save(tmp_path / d, step, {"step": step}, keep=1)
    assert group.seen == [-1, 1, 2]
    assert [p.name for p in list_checkpoints(tmp_path / "sae")] == ["step_00000001", "step_00000003"]
