"""Fused device ops of the training step (Triton), each beside its torch reference (the LM's: lm/fused.py).

    xc, var_sq, ok = center(x_BD, b_dec_D, torch.bfloat16, "triton")        # x − b cast, Σ‖x − x̄‖², all finite
    f, colsum_F, counts_F = encode_relu(xc_BD, W_enc_DF, b_enc_F, "triton")   # f = ReLU(xc W + b), Σ_B f, #(f > 0)
    g_r, sq, rsum_D = residual(recon_BD, x_BD, c, torch.bfloat16, "triton")  # c·(x̂ − x) cast, Σ(x̂ − x)², Σ_B
    g_pre, gsum_F = relu_backward(g_BD, W_dec_FD, f, add, "triton")            # [f > 0]·(g W_decᵀ + add), Σ_B g_pre
    f, _, _ = encode_relu(xc_BD, W_enc_DF, b_enc_F, "triton", stats=False)     # f alone: Triton's or cuBLAS's matmul
    g_pre, gsum_F, colsum_F, counts_F = relu_backward(..., stats=True)         # f's sums from the tile the mask loads
    project_out_rows_(g_FD, W_FD, "triton")    # g_f −= (⟨g_f, w_f⟩ / ‖w_f‖²) w_f per row: one pass instead of ~8
    normalize_rows_(W_FD, "triton")            # w_f /= ‖w_f‖ per row

Why: on an H200 at d_sae 4096 / batch 8192 the matmuls of a step took ~250 µs and the passes over [B, d_sae]
between them (the L1 sum, firing counts, the λ add, the ReLU mask, the b_enc gradient sum) ~450 µs more. Here each
tile is finished where the matmul left it, in registers: one write of f, one of g_pre, and per-row-block partial
column sums ([⌈B/BM⌉, ·, d_sae], finished by one matrix-vector product: deterministic, unlike atomics). Sums are
of the values stored (f in the matmul dtype, promoted to fp32), so they equal what a pass over the stored f would
give. The step may take Σ_B f and the firing counts from the backward (stats=True), which loads f for its mask
anyway: the encoder is then a plain matmul + bias + ReLU, which cuBLAS's epilogue may do faster than Triton's
kernel (session 15's profile on an H200: Triton's encoder with its sums 91 µs, a cuBLAS matmul of that shape 44),
at the cost of the backward's registers: on CUDA the first step per shape times both layouts and keeps the faster
(step_layout; ENCODE_ENV overrides). The [batch, d_in] passes
(centring, residual, their sums for the loss, b_dec's gradient and the FVU's variance) are one kernel each instead
of ~4 (each ~5-20 µs however small: a step was ~0.65 ms).

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
MIN_BLOCK_M = 64  # the smallest row block of any config: partial-sum buffers have ⌈B/64⌉ rows (a launch writes
# ⌈B/BM⌉ of them: only those are summed, so they need no zeroing)
MAX_COUNT_ROWS = 2**24  # counts are summed as fp32 (exact up to here): larger batches take the torch path
# Where the step takes f's column sums, and which encoder matmul it runs (step_layout): `stats` Triton's encoder with
# the sums in its epilogue (session 15's layout); `triton` Triton's encoder without them, the sums in the
# backward's epilogue; `cublas` cuBLAS's bias + ReLU matmul, the sums in the backward's. `auto` times `stats`
# against `cublas` on the first step of each shape (CUDA) and keeps the faster.
ENCODE_ENV = "SAE_STREAM_ENCODE"
LAYOUTS = ("stats", "triton", "cublas")
# (BM, BN, BK, warps, stages) tried by the autotuner on the first call per shape (~10-20 s measured with the first
# 8; 13 now); "0" in this environment variable uses FIXED instead (tests: seconds, not a minute of tuning per
# shape). An H200 at batch 8192 picked 128×128×64/4/3 for both kernels at 512 -> 4096 and 16384; 128×128×32/4/5
# and 256×128×32/8/4 at 65536. At K = 512 a tile's main loop is short (~2 µs on an H200) against its prologue
# and epilogue (loads of the first stages; f's tile, the store, the column sums), which one resident block cannot
# overlap with its own matmul: the 9th-12th leave room (shared memory, registers) for 2-3 blocks per SM, whose
# epilogues overlap the others' matmuls. Compiled for sm_90 (Triton 3.9) the 128×128 4-warp configs make the
# backward spill (32 bytes a thread; 88 with f's sums in it): the last, with 8 warps, spills in no kernel.
AUTOTUNE_ENV = "SAE_STREAM_TRITON_AUTOTUNE"
CONFIGS = [(128, 128, 32, 4, 4), (128, 128, 32, 4, 5), (128, 128, 32, 8, 4), (128, 256, 32, 8, 4),
           (256, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3),
           (128, 128, 64, 4, 2), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3)]
FIXED = CONFIGS[0]  # fits shared memory in fp32 too
GROUP_M = 8  # row blocks per group of the matmul kernels' program order (fused_kernels: weight tiles reused in L2)


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
    # per-block fp32 sums of x − b (b ≈ the data's centre: little cancellation), combined in fp64 by a mat-vec
    # (on an H200 torch's sum over dim 0 of these [B/16, D] took ~13 µs, a cast + mat-vec a few)
    col_D = col_sums(col.double())
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
        return g_BD, torch.linalg.vector_norm(r_BD).square(), col_sums(r_BD)
    (B, D) = x_BD.shape
    g_BD = torch.empty(B, D, dtype=dtype, device=x_BD.device)
    kernel, grid, meta = _row_launcher("residual", x_BD)
    col = torch.empty(grid[0], D, dtype=torch.float32, device=x_BD.device)
    sq = torch.empty(grid[0], dtype=torch.float32, device=x_BD.device)
    kernel[grid](recon_BD, x_BD, g_BD, col, sq, B, c, D=D, **meta)
    return g_BD, sq.sum(), col_sums(col)


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


def encode_relu(xc_BD: Tensor, W_DF: Tensor, b_F: Tensor, backend: str, tune: bool = True, stats: bool = True,
                impl: str | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """f = ReLU(xc W + b) in xc's dtype; with `stats` also Σ_B f (fp32) and the number of rows with f > 0 (int64)
    per feature, else None for both (relu_backward(stats=True) gives them). `tune=False`: the FIXED config even
    where the autotuner would run. Without stats the Triton backend's matmul is `impl`: 'triton', or 'cublas' (a
    bias + ReLU epilogue; on CPU addmm + relu)."""
    if backend == "torch" or not _matmul_fits(xc_BD, W_DF, W_DF.shape[1]):
        f_BF = _addmm_relu(b_F, xc_BD, W_DF)
        return (f_BF, f_BF.sum(0, dtype=_sum_dtype(f_BF)), firing_counts(f_BF)) if stats else (f_BF, None, None)
    if not stats and impl == "cublas":
        return _addmm_relu(b_F, xc_BD, W_DF), None, None
    (B, D), F = xc_BD.shape, W_DF.shape[1]
    f_BF = torch.empty(B, F, dtype=xc_BD.dtype, device=xc_BD.device)
    part = torch.empty(triton_cdiv(B, MIN_BLOCK_M), 2, F, dtype=torch.float32, device=xc_BD.device) if stats else f_BF
    kernel, grid, extra = _launcher("encode", xc_BD, F, tune)
    kernel[grid](xc_BD, W_DF, b_F, f_BF, part, B, F, xc_BD.stride(0), W_DF.stride(0),
                 W_DF.stride(1), K=D, STATS=stats, **_precision(xc_BD), **extra)
    if not stats:
        return f_BF, None, None
    fsum_F, counts_F = _finish(part, _rows_written(kernel, extra, B))
    return f_BF, fsum_F, counts_F.long()


def relu_backward(g_BD: Tensor, W_FD: Tensor, f_BF: Tensor, add: Tensor, backend: str, stats: bool = False
                  ) -> tuple[Tensor, ...]:
    """g_pre = [f > 0]·(g W_FDᵀ + add) in g's dtype (add: a 0-dim fp32 tensor) and Σ_B g_pre (fp32); with
    `stats` also Σ_B f (fp32) and the rows with f > 0 (int64), per feature, as encode_relu(stats=True) gives them."""
    if backend == "torch" or not _matmul_fits(g_BD, W_FD, W_FD.shape[0]):
        # λ/B as a bias vector, added in the matmul's epilogue (in bf16 runs rounded to bf16: <= 0.2% of λ)
        bias_F = add.to(g_BD.dtype).expand(W_FD.shape[0])
        g_pre = torch.ops.aten.threshold_backward(torch.addmm(bias_F, g_BD, W_FD.T), f_BF, 0)
        out = (g_pre, g_pre.sum(0, dtype=_sum_dtype(g_pre)))
        return out + (f_BF.sum(0, dtype=_sum_dtype(f_BF)), firing_counts(f_BF)) if stats else out
    (B, D), F = g_BD.shape, W_FD.shape[0]
    g_pre = torch.empty(B, F, dtype=g_BD.dtype, device=g_BD.device)
    part = torch.empty(triton_cdiv(B, MIN_BLOCK_M), 3 if stats else 1, F, dtype=torch.float32, device=g_BD.device)
    kernel, grid, extra = _launcher("backward", g_BD, F)
    kernel[grid](g_BD, W_FD, f_BF, add, g_pre, part, B, F, g_BD.stride(0), W_FD.stride(0), W_FD.stride(1),
                 f_BF.stride(0), K=D, STATS=stats, **_precision(g_BD), **extra)
    sums = _finish(part, _rows_written(kernel, extra, B))
    return (g_pre, sums[0], sums[1], sums[2].long()) if stats else (g_pre, sums[0])


def _matmul_fits(x_BD: Tensor, W: Tensor, F: int) -> bool:
    """The matmul kernels take x [B, D] and W giving F output columns: 32-bit offsets, counts exact in fp32."""
    return max(x_BD.shape[0] * F, W.numel(), x_BD.numel()) < MAX_NUMEL and x_BD.shape[0] < MAX_COUNT_ROWS


def _addmm_relu(b_F: Tensor, x_BD: Tensor, W_DF: Tensor) -> Tensor:
    b = b_F.to(x_BD.dtype)
    return torch._addmm_activation(b, x_BD, W_DF) if x_BD.is_cuda else torch.addmm(b, x_BD, W_DF).relu_()


def _finish(part_RSF: Tensor, rows: int) -> Tensor:
    """[S, F]: the sums over the first `rows` row blocks of a kernel's partial sums, by one matrix-vector product."""
    _, S, F = part_RSF.shape
    return col_sums(part_RSF[:rows].view(rows, S * F)).view(S, F)


