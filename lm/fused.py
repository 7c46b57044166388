"""Fused Triton kernels for producing activations with the GPT (lm.capture.GPTCapture, kernels="triton"), each
beside its torch reference, computing what bf16 autocast computes with fewer passes over memory.

    y = layer_norm(x_BTD, ln.weight, ln.bias, ln.eps, torch.bfloat16, "triton")    # fp32 LayerNorm, bf16 out
    x, y = embed_layer_norm(tokens_BT, gpt.wte, gpt.wpe, ln_1, torch.bfloat16, "triton")  # embedding + its LN
    h = block_mlp_in(z_BTD, x_BTD, block, relu=True, backend="triton")           # heads' output -> MLP neurons

Why: on an H200 the forward up to `blocks.0.mlp.hook_post` at context 1024 (65,536 tokens) took ~570 µs, a third of
it torch's fp32 LayerNorm (~100 µs per call where a pass over its bytes takes ~15) and much of the rest passes of a
few µs each over [65536, 128] and [65536, 512] tensors (the attention output projection, the residual add, the
casts around the LayerNorms, the MLP matmul, the ReLU). `block_mlp_in` does the block from the heads' output to
the MLP's hidden layer in one kernel: d_model (<= 256) fits one tile, so both matmuls are single dots and the
LayerNorm sits between them in registers.

On CPU tensors the kernels run through Triton's interpreter (TRITON_INTERPRET=1 before triton is imported: tests),
which rounds fp32 -> bf16 toward zero where compiled kernels round to nearest.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_stream.fused_ops import AUTOTUNE_ENV, FLOATS, MAX_NUMEL, autotuned, rows_fit, triton_cdiv

MAX_D_MODEL = 256  # block_mlp_in holds [BM, d_model] tiles and W_O [d_model, d_model] in one program
# (BM, BN, warps) tried by the autotuner for block_mlp_in on the first call per shape; FIXED without autotuning
MLP_IN_CONFIGS = [(64, 128, 4), (64, 256, 8), (128, 128, 8), (32, 128, 4), (128, 64, 4)]
FIXED = MLP_IN_CONFIGS[0]


@torch.no_grad()
def layer_norm(x: Tensor, w_D: Tensor, b_D: Tensor, eps: float, dtype: torch.dtype, backend: str) -> Tensor:
    """LayerNorm over the last dim, computed in fp32 (x in any float dtype), written in `dtype`: one pass for what
    bf16 autocast does in two (an fp32 LayerNorm, then the next linear's cast of its output)."""
    D = x.shape[-1]
    fits = x.is_contiguous() and rows_fit(x.view(-1, D), dtypes=FLOATS) and rows_fit(w_D[None], b_D[None])
    if backend == "torch" or not fits:
        return F.layer_norm(x.float(), (D,), w_D.float(), b_D.float(), eps).to(dtype)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    x_ND = x.view(-1, D)
    BD = 1 << (D - 1).bit_length()
    BR = max(1, 4096 // BD)  # rows per program
    kernel = _kernels()["layer_norm" if x.is_cuda else "layer_norm_interpreted"]
    kernel[(triton_cdiv(len(x_ND), BR),)](x_ND, w_D, b_D, y, len(x_ND), eps, x_ND, x_ND, x_ND, 1, D=D, BD=BD, BR=BR,
                                          EMBED=False)
    return y


@torch.no_grad()
def embed_layer_norm(tokens_BT: Tensor, wte: torch.nn.Embedding, wpe: torch.nn.Embedding, ln: torch.nn.LayerNorm,
                     dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    """The residual stream's start x = wte[token] + wpe[position] (fp32) and the first LayerNorm of it written in
    `dtype`, in one pass (torch: the two lookups, their sum, then the LayerNorm read it back); the same values.
    The kernel does not bounds-check token ids as nn.Embedding does: the training data's are checked against the
    tokenizer as they are read, and the tokenizer against the LM's vocabulary before any work (report.py)."""
    B, T = tokens_BT.shape
    D = wte.embedding_dim
    params = (wte.weight, wpe.weight, ln.weight[None], ln.bias[None])
    fits = (tokens_BT.dtype == torch.int64 and tokens_BT.is_contiguous() and T <= wpe.num_embeddings
            and rows_fit(*params) and B * T * D < MAX_NUMEL)
    if backend == "torch" or not fits:
        x_BTD = wte(tokens_BT) + wpe(torch.arange(T, device=tokens_BT.device))
        return x_BTD, layer_norm(x_BTD, ln.weight, ln.bias, ln.eps, dtype, backend)
    x_BTD = torch.empty(B, T, D, device=tokens_BT.device)
    y_BTD = torch.empty(B, T, D, dtype=dtype, device=tokens_BT.device)
    BD = 1 << (D - 1).bit_length()
    BR = max(1, 4096 // BD)  # (as layer_norm's: the same sums, so the same roundings)
    kernel = _kernels()["layer_norm" if tokens_BT.is_cuda else "layer_norm_interpreted"]
    kernel[(triton_cdiv(B * T, BR),)](x_BTD, ln.weight, ln.bias, y_BTD, B * T, ln.eps, tokens_BT, wte.weight,
                                      wpe.weight, T, D=D, BD=BD, BR=BR, EMBED=True)
    return x_BTD, y_BTD


def mlp_in_fits(x_BTD: Tensor, block: torch.nn.Module, dtype: torch.dtype) -> bool:
    """block_mlp_in's Triton kernel takes a block with these: matmuls in bf16/fp16 (`dtype`, the heads' output's),
    a contiguous fp32 residual, d_model <= MAX_D_MODEL, fp32 parameters, 32-bit offsets. Decidable before the
    heads run."""
    D, M = x_BTD.shape[-1], block.mlp.c_fc.out_features
    params = (block.attn.c_proj.weight, block.attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias,
              block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    return (dtype in (torch.bfloat16, torch.float16) and x_BTD.dtype == torch.float32 and x_BTD.is_contiguous()
            and D <= MAX_D_MODEL and max(x_BTD.numel(), x_BTD.numel() // D * M) < MAX_NUMEL
            and all(p.dtype == torch.float32 and p.is_contiguous() for p in params))


def dest_fits(out_RM: Tensor, dest_N: Tensor, x_BTD: Tensor, M: int, dtype: torch.dtype) -> bool:
    """block_mlp_in can store the rows of width M it computes from x through dest_N into out_RM."""
    return (out_RM.ndim == 2 and out_RM.shape[1] == M and out_RM.dtype == dtype and out_RM.is_contiguous()
            and dest_N.shape == (x_BTD.numel() // x_BTD.shape[-1],) and dest_N.dtype == torch.int64
            and out_RM.device == dest_N.device == x_BTD.device)


@torch.no_grad()
def block_mlp_in(z_BTD: Tensor, x_BTD: Tensor, block: torch.nn.Module, relu: bool, backend: str,
                 out_RM: Tensor | None = None, dest_N: Tensor | None = None) -> Tensor:
    """From a block's heads' output z (attn.hook_z, in the matmul dtype) and its input residual x (fp32) to the MLP's
    hidden layer, as bf16 autocast computes it:
        attn_out = z W_Oᵀ + b_O (rounded to z's dtype);  h = x + attn_out;  u = LN₂(h) (fp32, rounded)
        pre = u W_fcᵀ + b_fc (rounded);  post = ReLU(pre)
    Returns post (`relu`) or pre, [B, T, d_mlp] in z's dtype. With `out_RM` and `dest_N` (int64, one per row of
    [B·T] in row-major order) row n goes to out_RM[dest_N[n]] instead, or nowhere where dest_N[n] < 0, and out_RM is
    returned: the kernel stores straight into a ring's slots (the torch reference masks on the host: a sync)."""
    proj, ln, fc = block.attn.c_proj, block.ln_2, block.mlp.c_fc
    dtype = z_BTD.dtype
    fits = z_BTD.shape == x_BTD.shape and z_BTD.is_contiguous() and mlp_in_fits(x_BTD, block, dtype)
    D, M = x_BTD.shape[-1], fc.out_features
    N = x_BTD.numel() // D
    if dest_N is not None and not (out_RM is not None and dest_fits(out_RM, dest_N, x_BTD, M, dtype)):
        raise ValueError(f"block_mlp_in: out_RM must be a contiguous [rows, {M}] {dtype} tensor and dest_N {N} int64 "
                         f"row indices, both on x's device ({x_BTD.device}); got out_RM "
                         f"{None if out_RM is None else (tuple(out_RM.shape), out_RM.dtype, str(out_RM.device))}")
    if backend == "torch" or not fits:
        h_BTD = x_BTD + F.linear(z_BTD, proj.weight.to(dtype), proj.bias.to(dtype))
        u_BTD = F.layer_norm(h_BTD.float(), (h_BTD.shape[-1],), ln.weight, ln.bias, ln.eps).to(dtype)
        pre_BTM = F.linear(u_BTD, fc.weight.to(dtype), fc.bias.to(dtype))
        post_BTM = torch.relu(pre_BTM) if relu else pre_BTM
        if dest_N is None:
            return post_BTM
        keep_N = dest_N >= 0
        out_RM[dest_N[keep_N]] = post_BTM.reshape(N, M)[keep_N]
        return out_RM
    out = torch.empty(*x_BTD.shape[:-1], M, dtype=dtype, device=x_BTD.device) if dest_N is None else out_RM
    # the weights in the matmul dtype up front (as autocast casts them: ~100 KB), so the kernel loads them as is
    args = (z_BTD, proj.weight.to(dtype), proj.bias, x_BTD, ln.weight, ln.bias, fc.weight.to(dtype), fc.bias, out,
            out if dest_N is None else dest_N, N, M, ln.eps)
    meta = {"D": D, "BD": max(16, 1 << (D - 1).bit_length()), "RELU": relu, "DEST": dest_N is not None}
    kernels = _kernels()
    if not x_BTD.is_cuda:
        grid, kernel, meta = (triton_cdiv(N, 32) * triton_cdiv(M, 32),), kernels["mlp_in_interpreted"], \
            meta | {"BM": 32, "BN": 32, "UPCAST": True}
    elif os.environ.get(AUTOTUNE_ENV, "1") == "0":
        bm, bn, warps = FIXED
        grid, kernel = (triton_cdiv(N, bm) * triton_cdiv(M, bn),), kernels["mlp_in_fixed"]
        meta |= {"BM": bm, "BN": bn, "UPCAST": False, "num_warps": warps}
    else:
        def grid(m: dict) -> tuple[int]:
            return (triton_cdiv(N, m["BM"]) * triton_cdiv(M, m["BN"]),)
        kernel, meta = kernels["mlp_in"], meta | {"UPCAST": False}
    kernel[grid](*args, **meta)
    return out


@functools.cache
def _kernels() -> dict:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=2) for bm, bn, w in MLP_IN_CONFIGS]
    ln, mlp_in = triton.jit(_layer_norm), triton.jit(_mlp_in)
    return {"layer_norm": ln, "layer_norm_interpreted": InterpretedFunction(_layer_norm),
            "mlp_in_fixed": mlp_in, "mlp_in": autotuned(mlp_in, configs, ["N", "M", "D", "RELU", "DEST"]),
            "mlp_in_interpreted": InterpretedFunction(_mlp_in)}


try:
    import triton.language as tl
except ImportError:  # the torch backend only
    tl = None

if tl is not None:

    def _layer_norm(x_ptr, w_ptr, b_ptr, y_ptr, M, eps, tok_ptr, wte_ptr, wpe_ptr, T, D: tl.constexpr,
                    BD: tl.constexpr, BR: tl.constexpr, EMBED: tl.constexpr):
        rows, cols = tl.program_id(0) * BR + tl.arange(0, BR), tl.arange(0, BD)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        if EMBED:  # x = wte[token] + wpe[position] (row r of [B, T]: position r % T), stored: the residual stream
            tok = tl.load(tok_ptr + rows, mask=rows < M, other=0)
            x = (tl.load(wte_ptr + tok[:, None] * D + cols[None, :], mask=mask, other=0.0)
                 + tl.load(wpe_ptr + (rows % T)[:, None] * D + cols[None, :], mask=mask, other=0.0))
            tl.store(x_ptr + offs, x, mask=mask)
        else:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)  # biased variance, as torch
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (xc * rstd[:, None] * w[None, :] + b[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    def _mlp_in(z_ptr, wo_ptr, bo_ptr, x_ptr, lnw_ptr, lnb_ptr, wfc_ptr, bfc_ptr, out_ptr, dest_ptr, N, M, eps,
                D: tl.constexpr, BD: tl.constexpr, RELU: tl.constexpr, DEST: tl.constexpr, UPCAST: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
        # program -> (row block, column block of d_mlp); the row block's attention output and LayerNorm are
        # recomputed per column block (d_model-wide: cheap next to the [BM, BN] output)
        n_blocks = tl.cdiv(M, BN)
        pid_m, pid_n = tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
        rm, d, rn = pid_m * BM + tl.arange(0, BM), tl.arange(0, BD), pid_n * BN + tl.arange(0, BN)
        am, dm, nm = rm % N, d < D, rn < M  # rows past N re-read valid ones (their outputs are masked)
        mm_dtype = z_ptr.dtype.element_ty
        z = tl.load(z_ptr + am[:, None] * D + d[None, :], mask=dm[None, :], other=0.0)
        wo_t = tl.load(wo_ptr + d[None, :] * D + d[:, None], mask=dm[:, None] & dm[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32 anyway
            z, wo_t = z.to(tl.float32), wo_t.to(tl.float32)
        bo = tl.load(bo_ptr + d, mask=dm, other=0.0).to(mm_dtype).to(tl.float32)  # autocast's bf16 bias
        attn = (tl.dot(z, wo_t) + bo[None, :]).to(mm_dtype).to(tl.float32)  # the projection's bf16 output
        h = tl.where(dm[None, :], tl.load(x_ptr + am[:, None] * D + d[None, :], mask=dm[None, :], other=0.0) + attn,
                     0.0)
        hc = tl.where(dm[None, :], h - (tl.sum(h, axis=1) / D)[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(hc * hc, axis=1) / D + eps)
        lnw = tl.load(lnw_ptr + d, mask=dm, other=0.0)
        lnb = tl.load(lnb_ptr + d, mask=dm, other=0.0)
        u = tl.where(dm[None, :], hc * rstd[:, None] * lnw[None, :] + lnb[None, :], 0.0).to(mm_dtype)
        wfc_t = tl.load(wfc_ptr + rn[None, :] * D + d[:, None], mask=dm[:, None] & nm[None, :], other=0.0)
        if UPCAST:
            u, wfc_t = u.to(tl.float32), wfc_t.to(tl.float32)
        bfc = tl.load(bfc_ptr + rn, mask=nm, other=0.0).to(mm_dtype).to(tl.float32)
        pre = (tl.dot(u, wfc_t) + bfc[None, :]).to(mm_dtype).to(tl.float32)  # the bf16 linear's rounding
        if RELU:  # (compared in fp32: Triton 3.9's interpreter compares bf16 as raw bits)
            pre = tl.where(pre < 0, 0.0, pre)  # NaN stays NaN, as torch.relu
        if DEST:  # row n -> out row dest[n] (int64: a ring's offsets may pass 2^31), none where dest[n] < 0
            dst = tl.load(dest_ptr + am)
            tl.store(out_ptr + dst[:, None] * M + rn[None, :], pre.to(mm_dtype),
                     mask=((rm < N) & (dst >= 0))[:, None] & nm[None, :])
        else:
            tl.store(out_ptr + rm[:, None] * M + rn[None, :], pre.to(mm_dtype), mask=(rm[:, None] < N) & nm[None, :])
