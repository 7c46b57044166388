"""The SAE's learning-rate and λ schedules: pure functions of the 0-based step (on CUDA the trainer writes their
values into device scalars that the captured step reads)."""

from __future__ import annotations

from sae_stream.config import Config, TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for the 0-based step `step`: linear warm-up, then constant or a linear tail to 0."""
    factor = 1.0
    if t.lr_schedule in ("warmup", "linear_tail") and t.warmup_steps > 0:
        factor = min(1.0, (step + 1) / t.warmup_steps)
    if t.lr_schedule == "linear_tail":
        total = t.total_steps
        decay_start = int(total * (1.0 - t.decay_fraction))
        if total > decay_start and step >= decay_start:
            factor = min(factor, (total - step) / (total - decay_start))
    return t.lr * factor


def l1_coeff_at(step: int, cfg: Config) -> float:
    """λ for the 0-based step: ramps linearly from 0 over train.l1_warmup_fraction of the run."""
    warm = cfg.train.l1_warmup_fraction * cfg.train.total_steps
    return cfg.sae.l1_coeff * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)
