"""Dead-feature tracking and Anthropic neuron resampling (Towards Monosemanticity, 2023).

At each configured step, features that fired on no input during the last `dead_window` steps (capped at the
steps since the previous resample or the start) are re-initialised towards inputs the SAE reconstructs badly:

1. per-input squared reconstruction loss ‖x − x̂‖² on a pool of inputs from the live buffer (in chunks);
2. one input per dead feature, drawn with probability ∝ loss² (without replacement when enough inputs are
   non-zero; seeded CPU generator, so the picks are the same on every device);
3. decoder row = the input's direction; encoder column = that direction × encoder_scale × the mean norm of the
   alive encoder columns; b_enc = 0;
4. Adam's exp_avg / exp_avg_sq reset to zero for exactly those rows/columns of W_enc, b_enc, W_dec —
   looked up by parameter in `optimizer.state`, never by position.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from sae_stream.config import ResampleConfig
from sae_stream.rundir import is_main_process
from sae_stream.sae import SAE

# Inputs scored per forward when computing the pool's losses: bounds memory at chunk x d_sae floats.
LOSS_CHUNK = 8192


class FiringTracker:
    """Step at which each feature last fired (a device tensor, updated without host syncs)."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.last_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.last_resample_step = 0

    @torch.no_grad()
    def update_(self, fired_F: Tensor, step: int | Tensor) -> None:
        """Record that the features in the bool mask `fired_F` fired during (1-based) step `step`."""
        # where + copy_ rather than masked_fill_: with a device-tensor step that would read it back (a host sync)
        self.last_fired_F.copy_(torch.where(fired_F, step, self.last_fired_F))

    def dead_since(self, step: int, n_steps: int) -> Tensor:
        """Bool mask: features that did not fire in steps (step − n_steps, step]. (Start counts as a firing.)"""
        return self.last_fired_F <= step - n_steps

    def resample_dead_mask(self, step: int, dead_window: int) -> Tensor:
        """Dead for resampling: no firing in the last dead_window steps, capped at the steps since the last one."""
        return self.dead_since(step, min(dead_window, step - self.last_resample_step))

    def state_dict(self) -> dict:
        return {"last_fired_F": self.last_fired_F, "last_resample_step": self.last_resample_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_fired_F = state["last_fired_F"].to(self.last_fired_F.device)
        self.last_resample_step = int(state["last_resample_step"])


def resample_steps(cfg: ResampleConfig, total_steps: int) -> list[int]:
    """The (1-based, completed-step) counts after which to resample: at_steps, else at_fractions × total."""
    steps = cfg.at_steps if cfg.at_steps is not None else [round(f * total_steps) for f in cfg.at_fractions]
    late = sorted(s for s in steps if s >= total_steps)
    if cfg.at_steps is not None and late and is_main_process():  # (once, not per torchrun rank)
        warnings.warn(f"resample.at_steps {late} at or past the run's last step ({total_steps:,}): never reached",
                      stacklevel=2)
    return sorted({s for s in steps if 0 < s < total_steps})


@torch.no_grad()
def per_input_loss(sae: SAE, pool_ND: Tensor, chunk: int = LOSS_CHUNK) -> Tensor:
    """‖x − x̂‖² for each pool row, as float32 on the CPU; the pool may be bf16 and/or on the host."""
    device = sae.b_dec_D.device
    out = torch.empty(pool_ND.shape[0], dtype=torch.float32)
    for start in range(0, pool_ND.shape[0], chunk):
        x_BD = pool_ND[start:start + chunk].to(device, torch.float32, non_blocking=True)
        recon_BD = sae.decode(sae.encode(x_BD))
        out[start:start + chunk] = (recon_BD - x_BD).pow(2).sum(dim=1).cpu()
    return out


@torch.no_grad()
def reset_adam_state_(optimizer: torch.optim.Optimizer, param: Tensor, index: Tensor, dim: int) -> None:
    """Zero Adam's moments of `param` at `index` along `dim` (other entries untouched)."""
    state = optimizer.state.get(param)
    if not state:
        return  # no step taken yet: nothing to reset
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index.to(state[key].device), 0.0)


@torch.no_grad()
def reinit_features_(sae: SAE, idx_K: Tensor, x_KD: Tensor, encoder_scale: float) -> None:
    """Point features idx_K at the directions of inputs x_KD (decoder unit vectors, scaled encoder columns)."""
    dir_KD = x_KD / x_KD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive_F = torch.ones(sae.d_sae, dtype=torch.bool, device=idx_K.device)
    alive_F[idx_K] = False
    enc_norm_F = sae.W_enc_DF.norm(dim=0)
    mean_alive = enc_norm_F[alive_F].mean() if bool(alive_F.any()) else enc_norm_F.new_tensor(1.0)
    sae.W_dec_FD[idx_K] = dir_KD
    sae.W_enc_DF[:, idx_K] = (dir_KD * (encoder_scale * mean_alive)).T
    sae.b_enc_F[idx_K] = 0.0


@torch.no_grad()
def resample_dead_(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    dead_F: Tensor,
    pool_fn: Callable[[int], Tensor],
    cfg: ResampleConfig,
    generator: torch.Generator,
) -> int:
    """Resample the features in the bool mask dead_F (see the module docstring); returns how many."""
    idx_K = dead_F.nonzero().squeeze(1)
    n_dead = idx_K.numel()
    if n_dead == 0:
        return 0
    pool_ND = pool_fn(cfg.pool_size)
    if pool_ND.ndim != 2 or pool_ND.shape[1] != sae.d_in:
        raise ValueError(f"resample pool has shape {tuple(pool_ND.shape)}; expected [n, {sae.d_in}]")
    if pool_ND.shape[0] == 0:  # a finite stream drained right at a resampling step
        warnings.warn(f"{n_dead} dead features not resampled: the resampling pool is empty (the activation stream "
                      "has ended)", stacklevel=2)
        return 0
    weights_N = per_input_loss(sae, pool_ND).double().pow(2)
    weights_N = torch.where(torch.isfinite(weights_N), weights_N, torch.zeros_like(weights_N))
    if float(weights_N.sum()) <= 0.0:
        weights_N = torch.ones_like(weights_N)  # perfect reconstruction everywhere: pick uniformly
    replacement = n_dead > int((weights_N > 0).sum())
    pick_K = torch.multinomial(weights_N, n_dead, replacement=replacement, generator=generator)
    x_KD = pool_ND[pick_K.to(pool_ND.device)].to(sae.b_dec_D.device, torch.float32)
    reinit_features_(sae, idx_K, x_KD, cfg.encoder_scale)
    reset_adam_state_(optimizer, sae.W_enc_DF, idx_K, dim=1)
    reset_adam_state_(optimizer, sae.b_enc_F, idx_K, dim=0)
    reset_adam_state_(optimizer, sae.W_dec_FD, idx_K, dim=0)
    return n_dead
