"""Token batches read and tokenized ahead by a background process, so text never stalls a GPU loop.

    batches = PrefetchedBatches(cfg.data, batch_size=64, depth=32)   # split, rank, world_size as TokenContexts
    batches.load_state_dict(state)          # (a resume) before iterating: the reader starts there
    for tokens_BT in batches: ...           # the batches ContextBatches gives, in the same order
    state = batches.state_dict()            # the position after the batches handed out so far
    batches.close()                         # (also done at exit)

Why a process: on a GPU the SAE step takes ~0.5 ms per 8192 tokens, and reading, filtering and tokenizing text in
the training thread gave about 3M tokens/s per core (benchmarks/data_throughput.py) against a loop that takes over
10M; a thread would also hold the GIL that the loop's launches need. The child runs TokenContexts (its tokenizer
threads encode documents in parallel) and sends each batch as an int32 array through a queue of `depth` batches.
A batch's data state stays in the child (a stream's holds its shuffle buffer's texts) and crosses only when asked
for (a checkpoint): the child keeps the positions of the batches the parent may not have taken yet.

The child ignores SIGINT and SIGTERM, so a signal to the whole process group (Ctrl-C, a scheduler's stop) leaves
it answering for the checkpoint the parent writes on its way out. It stops when told (close(), also at the
parent's exit) or within a second of finding its parent gone.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sae_stream.config import DataConfig
from sae_stream.data import ContextBatches, TokenContexts, context_batches

POLL_S = 1.0  # how often a blocked side checks that the other is still there


class PrefetchedBatches:
    """ContextBatches over TokenContexts(cfg, split, rank, world_size), produced by a child process."""

    def __init__(self, cfg: DataConfig, batch_size: int, depth: int, split: str = "train", rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size <= 0 or depth <= 0:
            raise ValueError(f"batch_size ({batch_size}) and depth ({depth}) must be > 0")
        self.cfg, self.batch_size, self.depth = cfg, batch_size, depth
        self._where = (split, rank, world_size)
        self._proc: Any = None
        self._start()  # the source opens in the child: a bad one raises here, as TokenContexts would

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # (fork after CUDA is initialised is unsafe)
        self._data, self._commands, self._replies = ctx.Queue(self.depth), ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_child, name="sae-stream-data", daemon=True,
                                 args=(self.cfg, self.batch_size, self.depth, *self._where, self._data,
                                       self._commands, self._replies))
        self._proc.start()
        self._stopper = weakref.finalize(self, _stop, self._proc, self._commands)
        _live.difference_update([f for f in _live if not f.alive])  # (readers collected since: their queues go)
        _live.add(self._stopper)
        self._consumed, self._going = 0, False
        self._ask(None, "starting")

    def _receive(self, q: Any, doing: str) -> tuple:
        while True:
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError(f"the data process (pid {self._proc.pid}) ended with exit code "
                                       f"{self._proc.exitcode} while {doing}: its message, if any, is above") from None

    def _ask(self, command: tuple | None, doing: str) -> Any:
        if command is not None:
            self._commands.put(command)
        kind, payload = self._receive(self._replies, doing)
        if kind == "error":
            raise payload
        return payload

    def state_dict(self) -> dict[str, Any]:
        """The data state after the batches handed out so far (TokenContexts.state_dict's)."""
        return self._ask(("state", self._consumed), "saving the data state")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state` (a TokenContexts state_dict): checked by the child; a reader already running is
        replaced by a new one."""
        if self._going:
            self.close()
            self._start()
        self._ask(("load", state), "loading the data state")
        self._consumed = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._batches()

    def _batches(self) -> Iterator[torch.Tensor]:
        if not self._going:
            self._commands.put(("go", None))
            self._going = True
        proc = self._proc
        while self._proc is proc:  # (a load_state_dict since then: a new reader, a new iterator)
            kind, k, payload = self._receive(self._data, "reading text")
            if kind == "batch":
                self._consumed = k
                yield torch.from_numpy(payload.astype(np.int64))  # (numpy: torch's parallel cast would wake
                # its thread pool, whose spinning took 30-40% of the child's cores on a 2-core machine)
            elif kind == "warn":
                warnings.warn(payload[1], payload[0], stacklevel=2)
            elif kind == "error":
                raise payload
            else:  # "end": the stream stopped (data.loop=false)
                return

    def close(self) -> None:
        """Stop the child (waits at most a few seconds)."""
        if self._proc is not None:
            self._stopper()
            _live.discard(self._stopper)


def training_batches(cfg: DataConfig, batch_size: int, device: torch.device, rank: int = 0,
                     world_size: int = 1) -> ContextBatches | PrefetchedBatches:
    """The training split's [B, T] batches for a loop on `device`: read ahead by a child process per
    `data.prefetch` (None: 32 batches on CUDA, inline elsewhere), else inline. The same batches either way."""
    depth = cfg.prefetch if cfg.prefetch is not None else (32 if device.type == "cuda" else 0)
    if depth == 0:
        return ContextBatches(TokenContexts(cfg, "train", rank, world_size), batch_size)
    return PrefetchedBatches(cfg, batch_size, depth, "train", rank, world_size)


_live: set[weakref.finalize] = set()


@atexit.register
def _stop_all() -> None:
    # registered after multiprocessing's own exit handler (atexit runs last-in first-out): our children have gone
    # before it joins them (they ignore its SIGTERM)
    for stopper in list(_live):
        stopper()


def _stop(proc: Any, commands: Any) -> None:
    if proc.is_alive():
        commands.put(("stop", None))
        proc.join(timeout=2 * POLL_S)
        if proc.is_alive():
            proc.kill()
            proc.join()


# ---------------------------------------------------------------------------------------------- the child


def _child(cfg: DataConfig, batch_size: int, depth: int, split: str, rank: int, world_size: int, data: Any,
           commands: Any, replies: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    data.cancel_join_thread()  # exiting must not wait for the parent to read what is queued
    parent = os.getppid()
    try:
        contexts = TokenContexts(cfg, split, rank, world_size)
    except BaseException as e:  # noqa: BLE001 — handed to the parent, which raises it
        replies.put(("error", _portable(e)))
        return
    replies.put(("ready", None))
    reader = _Reader(contexts, batch_size, depth, data, parent)
    while True:
        try:
            command, arg = commands.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                os._exit(0)
            continue
        if command == "stop":  # at once: an interpreter shutdown under the reader's thread, mid-document, would
            sys.stderr.flush()  # print its tokenizer pool's refusal (and abort C++ threads) on the user's terminal
            os._exit(0)
        try:
            if command == "go":
                threading.Thread(target=reader.run, name="sae-stream-reader", daemon=True).start()
            elif command == "load":
                contexts.load_state_dict(arg)
                reader.positions = {0: contexts.position()}
                replies.put(("loaded", None))
            elif command == "state":
                replies.put(("state", contexts.state_dict(reader.position(arg))))
        except BaseException as e:  # noqa: BLE001
            replies.put(("error", _portable(e)))


class _Reader:
    """The child's producing thread: batches onto the data queue, each one's position noted."""

    def __init__(self, contexts: TokenContexts, batch_size: int, depth: int, data: Any, parent: int) -> None:
        self.contexts, self.batch_size, self.depth, self.data, self.parent = contexts, batch_size, depth, data, parent
        self.lock = threading.Lock()
        self.positions = {0: contexts.position()}  # batch count -> position after it

    def position(self, k: int) -> tuple:
        with self.lock:
            if k not in self.positions:
                raise RuntimeError(f"the data process no longer holds the position after batch {k}")
            return self.positions[k]

    def run(self) -> None:
        warnings.showwarning = self._forward_warning
        k = 0
        try:
            for batch_BT in context_batches(self.contexts, self.batch_size):
                k += 1
                with self.lock:
                    # the parent has taken at least k - depth - 1 batches: older positions are never asked for
                    self.positions[k] = self.contexts.position()
                    self.positions.pop(k - self.depth - 3, None)
                self._put(("batch", k, batch_BT.numpy().astype(np.int32)))
            self._put(("end", k, None))
        except BaseException as e:  # noqa: BLE001
            if not isinstance(e, (ValueError, OSError)):
                traceback.print_exc()
            self._put(("error", k, _portable(e)))

    def _put(self, item: tuple) -> None:
        while True:
            try:
                self.data.put(item, timeout=POLL_S)
                return
            except queue.Full:
                if os.getppid() != self.parent:
                    os._exit(0)

    def _forward_warning(self, message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        self._put(("warn", None, (category, str(message))))


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives pickling (to be raised in the parent as is), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")
