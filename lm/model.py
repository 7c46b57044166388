"""A nanoGPT-style decoder-only transformer: the 1-layer LM of "Towards Monosemanticity".

Token + learned position embeddings, `n_layers` pre-LN blocks (causal self-attention, MLP d_model -> d_mlp -> d_model
with ReLU or exact-erf GELU), a final LayerNorm and an unembedding tied to the token embedding. Every linear and
LayerNorm has a bias, so the model maps exactly onto a transformer-lens HookedTransformer (lm/hooked.py).

    gpt = GPT(LMConfig(d_model=128, d_mlp=512))
    logits_BTV, loss = gpt(idx_BT, targets_BT)
    gpt.save("runs/lm")                       # model.safetensors (atomic)
    gpt = GPT.from_run_dir("runs/lm")         # config.yaml + model.safetensors
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_stream.config import Config, ConfigError, LMConfig, config_from_dict, read_yaml
from sae_stream.rundir import first_line

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


class GPTOutput(NamedTuple):
    logits: torch.Tensor | None
    """[B, T, V] next-token logits (None when the loss was computed without them)."""
    loss: torch.Tensor | None
    """Mean cross-entropy against the targets, or None without targets."""


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.resid_drop(self.c_proj(self.heads(x_BTD)))

    def heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The heads' outputs before the output projection, [B, T, H·d] head-major (TL: attn.hook_z flattened)."""
        B, T, D = x_BTD.shape
        H = self.n_heads
        q_BTD, k_BTD, v_BTD = self.c_attn(x_BTD).split(D, dim=2)
        q_BHTd, k_BHTd, v_BHTd = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q_BTD, k_BTD, v_BTD))
        z_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, is_causal=True,
                                                dropout_p=self.dropout if self.training else 0.0)
        return z_BHTd.transpose(1, 2).contiguous().view(B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = nn.ReLU() if cfg.act_fn == "relu" else nn.GELU(approximate="none")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        post_BTM = self.act(self.c_fc(x_BTD))  # the neurons the SAE reads (TL: blocks.L.mlp.hook_post)
        return self.drop(self.c_proj(post_BTM))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD))
        return x_BTD + self.mlp(self.ln_2(x_BTD))


