"""Our GPT as a transformer-lens HookedTransformer, so any hook point can feed the SAE.

The weights are copied as they are: no LayerNorm folding or weight centering, so the hooked model's logits equal
the GPT's (fp32: max abs diff ~1e-6) and its hook activations are the GPT's own.

    model = load_hooked("runs/lm")            # a run dir written by `lm train`
    model = load_hooked("gelu-1l")            # or any transformer-lens model name (needs the HF hub or its cache)
    hook_names(model)                         # ['hook_embed', ..., 'blocks.0.mlp.hook_post', ...]
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lm.model import GPT
from sae_stream.hub import hub_unreachable_reason
from sae_stream.rundir import first_line


def hooked_config(gpt: GPT, device: str | torch.device = "cpu") -> HookedTransformerConfig:
    c = gpt.cfg
    return HookedTransformerConfig(
        model_name="sae-stream-gpt", n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads,
        d_head=c.d_model // c.n_heads, d_mlp=c.d_mlp, d_vocab=c.vocab_size, d_vocab_out=c.vocab_size, n_ctx=c.n_ctx,
        act_fn=c.act_fn,  # TL's 'gelu' is F.gelu (exact erf), like nn.GELU(approximate='none'); 'relu' is F.relu
        normalization_type="LN", positional_embedding_type="standard", eps=1e-5,  # nn.LayerNorm's eps
        default_prepend_bos=False,  # our contexts carry no BOS
        init_weights=False, dtype=torch.float32, device=str(device),
    )


def _block_state(gpt: GPT, layer: int) -> dict[str, torch.Tensor]:
    """One block's weights in TL's layout: W_Q/W_K/W_V [H, D, d], b_Q.. [H, d], W_O [H, d, D], W_in [D, M]."""
    b = gpt.blocks[layer]
    D, H = gpt.cfg.d_model, gpt.cfg.n_heads
    W_qkv_3DD = b.attn.c_attn.weight.view(3, D, D)  # nn.Linear stores [out, in]
    b_qkv_3D = b.attn.c_attn.bias.view(3, D)
    out = {}
    for i, name in enumerate("QKV"):
        out[f"W_{name}"] = W_qkv_3DD[i].T.reshape(D, H, D // H).permute(1, 0, 2)  # [D, H*d] -> [H, D, d]
        out[f"b_{name}"] = b_qkv_3D[i].view(H, D // H)
    out["W_O"] = b.attn.c_proj.weight.T.reshape(H, D // H, D)  # [H*d, D] -> [H, d, D]
    out["b_O"] = b.attn.c_proj.bias
    p = f"blocks.{layer}."
    sd = {p + "attn." + k: v for k, v in out.items()}
    sd |= {p + "ln1.w": b.ln_1.weight, p + "ln1.b": b.ln_1.bias, p + "ln2.w": b.ln_2.weight, p + "ln2.b": b.ln_2.bias}
    sd |= {p + "mlp.W_in": b.mlp.c_fc.weight.T, p + "mlp.b_in": b.mlp.c_fc.bias,
           p + "mlp.W_out": b.mlp.c_proj.weight.T, p + "mlp.b_out": b.mlp.c_proj.bias}
    return sd


@torch.no_grad()
def to_hooked(gpt: GPT, device: str | torch.device | None = None) -> HookedTransformer:
    """A HookedTransformer computing exactly `gpt` (fp32 copy of the weights, on `device` or the GPT's device)."""
    device = device if device is not None else gpt.wte.weight.device
    with warnings.catch_warnings():  # TL 3.x deprecates HookedTransformer for TransformerBridge; we want its hooks
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        model = HookedTransformer(hooked_config(gpt, device), move_to_device=True)
    sd = {"embed.W_E": gpt.wte.weight, "pos_embed.W_pos": gpt.wpe.weight,
          "ln_final.w": gpt.ln_f.weight, "ln_final.b": gpt.ln_f.bias,
          "unembed.W_U": gpt.wte.weight.T,  # tied in the GPT; TL keeps its own copy
          "unembed.b_U": torch.zeros(gpt.cfg.vocab_size)}
    for layer in range(gpt.cfg.n_layers):
        sd |= _block_state(gpt, layer)
    full = model.state_dict()  # keeps TL's own buffers (attention masks, IGNORE)
    for k, v in sd.items():
        if full[k].shape != v.shape:
            raise ValueError(f"TL weight {k} is {tuple(full[k].shape)} but the GPT gives {tuple(v.shape)}")
        full[k] = v.detach().to(device=full[k].device, dtype=torch.float32).contiguous()
    model.load_state_dict(full, strict=True)
    return model.eval()


def hook_names(model: HookedTransformer) -> list[str]:
    """Every hook point of the model, in module order (e.g. 'blocks.0.mlp.hook_post')."""
    return list(model.hook_dict)


def load_hooked(path_or_name: str | Path | HookedTransformer, device: str | torch.device = "cpu") -> HookedTransformer:
    """A run dir written by `lm train`, a transformer-lens model name, or a HookedTransformer (returned as is)."""
    if isinstance(path_or_name, HookedTransformer):
        return path_or_name
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.exists():
        return to_hooked(GPT.from_run_dir(path), device=device)
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(text)  # TL names may contain '/', so look the name up before calling it a path
    except ValueError:
        if os.sep in text or text.startswith((".", "~")):
            raise ValueError(f"LM run dir {text!r} does not exist: pass a directory written by `lm train`") from None
        raise ValueError(f"{text!r} is neither an LM run dir nor a transformer-lens model name: "
                         f"pass a directory written by `lm train` or a name such as 'gelu-1l'") from None
    return _from_pretrained(text, device)


def _from_pretrained(name: str, device: str | torch.device) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    hint = "pass a local run dir from `lm train` instead"
    # without a connection from_pretrained spends ~30 s in retries before failing; the check goes through
    # HTTPS_PROXY when one is set, and a hanging DNS lookup is bounded
    if not _is_cached(get_official_model_name(name)) and \
            (why := hub_unreachable_reason(offline_vars=("HF_HUB_OFFLINE",))) is not None:
        raise ValueError(f"could not download model {name!r} (offline: {why}); {hint}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
            return HookedTransformer.from_pretrained(name, device=str(device))
    except Exception as e:  # noqa: BLE001 - network/hub errors come in many types; report one line
        raise ValueError(f"could not download model {name!r} ({first_line(e)}); {hint}") from None


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


