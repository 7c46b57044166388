"""Matching the features of two SAEs, the two ways "Towards Monosemanticity" compares feature sets.

- Decoder cosine: for each feature of A, the largest cosine similarity between its decoder direction and any of B's.
  Cheap, needs no text, and means something only when both SAEs read the same activations (same LM and hook).
- Activation correlation: the Pearson correlation of two features' activations over the same tokens, for each
  feature of A its best partner in B. This also compares SAEs of different LMs or hooks (the paper's universality
  study), and for features that never fire it is undefined (NaN, partner -1).

Both are computed in blocks of A's features. Correlations hold a float64 [F_A, F_B] cross-moment matrix and,
while a chunk of tokens is added, its float32 product (1.5x the matrix); the rest is one [block, F_B] slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_CORRELATION_PAIRS = 1 << 28
"""Largest F_A * F_B whose correlations are accumulated (float64 and float32 [F_A, F_B] matrices: 3 GiB here)."""

THRESHOLDS = (0.5, 0.7, 0.9)


class Matches(NamedTuple):
    value_F: Tensor  # each feature's best similarity to the other SAE (float32; NaN where undefined)
    index_F: Tensor  # the other SAE's feature that reaches it (int64; -1 where undefined)


def _best_of_rows(sim_fG: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise max of a similarity block whose undefined entries are NaN: (values, indices), NaN / -1 for rows
    with nothing defined."""
    defined = ~torch.isnan(sim_fG)
    value_f, index_f = sim_fG.nan_to_num(nan=-math.inf).max(1)
    none = ~defined.any(1)
    return value_f.masked_fill(none, math.nan), index_f.masked_fill(none, -1)


def _fold_columns(best: Matches, sim_fG: Tensor, row0: int) -> Matches:
    """Update B's running best (over A's rows so far) with a block of rows starting at A's feature `row0`."""
    value_G, index_G = _best_of_rows(sim_fG.T)
    better = ~torch.isnan(value_G) & (torch.isnan(best.value_F) | (value_G > best.value_F))
    return Matches(torch.where(better, value_G, best.value_F), torch.where(better, index_G + row0, best.index_F))


def _undefined(n: int, device: torch.device) -> Matches:
    return Matches(torch.full((n,), math.nan, device=device), torch.full((n,), -1, dtype=torch.long, device=device))


def _matches_in_blocks(d_a: int, d_b: int, block_rows: int, device: torch.device,
                       similarity: Callable[[int, int], Tensor]) -> tuple[Matches, Matches]:
    """(A's best match in B, B's best in A) from `similarity(start, stop)`, A's rows start:stop against all of B
    ([stop - start, d_b], NaN where undefined), one block of rows at a time."""
    values, indices, best_b = [], [], _undefined(d_b, device)
    for i in range(0, d_a, block_rows):
        sim_fG = similarity(i, min(i + block_rows, d_a))
        value_f, index_f = _best_of_rows(sim_fG)
        values.append(value_f)
        indices.append(index_f)
        best_b = _fold_columns(best_b, sim_fG, i)
    return Matches(torch.cat(values), torch.cat(indices)), best_b


@torch.no_grad()
def decoder_matches(W_dec_a_FD: Tensor, W_dec_b_GD: Tensor, block_rows: int = 1024) -> tuple[Matches, Matches]:
    """(A's best decoder cosine in B, B's best in A). A zero decoder row has no direction: undefined (NaN, -1)."""
    if W_dec_a_FD.shape[1] != W_dec_b_GD.shape[1]:
        raise ValueError(f"decoders of width {W_dec_a_FD.shape[1]} and {W_dec_b_GD.shape[1]}: decoder cosines need "
                         "SAEs of the same activations")
    a_FD = F.normalize(W_dec_a_FD.float(), dim=1)
    b_GD = F.normalize(W_dec_b_GD.to(a_FD), dim=1)
    zero_a_F, zero_b_G = a_FD.norm(dim=1) == 0, b_GD.norm(dim=1) == 0

    def cosines(start: int, stop: int) -> Tensor:
        sim_fG = a_FD[start:stop] @ b_GD.T
        sim_fG[zero_a_F[start:stop]] = math.nan
        sim_fG[:, zero_b_G] = math.nan
        return sim_fG

    return _matches_in_blocks(a_FD.shape[0], b_GD.shape[0], block_rows, a_FD.device, cosines)


