"""Shared by test_reliability.py and test_checkpoint_writer.py: a run's checkpoint steps, a do-nothing tracker and
a batch stream that raises a signal while it produces a chosen batch."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import torch


def _steps(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in sorted((run / "checkpoints").glob("step_*"))]


class _NullLog:
    def log(self, step: int, metrics: dict) -> None:
        pass


def _batches_raising(signum: int, at: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    for i in range(1000):
        if i == at:
            signal.raise_signal(signum)  # arrives while batch `at` is being produced, i.e. before step at+1
        yield torch.randn(64, 8, generator=gen)
