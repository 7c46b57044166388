"""Atomic writes (temp file + fsync + rename) and checksummed checkpoints.

Every checkpoint, export and result the project writes goes through `atomic_write_bytes`, so a crash
mid-write leaves either the old file or the new one, never half of one. A checkpoint is a directory
`step_XXXXXXXX/` holding `state.pt` and `MANIFEST.json` (sha256 of every file); `latest_checkpoint`
returns the newest one whose manifest verifies, so a truncated checkpoint is reported and skipped.

`CheckpointWriter(background=True)` writes them on a thread while training goes on: the caller hands it a
snapshot (`host_copy`), checkpoints are written in the order given, and at most one step's are in flight.

Data parallel (torchrun): no rank sends its state to another. Rank 0 writes the checkpoint (the SAE and Adam, the
same on every rank, with its own part), rank r > 0 writes only its own part (`RANK_KEYS`: its ring, RNG, stream
position) under `checkpoints/rank_<r>/step_XXXXXXXX/`, each in its own background writer.

A step written as several directories (every rank's; a sweep's SAEs and stream) is atomic directory by directory,
so a resume takes the newest step that verifies in all (`newest_common_step`; data parallel, a collective), and such
a writer (`protect_common`) never prunes the step before the one it writes, which every directory (every rank: a
collective) had finished first: a crash mid-step leaves it (`keep_checkpoints=1` keeps up to 2 per directory).
Pruning stops at the step just written: a newer one a crash left is pruned once training passes it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sae_stream.rundir import first_line


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's own 0600 would hide results from other users


@contextlib.contextmanager
def _atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A temp file beside `path` to write; on success fsync'd and renamed over `path`, on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    with _atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class _HashingWriter:
    """What torch.save writes to: the file, and a sha256 of the bytes on the way."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256 = f, hashlib.sha256()
        self.error: OSError | None = None  # torch.save reports a failed write as "unexpected pos": kept here

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(path: str | Path, obj: Any) -> str:
    """torch.save atomically, streamed to the file; returns the sha256 of the bytes written. (Serialising into
    memory first held a second copy of every tensor: 4.3 GB more host RAM for A/1's bf16 ring, and twice the time
    on a 2-core machine: 29 s -> 16 s for that ring.)"""
    with _atomic_file(path) as f:
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:  # the file's own error (a full disk says so), not torch's summary
                raise writer.error from None
            raise
    return writer.sha256.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or fails its checksum."""


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2,
                    protect: int | None = None) -> Path:
    """Write `state` as checkpoint `ckpt_dir/step_{step:08d}` and prune all but the newest `keep` and `protect`."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    staging = ckpt_dir / f".step_{step:08d}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for stale in ckpt_dir.glob(".step_*.partial"):  # left by a process killed mid-write (one writer per dir)
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        digest = atomic_torch_save(staging / "state.pt", state)
        atomic_write_json(staging / "MANIFEST.json", {"step": step, "files": {"state.pt": digest}})
    except BaseException:  # a full disk or a signal: leave no half-written checkpoint, keep the previous ones
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(ckpt_dir)
    done = [p for p in list_checkpoints(ckpt_dir) if step_of(p) <= step]  # (not a newer one a crash left)
    for old in done[:-keep] if keep > 0 else []:
        if step_of(old) != protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


# the keys of a checkpoint state that are each data-parallel rank's own (the rest is rank 0's, the same everywhere)
RANK_KEYS = ("step", "world_size", "trainer", "rng", "extra")


def rank_dir(ckpt_dir: str | Path, rank: int) -> Path:
    """Where rank `rank` writes its checkpoints: rank 0 (or a single process) `ckpt_dir`, others `ckpt_dir/rank_<r>`."""
    return Path(ckpt_dir) if rank == 0 else Path(ckpt_dir) / f"rank_{rank}"


def own_dir(ckpt_dir: str | Path, dist: Any) -> Path:
    """This process's `rank_dir` (dist: a Distributed, or None in a single process)."""
    return rank_dir(ckpt_dir, dist.rank if dist is not None else 0)


