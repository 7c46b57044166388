"""Feature steering: sample from the LM with SAE features pinned to values (Anthropic's dictionary-learning
papers hold a feature high while the model samples, to show what it does).

At every position the hook writes (past the first with `skip_first_position`, which the SAE never saw)

    x' = x + Σ_i (v_i − f_i(x))·d_i          d_i = decode(e_i) − decode(0): feature i's direction in activation space

so the reconstruction's pinned features read their v_i, and everything else in x (the other features and the
SAE's error) is left as it is. v = 0 ablates a feature wherever it fires. The clean and the pinned samples run in
one batch and read the same seeded noise (`sample`): with zero directions the two are identical.

    result = steer(model, sae, hook_name, tokens_1T, feature=12, value=8.0, n_vocab=50257, n_tokens=40)
    result = steer(model, sae, hook_name, tokens_1T, feature=[12, 40], value=[8.0, 0.0], n_vocab=50257)
    result.clean_SN, result.pinned_SN    # LongTensor[samples, n_tokens]: the tokens after the prompt
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_stream.analysis.hooks import (
    SAELike,
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
from sae_stream.hook_points import check_hook_names


class SteerResult(NamedTuple):
    feature: int | tuple[int, ...]
    """The feature pinned, or the features (a tuple) when several were."""
    value: float | tuple[float, ...]
    clean_SN: Tensor
    """Tokens sampled after the prompt by the clean LM, [samples, n_tokens] (CPU)."""
    pinned_SN: Tensor
    """The same with the feature pinned at `value`, same seed."""


def as_features(feature: int | Sequence[int]) -> tuple[list[int], bool]:
    """One feature id or several: (the ids as a list, whether several were given, even if one)."""
    several = isinstance(feature, (list, tuple, Tensor))
    return ([int(f) for f in feature] if several else [int(feature)]), several


def pin_values(value: Any, n: int) -> list:
    """The pin values of n features: one value for them all, or a list of one each."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{len(values)} pin values for {n} features: give one value, or one each")
    return values