def check_correlation_size(d_a: int, d_b: int, max_pairs: int = MAX_CORRELATION_PAIRS) -> None:
    if d_a * d_b > max_pairs:
        gib = d_a * d_b * 12 / 2**30
        raise ValueError(f"activation correlations of {d_a:,} x {d_b:,} features need {gib:.0f} GiB of matrices "
                         f"(at most {max_pairs:,} pairs): pass --no-correlation for decoder cosines only")


class CorrelationTotals:
    """Running moments of two feature sets over the same tokens, for their Pearson correlations.

    The activations are shifted by the first chunk's means before the products are summed (float32 products per
    chunk, float64 totals), which keeps cov = E[ab] - E[a]E[b] from cancelling away for features that fire often.
    """

    def __init__(self, d_a: int, d_b: int, device: torch.device | str = "cpu",
                 max_pairs: int = MAX_CORRELATION_PAIRS) -> None:
        check_correlation_size(d_a, d_b, max_pairs)
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.shift_a: Tensor | None = None
        self.shift_b: Tensor | None = None
        self.sum_a, self.sq_a, self.fires_a = (torch.zeros(d_a, **kw) for _ in range(3))
        self.sum_b, self.sq_b, self.fires_b = (torch.zeros(d_b, **kw) for _ in range(3))
        self.cross_FG = torch.zeros(d_a, d_b, **kw)

    @torch.no_grad()
    def update(self, a_NF: Tensor, b_NG: Tensor) -> None:
        """Add N tokens: A's features [N, F_A] and B's [N, F_B] at the same positions."""
        if a_NF.shape[0] != b_NG.shape[0]:
            raise ValueError(f"{a_NF.shape[0]} tokens of A's features but {b_NG.shape[0]} of B's")
        a_NF, b_NG = a_NF.float(), b_NG.float()
        if self.shift_a is None or self.shift_b is None:
            self.shift_a, self.shift_b = a_NF.mean(0), b_NG.mean(0)
        self.fires_a += (a_NF > 0).sum(0)
        self.fires_b += (b_NG > 0).sum(0)
        a_NF, b_NG = a_NF - self.shift_a, b_NG - self.shift_b
        self.sum_a += a_NF.sum(0)
        self.sq_a += a_NF.pow(2).sum(0)
        self.sum_b += b_NG.sum(0)
        self.sq_b += b_NG.pow(2).sum(0)
        self.cross_FG += a_NF.T @ b_NG  # (promoted in place: no float64 copy of the product)
        self.n += a_NF.shape[0]

    def _std(self, total: Tensor, sq: Tensor) -> Tensor:
        """Standard deviations, NaN where (near) constant: such a feature correlates with nothing."""
        var = (sq / self.n - (total / self.n).pow(2)).clamp_min(0)
        return var.sqrt().masked_fill(var <= 1e-12 * (sq / self.n).clamp_min(1e-30), math.nan)

    def correlation_rows(self, start: int, stop: int, std_a: Tensor | None = None,
                         std_b: Tensor | None = None) -> Tensor:
        """Correlations of A's features start:stop with all of B's, [stop - start, F_B] float64 (NaN: undefined).
        `std_a` / `std_b`: the features' standard deviations (`_std`), when the caller has them already."""
        if self.n == 0:
            raise ValueError("no tokens were added: nothing to correlate")
        std_a = std_a if std_a is not None else self._std(self.sum_a, self.sq_a)
        std_b = std_b if std_b is not None else self._std(self.sum_b, self.sq_b)
        mean_a, mean_b = self.sum_a[start:stop] / self.n, self.sum_b / self.n
        cov_fG = self.cross_FG[start:stop] / self.n - mean_a[:, None] * mean_b[None, :]
        return (cov_fG / (std_a[start:stop, None] * std_b[None, :])).clamp(-1, 1)

    def matches(self, block_rows: int = 1024) -> tuple[Matches, Matches]:
        """(A's best-correlated feature in B, B's in A)."""
        if self.n == 0:
            raise ValueError("no tokens were added: nothing to correlate")
        std_a, std_b = self._std(self.sum_a, self.sq_a), self._std(self.sum_b, self.sq_b)  # (once, not per block)
        d_a, d_b = self.cross_FG.shape
        return _matches_in_blocks(d_a, d_b, block_rows, self.cross_FG.device,
                                  lambda start, stop: self.correlation_rows(start, stop, std_a, std_b).float())

    def densities(self) -> tuple[Tensor, Tensor]:
        """Fraction of the tokens each feature of A and of B fired on."""
        return self.fires_a / max(self.n, 1), self.fires_b / max(self.n, 1)


