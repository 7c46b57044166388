"""Fused device ops of the training step (Triton), each beside its torch reference (the LM's: lm/fused.py).

    xc, var_sq, ok = center(x_BD, b_dec_D, torch.bfloat16, "triton")        # x − b cast, Σ‖x − x̄‖², all finite
    f, colsum_F, counts_F = encode_relu(xc_BD, W_enc_DF, b_enc_F, "triton")   # f = ReLU(xc W + b), Σ_B f, #(f > 0)
    g_r, sq, rsum_D = residual(recon_BD, x_BD, c, torch.bfloat16, "triton")  # c·(x̂ − x) cast, Σ(x̂ − x)², Σ_B
    g_pre, gsum_F = relu_backward(g_BD, W_dec_FD, f, add, "triton")            # [f > 0]·(g W_decᵀ + add), Σ_B g_pre
    project_out_rows_(g_FD, W_FD, "triton")    # g_f −= (⟨g_f, w_f⟩ / ‖w_f‖²) w_f per row: one pass instead of ~8
    normalize_rows_(W_FD, "triton")            # w_f /= ‖w_f‖ per row

Why: on an H200 at d_sae 4096 / batch 8192 the matmuls of a step took ~250 µs and the passes over [B, d_sae]
between them (the L1 sum, firing counts, the λ add, the ReLU mask, the b_enc gradient sum) ~450 µs more. Here each
tile is finished where the matmul left it, in registers: one write of f, one of g_pre, and per-row-block partial
column sums ([⌈B/64⌉, d_sae], reduced by torch: deterministic, unlike atomics). Sums are of the values stored (f in
the matmul dtype, promoted to fp32), so they equal what a pass over the stored f would give. The [batch, d_in]
passes (centring, residual, their sums for the loss, b_dec's gradient and the FVU's variance) are one kernel each
instead of ~4 (each ~5-20 µs however small: a step was ~0.65 ms).

`backend="torch"` is the reference (and the path without Triton); `"triton"` runs the kernels (on CPU tensors
through Triton's interpreter: slow, for tests). Inputs are 2-D with unit stride in the last dim, of one dtype
(bf16, or fp32 with TF32 per torch.backends.cuda.matmul.allow_tf32). The row ops take contiguous fp32 [F, D]
(D up to MAX_ROW: longer rows use torch).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

MAX_ROW = 8192  # the row kernels hold a whole row (padded to a power of two) in registers
MAX_NUMEL = 2**31 - 2**24  # the kernels index with 32-bit offsets: larger tensors take the torch path
FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # what the row kernels read x in (computing in fp32)
MIN_BLOCK_M = 64  # the smallest row block of any config: partial-sum buffers have ⌈B/64⌉ rows (unused ones zero)
# (BM, BN, BK, warps, stages) tried by the autotuner on the first call per shape (~10-20 s); "0" in this environment
# variable uses FIXED instead (tests: seconds, not a minute of tuning per shape). An H200 at batch 8192 picked
# 128×128×64/4/3 for both kernels at 512 -> 4096 and 16384; 128×128×32/4/5 and 256×128×32/8/4 at 65536.
AUTOTUNE_ENV = "SAE_STREAM_TRITON_AUTOTUNE"
CONFIGS = [(128, 128, 32, 4, 4), (128, 128, 32, 4, 5), (128, 128, 32, 8, 4), (128, 256, 32, 8, 4),
           (256, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3)]
FIXED = CONFIGS[0]  # fits shared memory in fp32 too


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def centred_sq_sum(x_BD: Tensor) -> Tensor:
    """Σ_rows ‖x − mean‖² (fp64 0-dim) as Σx² − ‖Σx‖²/n, both sums in fp64 (no cancellation at fp32 data), without a
    centred copy of x. fp64 sums of fp32 values cannot overflow: finite iff every x is."""
    col_D = x_BD.sum(0, dtype=torch.float64)
    return torch.linalg.vector_norm(x_BD, dtype=torch.float64).square() - col_D.square().sum() / len(x_BD)


@torch.no_grad()
def center(x_BD: Tensor, b_D: Tensor, dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x − b in `dtype` (x in any float dtype, b fp32; computed in fp32); Σ_rows ‖x − mean‖² (fp64 0-dim: the
    FVU's denominator); and whether every x is finite (bool 0-dim; judged on x alone). The Triton path squares
    x − b in fp32: past |x − b| ~ 1e19 var_sq is inf (the logged FVU then reads 0) while x counts as finite."""
    if backend == "torch" or not rows_fit(x_BD, dtypes=FLOATS):
        xc_BD = torch.sub(x_BD, b_D, out=torch.empty_like(x_BD, dtype=dtype))  # centred and cast: one pass
        var_sq = centred_sq_sum(x_BD)
        return xc_BD, var_sq, torch.isfinite(var_sq)
    (B, D) = x_BD.shape
    xc_BD = torch.empty(B, D, dtype=dtype, device=x_BD.device)
    kernel, grid, meta = _row_launcher("center", x_BD)
    col = torch.empty(grid[0], D, dtype=torch.float32, device=x_BD.device)
    sq = torch.empty(grid[0], dtype=torch.float32, device=x_BD.device)
    bad = torch.empty(grid[0], dtype=torch.int32, device=x_BD.device)
    kernel[grid](x_BD, b_D, xc_BD, col, sq, bad, B, D=D, **meta)
    # per-block fp32 sums of x − b (b ≈ the data's centre: little cancellation), combined in fp64
    col_D = col.sum(0, dtype=torch.float64)
    return xc_BD, sq.sum(dtype=torch.float64) - col_D.square().sum() / B, bad.sum() == 0