def col_sums(x_RC: Tensor) -> Tensor:
    """Σ over rows, [C], as a mat-vec (cuBLAS): on an H200 torch's sum(0) of a [128, 4096] fp32 tensor took ~9 µs."""
    return x_RC.T.mv(x_RC.new_ones(x_RC.shape[0]))


def _rows_written(kernel: Any, extra: dict, B: int) -> int:
    """How many row blocks (of the partial sums) the launch just made wrote: ⌈B/BM⌉ for the BM it ran with (the
    autotuner's pick for this call, read on the host: no sync; graph replays keep the captured launch)."""
    bm = extra["BM"] if "BM" in extra else kernel.best_config.kwargs["BM"]
    return triton_cdiv(B, bm)


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
            {"BM": MIN_BLOCK_M, "BN": 32, "BK": 32, "UPCAST": True, "GM": GROUP_M}
    if not tune or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        bm, bn, bk, warps, stages = FIXED
        return kernels[name + "_fixed"], (triton_cdiv(B, bm) * triton_cdiv(F, bn),), \
            {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages, "UPCAST": False, "GM": GROUP_M}

    def grid(meta: dict) -> tuple[int]:
        return (triton_cdiv(B, meta["BM"]) * triton_cdiv(F, meta["BN"]),)
    return kernels[name], grid, {"UPCAST": False, "GM": GROUP_M}