def rank_state(state: dict[str, Any], dist: Any) -> dict[str, Any]:
    """What this rank writes of a checkpoint `state`: all of it in a single process; under data parallelism rank 0
    all of it and the others their own part (RANK_KEYS), each marked with the number of ranks."""
    if dist is None:
        return state
    state = {**state, "world_size": dist.world_size}
    return state if dist.is_main else {k: v for k, v in state.items() if k in RANK_KEYS}


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor replaced by a copy of it on the CPU (dicts, lists and tuples rebuilt, their types and
    attributes such as a state_dict's `_metadata` kept): a snapshot that a background write can hold while training
    goes on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # (OrderedDict with _metadata, defaultdict with its factory)
        for k, v in out.items():
            out[k] = host_copy(v)
        return out
    if isinstance(obj, list):
        return [host_copy(v) for v in obj]
    if isinstance(obj, tuple):
        items = [host_copy(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


class CheckpointWriter:
    """Writes checkpoints (save_checkpoint) now, or with `background=True` on one thread while training goes on.

    In the background: checkpoints are written in the order they are given, so a crash leaves the newest ones
    missing, never older ones, and at most one step's are in flight: call `make_room(step)` before building a
    step's snapshot (it waits for an earlier step's writes), so only one step's snapshots are ever in memory and a
    sweep's members and stream always have a step in common on disk. The state handed over must not change
    afterwards: pass copies (`host_copy`). A failed write is raised by the next `save`, `check` or `wait` (an OSError
    as itself: it names the file; others as CheckpointError), i.e. at the next log step after it failed, the next
    checkpoint or the end; the interpreter finishes a write in flight before it exits."""

    def __init__(self, background: bool = False, dist: Any = None, protect_common: bool | None = None) -> None:
        self.background, self.dist = background, dist
        # a step written as several directories (ranks, a sweep's SAEs and stream): keep the previous step on pruning
        self.protect_common = dist is not None if protect_common is None else protect_common
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sae-stream-checkpoint") if background else None
        self._inflight: list[tuple[int, Path, Future]] = []
        self._errors: list[tuple[Path, BaseException]] = []  # failed writes not yet raised
        self.written: int | None = None  # the newest step whose writes all succeeded (or that was resumed from)
        self._room_for: int | None = None  # the step make_room last made room for
        self._failed: set[int] = set()  # steps with a failed write
        self.protect: int | None = None  # the newest step every directory (rank) had finished: never pruned

    @property
    def pending(self) -> int:
        """Checkpoints handed over and not yet waited for (or failed and not yet reported)."""
        return len(self._inflight) + len(self._errors)

    def make_room(self, step: int) -> None:
        """Before building the snapshot of checkpoint `step`: wait for the writes of other steps (raising theirs).
        With protect_common, at each new step: the step to keep; data parallel, a collective that every rank reaches
        only once its own writes of the previous step are on disk, so none prunes it before all have it."""
        self.check()
        if any(s != step for s, _, _ in self._inflight):
            self.wait()
        if step != self._room_for:  # a new step: every write of the previous one has ended
            if self._room_for is not None and self._room_for not in self._failed:
                self.written = self._room_for
            if self.protect_common:
                mine = -1 if self.written is None else self.written
                agreed = self.dist.min_int(mine) if self.dist is not None else mine
                self.protect = None if agreed < 0 else agreed
        self._room_for = step

    def save(self, ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
        """Write (or start writing) checkpoint `ckpt_dir/step_{step:08d}`; returns its path."""
        self.make_room(step)
        if self._pool is None:
            try:
                return save_checkpoint(ckpt_dir, step, state, keep=keep, protect=self.protect)
            except BaseException:
                self._failed.add(step)
                raise
        path = Path(ckpt_dir) / f"step_{step:08d}"
        future = self._pool.submit(save_checkpoint, ckpt_dir, step, state, keep, self.protect)
        self._inflight.append((step, path, future))
        return path

    def check(self) -> None:
        """Raise the error of a background write that has failed (without waiting for the others)."""
        if self._errors or any(f.done() and f.exception() is not None for _, _, f in self._inflight):
            self.wait()

    def wait(self) -> None:
        """Block until every checkpoint handed over is on disk; raise the first failure. Interrupted (a second
        Ctrl-C), the writes not yet finished stay pending for a later wait or drain."""
        while self._inflight:
            step, path, future = self._inflight[0]
            err = _exception_of(future)  # blocks until that write ends
            self._inflight.pop(0)
            if err is not None:
                self._errors.append((path, err))
                self._failed.add(step)
        errors, self._errors = self._errors, []
        if errors:
            path, err = errors[0]
            if isinstance(err, OSError):  # a full disk stays an OSError (the CLI reports it as such)
                raise err
            raise CheckpointError(f"writing checkpoint {path} failed: {err}"
                                  + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")) from err

    def drain(self) -> None:
        """wait(), for a caller already leaving on an error: a failed write is printed to stderr, not raised."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 — the error being raised already is the one to report
            print(f"sae-stream: warning: a checkpoint write failed too: {e}", file=sys.stderr)


def _exception_of(future: Any) -> BaseException | None:
    """future.exception(), waking every 0.2 s: a Ctrl-C the kernel hands to another thread than the main one only
    runs its handler (KeyboardInterrupt) once the main thread wakes, which a plain wait would put off until the
    write ends."""
    while True:
        try:
            return future.exception(timeout=0.2)
        except concurrent.futures.TimeoutError:
            continue


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The `step_XXXXXXXX` directories in `ckpt_dir`, oldest first (other names, e.g. `step_..._bak`, ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8,}", p.name)), key=step_of)


def verify_checkpoint(path: str | Path) -> None:
    path = Path(path)
    manifest = path / "MANIFEST.json"
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path} has no MANIFEST.json (incomplete write)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} has a corrupt MANIFEST.json: {e}") from None
    for name, digest in files.items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its sha256 check")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """The checkpoint's state (verified first unless `verify=False`: one just verified), memory-mapped
    (copy-on-write): only what is used is read into memory (a data-parallel rank r > 0 takes the SAE and Adam from
    rank 0's file and never loads rank 0's ring)."""
    if verify:
        verify_checkpoint(path)
    return torch.load(Path(path) / "state.pt", map_location=map_location, weights_only=False, mmap=True)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Newest checkpoint that verifies; corrupt ones are reported and skipped (a data-parallel run's: ValueError)."""
    step = newest_common_step([ckpt_dir])
    return None if step is None else Path(ckpt_dir) / f"step_{step:08d}"


def newest_common_step(ckpt_dirs: Sequence[str | Path], dist: Any = None) -> int | None:
    """The newest step with a checkpoint that verifies in every one of `ckpt_dirs` (a sweep: the stream's and each
    SAE's) and, data parallel, on every rank (each checks its own parts, `rank_dir`; a collective). Corrupt ones are
    reported and skipped; None if no step has them all. Written by another number of ranks: a ValueError."""
    world = dist.world_size if dist is not None else 1
    for d in ckpt_dirs:
        if list_checkpoints(d) and (saved := saved_world_size(d)) != world:
            raise ValueError(_world_mismatch(f"checkpoint directory {d}", saved, world))
    mine = [own_dir(d, dist) for d in ckpt_dirs]
    steps = set.intersection(*({step_of(p) for p in list_checkpoints(d)} for d in mine))
    if dist is not None:
        steps = set.intersection(*(set(s) for s in dist.all_gather_objects(sorted(steps))))
    for step in sorted(steps, reverse=True):
        try:
            for d in mine:
                verify_checkpoint(d / f"step_{step:08d}")
            ok = True
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
            ok = False
        if (dist.min_int(int(ok)) == 1) if dist is not None else ok:
            return step
    return None


def drop_newer(ckpt_dirs: Sequence[str | Path], step: int, dist: Any = None) -> None:
    """After resuming at `step`: remove this rank's checkpoints newer than it (each lacks a part somewhere or fails
    its check, or a crash left it), so that none of that abandoned history can win a later resume."""
    for d in ckpt_dirs:
        for ckpt in list_checkpoints(own_dir(d, dist)):
            if step_of(ckpt) > step:
                shutil.rmtree(ckpt, ignore_errors=True)


def saved_world_size(ckpt_dir: str | Path) -> int:
    """How many data-parallel ranks wrote the checkpoints in `ckpt_dir` (1 + the highest `rank_<r>/`)."""
    ranks = [int(p.name[5:]) for p in Path(ckpt_dir).glob("rank_*") if p.is_dir() and p.name[5:].isdigit()]
    return max(ranks, default=0) + 1


def _world_mismatch(where: str | Path, saved: int, world: int) -> str:
    return (f"{where} was written by {saved} data-parallel processes, this run has {world}: resume with {saved} "
            f"in all (one node: `torchrun --nproc_per_node={saved} -m sae_stream train --resume RUN_DIR`)"
            if saved > 1 else f"{where} was written by a single process: resume it without torchrun (or, if torchrun "
            "wrote it with an sae-stream from before per-rank checkpoint files, with that version)")


def load_own_part(ckpt: str | Path, dist: Any = None, verify: bool = True) -> dict[str, Any]:
    """Checkpoint `ckpt` (a `step_*` dir of rank 0's) as this rank saved it: rank 0's state with, on rank r > 0,
    its own part (RANK_KEYS, from its own directory) in place of rank 0's. Resuming needs as many ranks as wrote it.
    verify=False: the step was just agreed by `newest_common_step`, which verified every part. Under torchrun with
    verify=True (an explicit step directory) the ranks agree first: if any rank's part is missing or fails its
    check, every rank raises the same error naming the ranks."""
    if dist is not None and verify:
        try:
            state, err = _load_own_part(Path(ckpt), dist, verify=True), None
        except Exception as e:  # noqa: BLE001 - any failure must reach the collective, or the others wait on it
            state, err = None, first_line(e)
        by_error: dict[str, list[int]] = {}
        for r, e in enumerate(dist.all_gather_objects(err)):
            if e is not None:
                by_error.setdefault(e, []).append(r)
        if by_error:
            raise ValueError("; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: {e}"
                                       for e, rs in by_error.items()))
        return state
    return _load_own_part(Path(ckpt), dist, verify)


def _load_own_part(ckpt: Path, dist: Any, verify: bool) -> dict[str, Any]:
    state = load_checkpoint(ckpt, verify=verify)
    if "per_rank" in state:
        raise ValueError(f"checkpoint {ckpt} holds every rank's part in one file, a layout sae-stream no longer "
                         "reads: resume it with the version that wrote it (before per-rank checkpoint files)")
    saved, world = state.get("world_size", 1), dist.world_size if dist is not None else 1
    if saved != world:
        raise ValueError(_world_mismatch(f"checkpoint {ckpt}", saved, world))
    if dist is None or dist.rank == 0:
        return state
    return {**state, **load_checkpoint(rank_dir(ckpt.parent, dist.rank) / ckpt.name, verify=verify)}
