"""Process-wide concerns of a training process: the device, the CPU allocator setting, SIGTERM/SIGINT handling."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sae_stream.config import ConfigError

_ALLOCATOR_TUNED = False


def resolve_device(name: str) -> torch.device:
    """`train.device` -> torch.device ('auto': cuda when available). A GPU named by index (cuda:1) also becomes the
    process's current device: Triton launches its kernels there, not on the tensors' device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available: use --train.device=cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name!r} but this machine has {torch.cuda.device_count()} GPU(s): use "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
    return device


def as_reported(device: str | torch.device) -> torch.device:
    """The device as a tensor on it reports it (`cuda` -> `cuda:<current index>`): comparable with tensor.device."""
    return torch.empty(0, device=device).device


def tune_cpu_allocator() -> bool:
    """glibc: serve big tensors from the heap and never trim it (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=max).

    A CPU step allocates and frees several [batch, d_sae] tensors; by default glibc mmaps and unmaps each one,
    so every step page-faults its fresh memory again (~100k minor faults per 512->4096 step at batch 4096;
    a lone ReLU over 4096x4096 takes 76 ms instead of 11 ms; the whole step gets ~10-25% less CPU time).
    The cost: freed memory stays with the process (its peak), which a training run keeps anyway. Process-wide,
    applied once; returns False where glibc is not available.
    """
    global _ALLOCATOR_TUNED
    if not _ALLOCATOR_TUNED:
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4
            _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
        except (OSError, AttributeError):
            return False
    return _ALLOCATOR_TUNED


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped training after the step in flight, with a checkpoint at that step; exit code
    128+signum. `command` continues it (None: `sae-stream train --resume RUN_DIR`, as resume_command gives)."""

    def __init__(self, signum: int, step: int, run_dir: Path | None, command: str | None = None,
                 at: str | None = None) -> None:
        self.signum, self.step, self.run_dir, self.command = signum, step, run_dir, command
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} at {at or f'step {step}'}")


@contextlib.contextmanager
def signals_to(on_signal: Callable[[int], None],
               signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Route `signals` (SIGTERM/SIGINT) to `on_signal` inside the block, then restore the handlers they had; main
    thread only (where Python runs handlers: elsewhere the block runs with the handlers as they are)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, _frame: on_signal(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def continued_by(command: str) -> Iterator[None]:
    """A TrainingInterrupted raised in the block names `command` as the way to continue (a stage of a larger job:
    `run`'s LM is continued by `train --resume RUN_DIR`, which finishes it and then the rest)."""
    try:
        yield
    except TrainingInterrupted as e:
        e.command = command
        raise
