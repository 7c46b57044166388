"""Reading and replacing one hook's activation in a HookedTransformer forward, and the contexts fed to it.

Everything downstream (evaluation, dashboard, ablation) sees a hook's activation as `x_BTD`: hooks with more
dims after [batch, pos] (attention `blocks.L.attn.hook_z` is [B, T, H, d_head]) are flattened to
D = H * d_head for the SAE and reshaped back when a replacement is spliced in.

When `skip_first_position` is set (as in `buffer.skip_first_position`), position 0 is neither read nor
replaced: the SAE never saw it during training, so it keeps its clean activation in every spliced run.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap

from sae_stream.hook_points import check_hook_names


class SAELike(Protocol):
    """What evaluation and analysis need from an SAE (sae_stream.sae.SAE satisfies it)."""

    d_in: int
    d_sae: int

    def encode(self, x_BD: Tensor) -> Tensor: ...

    def decode(self, feats_BF: Tensor) -> Tensor: ...


F = TypeVar("F", bound=Callable[..., Any])


def sae_in_eval_mode(fn: F) -> F:
    """Run `fn(model, sae, ...)` with the SAE in eval mode, then give it back in the mode it had: a BatchTopK SAE
    in train mode keeps the top-k over the whole batch, so its features would depend on what else is in it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sae = kwargs["sae"] if "sae" in kwargs else args[1]
        training = isinstance(sae, torch.nn.Module) and sae.training
        if training:
            sae.eval()
        try:
            return fn(*args, **kwargs)
        finally:
            if training:
                sae.train()

    return wrapper  # type: ignore[return-value]


Replace = Callable[[Tensor], Tensor]
"""Maps the spliced positions' activation `x_BTD` to its replacement of the same shape."""


