"""Export to (and load from) SAELens's on-disk format, so `SAE.load_from_disk(dir)` in SAELens works.

    export_saelens(sae, "runs/x/saelens", hook_name="blocks.0.mlp.hook_post", log10_density=d_F)
    sae = load_saelens("runs/x/saelens")

The directory holds `cfg.json`, `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec; + threshold for jumprelu) and, if densities are given, `sparsity.safetensors` (key 'sparsity': log10
feature density). cfg.json carries both SAELens >= 6 fields (top-level d_in/d_sae/dtype/device/
apply_b_dec_to_input/normalize_activations/reshape_activations/architecture/k + a `metadata` block) and the
older flat ones (model_name, hook_name/hook_point, hook_layer, hook_head_index, activation_fn_str, context_size,
dataset_path, prepend_bos, finetuning_scaling_factor ...); each SAELens version ignores the keys it doesn't know.
Our own config sits under `sae_stream` so `load_saelens` rebuilds the exact architecture.

Architecture mapping:
- anthropic -> 'standard' (apply_b_dec_to_input true).
- april -> 'standard' with apply_b_dec_to_input false and the input scale s FOLDED into the weights
  (W_enc·s, W_dec/s, b_dec/s; normalize_activations 'none'), so the exported SAE runs on raw activations and
  produces the same features and reconstructions as ours.
- topk -> 'topk' with k (rescale_acts_by_decoder_norm false).
- batchtopk -> 'jumprelu' with threshold θ (the running threshold used at inference) for every feature — what
  SAELens itself saves BatchTopK SAEs as; its jumprelu keeps pre·[pre > θ], which is our inference rule.
  Its sparsity.safetensors counts training-time firing (batch top-k), as SAELens's does, not the θ rule.
- jumprelu -> 'jumprelu' with its per-feature thresholds, the input scale folded in as for april.
A SAELens 'jumprelu' SAE that we did not write loads as our jumprelu (any thresholds). A file we did not write
whose apply_b_dec_to_input (true when absent, as in SAELens) differs from our architecture's (a 'topk' one with
false, a 'jumprelu' one with true) has b_dec·W_enc folded into b_enc: the same pre-activations either way.
All files are written atomically; cfg.json goes last, so a directory with a cfg.json is complete.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from sae_stream.checkpoint import atomic_write_bytes, atomic_write_json
from sae_stream.config import SAEConfig
from sae_stream.sae import SAE, build_sae

SAELENS_ARCH = {"anthropic": "standard", "april": "standard", "topk": "topk", "batchtopk": "jumprelu",
                "jumprelu": "jumprelu"}
FORMAT_VERSION = "6.0.0"  # the SAELens config layout we write (with the pre-6 keys alongside)
# keys SAELens 6.x accepts in `metadata` (it builds a dataclass from them, so nothing else goes there)
METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size", "dataset_path", "prepend_bos",
                 "seqpos_slice", "model_from_pretrained_kwargs", "sae_lens_version", "sae_lens_training_version")


@torch.no_grad()
def saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """Our parameters in SAELens's names, with april's input scale folded in (float32, CPU, contiguous)."""
    s = float(sae.input_scale)
    out = {
        "W_enc": sae.W_enc_DF * s,
        "b_enc": sae.b_enc_F.clone(),
        "W_dec": sae.W_dec_FD / s,
        "b_dec": sae.b_dec_D / s,
    }
    if sae.cfg.architecture == "batchtopk":
        out["threshold"] = torch.full_like(sae.b_enc_F, float(sae.threshold.clamp_min(0.0)))
    if sae.cfg.architecture == "jumprelu":  # pre-activations are unchanged by the folding: θ carries over as is
        out["threshold"] = sae.threshold_F
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def hook_layer(hook_name: str, n_layers: int | None = None) -> int:
    """The block a hook belongs to (older SAELens runs the model to `hook_layer + 1`): blocks.N.* -> N; after the
    last block (ln_final.*, unembed.*) the last block, given n_layers; embeddings (and unknown: no n_layers) 0."""
    block = re.match(r"blocks\.(\d+)\.", hook_name)
    if block:
        return int(block.group(1))
    return n_layers - 1 if n_layers and hook_name.startswith(("ln_final.", "unembed.")) else 0


def saelens_cfg(sae: SAE, hook_name: str, model_name: str, extra_cfg: dict[str, Any] | None = None,
                n_layers: int | None = None) -> dict:
    """cfg.json contents (both SAELens >= 6 and older field names)."""
    arch = SAELENS_ARCH[sae.cfg.architecture]
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.subtract_b_dec,
        "normalize_activations": "none",
        # an attention hook_z SAE reads [..., heads, d_head] flattened head-major, as SAELens's "hook_z" mode does
        "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_point": hook_name,
        "hook_layer": hook_layer(hook_name, n_layers),
        "hook_head_index": None,
        "hook_point_head_index": None,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": sae.cfg.k} if arch == "topk" else {},
        "finetuning_scaling_factor": False,
        "context_size": None,
        "dataset_path": None,
        "prepend_bos": False,
        "sae_lens_version": FORMAT_VERSION,
        "sae_lens_training_version": None,
    }
    if arch == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    cfg.update(extra_cfg or {})
    cfg["activation_fn"] = cfg["activation_fn_str"]
    cfg["metadata"] = {k: cfg[k] for k in METADATA_KEYS if k in cfg}
    cfg["sae_stream"] = {"sae": dataclasses.asdict(sae.cfg), "input_scale_folded": float(sae.input_scale)}
    return cfg


def export_saelens(sae: SAE, out_dir: Path | str, hook_name: str, log10_density: torch.Tensor | None = None,
                   model_name: str = "unknown", extra_cfg: dict[str, Any] | None = None,
                   n_layers: int | None = None) -> Path:
    """Write `sae` as a SAELens SAE directory; extra_cfg adds/overrides cfg.json keys (context_size,
    dataset_path, prepend_bos, ...); n_layers (the model's) places hooks after the last block. Returns the
    directory."""
    out = Path(out_dir)
    if log10_density is not None and tuple(log10_density.shape) != (sae.d_sae,):
        raise ValueError(f"log10_density has shape {tuple(log10_density.shape)}; expected ({sae.d_sae},)")
    atomic_write_bytes(out / "sae_weights.safetensors", save(saelens_tensors(sae)))
    if log10_density is not None:
        sparsity = {"sparsity": log10_density.detach().float().cpu().contiguous()}
        atomic_write_bytes(out / "sparsity.safetensors", save(sparsity))
    else:  # an earlier export's densities would no longer describe these weights
        (out / "sparsity.safetensors").unlink(missing_ok=True)
    atomic_write_json(out / "cfg.json", saelens_cfg(sae, hook_name, model_name, extra_cfg, n_layers))
    return out


def _sae_config_from(cfg: dict[str, Any]) -> SAEConfig:
    """Ours if we wrote it; otherwise the SAELens architecture mapped to ours."""
    if "sae_stream" in cfg:
        return SAEConfig(**cfg["sae_stream"]["sae"])
    arch = cfg.get("architecture", "standard")
    if arch == "standard":
        ours = "anthropic" if cfg.get("apply_b_dec_to_input", True) else "april"
    elif arch in ("topk", "jumprelu"):
        ours = arch
    else:
        raise ValueError(f"cannot load a SAELens {arch!r} SAE: supported are standard, topk and jumprelu")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise ValueError(f"cannot load normalize_activations={cfg['normalize_activations']!r}: fold it first")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 1
    return SAEConfig(architecture=ours, d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=int(k))


@torch.no_grad()
def load_saelens(path: Path | str, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens-format directory (ours, or SAELens's standard / topk / jumprelu)."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        inner = path / "sae"
        hint = f" (a run directory: its SAE is in {str(inner)!r})" if (inner / "cfg.json").is_file() else ""
        raise ValueError(f"{str(path)!r} has no cfg.json: point at a directory written by export_saelens or SAELens"
                         + hint)
    cfg = json.loads((path / "cfg.json").read_text())
    sae_cfg = _sae_config_from(cfg)
    tensors = load_file(str(path / "sae_weights.safetensors"))
    sae = build_sae(sae_cfg, int(cfg["d_in"]), seed=0)
    sae.W_enc_DF.copy_(tensors["W_enc"])
    sae.b_enc_F.copy_(tensors["b_enc"])
    sae.W_dec_FD.copy_(tensors["W_dec"])
    sae.b_dec_D.copy_(tensors["b_dec"])
    sae.input_scale.fill_(1.0)  # folded into the weights at export
    if sae_cfg.architecture == "batchtopk":
        thr = tensors["threshold"]
        if not torch.all(thr == thr[0]):
            raise ValueError(f"{str(path)!r}: a BatchTopK SAE needs one threshold shared by all features")
        sae.threshold.fill_(float(thr[0]))
    if sae_cfg.architecture == "jumprelu":
        sae.log_threshold_F.copy_(tensors["threshold"].clamp_min(0.0).log())  # (θ 0: -inf, fires when pre > 0)
    # a file whose encoder input (SAELens's apply_b_dec_to_input, true unless it says) differs from ours:
    # (x - b_dec)·W_enc + b_enc = x·W_enc + (b_enc - b_dec·W_enc), the same pre-activations either way
    subtracts = bool(cfg.get("apply_b_dec_to_input", True))
    if "sae_stream" not in cfg and subtracts != sae.subtract_b_dec:
        sae.b_enc_F.add_((sae.b_dec_D @ sae.W_enc_DF) * (1.0 if sae.subtract_b_dec else -1.0))
    return sae.to(device).eval()
