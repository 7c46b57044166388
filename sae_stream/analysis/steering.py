"""Feature steering: sample from the LM with one SAE feature pinned to a value (Anthropic's dictionary-learning
papers hold a feature high while the model samples, to show what it does).

At every position the hook writes (past the first with `skip_first_position`, which the SAE never saw)

    x' = x + (v − f_i(x))·d_i          d_i = decode(e_i) − decode(0): feature i's direction in activation space

so the reconstruction's feature i reads v, and everything else in x (the other features and the SAE's error)
is left as it is. v = 0 ablates the feature wherever it fires. Both the clean and the pinned samples draw from
one seeded generator each, the same seed: with a zero direction the two are identical.

    result = steer(model, sae, hook_name, tokens_1T, feature=12, value=8.0, n_vocab=50257, n_tokens=40)
    result.clean_SN, result.pinned_SN    # LongTensor[samples, n_tokens]: the tokens after the prompt
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_stream.analysis.hooks import (
    SAELike,
    check_hook,
    check_not_unembed,
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


def check_steer(model: HookedTransformer, sae: SAELike, hook_name: str, prompt_tokens: int, feature: int,
                n_tokens: int, samples: int, temperature: float) -> None:
    """One-line errors for what `steer` cannot do, before any work."""
    check_hook(model, hook_name)
    check_not_unembed(hook_name)  # (the samples' forward stops before the unembedding: its hook would never run)
    if not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature {feature} is not a feature of this SAE: ids run from 0 to {sae.d_sae - 1}")
    if n_tokens < 1 or samples < 1 or not temperature >= 0:
        raise ValueError(f"steering needs tokens >= 1, samples >= 1 and temperature >= 0 (got {n_tokens}, {samples}, "
                         f"{temperature})")
    if prompt_tokens < 1:
        raise ValueError("the prompt has no tokens: start it with the end-of-text token, as documents are")
    if prompt_tokens + n_tokens > model.cfg.n_ctx:
        raise ValueError(f"the prompt ({prompt_tokens} tokens with the leading end-of-text) and {n_tokens} new tokens "
                         f"exceed the LM's context of {model.cfg.n_ctx}: ask for fewer tokens or a shorter prompt")


def pin_value(value: float | str) -> tuple[float, bool]:
    """(the number, whether it is a multiple of the largest activation) of a pin value: 8.5, "8.5" or "5x"."""
    text = str(value).strip()
    multiple = text.endswith("x")
    try:
        number = float(text[:-1] if multiple else text)
    except ValueError:
        raise ValueError(f"pin value {value!r}: give a number (the activation) or Nx (N times the feature's largest "
                         "held-out activation), e.g. 8.5 or 5x") from None
    if not math.isfinite(number) or (multiple and number < 0):
        raise ValueError(f"pin value {value!r}: give a finite number, or Nx with N >= 0")
    return number, multiple


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
        f_BT = sae_features(sae, x_BTD)[..., feature].float()  # (in fp32: a bf16 LM's x keeps its error exactly
        d_D = feature_direction(sae, feature, torch.float32, x_BTD.device)  # but for the one rounding at the end)
        return (x_BTD.float() + (value - f_BT)[..., None] * d_D).to(x_BTD.dtype)

    return replace


def pinned_hooks(sae: SAELike, hook_name: str, feature: int, value: float,
                 skip_first_position: bool = True) -> Callable[[Tensor], list[tuple[str, Any]]]:
    """`sample`'s hooks for a feature pinned at `value`."""
    replace = pin_feature(sae, feature, value)
    return lambda tokens_BT: [(hook_name, splice_hook(replace, tokens_BT, skip_first_position))]


@torch.no_grad()
def sample(model: HookedTransformer, tokens_1T: Tensor, n_tokens: int, samples: int, temperature: float,
           seed: int, n_vocab: int, hooks: Callable[[Tensor], list[tuple[str, Any]]] = lambda tokens_BT: []) -> Tensor:
    """`samples` continuations of `n_tokens` tokens, [samples, n_tokens]: softmax(logits / temperature) over the
    tokenizer's `n_vocab` ids (not the LM's padding) at each step, the argmax at temperature 0, with the forward
    hooks `hooks(tokens_BT)` gives for the tokens so far."""
    tokens_1T = tokens_1T.to(model_device(model))
    generator = torch.Generator(device=tokens_1T.device).manual_seed(seed)
    tokens_BT = tokens_1T.expand(samples, -1)
    for _ in range(n_tokens):
        resid_BD = final_residual(model, tokens_BT, hooks(tokens_BT))[:, -1]
        logits_BV = unembed_rows(model, resid_BD).float()[:, :n_vocab]
        if temperature == 0:
            next_B = logits_BV.argmax(-1)
        else:  # (the max subtracted first: a tiny temperature would make inf - inf of the logits otherwise)
            logits_BV = logits_BV - logits_BV.max(-1, keepdim=True).values
            probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
            next_B = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
    return tokens_BT[:, tokens_1T.shape[1]:].cpu()


@sae_in_eval_mode
def steer(model: HookedTransformer, sae: SAELike, hook_name: str, tokens_1T: Tensor, feature: int, value: float,
          n_vocab: int, n_tokens: int = 40, samples: int = 3, temperature: float = 1.0, seed: int = 0,
          skip_first_position: bool = True) -> SteerResult:
    """Clean and feature-pinned samples after the prompt `tokens_1T` (ids below `n_vocab`), same seed."""
    check_steer(model, sae, hook_name, tokens_1T.shape[1], feature, n_tokens, samples, temperature)
    clean = sample(model, tokens_1T, n_tokens, samples, temperature, seed, n_vocab)
    pinned = pinned_hooks(sae, hook_name, feature, value, skip_first_position)
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