def stop_layer(model: HookedTransformer, hook_name: str) -> int | None:
    """The `stop_at_layer` that still runs `hook_name` (None: the whole model), so reads skip the unembedding."""
    if hook_name in ("hook_embed", "hook_pos_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) + 1 if m else None


def flatten_BTD(act: Tensor, tokens_BT: Tensor) -> Tensor:
    if act.dim() < 3 or act.shape[:2] != tokens_BT.shape:
        raise ValueError(f"hook activation has shape {tuple(act.shape)}: only hooks shaped [batch, pos, ...] "
                         "can be read by an SAE (not attention patterns or scores)")
    return act.reshape(*act.shape[:2], -1)


def first_position(skip_first_position: bool) -> int:
    return 1 if skip_first_position else 0


@torch.no_grad()
def hook_activations(model: HookedTransformer, hook_name: str, tokens_BT: Tensor) -> Tensor:
    """The clean activation at `hook_name` as x_BTD; the forward stops after the hooked block."""
    check_hook_names(model, hook_name)  # (an optional hook switched on)
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        captured["x_BTD"] = flatten_BTD(act, tokens_BT)

    model.run_with_hooks(tokens_BT, fwd_hooks=[(hook_name, capture)], stop_at_layer=stop_layer(model, hook_name))
    return captured["x_BTD"]


def splice_hook(replace: Replace, tokens_BT: Tensor, skip_first_position: bool) -> Callable[[Tensor, Any], Tensor]:
    """A forward hook writing `replace(x)` over positions >= first_position (others keep their clean value)."""
    start = first_position(skip_first_position)

    def hook(act: Tensor, hook: Any) -> Tensor:
        x_BTD = flatten_BTD(act, tokens_BT)
        new_BTD = replace(x_BTD[:, start:]).to(x_BTD.dtype)
        if start:
            new_BTD = torch.cat([x_BTD[:, :start], new_BTD], dim=1)
        return new_BTD.reshape(act.shape)

    return hook


@torch.no_grad()
def final_residual(model: HookedTransformer, tokens_BT: Tensor,
                   fwd_hooks: Iterable[tuple[str, Callable[[Tensor, Any], Tensor | None]]] = ()) -> Tensor:
    """What the unembedding reads, [B, T, d_model]: the residual after ln_final, with `fwd_hooks` applied (any
    hook but the unembedding's own). With `unembed_rows` it gives the logits of chosen positions, or of all
    of them a slice at a time, without a full forward's [B, T, d_vocab] tensor."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        resid_BTD = model(tokens_BT, stop_at_layer=model.cfg.n_layers)
        if model.cfg.normalization_type is not None:
            resid_BTD = model.ln_final(resid_BTD)
    return resid_BTD


@torch.no_grad()
def unembed_rows(model: HookedTransformer, resid_ND: Tensor) -> Tensor:
    """Logits [N, d_vocab] of rows of `final_residual`, as the model's forward makes them: the unembedding,
    then the soft cap of models that have one. (A plain matmul: `model.unembed` would copy W_U on every call.)"""
    logits_NV = torch.addmm(model.b_U, resid_ND, model.W_U)
    return apply_softcap(logits_NV, model.cfg.output_logits_soft_cap)


def check_not_unembed(hook_name: str) -> None:
    """Spliced runs stop at the unembedding's input, so its own hooks cannot be replaced there."""
    if hook_name.startswith("unembed."):
        raise ValueError(f"{hook_name!r} is the unembedding's own hook: splice at ln_final.hook_normalized, which "
                         "holds the values unembed.hook_in reads")


@torch.no_grad()
def spliced_logits(model: HookedTransformer, hook_name: str, tokens_BT: Tensor, replace: Replace,
                   skip_first_position: bool) -> Tensor:
    """Full-model logits [B, T, V] with the hook's activation replaced."""
    check_hook_names(model, hook_name)  # (an optional hook switched on)
    hook = splice_hook(replace, tokens_BT, skip_first_position)
    return model.run_with_hooks(tokens_BT, fwd_hooks=[(hook_name, hook)])


def sae_dtype(sae: SAELike, default: torch.dtype) -> torch.dtype:
    w = getattr(sae, "W_dec_FD", None)
    return w.dtype if isinstance(w, Tensor) else default


@torch.no_grad()
def sae_features(sae: SAELike, x_BTD: Tensor) -> Tensor:
    """feats_BTF for activations x_BTD (any leading dims), in the SAE's dtype."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1]).to(sae_dtype(sae, x_BTD.dtype))
    return sae.encode(x_ND).reshape(*x_BTD.shape[:-1], -1)


@torch.no_grad()
def sae_decode(sae: SAELike, feats_BTF: Tensor, like_BTD: Tensor) -> Tensor:
    recon_ND = sae.decode(feats_BTF.reshape(-1, feats_BTF.shape[-1]))
    return recon_ND.reshape(like_BTD.shape).to(like_BTD.dtype)


def check_sae(sae: SAELike, d_in: int, hook_name: str) -> None:
    if getattr(sae, "d_in", d_in) != d_in:
        raise ValueError(f"SAE d_in ({sae.d_in}) does not match hook {hook_name!r} width ({d_in}): "
                         "evaluate the SAE on the hook it was trained on")


def model_device(model: HookedTransformer) -> torch.device:
    return model.W_U.device


@contextmanager
def fp32_matmuls() -> Iterator[None]:
    """Full-precision fp32 matmuls inside (a context manager, or `@fp32_matmuls()` on a function): train.tf32
    switches TF32 on process-wide, and what eval, compare and the dashboard report must not depend on whether
    training ran in the same process (`sae-stream run`) or not (TF32 moves a correlation of 1 by ~2e-4)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def take_contexts(token_batches: Iterable[Tensor], max_tokens: int) -> Tensor:
    """Concatenate batches [B, T] into CPU token ids [N, T], N = ceil(max_tokens / T) contexts at most.

    Only the token ids are materialised (8 bytes a token), so several passes over the same held-out
    contexts cost no extra data loading.
    """
    rows: list[Tensor] = []
    n_tokens, width = 0, None
    for batch_BT in token_batches:
        if batch_BT.dim() != 2:
            raise ValueError(f"token batches must be [batch, pos], got shape {tuple(batch_BT.shape)}")
        if width is not None and batch_BT.shape[1] != width:
            raise ValueError(f"token batches must share one context length, got {width} and {batch_BT.shape[1]}")
        width = batch_BT.shape[1]
        need = -(-(max_tokens - n_tokens) // width)
        rows.append(batch_BT[:need].detach().to("cpu", torch.long))
        n_tokens += rows[-1].numel()
        if n_tokens >= max_tokens:
            break
    if not rows:
        raise ValueError("no token batches to evaluate on: check the held-out data source")
    return torch.cat(rows)


def chunks(tokens_NT: Tensor, batch_contexts: int, device: torch.device) -> Iterator[Tensor]:
    for i in range(0, tokens_NT.shape[0], batch_contexts):
        yield tokens_NT[i : i + batch_contexts].to(device)
