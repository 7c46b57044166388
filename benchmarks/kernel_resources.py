"""What the step's Triton matmul kernels cost a GPU's SM, without a GPU: each kernel compiled for sm_90 (H100 / H200)
by Triton's own ptxas, as a launch at the step's shapes would specialise it (d_in 512, bf16, sizes and strides
multiples of 16), and its registers per thread, spill stack, shared memory and whether its matmul runs on warpgroup
(wgmma) tensor cores, per autotune config (fused_ops.CONFIGS). Registers decide how many blocks an SM holds (65,536
per SM), and a stack means spills to local memory; the autotuner only sees the resulting time.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources.jsonl

One JSON line per (kernel, f's sums in it or not, config), then a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sae_stream.fused_ops import CONFIGS, GROUP_M  # noqa: E402

SM90_SHARED = 227 * 1024  # an H100's / H200's shared memory per block
TAIL = ("K", "STATS", "PRECISION", "UPCAST", "BM", "BN", "BK", "GM")
SIGNATURES = {  # kernel: (argument kinds before the constexprs, the argument a launch passes as 1, the aligned ones)
    "encode": ("x_ptr w_ptr b_ptr f_ptr part_ptr M N sxm swk swn", "swn"),
    "backward": ("g_ptr w_ptr f_ptr add_ptr out_ptr part_ptr M N sgm swn swk sfm", "swk"),
}


def sm90_compiler() -> Callable[..., Any] | None:
    """compile(fn, signature, constexprs, aligned, warps, stages) for sm_90, or None without Triton's CUDA backend."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        return None
    if "nvidia" not in triton.backends.backends:
        return None
    target = GPUTarget("cuda", 90, 32)

    def compile_sm90(fn, signature: dict, constexprs: dict, aligned: list[str], warps: int = 4, stages: int = 3):
        """`fn` as a launch specialises it: 16-byte aligned pointers and the ints in `aligned` multiples of 16, the
        constexprs (and ints equal to 1) folded in."""
        sig = {name: ("constexpr" if name in constexprs else kind) for name, kind in signature.items()}
        keys = list(sig)
        attrs = {(keys.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=triton.jit(fn), signature=sig, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    return compile_sm90


def matmul_signature(kernel: str, dtype: str) -> tuple[dict, str, list[str]]:
    """(signature, the argument equal to 1, the aligned arguments) of fused_kernels' `kernel` with `dtype` operands."""
    names, unit = SIGNATURES[kernel]
    kinds = {"b_ptr": "*fp32", "add_ptr": "*fp32", "part_ptr": "*fp32"}
    sig = {n: kinds.get(n, f"*{dtype}") if n.endswith("_ptr") else "i32" for n in names.split()}
    return sig | dict.fromkeys(TAIL, "constexpr"), unit, [n for n in names.split() if n != unit]


def registers_and_stack(cubin: bytes) -> tuple[int, int]:
    """REG and STACK of the kernel in `cubin`, from cuobjdump (shipped with Triton's CUDA backend)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(x for x in out.splitlines() if "REG:" in x)
    return int(line.split("REG:")[1].split()[0]), int(line.split("STACK:")[1].split()[0])


def measure(configs: Sequence[tuple[int, ...]], dtype: str = "bf16") -> list[dict]:
    from sae_stream import fused_kernels as k

    compile_sm90 = sm90_compiler()
    if compile_sm90 is None:
        raise SystemExit("kernel_resources: this Triton has no CUDA backend (ptxas) to compile with")
    import triton

    common = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "target": "sm_90",
              "dtype": dtype, "d_in": 512}
    rows = []
    for kernel, fn in (("encode", k._encode), ("backward", k._backward)):
        sig, unit, aligned = matmul_signature(kernel, dtype)
        for stats in (False, True):
            for bm, bn, bk, warps, stages in configs:
                meta = {"K": 512, "STATS": stats, "PRECISION": "ieee" if dtype == "bf16" else "tf32",
                        "UPCAST": False, "BM": bm, "BN": bn, "BK": bk, "GM": GROUP_M, unit: 1}
                compiled = compile_sm90(fn, sig, meta, aligned, warps, stages)
                regs, stack = registers_and_stack(compiled.asm["cubin"])
                rows.append(common | {"kernel": kernel, "f_sums": stats, "config": f"{bm}x{bn}x{bk}/{warps}/{stages}",
                                      "registers": regs, "stack_bytes": stack,
                                      "shared_bytes": compiled.metadata.shared,
                                      "blocks_per_sm_by_registers": 65536 // (regs * 32 * warps),
                                      "wgmma": "warp_group_dot" in compiled.asm["ttgir"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| config | " + " | ".join(f"{k} {'+ sums' if s else ''}".strip() for k, s in
                                       (("encode", False), ("encode", True), ("backward", False), ("backward", True)))
             + " |", "|---|---:|---:|---:|---:|"]
    by = {(r["kernel"], r["f_sums"], r["config"]): r for r in rows}
    for config in dict.fromkeys(r["config"] for r in rows):
        cells = [by[(k, s, config)] for k, s in (("encode", False), ("encode", True), ("backward", False),
                                                ("backward", True))]
        lines.append(f"| {config} | " + " | ".join(f"{c['registers']} / {c['stack_bytes']}" for c in cells) + " |")
    return "\n".join(lines) + "\n(registers per thread / spill stack bytes)"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--configs", type=int, default=None, help="only the first N of fused_ops.CONFIGS")
    p.add_argument("--out", default=None, help="append the JSON lines here")
    args = p.parse_args(argv)
    rows = measure(CONFIGS[:args.configs], args.dtype)
    for r in rows:
        line = json.dumps(r)
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