@torch.no_grad()
def residual(recon_BD: Tensor, x_BD: Tensor, c: float, dtype: torch.dtype, backend: str
             ) -> tuple[Tensor, Tensor, Tensor]:
    """r = x̂ − x (in fp32; x in any float dtype): c·r in `dtype`, Σr² (0-dim) and Σ_rows r ([D]), both fp32
    (fp64 for fp64 inputs)."""
    if backend == "torch" or not rows_fit(x_BD, dtypes=FLOATS) or not recon_BD.is_contiguous():
        if recon_BD.dtype.itemsize < 4 and x_BD.dtype.itemsize < 4:  # (bf16 − bf16 would round r to bf16)
            recon_BD = recon_BD.float()
        r_BD = torch.sub(recon_BD, x_BD)  # fp32 out of a bf16 x̂: no separate cast
        g_BD = torch.mul(r_BD, c, out=torch.empty_like(r_BD, dtype=dtype))
        ones_B = torch.ones(len(r_BD), dtype=r_BD.dtype, device=r_BD.device)
        return g_BD, torch.linalg.vector_norm(r_BD).square(), r_BD.T.mv(ones_B)  # mat-vec: faster than sum(0)
    (B, D) = x_BD.shape
    g_BD = torch.empty(B, D, dtype=dtype, device=x_BD.device)
    kernel, grid, meta = _row_launcher("residual", x_BD)
    col = torch.empty(grid[0], D, dtype=torch.float32, device=x_BD.device)
    sq = torch.empty(grid[0], dtype=torch.float32, device=x_BD.device)
    kernel[grid](recon_BD, x_BD, g_BD, col, sq, B, c, D=D, **meta)
    return g_BD, sq.sum(), col.sum(0)


