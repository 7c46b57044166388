"""Per-feature histograms of firing activations over a stream, in one pass and O(F * bins) memory.

Feature f's bins are [j * w_f, (j + 1) * w_f) for j < bins. The width starts at (first chunk's max) / bins
and doubles whenever a larger activation arrives; after m doublings each new bin is exactly the union of
2^m old ones, so counts are merged, never re-estimated: the final counts equal a histogram of the whole
stream with the final edges (values on the last edge go in the last bin). The one value that does not merge
with its bin is one on the top edge, clamped into the last bin: it is counted apart too, and moved to the
bin that edge starts once the range grows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class HistogramResult(NamedTuple):
    counts_FB: Tensor
    """Firing activations per bin, int64."""
    width_F: Tensor
    """Bin width per feature (0: the feature never fired); edges are width * arange(bins + 1)."""


class StreamingHistogram:
    def __init__(self, n_features: int, bins: int = 32, device: torch.device | str = "cpu") -> None:
        if bins <= 0 or bins & (bins - 1):
            raise ValueError(f"StreamingHistogram bins must be a power of two, got {bins}")
        self.bins = bins
        self.counts_FB = torch.zeros(n_features, bins, dtype=torch.long, device=device)
        self.width_F = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.on_top_F = torch.zeros(n_features, dtype=torch.long, device=device)  # values == the top edge

    @torch.no_grad()
    def update(self, values_NF: Tensor) -> None:
        """Count the activations > 0 of a chunk [N, F]."""
        if values_NF.shape[0] == 0:
            return
        values_NF = values_NF.to(self.width_F.device)
        self._grow_(values_NF.max(0).values.double())
        n_idx, f_idx = (values_NF > 0).nonzero(as_tuple=True)
        if f_idx.numel() == 0:
            return
        firing = values_NF[n_idx, f_idx].double()
        bin_idx = (firing / self.width_F[f_idx]).floor().long().clamp_(max=self.bins - 1)
        flat = torch.bincount(f_idx * self.bins + bin_idx, minlength=self.counts_FB.numel())
        self.counts_FB += flat.view_as(self.counts_FB)
        on_top = firing >= self.width_F[f_idx] * self.bins
        self.on_top_F += torch.bincount(f_idx[on_top], minlength=len(self.on_top_F))

    def _grow_(self, max_F: Tensor) -> None:
        unset = (self.width_F == 0) & (max_F > 0)
        self.width_F[unset] = max_F[unset] / self.bins
        top_F = self.width_F * self.bins
        grow = (self.width_F > 0) & (max_F > top_F)
        if not bool(grow.any()):
            return
        doublings = torch.zeros_like(self.width_F, dtype=torch.long)
        doublings[grow] = torch.log2(max_F[grow] / top_F[grow]).ceil().long().clamp_(min=1)
        # log2 may round one short of covering the max.
        short = grow & (self.width_F * self.bins * torch.exp2(doublings.double()) < max_F)
        doublings[short] += 1
        for m in doublings[grow].unique().tolist():
            rows = (doublings == m).nonzero(as_tuple=True)[0]
            counts_RB = _merge_bins(self.counts_FB[rows], m)
            # the old top edge is the new edge bins / 2^m: its values leave the bin the last old bin merged into
            src, dst = (self.bins - 1) >> m, self.bins >> m
            if src != dst:
                counts_RB[:, src] -= self.on_top_F[rows]
                counts_RB[:, dst] += self.on_top_F[rows]
            self.counts_FB[rows] = counts_RB
            self.width_F[rows] *= 2.0**m
        self.on_top_F[grow] = 0

    def result(self) -> HistogramResult:
        return HistogramResult(self.counts_FB, self.width_F)


def _merge_bins(counts_RB: Tensor, doublings: int) -> Tensor:
    """Counts after doubling the bin width `doublings` times: groups of 2^m bins become one, the top fills with 0."""
    rows, bins = counts_RB.shape
    group = 2 ** min(doublings, int(math.log2(bins)))
    merged_RB = counts_RB.view(rows, bins // group, group).sum(-1)
    out_RB = torch.zeros_like(counts_RB)
    out_RB[:, : merged_RB.shape[1]] = merged_RB
    return out_RB
