"""Sparse forward/backward for TopK-style SAEs: only the selected (row, feature) entries are touched.

    sel, order_BK = rowwise(idx_BK, d_sae)                          # k columns per row -> Selected
    vals_N = GatherEncode.apply(pre_N, x_BD, W_enc_DF, bias_F, sel, via).relu()
    dec_BD = SparseDecode.apply(vals_N, W_dec_FD, sel, via)         # Σ_j vals · W_dec[col_j] per row

Dense decoding costs B·d_sae·d_in per matmul (forward, and two in the backward); these cost B·nnz·d_in. Two
backward flavours, chosen by `via`:
- "spmm": torch.sparse matmuls (COO/CSR). Fastest on CPU (~2x a dense step at 512 -> 4096, k = 32).
- "index": gathers and index_add, forward and backward. No sparse tensors and no host synchronisation, written to
  be captured in a CUDA graph (not yet run on a GPU); it makes [nnz, d_in] temporaries (nnz = B·k; AuxK: B·auxk_k,
  ~8x more at the default auxk_k = d_in/2), so on a GPU it can only beat tensor-core dense matmuls at large d_sae.
Both are checked against a dense reference in tests/test_sae.py.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

VIAS = ("spmm", "index")


class Selected(NamedTuple):
    """Positions kept in a [n_rows, d_sae] activation matrix, row-major: rows_N non-decreasing, and cols_N
    increasing within each row (rowwise and BatchTopK's select sort them; by_group relies on it)."""

    rows_N: Tensor
    cols_N: Tensor
    offsets_B: Tensor  # index of each row's first entry
    shape: tuple[int, int]


def rowwise(idx_BK: Tensor, d_sae: int) -> tuple[Selected, Tensor]:
    """Selected for k columns per row (column-sorted within each row, as CSR wants); returns the sort order."""
    idx_BK, order_BK = idx_BK.sort(dim=-1)
    n_rows, k = idx_BK.shape
    rows_N = torch.arange(n_rows, device=idx_BK.device)[:, None].expand(n_rows, k).flatten()
    offsets_B = torch.arange(0, n_rows * k, k, device=idx_BK.device)
    return Selected(rows_N, idx_BK.flatten(), offsets_B, (n_rows, d_sae)), order_BK


def by_group(sel: Selected, bounds: tuple[int, ...]) -> Selected:
    """The selection with each row split into one row per group of columns [bounds[g], bounds[g + 1]): entry (r, c)
    moves to row r·G + g, so one decode gives every group's part, [n_rows·G, d_in] (Matryoshka levels). Row-major
    order holds because columns are sorted within each row. One group: `sel` itself."""
    n_groups = len(bounds) - 1
    if n_groups == 1:
        return sel
    group_N = sum((sel.cols_N >= b).long() for b in bounds[1:-1])  # (no tensor from host data: graph-capturable)
    rows_N = sel.rows_N * n_groups + group_N
    n_rows = sel.shape[0] * n_groups
    return Selected(rows_N, sel.cols_N, torch.searchsorted(rows_N, torch.arange(n_rows, device=rows_N.device)),
                    (n_rows, sel.shape[1]))


def _coo_FB(sel: Selected, vals_N: Tensor) -> Tensor:
    """The selection as a sparse [d_sae, n_rows] matrix (the transpose of the activations)."""
    return torch.sparse_coo_tensor(torch.stack([sel.cols_N, sel.rows_N]), vals_N, (sel.shape[1], sel.shape[0]))


def _rows_into(n_out: int, index_N: Tensor, rows_ND: Tensor) -> Tensor:
    """[n_out, D] with rows_ND summed into the rows index_N (index_add: no sparse tensor, no host sync)."""
    return torch.zeros(n_out, rows_ND.shape[1], dtype=rows_ND.dtype, device=rows_ND.device).index_add_(
        0, index_N, rows_ND)


def _check_via(via: str) -> None:
    if via not in VIAS:
        raise ValueError(f"sparse TopK backward must be one of {', '.join(VIAS)}, got {via!r}")


class GatherEncode(torch.autograd.Function):
    """Pre-activations at the selected positions (values precomputed by the dense no-grad encoder matmul);
    the backward touches only those positions: dW_enc = (S_FB @ x)ᵀ, not xᵀ·dpre_BF."""

    @staticmethod
    def forward(ctx, pre_N: Tensor, x_BD: Tensor, W_DF: Tensor, bias_F: Tensor, sel: Selected,
                via: str = "spmm") -> Tensor:
        _check_via(via)
        ctx.save_for_backward(x_BD, W_DF, sel.rows_N, sel.cols_N)
        ctx.shape, ctx.bias_dtype, ctx.via = sel.shape, bias_F.dtype, via
        return pre_N.clone()

    @staticmethod
    def backward(ctx, g_N: Tensor):
        x_BD, W_DF, rows_N, cols_N = ctx.saved_tensors
        g_N = g_N.to(W_DF.dtype)
        dx = dW = dbias = None
        if ctx.via == "index":
            if ctx.needs_input_grad[1]:
                dx = _rows_into(ctx.shape[0], rows_N, g_N[:, None] * W_DF.T[cols_N])
            if ctx.needs_input_grad[2]:
                dW = _rows_into(ctx.shape[1], cols_N, g_N[:, None] * x_BD.to(W_DF.dtype)[rows_N]).T
        else:
            S_FB = _coo_FB(Selected(rows_N, cols_N, rows_N, ctx.shape), g_N)
            dx = torch.sparse.mm(S_FB.t(), W_DF.T) if ctx.needs_input_grad[1] else None
            dW = torch.sparse.mm(S_FB, x_BD.to(W_DF.dtype)).T if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[3]:
            dbias = torch.zeros(ctx.shape[1], dtype=g_N.dtype, device=g_N.device).index_add_(0, cols_N, g_N)
            dbias = dbias.to(ctx.bias_dtype)
        return None, dx, dW, dbias, None, None


class SparseDecode(torch.autograd.Function):
    """Σ vals · W_dec[col] per row (spmm: embedding_bag; index: gather + index_add). Sparse backward: d_vals by a
    sampled matmul (spmm: SDDMM; index: gather + row-wise dot), dW_dec = S_FB @ grad (spmm: sparse matmul; index:
    index_add)."""

    @staticmethod
    def forward(ctx, vals_N: Tensor, W_FD: Tensor, sel: Selected, via: str = "spmm") -> Tensor:
        _check_via(via)
        v_N = vals_N.to(W_FD.dtype)
        ctx.save_for_backward(v_N, W_FD, sel.rows_N, sel.cols_N, sel.offsets_B)
        ctx.shape, ctx.vals_dtype, ctx.via = sel.shape, vals_N.dtype, via
        if via == "index":  # embedding_bag's CUDA offset checks could sync: a gather and index_add cannot
            return _rows_into(sel.shape[0], sel.rows_N, v_N[:, None] * W_FD[sel.cols_N])
        return F.embedding_bag(sel.cols_N, W_FD, sel.offsets_B, mode="sum", per_sample_weights=v_N)

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        v_N, W_FD, rows_N, cols_N, offsets_B = ctx.saved_tensors
        g_BD = g_BD.to(W_FD.dtype).contiguous()
        d_vals = d_W = None
        if ctx.via == "index":
            g_ND = g_BD[rows_N]
            if ctx.needs_input_grad[0]:
                d_vals = (W_FD[cols_N] * g_ND).sum(dim=1).to(ctx.vals_dtype)
            if ctx.needs_input_grad[1]:
                d_W = _rows_into(ctx.shape[1], cols_N, v_N[:, None] * g_ND)
            return d_vals, d_W, None, None
        if ctx.needs_input_grad[0]:
            crow = torch.cat([offsets_B, offsets_B.new_tensor([cols_N.numel()])])
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(crow, cols_N, torch.zeros_like(v_N), ctx.shape)
            d_vals = torch.sparse.sampled_addmm(pattern, g_BD, W_FD.T, beta=0.0).values().to(ctx.vals_dtype)
        if ctx.needs_input_grad[1]:
            d_W = torch.sparse.mm(_coo_FB(Selected(rows_N, cols_N, offsets_B, ctx.shape), v_N), g_BD)
        return d_vals, d_W, None, None