@functools.cache
def triton_probe(device: torch.device) -> str | None:
    """None if small Triton kernels (a row kernel; the encoder's dot in bf16 and fp32, FIXED config) compile and
    compute correctly on `device`, else why not: Triton can be importable yet unusable (no C compiler for its
    launcher, an unsupported GPU)."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(3, 40, generator=g).to(device)
        want = w / w.norm(dim=1, keepdim=True)
        normalize_rows_(w, "triton")
        if not torch.allclose(w, want, rtol=1e-5, atol=1e-6):
            return "a test kernel (row normalisation) computed wrong values"
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(70, 32, generator=g).to(device, dtype)
            W = torch.randn(32, 48, generator=g).to(device, dtype)
            b = torch.randn(48, generator=g).to(device)
            f, _, counts = encode_relu(x, W, b, "triton", tune=False)
            ref = torch.relu(x.float() @ W.float() + b)
            if not torch.allclose(f.float(), ref, rtol=2e-2, atol=2e-2) or not torch.equal(counts, (f > 0).sum(0)):
                return f"a test kernel (the {dtype} encoder matmul) computed wrong values"
    except Exception as exc:  # noqa: BLE001 — any failure means: use the torch ops
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def encode_relu(xc_BD: Tensor, W_DF: Tensor, b_F: Tensor, backend: str, tune: bool = True
                ) -> tuple[Tensor, Tensor, Tensor]:
    """f = ReLU(xc W + b) in xc's dtype, Σ_B f (fp32) and the number of rows with f > 0 (int64), per feature.
    `tune=False`: the FIXED config even where the autotuner would run."""
    if backend == "torch" or max(xc_BD.shape[0] * W_DF.shape[1], W_DF.numel(), xc_BD.numel()) >= MAX_NUMEL:
        b = b_F.to(xc_BD.dtype)
        f_BF = torch._addmm_activation(b, xc_BD, W_DF) if xc_BD.is_cuda else torch.addmm(b, xc_BD, W_DF).relu_()
        return f_BF, f_BF.sum(0, dtype=_sum_dtype(f_BF)), firing_counts(f_BF)
    (B, D), F = xc_BD.shape, W_DF.shape[1]
    f_BF = torch.empty(B, F, dtype=xc_BD.dtype, device=xc_BD.device)
    sums = torch.zeros(triton_cdiv(B, MIN_BLOCK_M), F, dtype=torch.float32, device=xc_BD.device)
    counts = torch.zeros(sums.shape, dtype=torch.int32, device=xc_BD.device)
    kernel, grid, extra = _launcher("encode", xc_BD, F, tune)
    kernel[grid](xc_BD, W_DF, b_F, f_BF, sums, counts, B, F, xc_BD.stride(0), W_DF.stride(0), W_DF.stride(1), K=D,
                 **_precision(xc_BD), **extra)
    return f_BF, sums.sum(0), counts.sum(0)


def relu_backward(g_BD: Tensor, W_FD: Tensor, f_BF: Tensor, add: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """g_pre = [f > 0]·(g W_FDᵀ + add) in g's dtype (add: a 0-dim fp32 tensor) and Σ_B g_pre (fp32)."""
    if backend == "torch" or max(g_BD.shape[0] * W_FD.shape[0], W_FD.numel(), g_BD.numel()) >= MAX_NUMEL:
        # λ/B as a bias vector, added in the matmul's epilogue (in bf16 runs rounded to bf16: <= 0.2% of λ)
        bias_F = add.to(g_BD.dtype).expand(W_FD.shape[0])
        g_pre = torch.ops.aten.threshold_backward(torch.addmm(bias_F, g_BD, W_FD.T), f_BF, 0)
        return g_pre, g_pre.sum(0, dtype=_sum_dtype(g_pre))
    (B, D), F = g_BD.shape, W_FD.shape[0]
    g_pre = torch.empty(B, F, dtype=g_BD.dtype, device=g_BD.device)
    sums = torch.zeros(triton_cdiv(B, MIN_BLOCK_M), F, dtype=torch.float32, device=g_BD.device)
    kernel, grid, extra = _launcher("backward", g_BD, F)
    kernel[grid](g_BD, W_FD, f_BF, add, g_pre, sums, B, F, g_BD.stride(0), W_FD.stride(0), W_FD.stride(1),
                 f_BF.stride(0), K=D, **_precision(g_BD), **extra)
    return g_pre, sums.sum(0)


@torch.no_grad()
def project_out_rows_(g_FD: Tensor, W_FD: Tensor, backend: str) -> None:
    """In place: remove from each row of g its component along the same row of W (Adam then moves W's rows
    along the sphere's tangent)."""
    if backend == "torch" or not rows_fit(g_FD, W_FD):
        coef_F1 = (g_FD * W_FD).sum(dim=1, keepdim=True) / (W_FD * W_FD).sum(dim=1, keepdim=True).clamp_min(1e-12)
        g_FD.sub_(coef_F1 * W_FD)
        return
    kernel, grid, meta = _row_launcher("project", g_FD)
    kernel[grid](g_FD, W_FD, g_FD.shape[0], D=g_FD.shape[1], **meta)