def _encoder_env() -> str:
    value = os.environ.get(ENCODE_ENV, "auto")
    if value not in ("auto", *LAYOUTS):
        raise ValueError(f"{ENCODE_ENV}={value!r}: use auto, {', '.join(LAYOUTS[:-1])} or {LAYOUTS[-1]}")
    return value


_LAYOUT_PICKS: dict[tuple, str] = {}  # (shapes, strides, dtype, precision, device) -> a layout


def step_layout(xc_BD: Tensor, W_DF: Tensor, b_F: Tensor, W_FD: Tensor, tune: bool = True,
                pin: str | None = None) -> str:
    """The step's layout (LAYOUTS) on these operands: ENCODE_ENV if set; else `pin` if given (a resumed run keeps
    the layout its checkpoint names: the other one would round differently); on CUDA the faster of `stats` and
    `cublas`, timed once per shape outside graph capture (a capture that meets an untimed shape uses `stats`);
    `stats` off CUDA (the interpreter). Timed with the backward, whose register pressure the sums change: compiled
    for sm_90 its 128×128 4-warp configs spill 32 bytes a thread without them and 88 with them."""
    forced = _encoder_env()
    if forced != "auto" or pin is not None or not xc_BD.is_cuda:
        return forced if forced != "auto" else pin or "stats"
    key = (tuple(xc_BD.shape), tuple(W_DF.shape), W_DF.stride(), W_FD.stride(), xc_BD.dtype,
           _precision(xc_BD)["PRECISION"], xc_BD.device, tune)
    if key not in _LAYOUT_PICKS:
        if torch.cuda.is_current_stream_capturing():
            return "stats"
        _LAYOUT_PICKS[key] = _time_layouts(xc_BD, W_DF, b_F, W_FD, tune)
    return _LAYOUT_PICKS[key]


