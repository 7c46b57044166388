"""Direct logit effects of SAE features: the decoder direction mapped through the model to the unembedding.

For `blocks.L.mlp.hook_post`: W_dec_FD @ W_out[L] @ W_U. For `blocks.L.attn.hook_z` (flattened H * d_head):
W_dec_FD @ W_O[L] @ W_U. For hooks that live in (or add straight into) the residual stream: W_dec_FD @ W_U.
These are direct paths only: any later blocks are skipped. The final LayerNorm's centring and weight are
applied (both linear); its 1/sigma scale is ignored, a positive per-token factor that scales every logit
effect of a token equally, so the ranking shown is unchanged. Other hooks get no logit effects (a note).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_stream.analysis.hooks import SAELike

RESIDUAL_HOOK = re.compile(r"^(hook_embed|hook_pos_embed|blocks\.\d+\.(hook_resid_pre|hook_resid_mid|hook_resid_post"
                           r"|hook_attn_out|hook_mlp_out))$")
LN_NOTE = "final LayerNorm's 1/sigma scale ignored (does not change the ranking)"


@torch.no_grad()
def decoder_directions(sae: SAELike, features: Sequence[int]) -> Tensor:
    """What each feature adds to the reconstruction per unit activation, [S, d_in], in the original space.

    Taken through `decode` (decode(e_f) - decode(0)) so any input scaling inside the SAE is accounted for.
    """
    w = getattr(sae, "W_dec_FD", None)
    device, dtype = (w.device, w.dtype) if isinstance(w, Tensor) else (torch.device("cpu"), torch.float32)
    ids = torch.as_tensor(list(features), dtype=torch.long, device=device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= sae.d_sae):
        raise ValueError(f"feature ids must be in [0, {sae.d_sae}), got {ids.tolist()}")
    onehot_SF = torch.zeros(ids.numel(), sae.d_sae, device=device, dtype=dtype)
    onehot_SF[torch.arange(ids.numel(), device=device), ids] = 1.0
    return (sae.decode(onehot_SF) - sae.decode(torch.zeros_like(onehot_SF[:1]))).float()


def _to_residual(model: HookedTransformer, hook_name: str, dirs_SD: Tensor) -> tuple[Tensor | None, str]:
    if RESIDUAL_HOOK.match(hook_name):
        return dirs_SD, "W_dec @ W_U"
    m = re.match(r"^blocks\.(\d+)\.(mlp\.hook_post|attn\.hook_z)$", hook_name)
    if m is None:
        return None, ""
    layer = int(m.group(1))
    if m.group(2) == "mlp.hook_post":
        return dirs_SD @ model.W_out[layer].float(), f"W_dec @ W_out[{layer}] @ W_U"
    return dirs_SD @ model.W_O[layer].reshape(-1, model.cfg.d_model).float(), f"W_dec @ W_O[{layer}] @ W_U"


@torch.no_grad()
def logit_effects(model: HookedTransformer, sae: SAELike, hook_name: str,
                  features: Sequence[int]) -> tuple[Tensor | None, str]:
    """Direct logit effects [S, V] of `features`, and a note on how they were computed (or why there are none)."""
    dirs_SD = decoder_directions(sae, features).to(model.W_U.device)
    resid_SD, path = _to_residual(model, hook_name, dirs_SD)
    if resid_SD is None:
        return None, f"no direct path from {hook_name} to the logits: logit effects omitted"
    if model.cfg.normalization_type in ("LN", "LNPre"):
        resid_SD = resid_SD - resid_SD.mean(-1, keepdim=True)
    ln_w = getattr(getattr(model, "ln_final", None), "w", None)
    if isinstance(ln_w, Tensor):
        resid_SD = resid_SD * ln_w.float()
    return resid_SD @ model.W_U.float(), f"direct path {path}; {LN_NOTE}"