@torch.no_grad()
def normalize_rows_(W_FD: Tensor, backend: str) -> None:
    """In place: scale each row of W to unit L2 norm (rows of norm < 1e-12 are divided by 1e-12)."""
    if backend == "torch" or not rows_fit(W_FD):
        W_FD.div_(W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return
    kernel, grid, meta = _row_launcher("normalize", W_FD)
    kernel[grid](W_FD, W_FD.shape[0], D=W_FD.shape[1], **meta)


def rows_fit(*ts: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """The row kernels take these 2-D tensors: contiguous, of `dtypes`, rows of <= MAX_ROW, 32-bit offsets."""
    return all(t.is_contiguous() and t.dtype in dtypes and t.shape[1] <= MAX_ROW and t.numel() < MAX_NUMEL
               for t in ts)


def _row_launcher(name: str, x: Tensor):
    F, D = x.shape
    BD = 1 << (D - 1).bit_length()
    BR = max(1, (8192 if name in ("center", "residual") else 4096) // BD)  # elements per program
    kernels = _kernels()
    return kernels[name if x.is_cuda else name + "_interpreted"], (triton_cdiv(F, BR),), {"BD": BD, "BR": BR}


def _sum_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (reference checks)


def firing_counts(feats_BF: Tensor) -> Tensor:
    """Per-feature number of rows with a positive activation (int64 [d_sae])."""
    if feats_BF.dtype == torch.float32:
        # a matrix-vector product over sign(f) (exact below 2^24 rows) is ~3x faster than a bool reduction
        ones_B = torch.ones(feats_BF.shape[0], dtype=torch.float32, device=feats_BF.device)
        return (ones_B @ torch.sign(feats_BF)).long()
    return (feats_BF > 0).sum(dim=0)


def _precision(x: Tensor) -> dict:
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return {"PRECISION": "tf32" if tf32 else "ieee"}


def _launcher(name: str, x: Tensor, F: int, tune: bool = True):
    """(kernel, grid, extra launch args) for input x [B, ·] and F output columns: the autotuned Triton kernel on
    CUDA (or the FIXED config: tune=False or AUTOTUNE_ENV=0); the interpreter with a small fixed config on CPU."""
    kernels, B = _kernels(), x.shape[0]
    if not x.is_cuda:
        return kernels[name + "_interpreted"], (triton_cdiv(B, MIN_BLOCK_M) * triton_cdiv(F, 32),), \
            {"BM": MIN_BLOCK_M, "BN": 32, "BK": 32, "UPCAST": True}
    if not tune or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        bm, bn, bk, warps, stages = FIXED
        return kernels[name + "_fixed"], (triton_cdiv(B, bm) * triton_cdiv(F, bn),), \
            {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages, "UPCAST": False}

    def grid(meta: dict) -> tuple[int]:
        return (triton_cdiv(B, meta["BM"]) * triton_cdiv(F, meta["BN"]),)
    return kernels[name], grid, {"UPCAST": False}


def tuned_configs() -> dict[str, str]:
    """The autotuner's pick per kernel (for benchmark records): 'BM×BN×BK/warps/stages', once it has run."""
    if not triton_available() or _kernels.cache_info().currsize == 0:
        return {}
    out = {}
    for name in ("encode", "backward"):
        best = getattr(_kernels()[name], "best_config", None)
        if best is not None:
            k = best.kwargs
            out[name] = f"{k['BM']}x{k['BN']}x{k['BK']}/{best.num_warps}/{best.num_stages}"
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def autotuned(fn: Any, configs: list, key: list[str], **kwargs: Any) -> Any:
    """triton.autotune(configs, key, ...)(fn), its picks kept on disk in Triton's cache (TRITON_CACHE_DIR, keyed by
    the kernel's source, the configs, the shape key, the GPU architecture (H100 and H200 share sm_90) and Triton's
    version) where this Triton can: a later run skips the tuning (~10-20 s per shape; clear that directory to tune
    again). Safe with reset_to_zero: without trial runs nothing needs zeroing (callers allocate those sums zeroed)."""
    import inspect

    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(configs, key=key, **kwargs)(fn)


@functools.cache
def _kernels() -> dict:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in CONFIGS]
    fns = {"encode": _encode, "backward": _backward, "center": _center, "residual": _residual,
           "project": _project_rows, "normalize": _normalize_rows}
    out = {name: triton.jit(fn) for name, fn in fns.items()}
    for name, sums in (("encode", ["sum_ptr", "cnt_ptr"]), ("backward", ["sum_ptr"])):
        out[name + "_fixed"] = out[name]
        # the partial sums have ⌈B/64⌉ rows, a config writes ⌈B/BM⌉: zero them before each timed config and before
        # the real launch, or a BM=64 trial's rows would stay in the first step's sums (the key also has dtypes)
        out[name] = autotuned(out[name], configs, ["M", "N", "K", "PRECISION"], reset_to_zero=sums)
    return out | {name + "_interpreted": InterpretedFunction(fn) for name, fn in fns.items()}


try:
    import triton.language as tl
except ImportError:  # the torch backend only
    tl = None

if tl is not None:
    # Matmul kernels: program -> (row block, column block), neighbours share a row block of the input. Loads wrap
    # rows modulo M (in bounds without a mask) and mask K only when BK ∤ K; the epilogue masks what lies outside
    # [M, N]: stores and the partial sums.

    def _encode(x_ptr, w_ptr, b_ptr, f_ptr, sum_ptr, cnt_ptr, M, N, sxm, swk, swn, K: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        n_blocks = tl.cdiv(N, BN)
        pid_m, pid_n = tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
        rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
        am = rm % M  # rows past M re-read valid ones (masked below): the loads need no row mask
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a_ptrs = x_ptr + am[:, None] * sxm + (k0 + rk)[None, :]
            b_ptrs = w_ptr + (k0 + rk)[:, None] * swk + rn[None, :] * swn  # contiguous along N: masked, not wrapped
            if K % BK == 0:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs, mask=rn[None, :] < N, other=0.0)
            else:
                a = tl.load(a_ptrs, mask=k0 + rk[None, :] < K, other=0.0)
                b = tl.load(b_ptrs, mask=(k0 + rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if UPCAST:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32 anyway
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        valid = (rm[:, None] < M) & (rn[None, :] < N)
        f = tl.where(valid, tl.maximum(acc + bias[None, :], 0.0), 0.0).to(f_ptr.dtype.element_ty)
        tl.store(f_ptr + rm[:, None] * N + rn[None, :], f, mask=valid)
        f32 = f.to(tl.float32)
        tl.store(sum_ptr + pid_m * N + rn, tl.sum(f32, axis=0), mask=rn < N)
        tl.store(cnt_ptr + pid_m * N + rn, tl.sum((f32 > 0).to(tl.int32), axis=0), mask=rn < N)

    def _backward(g_ptr, w_ptr, f_ptr, add_ptr, out_ptr, sum_ptr, M, N, sgm, swn, swk, sfm, K: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        n_blocks = tl.cdiv(N, BN)
        pid_m, pid_n = tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
        rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
        am, bn = rm % M, rn % N  # W_dec's rows are its non-contiguous dim: wrapped like x's
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a_ptrs = g_ptr + am[:, None] * sgm + (k0 + rk)[None, :]
            b_ptrs = w_ptr + (k0 + rk)[:, None] * swk + bn[None, :] * swn  # a W_decᵀ tile, [BK, BN]
            if K % BK == 0:
                a, b = tl.load(a_ptrs), tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k0 + rk[None, :] < K, other=0.0)
                b = tl.load(b_ptrs, mask=k0 + rk[:, None] < K, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        valid = (rm[:, None] < M) & (rn[None, :] < N)
        f = tl.load(f_ptr + rm[:, None] * sfm + rn[None, :], mask=valid, other=0.0)
        g = tl.where(valid & (f > 0), acc + tl.load(add_ptr), 0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], g, mask=valid)
        tl.store(sum_ptr + pid_m * N + rn, tl.sum(g.to(tl.float32), axis=0), mask=rn < N)

    # Row kernels: BR whole rows (padded to BD, a power of two) per program; sums per program, combined by torch.

    def _center(x_ptr, b_ptr, xc_ptr, col_ptr, sq_ptr, bad_ptr, M, D: tl.constexpr, BD: tl.constexpr,
                BR: tl.constexpr):
        pid = tl.program_id(0)
        rows, cols = pid * BR + tl.arange(0, BR), tl.arange(0, BD)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - b[None, :], 0.0)
        finite = (x == x) & (tl.abs(x) < float("inf"))  # NaN != NaN
        tl.store(bad_ptr + pid, tl.sum(tl.sum((mask & ~finite).to(tl.int32), axis=1), axis=0))
        tl.store(xc_ptr + offs, xc.to(xc_ptr.dtype.element_ty), mask=mask)
        tl.store(col_ptr + pid * D + cols, tl.sum(xc, axis=0), mask=cols < D)
        tl.store(sq_ptr + pid, tl.sum(tl.sum(xc * xc, axis=1), axis=0))

    def _residual(r_ptr, x_ptr, g_ptr, col_ptr, sq_ptr, M, c, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        pid = tl.program_id(0)
        rows, cols = pid * BR + tl.arange(0, BR), tl.arange(0, BD)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.where(mask, tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32) - x, 0.0)
        tl.store(g_ptr + offs, (r * c).to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(col_ptr + pid * D + cols, tl.sum(r, axis=0), mask=cols < D)
        tl.store(sq_ptr + pid, tl.sum(tl.sum(r * r, axis=1), axis=0))

    def _project_rows(g_ptr, w_ptr, F, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        rows, cols = tl.program_id(0) * BR + tl.arange(0, BR), tl.arange(0, BD)
        mask = (rows[:, None] < F) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        coef = tl.sum(g * w, axis=1) / tl.maximum(tl.sum(w * w, axis=1), 1e-12)
        tl.store(g_ptr + offs, g - coef[:, None] * w, mask=mask)

    def _normalize_rows(w_ptr, F, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        rows, cols = tl.program_id(0) * BR + tl.arange(0, BR), tl.arange(0, BD)
        mask = (rows[:, None] < F) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        norm = tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), 1e-12)
        tl.store(w_ptr + offs, w / norm[:, None], mask=mask)
