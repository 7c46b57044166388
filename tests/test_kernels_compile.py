"""The Triton kernels compile for an H100 / H200 (sm_90) on a machine with no GPU: Triton's own ptxas, the signature
and specialisation a CUDA launch at the step's shapes would give. The interpreter (test_fused_ops.py) checks what
the kernels compute; this checks what only the compiler sees (layouts, types, shared memory, tensor-core use), which
the interpreter lets through."""

from __future__ import annotations

import pytest

from sae_stream.fused_ops import CONFIGS, FIXED, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs the triton package")
SM90_SHARED = 227 * 1024  # an H100's / H200's shared memory per block


def _compiler():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no CUDA backend (ptxas) to compile with")
    target = GPUTarget("cuda", 90, 32)

    def compile_sm90(fn, signature: dict, constexprs: dict, divisible: list[str], warps: int = 4, stages: int = 3):
        """`fn` compiled as a launch would specialise it: 16-byte aligned pointers, the sizes and strides in
        `divisible` multiples of 16, the constexprs (and ints equal to 1) folded in."""
        sig = {name: ("constexpr" if name in constexprs else kind) for name, kind in signature.items()}
        keys = list(sig)
        attrs = {(keys.index(n),): [["tt.divisibility", 16]] for n in divisible}
        src = ASTSource(fn=triton.jit(fn), signature=sig, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    return compile_sm90


def _matmul_signature(names: str, dtype: str) -> dict:
    kinds = {"b_ptr": "*fp32", "add_ptr": "*fp32", "part_ptr": "*fp32"}
    return {n: kinds.get(n, f"*{dtype}") if n.endswith("_ptr") else "i32" for n in names.split()}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("stats", [False, True])
def test_step_matmul_kernels__compile_for_sm90_with_tensor_cores(dtype: str, stats: bool) -> None:
    """The encoder and the backward at d_in 512, in both layouts (f's sums in either), at the fixed config and the
    one an H200 picked: each compiles to warpgroup (wgmma) matmuls within the shared memory of a block."""
    from sae_stream import fused_kernels as k

    compile_sm90 = _compiler()
    precision = "ieee" if dtype == "bf16" else "tf32"
    encode = _matmul_signature("x_ptr w_ptr b_ptr f_ptr part_ptr M N sxm swk swn", dtype)
    backward = _matmul_signature("g_ptr w_ptr f_ptr add_ptr out_ptr part_ptr M N sgm swn swk sfm", dtype)
    for bm, bn, bk, warps, stages in {FIXED, (128, 128, 64, 4, 3)}:
        meta = {"K": 512, "STATS": stats, "PRECISION": precision, "UPCAST": False, "BM": bm, "BN": bn, "BK": bk}
        for fn, sig, unit, div in ((k._encode, encode, "swn", "x_ptr w_ptr b_ptr f_ptr part_ptr M N sxm swk"),
                                   (k._backward, backward, "swk", "g_ptr w_ptr f_ptr add_ptr out_ptr part_ptr M N sgm "
                                                                  "swn sfm")):
            compiled = compile_sm90(fn, sig | {"K": 0, "STATS": 0, "PRECISION": 0, "UPCAST": 0, "BM": 0, "BN": 0,
                                               "BK": 0}, meta | {unit: 1}, div.split(), warps, stages)
            assert "warp_group_dot" in compiled.asm["ttgir"], (fn.__name__, bm, bn, bk)
            assert 0 < compiled.metadata.shared <= SM90_SHARED, (fn.__name__, compiled.metadata.shared)


def test_step_row_kernels_and_lm_kernels__compile_for_sm90() -> None:
    """Centring and the residual (bf16 and fp32 x), the decoder-row ops, and the LM's LayerNorm and fused block."""
    import lm.fused as lm_fused
    from sae_stream import fused_kernels as k

    compile_sm90 = _compiler()
    rows = {"D": 512, "BD": 512, "BR": 16}
    for dtype in ("bf16", "fp32"):
        compile_sm90(k._center, {"x_ptr": f"*{dtype}", "b_ptr": "*fp32", "xc_ptr": "*bf16", "col_ptr": "*fp32",
                                 "sq_ptr": "*fp32", "bad_ptr": "*i32", "M": "i32", **dict.fromkeys(rows)},
                     rows, ["x_ptr", "b_ptr", "xc_ptr", "col_ptr", "M"])
        compile_sm90(k._residual, {"r_ptr": "*bf16", "x_ptr": f"*{dtype}", "g_ptr": "*bf16", "col_ptr": "*fp32",
                                   "sq_ptr": "*fp32", "M": "i32", "c": "fp32", **dict.fromkeys(rows)},
                     rows, ["r_ptr", "x_ptr", "g_ptr", "col_ptr", "M"])
    row_ops = {"D": 512, "BD": 512, "BR": 8}
    compile_sm90(k._project_rows, {"g_ptr": "*fp32", "w_ptr": "*fp32", "F": "i32", **dict.fromkeys(row_ops)},
                 row_ops, ["g_ptr", "w_ptr", "F"])
    compile_sm90(k._normalize_rows, {"w_ptr": "*fp32", "F": "i32", **dict.fromkeys(row_ops)}, row_ops,
                 ["w_ptr", "F"])
    ln = {"D": 128, "BD": 128, "BR": 32}
    compile_sm90(lm_fused._layer_norm, {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16",
                                        "M": "i32", "eps": "fp32", **dict.fromkeys(ln)}, ln,
                 ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "M"])
    bm, bn, warps = lm_fused.FIXED
    mlp = {"D": 128, "BD": 128, "RELU": True, "UPCAST": False, "BM": bm, "BN": bn}
    ptrs = "z_ptr wo_ptr bo_ptr x_ptr lnw_ptr lnb_ptr wfc_ptr bfc_ptr out_ptr".split()
    kinds = {"z_ptr": "*bf16", "wo_ptr": "*bf16", "wfc_ptr": "*bf16", "out_ptr": "*bf16"}
    compiled = compile_sm90(lm_fused._mlp_in, {p: kinds.get(p, "*fp32") for p in ptrs} | {"N": "i32", "M": "i32",
                            "eps": "fp32", **dict.fromkeys(mlp)}, mlp, [*ptrs, "N", "M"], warps, 2)
    assert "dot" in compiled.asm["ttgir"]


def test_autotune_configs__every_one_fits_a_block_in_bf16() -> None:
    """Each (BM, BN, BK, stages) of fused_ops.CONFIGS keeps its bf16 operand tiles in an sm_90 block's shared memory
    (the autotuner drops a config that does not, but then it is a config never tried)."""
    for bm, bn, bk, _, stages in CONFIGS:
        assert (bm * bk + bk * bn) * 2 * stages <= SM90_SHARED, (bm, bn, bk, stages)