def check_steer(model: HookedTransformer, sae: SAELike, hook_name: str, prompt_tokens: int,
                feature: int | Sequence[int], n_tokens: int, samples: int, temperature: float) -> None:
    """One-line errors for what `steer` cannot do, before any work."""
    check_hook_names(model, hook_name)
    check_not_unembed(hook_name)  # (the samples' forward stops before the unembedding: its hook would never run)
    features, _ = as_features(feature)
    for f in features:
        if not 0 <= f < sae.d_sae:
            raise ValueError(f"feature {f} is not a feature of this SAE: ids run from 0 to {sae.d_sae - 1}")
    if not features or len(set(features)) < len(features):
        raise ValueError(f"features to pin: {features}: give at least one, each once")
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
def feature_directions(sae: SAELike, features_R: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """decode(e_f) − decode(0) for each feature f of `features_R`, [R, d_in]: what one unit of it adds to the
    reconstruction (its decoder row, in activation space)."""
    basis_RF = torch.zeros(len(features_R) + 1, sae.d_sae, dtype=sae_dtype(sae, dtype), device=features_R.device)
    basis_RF[torch.arange(len(features_R), device=features_R.device), features_R] = 1.0
    recon_RD = sae.decode(basis_RF)
    return (recon_RD[:-1] - recon_RD[-1]).to(dtype)


def pin_features(sae: SAELike, features_R: Tensor, values_R: Tensor) -> Callable[[Tensor], Tensor]:
    """The replacement for `splice_hook` that splits a batch into R equal groups of consecutive rows (`sample`'s
    copies) and pins, in group r, feature features_R[r] at values_R[r] (or, given [R, K], the K features of row r
    at theirs): x -> x + Σ (v − f(x))·d. A NaN value leaves its feature as it is (clean rows beside pinned ones)."""
    features_RK, values_RK = features_R.reshape(len(features_R), -1), values_R.reshape(len(values_R), -1)
    cache: dict[Any, Tensor] = {}

    def replace(x_BTD: Tensor) -> Tensor:
        if x_BTD.numel() == 0:  # (the first step of an empty prompt: only the end-of-text, which keeps its value)
            return x_BTD
        key = x_BTD.device
        if key not in cache:
            cache[key] = feature_directions(sae, features_RK.to(key).flatten()).view(*features_RK.shape, -1)
        (B, T, _), K = x_BTD.shape, features_RK.shape[1]
        rows = torch.arange(B, device=key) // (B // len(features_RK))
        feature_BK, value_BK = features_RK.to(key)[rows], values_RK.to(key, torch.float32)[rows]
        # (in fp32: a bf16 LM's x keeps its error exactly but for the one rounding at the end)
        f_BTK = sae_features(sae, x_BTD).float().gather(-1, feature_BK[:, None, :].expand(-1, T, K))
        shift_BTK = torch.nan_to_num((value_BK[:, None, :] - f_BTK), nan=0.0)
        return (x_BTD.float() + (shift_BTK[..., None] * cache[key][rows][:, None]).sum(2)).to(x_BTD.dtype)

    return replace


def pin_feature(sae: SAELike, feature: int, value: float) -> Callable[[Tensor], Tensor]:
    """The replacement x -> x + (value − f_feature(x))·d_feature, for `splice_hook`, in every row."""
    return pin_features(sae, torch.tensor([feature]), torch.tensor([float(value)]))


def pinned_hooks(sae: SAELike, hook_name: str, feature: int | Tensor, value: float | Tensor,
                 skip_first_position: bool = True) -> Callable[[Tensor], list[tuple[str, Any]]]:
    """`sample`'s hooks for a feature pinned at `value` in every row (or, given tensors, feature[r] at value[r]
    in copy r: `pin_features`)."""
    if isinstance(feature, Tensor):
        replace = pin_features(sae, feature, torch.as_tensor(value))
    else:
        replace = pin_feature(sae, feature, float(value))
    return lambda tokens_BT: [(hook_name, splice_hook(replace, tokens_BT, skip_first_position))]


@torch.no_grad()
def sample(model: HookedTransformer, tokens_1T: Tensor, n_tokens: int, samples: int, temperature: float,
           seed: int, n_vocab: int, hooks: Callable[[Tensor], list[tuple[str, Any]]] = lambda tokens_BT: [],
           copies: int = 1) -> Tensor:
    """`samples` continuations of `n_tokens` tokens, [copies · samples, n_tokens] (row c·samples + s: copy c of
    sample s): at each step the argmax of logits / temperature + Gumbel noise over the tokenizer's `n_vocab` ids
    (not the LM's padding), which draws from softmax(logits / temperature); the argmax of the logits at temperature
    0. Sample s's noise comes from (`seed`, s) alone (not from how many samples are drawn) and every copy of it
    reads the same noise, so copies whose forward hooks (`hooks(tokens_BT)`, for the tokens so far) change nothing
    make the same tokens, and a pin's effect is not hidden by different draws; copies of one sample differ only
    where their distributions do."""
    tokens_1T = tokens_1T.to(model_device(model))
    generators = [torch.Generator(device=tokens_1T.device).manual_seed(sample_seed(seed, s)) for s in range(samples)]
    tokens_BT = tokens_1T.expand(copies * samples, -1)
    for _ in range(n_tokens):
        resid_BD = final_residual(model, tokens_BT, hooks(tokens_BT))[:, -1]
        logits_BV = unembed_rows(model, resid_BD).float()[:, :n_vocab]
        if temperature == 0:
            next_B = logits_BV.argmax(-1)
        else:  # (the max subtracted first: a tiny temperature would make inf - inf of the logits otherwise)
            u_SV = torch.stack([torch.rand(logits_BV.shape[1], generator=g, device=logits_BV.device)
                                for g in generators])
            gumbel_BV = (-torch.log(-torch.log(u_SV))).repeat(copies, 1)
            next_B = ((logits_BV - logits_BV.max(-1, keepdim=True).values) / temperature + gumbel_BV).argmax(-1)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
    return tokens_BT[:, tokens_1T.shape[1]:].cpu()


def sample_seed(seed: int, s: int) -> int:
    """The seed of sample s's noise: a hash of (seed, s), so sample s is the same however many are drawn."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(), "little") >> 1


@sae_in_eval_mode
def steer(model: HookedTransformer, sae: SAELike, hook_name: str, tokens_1T: Tensor, feature: int | Sequence[int],
          value: float | Sequence[float], n_vocab: int, n_tokens: int = 40, samples: int = 3, temperature: float = 1.0,
          seed: int = 0, skip_first_position: bool = True) -> SteerResult:
    """Clean samples after the prompt `tokens_1T` (ids below `n_vocab`) and samples with `feature` pinned at
    `value` (or the features at their values, pinned together; one value for them all, or one each), same seed."""
    check_steer(model, sae, hook_name, tokens_1T.shape[1], feature, n_tokens, samples, temperature)
    features, several = as_features(feature)
    values = [float(v) for v in pin_values(value, len(features))]
    # one batch: copy 0 clean (NaN pins change nothing), copy 1 pinned; the same noise for both
    both = pinned_hooks(sae, hook_name, torch.tensor([features, features]),
                        torch.tensor([[math.nan] * len(features), values]), skip_first_position)
    out = sample(model, tokens_1T, n_tokens, samples, temperature, seed, n_vocab, both, copies=2)
    return SteerResult(tuple(features) if several else features[0], tuple(values) if several else values[0],
                       out[:samples], out[samples:])


@sae_in_eval_mode
@torch.no_grad()
def max_activation(model: HookedTransformer, sae: SAELike, hook_name: str, token_batches: Iterable[Tensor],
                   feature: int | Sequence[int], max_tokens: int, batch_contexts: int = 16,
                   skip_first_position: bool = True) -> tuple[float | list[float], int]:
    """(the feature's largest activation, or each listed feature's, tokens scanned) over up to `max_tokens`
    held-out tokens (positions the SAE reads: past the first with `skip_first_position`)."""
    tokens_NT = take_contexts(token_batches, max_tokens)
    features, several = as_features(feature)
    start, best, seen = first_position(skip_first_position), [0.0] * len(features), 0
    for tokens_BT in chunks(tokens_NT, batch_contexts, model_device(model)):
        x_BTD = hook_activations(model, hook_name, tokens_BT)[:, start:]
        tops = sae_features(sae, x_BTD)[..., features].flatten(0, -2).amax(0).tolist() if x_BTD.numel() else best
        best = [max(b, float(t)) for b, t in zip(best, tops)]
        seen += x_BTD.shape[0] * x_BTD.shape[1]
    return (best if several else best[0]), seen
