"""Feature ablation: what one feature does to next-token predictions where it fires.

Both runs splice the SAE's reconstruction in at the hook (positions >= 1 when `skip_first_position`); the
ablated run zeroes the feature at every spliced position before decoding. The reported effect is
log p_ablated(v) - log p_spliced(v) at each context's activating position, averaged over the contexts:
tokens with positive values are ones the feature suppresses, negative ones it promotes. Contexts are cut
after their activating position (the model is causal), and only the logits there are computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_stream.analysis.hooks import (
    SAELike,
    check_not_unembed,
    final_residual,
    sae_decode,
    sae_features,
    sae_in_eval_mode,
    splice_hook,
    unembed_rows,
)
from sae_stream.hook_points import check_hook_names


class AblationResult(NamedTuple):
    feature: int
    delta_logprob_V: Tensor
    """Mean over contexts of log p(v | ablated) - log p(v | spliced) at the activating position, [V] (CPU)."""
    raised: list[tuple[int, float]]
    """(token id, mean change) of the tokens made most likely by removing the feature."""
    lowered: list[tuple[int, float]]
    """(token id, mean change) of the tokens made least likely by removing the feature."""
    activation_B: Tensor
    """The feature's activation at each context's activating position (CPU)."""


@torch.no_grad()
def _final_logprobs_at(model: HookedTransformer, hook_name: str, tokens_BT: Tensor, positions_B: Tensor,
                       hook: Callable[[Tensor, Any], Tensor]) -> Tensor:
    """Next-token log-probs [B, V] at `positions_B` with `hook` at `hook_name`; unembeds only those positions."""
    rows_B = torch.arange(tokens_BT.shape[0], device=tokens_BT.device)
    resid_BD = final_residual(model, tokens_BT, [(hook_name, hook)])[rows_B, positions_B]
    return unembed_rows(model, resid_BD).float().log_softmax(-1)


@sae_in_eval_mode
@torch.no_grad()
def ablate_feature(model: HookedTransformer, sae: SAELike, hook_name: str, tokens_BT: Tensor, feature: int,
                   positions: Tensor | list[int], k: int = 10, skip_first_position: bool = True,
                   n_vocab: int | None = None) -> AblationResult:
    """Zero `feature` in the spliced reconstruction of contexts `tokens_BT` and compare next-token log-probs
    at `positions` (one activating position per context) with the unablated spliced run. The top-k lists leave
    out ids from `n_vocab` on (an LM's padded vocabulary: ids no tokenizer gives)."""
    check_hook_names(model, hook_name)
    check_not_unembed(hook_name)
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature must be in [0, {sae.d_sae}), got {feature}")
    device = model.W_U.device
    positions_B = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(-1)
    if tokens_BT.dim() != 2 or positions_B.numel() != tokens_BT.shape[0]:
        raise ValueError("ablate_feature needs tokens [B, T] and one position per context")
    if int(positions_B.min()) < 0 or int(positions_B.max()) >= tokens_BT.shape[1]:
        raise ValueError(f"positions must be in [0, {tokens_BT.shape[1]}), got {positions_B.tolist()}")
    tokens_BT = tokens_BT[:, : int(positions_B.max()) + 1].to(device)
    n_ctx = tokens_BT.shape[0]
    seen: dict[str, Tensor] = {}

    # One forward over [contexts; contexts]: both copies reach the hook with the same activation, so the SAE
    # encodes once and the first copy gets the reconstruction, the second the one without the feature.
    def reconstruct_both(x_2BTD: Tensor) -> Tensor:
        x_BTD = x_2BTD[:n_ctx]
        feats_BTF = seen["feats_BTF"] = sae_features(sae, x_BTD)
        ablated_BTF = feats_BTF.clone()
        ablated_BTF[..., feature] = 0
        return torch.cat([sae_decode(sae, feats_BTF, x_BTD), sae_decode(sae, ablated_BTF, x_BTD)])

    tokens_2BT = torch.cat([tokens_BT, tokens_BT])
    hook = splice_hook(reconstruct_both, tokens_2BT, skip_first_position)
    logp_2BV = _final_logprobs_at(model, hook_name, tokens_2BT, positions_B.repeat(2), hook)
    delta_V = (logp_2BV[n_ctx:] - logp_2BV[:n_ctx]).mean(0).cpu()
    offset = 1 if skip_first_position else 0
    feats_BTF = seen["feats_BTF"]
    acts_B = feats_BTF[torch.arange(n_ctx, device=feats_BTF.device),
                       (positions_B - offset).clamp(min=0), feature].float().cpu()
    acts_B = torch.where((positions_B >= offset).cpu(), acts_B, torch.zeros_like(acts_B))
    shown_V = delta_V[:n_vocab]
    k = min(k, shown_V.numel())
    up, down = shown_V.topk(k), (-shown_V).topk(k)
    return AblationResult(feature, delta_V, list(zip(up.indices.tolist(), up.values.tolist())),
                          list(zip(down.indices.tolist(), (-down.values).tolist())), acts_B)
