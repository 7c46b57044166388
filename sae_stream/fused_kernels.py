"""The Triton kernels behind sae_stream.fused_ops (which launches them, documents the maths and holds the torch
references). Importable without Triton: then only `tl` is None.

Matmul kernels: program -> (row block, column block), in groups of GM row blocks: neighbouring programs share a
column block of the weights across GM row blocks (a weight too large for L2, 512 x 65536 bf16 = 64 MiB, is then
read from memory ~B/(BM·GM) times, not B/BM), and the input's row blocks (8 MB at batch 8192) stay in L2. Loads
wrap rows modulo M (in bounds without a mask) and mask K only when BK ∤ K; the epilogue masks what lies outside [M, N]:
stores and the partial sums. Partial sums go to part[row block, j, column] (fp32; NS = how many sums j): one
matrix-vector product over the row blocks the launch wrote finishes them all (deterministic, unlike atomics).
Counts are summed as fp32 (exact below 2^24 rows). Row kernels: BR whole rows (padded to BD, a power of two) per
program; their sums per program, combined by torch.
"""

from __future__ import annotations

try:
    import triton.language as tl
except ImportError:  # the torch backend only
    tl = None

if tl is not None:
    import triton

    @triton.jit
    def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GM: tl.constexpr):
        """This program's (row block, column block): column-major within a group of GM row blocks (the last group
        has what is left), the groups in order."""
        pid, per_group = tl.program_id(0), GM * tl.cdiv(N, BN)
        first_m = pid // per_group * GM
        rows = tl.minimum(tl.cdiv(M, BM) - first_m, GM)
        return first_m + pid % per_group % rows, pid % per_group // rows

    def _encode(x_ptr, w_ptr, b_ptr, f_ptr, part_ptr, M, N, sxm, swk, swn, K: tl.constexpr, STATS: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                GM: tl.constexpr):
        """f = ReLU(x W + b); STATS: part[:, 0] = Σ_rows f, part[:, 1] = #(f > 0), per row block."""
        pid_m, pid_n = _tile(M, N, BM, BN, GM)
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
        if STATS:
            f32 = f.to(tl.float32)
            tl.store(part_ptr + (pid_m * 2) * N + rn, tl.sum(f32, axis=0), mask=rn < N)
            tl.store(part_ptr + (pid_m * 2 + 1) * N + rn, tl.sum((f32 > 0).to(tl.float32), axis=0), mask=rn < N)

    def _backward(g_ptr, w_ptr, f_ptr, add_ptr, out_ptr, part_ptr, M, N, sgm, swn, swk, sfm, K: tl.constexpr,
                  STATS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr):
        """g_pre = [f > 0]·(g W_decᵀ + add); part[:, 0] = Σ_rows g_pre; STATS: part[:, 1] = Σ_rows f and
        part[:, 2] = #(f > 0), from the f tile the mask needs anyway."""
        pid_m, pid_n = _tile(M, N, BM, BN, GM)
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
        gsum = tl.sum(g.to(tl.float32), axis=0)
        if not STATS:
            tl.store(part_ptr + pid_m * N + rn, gsum, mask=rn < N)
        else:
            f32 = f.to(tl.float32)
            tl.store(part_ptr + (pid_m * 3) * N + rn, gsum, mask=rn < N)
            tl.store(part_ptr + (pid_m * 3 + 1) * N + rn, tl.sum(f32, axis=0), mask=rn < N)
            tl.store(part_ptr + (pid_m * 3 + 2) * N + rn, tl.sum((f32 > 0).to(tl.float32), axis=0), mask=rn < N)

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
