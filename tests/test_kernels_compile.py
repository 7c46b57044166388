"""The Triton kernels compile for an H100 / H200 (sm_90) on a machine with no GPU: Triton's own ptxas, the signature
and specialisation a CUDA launch at the step's shapes would give. The interpreter (test_fused_ops.py) checks what
the kernels compute; this checks what only the compiler sees (layouts, types, shared memory, tensor-core use), which
the interpreter lets through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sae_stream.fused_ops import CONFIGS, FIXED, GROUP_M, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs the triton package")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import kernel_resources  # noqa: E402 — the sm_90 compiler the benchmark uses
    from kernel_resources import SM90_SHARED  # noqa: E402
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def _compiler():
    """benchmarks/kernel_resources.py's sm_90 compiler (skips without Triton's CUDA backend)."""
    compile_sm90 = kernel_resources.sm90_compiler()
    if compile_sm90 is None:
        pytest.skip("this Triton has no CUDA backend (ptxas) to compile with")
    return compile_sm90, kernel_resources


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("stats", [False, True])
def test_step_matmul_kernels__compile_for_sm90_with_tensor_cores(dtype: str, stats: bool) -> None:
    """The encoder and the backward at d_in 512, in both layouts (f's sums in either), at the fixed config and the
    one an H200 picked: each compiles to warpgroup (wgmma) matmuls within the shared memory of a block."""
    from sae_stream import fused_kernels as k

    compile_sm90, resources = _compiler()
    precision = "ieee" if dtype == "bf16" else "tf32"
    for bm, bn, bk, warps, stages in {FIXED, (128, 128, 64, 4, 3)}:
        meta = {"K": 512, "STATS": stats, "PRECISION": precision, "UPCAST": False, "BM": bm, "BN": bn, "BK": bk,
                "GM": GROUP_M}
        for kernel, fn in (("encode", k._encode), ("backward", k._backward)):
            sig, unit, aligned = resources.matmul_signature(kernel, dtype)
            compiled = compile_sm90(fn, sig, meta | {unit: 1}, aligned, warps, stages)
            assert "warp_group_dot" in compiled.asm["ttgir"], (kernel, bm, bn, bk)
            assert 0 < compiled.metadata.shared <= SM90_SHARED, (kernel, compiled.metadata.shared)


def test_step_row_kernels_and_lm_kernels__compile_for_sm90() -> None:
    """Centring and the residual (bf16 and fp32 x), the decoder-row ops, and the LM's LayerNorm and fused block."""
    import lm.fused as lm_fused
    from sae_stream import fused_kernels as k

    compile_sm90, _ = _compiler()
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
    for embed in (False, True):  # the LayerNorm of x, or of the embedding it computes and stores
        ln = {"D": 128, "BD": 128, "BR": 32, "EMBED": embed}
        compile_sm90(lm_fused._layer_norm, {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16",
                                            "M": "i32", "eps": "fp32", "tok_ptr": "*i64", "wte_ptr": "*fp32",
                                            "wpe_ptr": "*fp32", "T": "i32", **dict.fromkeys(ln)}, ln,
                     ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "M", "tok_ptr", "wte_ptr", "wpe_ptr"])
    bm, bn, warps = lm_fused.FIXED
    for dest in (False, True):  # stored in row order, or each row to its ring slot
        mlp = {"D": 128, "BD": 128, "RELU": True, "DEST": dest, "UPCAST": False, "BM": bm, "BN": bn}
        ptrs = "z_ptr wo_ptr bo_ptr x_ptr lnw_ptr lnb_ptr wfc_ptr bfc_ptr out_ptr dest_ptr".split()
        kinds = {"z_ptr": "*bf16", "wo_ptr": "*bf16", "wfc_ptr": "*bf16", "out_ptr": "*bf16", "dest_ptr": "*i64"}
        compiled = compile_sm90(lm_fused._mlp_in, {p: kinds.get(p, "*fp32") for p in ptrs} | {
            "N": "i32", "M": "i32", "eps": "fp32", **dict.fromkeys(mlp)}, mlp, [*ptrs, "N", "M"], warps, 2)
        assert "dot" in compiled.asm["ttgir"]


def test_autotune_configs__every_one_fits_a_block_in_bf16() -> None:
    """Each (BM, BN, BK, stages) of fused_ops.CONFIGS keeps its bf16 operand tiles in an sm_90 block's shared memory
    (the autotuner drops a config that does not, but then it is a config never tried)."""
    for bm, bn, bk, _, stages in CONFIGS:
        assert (bm * bk + bk * bn) * 2 * stages <= SM90_SHARED, (bm, bn, bk, stages)


def test_kernel_resources__rows_per_kernel_layout_and_config(tmp_path) -> None:
    """benchmarks/kernel_resources.py (two configs): a row per kernel, f's sums or not, and config, with the
    registers (blocks per SM following from them), spill stack and shared memory of that compile."""
    import json
    import subprocess

    if kernel_resources.sm90_compiler() is None:
        pytest.skip("this Triton has no CUDA backend (ptxas) to compile with")
    out = tmp_path / "resources.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--configs", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["kernel"], r["f_sums"], r["config"]) for r in rows} == {
        (k, s, f"{bm}x{bn}x{bk}/{w}/{st}") for k in ("encode", "backward") for s in (False, True)
        for bm, bn, bk, w, st in CONFIGS[:2]}
    for r in rows:
        warps = int(r["config"].split("/")[1])
        assert 0 < r["registers"] <= 255 and r["stack_bytes"] >= 0 and r["wgmma"]
        assert r["blocks_per_sm_by_registers"] == 65536 // (r["registers"] * 32 * warps) >= 1
        assert 0 < r["shared_bytes"] <= SM90_SHARED
    assert "| config |" in proc.stdout
