"""Checkpoints written on a thread while training goes on (`CheckpointWriter(background=True)`).

The caller hands the writer a snapshot (`host_copy`) that training cannot change under it; checkpoints are written
in the order given (save_checkpoint in checkpoint.py: atomic, checksummed), and at most one step's are in flight,
so a crash leaves the newest checkpoints missing, never older ones.
"""

from __future__ import annotations

import concurrent.futures
import copy
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sae_stream.checkpoint import CheckpointError, save_checkpoint


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