class GPT(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.reset_parameters_()

    @torch.no_grad()
    def reset_parameters_(self) -> None:
        """nanoGPT init: N(0, 0.02) weights, zero biases; projections into the residual get 0.02/sqrt(2 n_layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                return_logits: bool = True) -> GPTOutput:
        """Logits and, given targets, the mean cross-entropy. `return_logits=False` with targets computes the loss
        chunk by chunk (see chunked_cross_entropy) and returns logits=None: faster on CPU, same value and grads."""
        T = idx_BT.shape[1]
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} exceeds lm.n_ctx={self.cfg.n_ctx}: use shorter contexts")
        pos_T = torch.arange(T, device=idx_BT.device)
        x_BTD = self.drop(self.wte(idx_BT) + self.wpe(pos_T))
        for block in self.blocks:
            x_BTD = block(x_BTD)
        x_BTD = self.ln_f(x_BTD)
        if targets_BT is not None and not return_logits:
            return GPTOutput(None, chunked_cross_entropy(x_BTD.flatten(0, 1), self.wte.weight, targets_BT.flatten()))
        logits_BTV = F.linear(x_BTD, self.wte.weight)  # tied unembedding, no bias
        if targets_BT is None:
            return GPTOutput(logits_BTV, None)
        loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())
        return GPTOutput(logits_BTV, loss)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() - self.wte.weight.numel() if non_embedding else n

    def save(self, run_dir: str | Path) -> Path:
        """Write the weights to run_dir/model.safetensors atomically (the config is the caller's: config.yaml)."""
        from safetensors.torch import save

        from sae_stream.checkpoint import atomic_write_bytes

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        path = Path(run_dir) / WEIGHTS_FILE
        atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
        return path

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
        """Build from run_dir/config.yaml (its `lm` section) and load run_dir/model.safetensors."""
        run_dir = Path(run_dir)
        if run_dir.is_file():
            raise ValueError(f"{str(run_dir)!r} is a file, not an LM run dir: pass the directory written by "
                             f"`lm train` (the one holding {CONFIG_FILE} and {WEIGHTS_FILE})")
        if not run_dir.is_dir():
            raise ValueError(f"LM run dir {str(run_dir)!r} does not exist: pass a directory written by `lm train`")
        gpt = cls(read_lm_config(run_dir))
        gpt.load_weights_(read_weights(run_dir))
        return gpt.to(device).eval()

    @torch.no_grad()
    def load_weights_(self, state_dict: dict[str, torch.Tensor]) -> None:
        """load_state_dict (strict), but a key or shape mismatch is a one-line ValueError naming the first one."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        extra = sorted(set(state_dict) - set(own))
        bad = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
        if missing or extra or bad:
            what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                    f"{bad[0]} is {tuple(state_dict[bad[0]].shape)}, the config needs {tuple(own[bad[0]].shape)}")
            raise ValueError(f"weights do not match the LM config ({what}): check config.yaml's lm section")
        self.load_state_dict(state_dict, strict=True)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean_n CE(h_n @ W.T, y_n), its gradients computed in the forward pass, `chunk` rows at a time.

    The [N, V] logits (V = 50304: 200 MB per 1k tokens in fp32) are never materialized: on CPU, allocating,
    faulting in and re-reading them costs more than the unembedding matmuls themselves. 128 rows of fp32
    probabilities (26 MB) stay in a server L3 between the softmax and the two gradient matmuls.
    """

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, W_VD: torch.Tensor, y_N: torch.Tensor, chunk: int,
                dtype: torch.dtype, grads: bool) -> torch.Tensor:
        N = h_ND.shape[0]
        grad_h_ND = torch.empty(h_ND.shape, dtype=torch.float32, device=h_ND.device)
        grad_W_VD = torch.zeros(W_VD.shape, dtype=torch.float32, device=W_VD.device)
        W_c = W_VD.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        rows = torch.arange(min(chunk, N), device=y_N.device)
        with torch.autocast(h_ND.device.type, enabled=False):
            for s in range(0, N, chunk):
                h_cD, y_c = h_ND[s:s + chunk].to(dtype), y_N[s:s + chunk]
                logits_cV = h_cD @ W_c.T
                if not grads:  # evaluation (no_grad / inference_mode, or frozen inputs): the loss is all we need
                    lse_c = torch.logsumexp(logits_cV.float(), dim=1)
                    total += (lse_c - logits_cV.gather(1, y_c[:, None]).squeeze(1).float()).sum()
                    continue
                # one fused softmax pass (exp is the costly op on CPU); -log p_target then equals the CE,
                # floored at p = 1e-38 (a loss of 87 nats) where fp32 underflows; gradients stay exact
                probs_cV = torch.softmax(logits_cV, dim=1, dtype=torch.float32)
                p_c = probs_cV.gather(1, y_c[:, None]).squeeze(1)
                total -= torch.log(p_c.clamp_min(1e-38)).sum()
                probs_cV[rows[:len(y_c)], y_c] -= 1.0  # dCE/dlogits = softmax - onehot
                g_cV = probs_cV.to(dtype)
                grad_h_ND[s:s + chunk] = g_cV @ W_c
                grad_W_VD += g_cV.T @ h_cD
        ctx.save_for_backward(grad_h_ND.div_(N).to(h_ND.dtype), grad_W_VD.div_(N).to(W_VD.dtype))
        return total / N

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h_ND, grad_W_VD = ctx.saved_tensors
        return grad_h_ND * grad_out, grad_W_VD * grad_out, None, None, None, None


def chunked_cross_entropy(h_ND: torch.Tensor, W_VD: torch.Tensor, y_N: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Mean cross-entropy of the logits h_ND @ W_VD.T against y_N, in the autocast dtype if autocast is on."""
    device_type = h_ND.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h_ND.dtype
    # (inside forward grad mode is always off, and needs_input_grad ignores no_grad: decided here)
    grads = torch.is_grad_enabled() and (h_ND.requires_grad or W_VD.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(h_ND, W_VD, y_N, chunk, dtype, grads)


def read_lm_config(run_dir: Path) -> LMConfig:
    return read_run_config(run_dir).lm


def read_run_config(run_dir: Path) -> Config:
    """The whole config an LM run dir was trained with (its tokenizer too), with errors that name the file."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(path)!r} not found: an LM run dir needs the config.yaml written by `lm train`")
    try:
        return config_from_dict(read_yaml(path))
    except ConfigError as e:
        raise ValueError(f"{str(path)!r} is not a valid config: {e}") from None


def read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        if (run_dir / "lm" / WEIGHTS_FILE).is_file():  # the directory of a `sae-stream run`, which holds its LM in lm/
            raise ValueError(f"{str(run_dir)!r} is a run directory, not an LM: its LM is {str(run_dir / 'lm')!r}")
        raise ValueError(f"{str(path)!r} not found: train the LM first (`lm train`) or pass another run dir")
    try:
        return load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{str(path)!r} is corrupt or truncated ({first_line(e)}): retrain or restore it") from None