def match_summary(m: Matches, thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """Mean, median and the fraction of defined features above each threshold, for one direction."""
    defined = m.value_F[~torch.isnan(m.value_F)].double().cpu()
    n = defined.numel()
    return {"features": m.value_F.numel(), "defined": n,
            "mean": float(defined.mean()) if n else None, "median": float(defined.median()) if n else None,
            "fraction_above": {f"{t:g}": float((defined > t).double().mean()) if n else None for t in thresholds}}


def partners_per_feature(b_to_a: Matches, d_a: int) -> dict[str, int]:
    """How many of A's features are the best match of 0, 1, 2-3 and 4+ of B's features: with B the larger SAE, a
    feature of A that is several B features' best match is one that split (the paper's feature splitting)."""
    index = b_to_a.index_F[b_to_a.index_F >= 0].cpu()
    counts_F = torch.bincount(index, minlength=d_a)
    return {"0": int((counts_F == 0).sum()), "1": int((counts_F == 1).sum()),
            "2-3": int(((counts_F >= 2) & (counts_F <= 3)).sum()), "4+": int((counts_F >= 4).sum())}


DENSITY_BANDS = ((0.0, 1e-4), (1e-4, 1e-3), (1e-3, 1e-2), (1e-2, 1.0))
"""Density bands (fraction of tokens, (low, high]) in which `by_density` averages the best matches."""


def by_density(m: Matches, density_F: Tensor) -> dict[str, dict]:
    """Mean best match of the features in each density band, and of those that never fired: rare features are the
    ones least likely to recur in another SAE, so an overall mean mixes two populations."""
    density_F = density_F.double().cpu()
    value_F = m.value_F.double().cpu()
    bands = {"never fired": density_F == 0}
    bands.update({f"({lo:g}, {hi:g}]": (density_F > lo) & (density_F <= hi) for lo, hi in DENSITY_BANDS})
    out = {}
    for name, in_band in bands.items():
        values = value_F[in_band & ~value_F.isnan()]
        out[name] = {"features": int(in_band.sum()), "mean": float(values.mean()) if values.numel() else None}
    return out


def top_splits(b_in_a: Matches, n: int = 10, min_value: float = 0.5, eligible_G: Tensor | None = None) -> list[dict]:
    """The `n` features of A that are the best match (at least `min_value`) of the most features of B, as
    {"a": id, "b": [B's ids, best first], "values": [...]}: candidates for feature splitting, to look at side by side
    (most partners first; ties: the higher best value). Features with fewer than 2 partners are left out; so are B's
    features outside `eligible_G` (e.g. ones that fired too rarely for their correlation to mean much)."""
    strong = ~torch.isnan(b_in_a.value_F) & (b_in_a.value_F >= min_value) & (b_in_a.index_F >= 0)
    if eligible_G is not None:
        strong &= eligible_G.to(strong.device)
    groups: dict[int, list[tuple[float, int]]] = {}
    for g, (a, v, keep) in enumerate(zip(b_in_a.index_F.tolist(), b_in_a.value_F.tolist(), strong.tolist())):
        if keep:  # (lists: one transfer from a GPU, not one per feature)
            groups.setdefault(a, []).append((v, g))
    ranked = sorted((sorted(members, reverse=True), a) for a, members in groups.items() if len(members) >= 2)
    ranked.sort(key=lambda item: (-len(item[0]), -item[0][0][0], item[1]))
    return [{"a": a, "b": [g for _, g in members], "values": [round(v, 4) for v, _ in members]}
            for members, a in ranked[:n]]