def _time_layouts(xc_BD: Tensor, W_DF: Tensor, b_F: Tensor, W_FD: Tensor, tune: bool, reps: int = 20,
                  rounds: int = 3) -> str:
    """The faster of `stats` and `cublas`: device time of `reps` encoder + backward pairs, the best of `rounds`
    rounds taken in alternating order, each from an idle GPU (other streams' queued work, e.g. an LM refill,
    would run beside the first one timed), after 3 warm-ups each (Triton's autotuning and compilation happen in
    the first); xc stands in for the residual's gradient (same shape)."""
    add, times = torch.zeros((), device=xc_BD.device), {"stats": [], "cublas": []}

    def pair(layout: str) -> None:
        split = layout != "stats"
        f_BF = encode_relu(xc_BD, W_DF, b_F, "triton", tune, stats=not split, impl=layout)[0]
        relu_backward(xc_BD, W_FD, f_BF, add, "triton", stats=split)

    for layout in times:
        for _ in range(3):
            pair(layout)
    for r in range(rounds):
        for layout in (list(times) if r % 2 == 0 else list(times)[::-1]):
            torch.cuda.synchronize(xc_BD.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                pair(layout)
            end.record()
            end.synchronize()
            times[layout].append(start.elapsed_time(end))
    return min(times, key=lambda layout: min(times[layout]))


def tuned_configs() -> dict[str, str]:
    """The autotuner's pick per kernel (for benchmark records): 'BM×BN×BK/warps/stages', once it has run; and the
    last step layout picked by timing (`layout`)."""
    if not triton_available() or _kernels.cache_info().currsize == 0:
        return {}
    out = {"layout": next(reversed(_LAYOUT_PICKS.values()))} if _LAYOUT_PICKS else {}
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
    again)."""
    import inspect

    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(configs, key=key, **kwargs)(fn)


@functools.cache
def _kernels() -> dict:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from sae_stream import fused_kernels as k

    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in CONFIGS]
    fns = {"encode": k._encode, "backward": k._backward, "center": k._center, "residual": k._residual,
           "project": k._project_rows, "normalize": k._normalize_rows}
    out = {name: triton.jit(fn) for name, fn in fns.items()}
    for name in ("encode", "backward"):
        out[name + "_fixed"] = out[name]
        # (the partial sums need no reset between trials: only the rows the final launch wrote are summed)
        out[name] = autotuned(out[name], configs, ["M", "N", "K", "STATS", "PRECISION"])
    return out | {name + "_interpreted": InterpretedFunction(fn) for name, fn in fns.items()}
