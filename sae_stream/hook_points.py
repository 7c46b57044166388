"""Hook points of a HookedTransformer as sae-stream uses them: names checked against the model (a typo gets the
closest names), the optional ones switched on when asked for, and which of them an SAE can train on.

transformer-lens computes a few hooks only when a switch is on: `attn.hook_result` (each head's output in the
residual stream, [B, T, H, d_model]: H times the memory of hook_attn_out) and `hook_mlp_in`. Asking for one of
them (`buffer.hook_name`, eval, analyze, load_run) turns its switch on in that model; no other hook changes.
`hook_attn_in` and `hook_q/k/v_input` (the residual stream copied per head) are refused: their switches also
reshape ln1's hooks per head, and they hold hook_resid_pre's values.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import torch
from transformer_lens import HookedTransformer

# hook name suffix -> the HookedTransformer method that makes it fire
OPTIONAL_HOOKS = {"attn.hook_result": "set_use_attn_result", "hook_mlp_in": "set_use_hook_mlp_in"}
PER_HEAD_INPUTS = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


def check_hook_names(model: HookedTransformer, hook_names: str | Sequence[str]) -> list[str]:
    """The hook names as a list, each one's switch turned on if it is optional (enable_optional_hooks); a one-line
    ValueError for a name the model lacks, with the closest trainable names."""
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("buffer.hook_name is empty: give a hook point such as 'blocks.0.mlp.hook_post'")
    for name in names:
        if name not in model.hook_dict:
            known = [n for n in model.hook_dict if untrainable(n) is None and not n.endswith("hook_scale")
                     and not _no_mlp_in(model, n)]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(f"hook {name!r} is not in the model ({model.cfg.n_layers} layer(s)): {hint}`sae-stream "
                             "hooks --lm LM` lists the hooks an SAE can train on")
    enable_optional_hooks(model, names)
    return names


def _no_mlp_in(model: HookedTransformer, name: str) -> bool:
    """`name` is an MLP input an attention-only model has not (transformer-lens asserts on its switch)."""
    return name.endswith("hook_mlp_in") and bool(model.cfg.attn_only)


def enable_optional_hooks(model: HookedTransformer, hook_names: Sequence[str]) -> None:
    """Turn on the transformer-lens switch each optional hook among `hook_names` needs (OPTIONAL_HOOKS)."""
    for name in hook_names:
        if _no_mlp_in(model, name):
            raise ValueError(f"hook {name!r}: this attention-only model has no MLP; train on "
                             f"{name.rsplit('.', 1)[0]}.hook_resid_mid (the same values) or another hook")
        setter = next((s for suffix, s in OPTIONAL_HOOKS.items() if name.endswith(suffix)), None)
        if setter is not None:
            getattr(model, setter)(True)


def trainable_hooks(model: HookedTransformer) -> dict[str, int]:
    """{name: width per position} of every hook an SAE can train on, in the model's module order, the optional ones
    included (their switches on for one forward, then as they were)."""
    tokens = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    was = {setter: getattr(model.cfg, setter.removeprefix("set_"))
           for suffix, setter in OPTIONAL_HOOKS.items() if not _no_mlp_in(model, suffix)}
    for setter in was:
        getattr(model, setter)(True)
    try:
        _, cache = model.run_with_cache(tokens, return_type=None)
    finally:
        for setter, value in was.items():
            getattr(model, setter)(value)
    widths = {name: math.prod(cache[name].shape[2:]) for name in model.hook_dict if name in cache}
    return {name: w for name, w in widths.items() if untrainable(name, w) is None}


def untrainable(hook: str, width: int | None = None) -> str | None:
    """Why an SAE cannot train on `hook` (of `width` per position, when known), as a one-line error; None if it
    can. One rule for `sae-stream hooks` (which lists only trainable hooks) and the checks before training."""
    if hook.endswith(("hook_pattern", "hook_attn_scores")):  # [batch, head, query, key]: no vector per position
        return (f"buffer.hook_name={hook!r} holds attention patterns or scores, which eval, analyze and load_run "
                "cannot read as one vector per position: train on attn.hook_z or another [batch, pos, ...] hook")
    if hook.endswith(PER_HEAD_INPUTS):
        resid = hook.rsplit(".", 1)[0] + ".hook_resid_pre" if "." in hook else "blocks.L.hook_resid_pre"
        return (f"buffer.hook_name={hook!r} is the residual stream copied per head (transformer-lens's "
                f"use_split_qkv_input / use_attn_in, which also reshape ln1's hooks): train on {resid!r}, the same "
                "values")
    if hook.startswith("unembed."):  # the stream's forward stops before the logits (return_type None)
        return (f"buffer.hook_name={hook!r}: the stream does not run the unembedding; its input is "
                "ln_final.hook_normalized (the same values): train on that")
    if width is not None and width < 2:
        return (f"buffer.hook_name={hook!r} gives one number per position (a LayerNorm scale): an SAE needs a "
                "vector; choose another hook (`sae-stream hooks --lm ...` lists them)")
    return None
