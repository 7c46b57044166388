"""Atomic writes (temp file + fsync + rename) and checksummed checkpoints.

Every checkpoint, export and result the project writes goes through `atomic_write_bytes`, so a crash
mid-write leaves either the old file or the new one, never half of one. A checkpoint is a directory
`step_XXXXXXXX/` holding `state.pt` and `MANIFEST.json` (sha256 of every file); `latest_checkpoint`
returns the newest one whose manifest verifies, so a truncated checkpoint is reported and skipped.

checkpoint_writer.py writes them on a thread while training goes on.

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

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
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


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The `step_XXXXXXXX` directories in `ckpt_dir`, oldest first (other names, e.g. `step_..._bak`, ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8,}", p.name)), key=step_of)


def any_checkpoint(run_dir: str | Path, outside: str) -> bool:
    """Whether a `step_*` checkpoint directory exists anywhere in `run_dir` except under its subdirectory `outside`."""
    run_dir = Path(run_dir)
    return any(p.is_dir() for p in run_dir.rglob("step_*") if p.relative_to(run_dir).parts[0] != outside)


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
