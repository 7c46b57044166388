"""One streaming pass over held-out contexts collecting what the dashboard shows for every feature.

Per feature: top-k activating tokens with the feature's activations in a window around each (StreamingTopK
payload), a histogram of its firing activations (StreamingHistogram) and its firing count. Memory is
O(d_sae * (top_k * window + bins)) plus one chunk of features; only the token ids are kept (to show the
contexts' text later). The forward stops after the hooked block.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_stream.analysis.histogram import HistogramResult, StreamingHistogram
from sae_stream.analysis.hooks import (
    SAELike,
    check_sae,
    chunks,
    first_position,
    hook_activations,
    model_device,
    sae_features,
    sae_in_eval_mode,
    take_contexts,
)
from sae_stream.analysis.topk import StreamingTopK, TopKResult
from sae_stream.config import AnalysisConfig
from sae_stream.hook_points import check_hook_names


class FeatureScan(NamedTuple):
    tokens_NT: Tensor
    """The scanned contexts' token ids (CPU); top-k ids are flat positions `row * T + pos` into it."""
    top: TopKResult
    """Top activations per feature; payload [F, k, left + 1 + right]: activations around each token (NaN off edge)."""
    histogram: HistogramResult
    fire_count_F: Tensor
    n_tokens: int
    """Positions counted (position 0 left out when skipped)."""
    left: int
    right: int

    @property
    def density_F(self) -> Tensor:
        return self.fire_count_F.double() / max(self.n_tokens, 1)


def window_activations(feats_BTF: Tensor, rows_FK: Tensor, left: int, right: int) -> Tensor:
    """feats[b, t + o, f] for each feature f's candidate rows (b * T + t) and offsets o in [-left, right]."""
    n_ctx, n_pos, n_feat = feats_BTF.shape
    offsets_W = torch.arange(-left, right + 1, device=rows_FK.device)
    pos_FKW = (rows_FK % n_pos)[..., None] + offsets_W
    inside = (pos_FKW >= 0) & (pos_FKW < n_pos)
    flat_FKW = (rows_FK // n_pos)[..., None] * n_pos + pos_FKW.clamp(0, n_pos - 1)
    feature_F11 = torch.arange(n_feat, device=rows_FK.device).view(-1, 1, 1)
    vals_FKW = feats_BTF.reshape(n_ctx * n_pos, n_feat)[flat_FKW, feature_F11]
    return vals_FKW.float().masked_fill(~inside, torch.nan)


@sae_in_eval_mode
@torch.no_grad()
def scan_features(model: HookedTransformer, sae: SAELike, hook_name: str, token_batches: Iterable[Tensor],
                  cfg: AnalysisConfig, skip_first_position: bool = True) -> FeatureScan:
    """Stream up to `cfg.tokens` tokens through the model and SAE, keeping per-feature summaries only."""
    check_hook_names(model, hook_name)
    tokens_NT = take_contexts(token_batches, cfg.tokens)
    n_ctx, n_pos = tokens_NT.shape
    device = model_device(model)
    left, right, start = cfg.window, cfg.window // 3, first_position(skip_first_position)
    topk: StreamingTopK | None = None
    hist: StreamingHistogram | None = None
    fire_F: Tensor | None = None
    n_tokens = 0
    batches = chunks(tokens_NT, cfg.batch_contexts, device)
    for i, tokens_BT in enumerate(tqdm(batches, total=-(-n_ctx // cfg.batch_contexts), desc="scan", disable=None)):
        x_BTD = hook_activations(model, hook_name, tokens_BT)
        if i == 0:
            check_sae(sae, x_BTD.shape[-1], hook_name)
        feats_BTF = sae_features(sae, x_BTD).float()
        n_feat = feats_BTF.shape[-1]
        if topk is None or hist is None or fire_F is None:
            topk = StreamingTopK(n_feat, cfg.top_k, payload_shape=(left + 1 + right,), device=device)
            hist = StreamingHistogram(n_feat, cfg.histogram_bins, device=device)
            fire_F = torch.zeros(n_feat, dtype=torch.long, device=device)
        # Skipped positions stay visible in the windows but never count as activations.
        counted_NF = feats_BTF.clone()
        counted_NF[:, :start] = 0
        counted_NF = counted_NF.view(-1, n_feat)
        row0 = i * cfg.batch_contexts
        ids_N = torch.arange(row0 * n_pos, (row0 + tokens_BT.shape[0]) * n_pos, device=device)
        topk.update(counted_NF, ids_N, functools.partial(window_activations, feats_BTF, left=left, right=right))
        hist.update(counted_NF)
        fire_F += (counted_NF > 0).sum(0)
        n_tokens += tokens_BT.shape[0] * (n_pos - start)
    assert topk is not None and hist is not None and fire_F is not None
    return FeatureScan(tokens_NT, topk.result(), hist.result(), fire_F.cpu(), n_tokens, left, right)
