"""Per-feature top-k activations over a token stream, without storing the activations.

Each chunk of activations [N, F] is reduced to its own top-k per feature, merged with the running top-k
[F, k] and cut back to k: memory is O(F * k) whatever the stream length. Order is deterministic: value
descending, ties broken by the smaller token id (the earlier token), exactly like a stable full sort of
the whole stream. Only firing activations (> 0) are kept; unused slots have id -1.

An optional payload per kept entry (e.g. the feature's activations in a window around the token) is
gathered for the chunk's candidates by a callback and carried through the merges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

PayloadFn = Callable[[Tensor], Tensor]
"""Maps candidate rows `rows_FK` (indices into the chunk's N rows, per feature) to a payload [F, K, ...]."""


class TopKResult(NamedTuple):
    values_FK: Tensor
    """Activations, descending per feature; unused slots hold -inf."""
    ids_FK: Tensor
    """Token ids (stream positions) of the values; -1 for unused slots."""
    payload_FK: Tensor | None
    """Per-entry payload [F, k, ...] (NaN-filled for unused slots), or None."""


def first_k_largest(vals_FN: Tensor, k: int) -> Tensor:
    """Column indices [F, min(k, N)] of each row's k largest values, sorted by column; among values tied at
    the k-th, the leftmost are taken (rows whose k-th value is -inf excepted: those entries are never kept).

    torch.topk picks arbitrarily among ties at the k-th value, so rows with such ties are redone exactly.
    """
    n_features, n = vals_FN.shape
    if n <= k:
        return torch.arange(n, device=vals_FN.device).expand(n_features, n)
    top = vals_FN.topk(k, dim=1)
    rows_FK = top.indices.sort(dim=1).values
    kth_F1 = top.values[:, -1:]
    ambiguous = (kth_F1[:, 0] > -torch.inf) & ((vals_FN >= kth_F1).sum(1) > k)
    if bool(ambiguous.any()):
        idx = ambiguous.nonzero()[:, 0]
        vals_AN, kth_A1 = vals_FN[idx], kth_F1[idx]
        tied = vals_AN == kth_A1
        still_needed_A1 = k - (vals_AN > kth_A1).sum(1, keepdim=True)
        keep = (vals_AN > kth_A1) | (tied & (tied.cumsum(1) <= still_needed_A1))
        rows_FK[idx] = keep.nonzero()[:, 1].view(-1, k)
    return rows_FK


class StreamingTopK:
    """Running top-k per feature over chunks of activations whose ids increase along the stream."""

    def __init__(self, n_features: int, k: int, payload_shape: tuple[int, ...] | None = None,
                 device: torch.device | str = "cpu") -> None:
        """`payload_shape`: shape of each entry's payload (None: no payload)."""
        if n_features <= 0 or k <= 0:
            raise ValueError(f"StreamingTopK needs n_features > 0 and k > 0, got {n_features}, {k}")
        self.k = k
        self.values_FK = torch.full((n_features, k), -torch.inf, device=device)
        self.ids_FK = torch.full((n_features, k), -1, dtype=torch.long, device=device)
        self.payload_FK = (torch.full((n_features, k, *payload_shape), torch.nan, device=device)
                           if payload_shape is not None else None)
        self._last_id = -1

    @torch.no_grad()
    def update(self, values_NF: Tensor, ids_N: Tensor, payload_fn: PayloadFn | None = None) -> None:
        """Merge a chunk: `values_NF` [N, F] activations of tokens `ids_N` [N] (increasing, after earlier chunks)."""
        if values_NF.shape[0] == 0:
            return
        ids_N = ids_N.to(self.ids_FK.device)
        if int(ids_N[0]) <= self._last_id or bool((ids_N[1:] <= ids_N[:-1]).any()):
            raise ValueError("StreamingTopK ids must increase along the stream (chunks in order, ids unique)")
        if (self.payload_FK is None) != (payload_fn is None):
            raise ValueError("pass payload_fn exactly when the StreamingTopK tracks a payload")
        self._last_id = int(ids_N[-1])
        vals_FN = values_NF.T.float()
        vals_FN = torch.where(vals_FN > 0, vals_FN, -torch.inf)
        rows_FK = first_k_largest(vals_FN, self.k)
        merged_vals = torch.cat([self.values_FK, vals_FN.gather(1, rows_FK)], dim=1)
        merged_ids = torch.cat([self.ids_FK, ids_N[rows_FK]], dim=1)
        # Running entries precede the chunk's (smaller ids) and each part is already in (value desc, id asc)
        # order among equal values, so a stable descending sort keeps that order overall.
        order_FK = merged_vals.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values_FK = merged_vals.gather(1, order_FK)
        self.ids_FK = merged_ids.gather(1, order_FK)
        if self.payload_FK is not None and payload_fn is not None:
            merged_payload = torch.cat([self.payload_FK, payload_fn(rows_FK).to(self.payload_FK)], dim=1)
            index = order_FK.view(*order_FK.shape, *[1] * (merged_payload.dim() - 2))
            self.payload_FK = merged_payload.gather(1, index.expand(-1, -1, *merged_payload.shape[2:]))

    def result(self) -> TopKResult:
        empty_FK = self.values_FK == -torch.inf
        ids_FK = self.ids_FK.masked_fill(empty_FK, -1)
        payload = self.payload_FK
        if payload is not None:
            payload = payload.masked_fill(empty_FK.view(*empty_FK.shape, *[1] * (payload.dim() - 2)), torch.nan)
        return TopKResult(self.values_FK, ids_FK, payload)
