"""Training metrics kept on the device: per-interval loss sums, per-feature firing counts and the density window.

    metrics = RunningMetrics(d_sae, device, cfg.train, bins, levels=cfg.sae.matryoshka_sizes)
    metrics.accumulate_(out, x_BD, firing_counts(out.feats), sae.input_scale)  # in the step (graph-safe)
    metrics.count_(len(x_BD))                                                   # on the host, once per step
    record = metrics.summary()                                                  # every log_every steps (syncs)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from sae_stream.config import TrainConfig
from sae_stream.fused_ops import centred_sq_sum

if TYPE_CHECKING:
    from sae_stream.distributed import Distributed

HIST_LOG10_MIN = -10.0  # density histogram range; never-firing features are counted in the lowest bin
_SUMS = ("loss", "mse", "l1", "aux", "l0", "err_sq", "var_sq")


def resolves(tokens: int, threshold: float) -> bool:
    """Whether densities measured over `tokens` can fall below `threshold` and be non-zero (1 / tokens < it)."""
    return threshold <= 0 or tokens * threshold > 1


def density_counts(density_F: Tensor, t: TrainConfig, tokens: int | None = None) -> dict[str, Any]:
    """Dead / ultra-low / dense counts (training's and eval's alike); ultralow is None when densities over `tokens`
    cannot resolve the threshold (every alive feature then has density >= 1 / tokens, so a count would read 0
    whatever the SAE)."""
    dead = density_F <= t.dead_threshold
    ultralow = int((~dead & (density_F < t.ultralow_threshold)).sum())
    return {"d_sae": density_F.numel(), "dead": int(dead.sum()),
            "ultralow": ultralow if tokens is None or resolves(tokens, t.ultralow_threshold) else None,
            "dense": int((density_F > t.dense_threshold).sum()),
            "thresholds": {"dead": t.dead_threshold, "ultralow": t.ultralow_threshold, "dense": t.dense_threshold}}


def density_window(t: TrainConfig) -> int:
    """Tokens per density window: train.density_window_tokens, at most a quarter of the run (at least a batch), so
    windows complete and the last one describes the end of training, not the untrained SAE of step 0."""
    return min(t.density_window_tokens, max(t.batch_size, t.total_tokens // 4))


class RunningMetrics:
    """Per-interval sums (on device) and a per-feature firing count over the density window (`density_window`
    tokens; started again after resampling, which changes the features). `levels`: a Matryoshka SAE's nested
    sizes, whose prefixes' FVU is logged too (`fvu_first_<m>`)."""

    def __init__(self, d_sae: int, device: torch.device, t: TrainConfig, bins: int,
                 levels: Sequence[int] = ()) -> None:
        self.t, self.bins, self.window, self.levels = t, bins, density_window(t), list(levels)
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self.prefix_err = torch.zeros(len(self.levels), dtype=torch.float64, device=device)  # Σ‖x − prefix recon‖²
        self.steps = 0
        self.tokens = 0
        self.fire_counts_F = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.window_tokens = 0
        self.density_F: Tensor | None = None  # last completed window
        self.density_tokens = 0  # the tokens of that window
        self.reduced_density_F: Tensor | None = None  # data parallel: all ranks' density at the last log
        self.stale = False  # the last completed window predates a restart: logs still show it, exports do not

    @torch.no_grad()
    def accumulate_(self, out: Any, x_BD: Tensor, counts_F: Tensor, input_scale: Tensor,
                    var_sq: Tensor | None = None) -> Tensor:
        """The device half of a step's bookkeeping (in place, so a CUDA graph can replay it; few kernels: on a GPU
        each costs a few µs however small). `var_sq` = Σ‖x − x̄‖² (fp64) if the step computed it; returned. Interval
        sums are fp64; the per-step terms are fp32 scalars."""
        n, d = x_BD.shape
        if var_sq is None:
            var_sq = centred_sq_sum(x_BD)
        mse = out.mse.float() / input_scale.square()  # back to the original space (april scales its inputs)
        err_sq = mse * (n * d)
        stacked = torch.stack([out.loss.float(), mse, out.l1.float(), out.aux.float(),
                               counts_F.sum() / n, err_sq])  # _SUMS order, var_sq apart (fp64 already)
        self.sums[:-1] += stacked
        self.sums[-1] += var_sq
        if self.levels and out.prefix_mse is not None:
            self.prefix_err += out.prefix_mse.double() * (n * d) / input_scale.square()
        self.fire_counts_F += counts_F
        return var_sq

    def count_(self, n: int) -> None:
        """The host half: one step of n rows."""
        self.steps += 1
        self.tokens += n
        self.window_tokens += n

    def summary(self) -> dict[str, Any]:
        """Host-side metrics for the interval since the last call (syncs), then resets the interval sums."""
        s = dict(zip(_SUMS, self.sums.tolist()))
        k = max(self.steps, 1)
        out: dict[str, Any] = {name: s[name] / k for name in ("loss", "mse", "l1", "aux", "l0")}
        out["fvu"] = s["err_sq"] / s["var_sq"] if s["var_sq"] > 0 else float("nan")
        for m, err in zip(self.levels, self.prefix_err.tolist()):
            out[f"fvu_first_{m}"] = err / s["var_sq"] if s["var_sq"] > 0 else float("nan")
        if self.window_tokens >= self.window or self.density_F is None:
            density_F, tokens = self.fire_counts_F.double() / max(self.window_tokens, 1), self.window_tokens
            if self.window_tokens >= self.window:
                self.density_F, self.density_tokens, self.stale = density_F, tokens, False
                self.fire_counts_F.zero_()
                self.window_tokens = 0
        else:
            density_F, tokens = self.density_F, self.density_tokens
        out.update(self._density_metrics(density_F.cpu().numpy(), tokens))
        self.sums.zero_()
        self.prefix_err.zero_()
        self.steps = 0
        return out

    def summary_across(self, dist: Distributed) -> tuple[dict[str, Any], int]:
        """summary() of all ranks' metrics together, and the global token count (data parallel; collective).

        Sums, firing counts and token counts are added over ranks (the per-step means averaged); this rank's
        interval and density window then reset exactly as the global ones did, so every rank agrees."""
        n_sums, n_levels, world = len(_SUMS), len(self.levels), dist.world_size
        counts = torch.tensor([self.tokens, self.window_tokens], dtype=torch.float64, device=self.sums.device)
        total = dist.all_reduce_(torch.cat([self.sums, self.prefix_err, self.fire_counts_F.double(), counts]))
        g = copy.copy(self)
        g.sums = total[:n_sums].clone()
        g.sums[:5] /= world  # loss, mse, l1, aux, l0 are per-step means: average them; err_sq, var_sq add up
        g.prefix_err = total[n_sums:n_sums + n_levels].clone()  # (squared errors: add up)
        g.fire_counts_F = total[n_sums + n_levels:-2].round().long()
        g.tokens, g.window_tokens = (int(v) for v in total[-2:].round().tolist())
        out = g.summary()
        self.reduced_density_F = g.current_density()  # what export reports
        self.sums.zero_()
        self.prefix_err.zero_()
        self.steps = 0
        if g.window_tokens == 0:  # the global window completed
            self.fire_counts_F.zero_()
            self.window_tokens = 0
        self.density_F, self.density_tokens, self.stale = g.density_F, g.density_tokens, g.stale
        return out, g.tokens

    def restart_window(self) -> None:
        """A new density window from here (after resampling): current_density() no longer reports the older one."""
        self.fire_counts_F.zero_()
        self.window_tokens = 0
        self.stale = self.density_F is not None

    def current_density(self) -> Tensor:
        """Per-feature firing density (what the export writes): the last completed window, else (none yet, or only
        one from before a restart) the window in progress."""
        if self.density_F is not None and not self.stale:
            return self.density_F
        return self.fire_counts_F.double() / max(self.window_tokens, 1)

    def _density_metrics(self, d_F: np.ndarray, tokens: int) -> dict[str, Any]:
        """Counts over a window of `tokens` (`density_counts`) and the log10 density histogram."""
        c = density_counts(torch.from_numpy(d_F), self.t, tokens)
        log_d = np.log10(np.maximum(d_F, 10.0 ** HIST_LOG10_MIN))
        counts, edges = np.histogram(log_d, bins=self.bins, range=(HIST_LOG10_MIN, 0.0))
        return {"dead": c["dead"], "ultralow": c["ultralow"], "dense": c["dense"],
                "density_log10_histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("sums", "prefix_err", "steps", "tokens", "fire_counts_F",
                                               "window_tokens", "density_F", "density_tokens", "stale")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.sums.device
        for k, v in state.items():
            setattr(self, k, v.to(device) if isinstance(v, Tensor) else v)
        if "density_tokens" not in state and self.density_F is not None:  # a checkpoint from before it was kept
            self.density_tokens = self.window  # (a completed window has at least that many)
