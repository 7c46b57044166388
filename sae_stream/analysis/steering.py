"""Feature steering: sample from the LM with one SAE feature pinned to a value ("Towards Monosemanticity" pins a
feature high and samples, and the text turns to what the feature stands for).

At every position the hook writes (past the first with `skip_first_position`, which the SAE never saw)

    x' = x + (v − f_i(x))·d_i          d_i = decode(e_i) − decode(0): feature i's direction in activation space

so the reconstruction's feature i reads v, and everything else in x (the other features and the SAE's error)
is left as it is. v = 0 ablates the feature wherever it fires. Both the clean and the pinned samples draw from
one seeded generator each, the same seed: with a zero direction the two are identical.

    result = steer(model, sae, hook_name, tokens_1T, feature=12, value=8.0, n_vocab=50257, n_tokens=40)
    result.clean_SN, result.pinned_SN    # LongTensor[samples, n_tokens]: the tokens after the prompt
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_stream.analysis.hooks import (
    SAELike,
    check_hook,
    chunks,
    final_residual,
    first_position,
    hook_activations,
    model_device,
    sae_dtype,
    sae_features,
    sae_in_eval_mode,
    splice_hook,
    take_contexts,
    unembed_rows,
)


class SteerResult(NamedTuple):
    feature: int
    value: float
    clean_SN: Tensor
    """Tokens sampled after the prompt by the clean LM, [samples, n_tokens] (CPU)."""
    pinned_SN: Tensor
    """The same with the feature pinned at `value`, same seed."""


@torch.no_grad()
def feature_direction(sae: SAELike, feature: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """decode(e_feature) − decode(0), [d_in]: what one unit of the feature adds to the reconstruction."""
    basis_2F = torch.zeros(2, sae.d_sae, dtype=sae_dtype(sae, dtype), device=device)
    basis_2F[0, feature] = 1.0
    recon_2D = sae.decode(basis_2F)
    return (recon_2D[0] - recon_2D[1]).to(dtype)


def pin_feature(sae: SAELike, feature: int, value: float) -> Callable[[Tensor], Tensor]:
    """The replacement x -> x + (value − f_feature(x))·d_feature, for `splice_hook`."""

    def replace(x_BTD: Tensor) -> Tensor:
        if x_BTD.numel() == 0:  # (the first step of an empty prompt: only the end-of-text, which keeps its value)
            return x_BTD
        f_BT = sae_features(sae, x_BTD)[..., feature].to(x_BTD.dtype)
        d_D = feature_direction(sae, feature, x_BTD.dtype, x_BTD.device)
        return x_BTD + (value - f_BT)[..., None] * d_D

    return replace


@torch.no_grad()
def sample(model: HookedTransformer, tokens_1T: Tensor, n_tokens: int, samples: int, temperature: float,
           seed: int, n_vocab: int, hooks: Callable[[Tensor], list[tuple[str, Any]]] = lambda tokens_BT: []) -> Tensor:
    """`samples` continuations of `n_tokens` tokens, [samples, n_tokens]: softmax(logits / temperature) over the
    tokenizer's `n_vocab` ids (not the LM's padding) at each step, the argmax at temperature 0, with the forward
    hooks `hooks(tokens_BT)` gives for the tokens so far."""
    generator = torch.Generator(device=tokens_1T.device).manual_seed(seed)
    tokens_BT = tokens_1T.expand(samples, -1)
    for _ in range(n_tokens):
        resid_BD = final_residual(model, tokens_BT, hooks(tokens_BT))[:, -1]
        logits_BV = unembed_rows(model, resid_BD).float()[:, :n_vocab]
        if temperature == 0:
            next_B = logits_BV.argmax(-1)
        else:
            probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
            next_B = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
    return tokens_BT[:, tokens_1T.shape[1]:].cpu()


@sae_in_eval_mode
def steer(model: HookedTransformer, sae: SAELike, hook_name: str, tokens_1T: Tensor, feature: int, value: float,
          n_vocab: int, n_tokens: int = 40, samples: int = 3, temperature: float = 1.0, seed: int = 0,
          skip_first_position: bool = True) -> SteerResult:
    """Clean and feature-pinned samples after the prompt `tokens_1T` (ids below `n_vocab`), same seed."""
    check_hook(model, hook_name)
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature {feature} is not a feature of this SAE: ids run from 0 to {sae.d_sae - 1}")
    if tokens_1T.shape[1] + n_tokens > model.cfg.n_ctx:
        raise ValueError(f"the prompt ({tokens_1T.shape[1]} tokens with the leading end-of-text) and {n_tokens} new "
                         f"tokens exceed the LM's context of {model.cfg.n_ctx}: ask for fewer tokens or a shorter "
                         "prompt")
    replace = pin_feature(sae, feature, value)

    def pinned(tokens_BT: Tensor) -> list[tuple[str, Any]]:
        return [(hook_name, splice_hook(replace, tokens_BT, skip_first_position))]

    clean = sample(model, tokens_1T, n_tokens, samples, temperature, seed, n_vocab)
    steered = sample(model, tokens_1T, n_tokens, samples, temperature, seed, n_vocab, pinned)
    return SteerResult(feature, float(value), clean, steered)


@sae_in_eval_mode
@torch.no_grad()
def max_activation(model: HookedTransformer, sae: SAELike, hook_name: str, token_batches: Iterable[Tensor],
                   feature: int, max_tokens: int, batch_contexts: int = 16,
                   skip_first_position: bool = True) -> tuple[float, int]:
    """(the feature's largest activation, tokens scanned) over up to `max_tokens` held-out tokens (positions
    the SAE reads: past the first with `skip_first_position`)."""
    tokens_NT = take_contexts(token_batches, max_tokens)
    start, best, seen = first_position(skip_first_position), 0.0, 0
    for tokens_BT in chunks(tokens_NT, batch_contexts, model_device(model)):
        x_BTD = hook_activations(model, hook_name, tokens_BT)[:, start:]
        best = max(best, float(sae_features(sae, x_BTD)[..., feature].max()))
        seen += x_BTD.shape[0] * x_BTD.shape[1]
    return best, seen
