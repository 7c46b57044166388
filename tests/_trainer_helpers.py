"""Synthetic training data and config shared by the trainer tests (test_trainer*.py, and the step, sweep, jumprelu,
fused-ops and distributed tests): sparse combinations of known unit atoms, a list logger, a small Config."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sae_stream.config import Config, config_from_dict

D_IN, N_ATOMS, BATCH = 32, 64, 512


class ListLogger:
    """Stand-in for sae_stream.tracking.Tracker: keeps (step, metrics)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, step: int, metrics: dict) -> None:
        self.rows.append((step, metrics))

    def last_record(self) -> dict:
        return {"step": self.rows[-1][0], **self.rows[-1][1]} if self.rows else {}


def _atoms(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N_ATOMS, D_IN, generator=g)
    return a / a.norm(dim=1, keepdim=True)


def sparse_batches(atoms: torch.Tensor, start: int = 0, seed: int = 0, batch: int = BATCH) -> Iterator[torch.Tensor]:
    """Replayable: batch i depends only on (seed, i). Codes: ~3 of 64 atoms active, uniform in [0, 2)."""
    i = start
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        active = torch.rand(batch, N_ATOMS, generator=g) < 3 / N_ATOMS
        yield (active * torch.rand(batch, N_ATOMS, generator=g) * 2) @ atoms
        i += 1


def _cfg(arch: str = "anthropic", steps: int = 100, **over) -> Config:
    raw = {
        "sae": {"architecture": arch, "d_sae": N_ATOMS, "l1_coeff": 0.01, "k": 4, "dead_tokens_auxk": 50 * BATCH},
        "train": {"total_tokens": BATCH * steps, "batch_size": BATCH, "lr": 1e-2, "log_every": 50,
                  "checkpoint_every": 10_000, "density_window_tokens": 25 * BATCH},
        "resample": {"enabled": False, "pool_size": 2048, "dead_window": 20},
        "buffer": {"capacity": 4 * BATCH},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    return config_from_dict(raw)


def _pool(atoms):
    return lambda n: torch.cat([b for _, b in zip(range(-(-n // BATCH)), sparse_batches(atoms, seed=7))])[:n]


def _recovered(sae, atoms) -> torch.Tensor:
    w = sae.W_dec_FD.detach()
    return (atoms @ (w / w.norm(dim=1, keepdim=True)).T).max(dim=1).values
