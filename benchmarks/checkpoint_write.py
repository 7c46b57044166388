"""Writing a checkpoint that holds a large ring: seconds and peak host memory of `save_checkpoint` (torch.save
streamed to the file, hashed on the way) against serialising into memory first (the way before), each variant in
its own process so that its peak RSS is its own. Default: the paper's A/1 ring, 4M x 512 in bf16 (4.3 GB).

    python benchmarks/checkpoint_write.py --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --rows 65536 --repeats 1          # smoke

One JSON line per variant and repeat (seconds, peak_rss_gb above the process's RSS with the state built).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def in_memory_save(ckpt_dir: Path, state: dict) -> None:
    """The previous atomic_torch_save: torch.save into a BytesIO, write the bytes, hash them."""
    from sae_stream.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write_bytes(ckpt_dir / "state.pt", data)
    hashlib.sha256(data).hexdigest()


def run_variant(variant: str, rows: int, d_in: int, directory: str) -> dict:
    from sae_stream.checkpoint import save_checkpoint

    acts = torch.randn(rows, d_in, dtype=torch.bfloat16)  # (no fp32 transient: it would be the peak)
    state = {"extra": {"buffer": {"acts": acts, "slots": torch.arange(rows)}}}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "streamed":
        save_checkpoint(Path(directory), 1, state, keep=1)
    else:
        in_memory_save(Path(directory), state)
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / 1e9  # ru_maxrss: KiB on Linux
    return {"variant": variant, "seconds": round(seconds, 2), "peak_rss_gb": round(peak, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4 * 2**20)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir on the default temp disk)")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._variant:  # a child: one measurement, printed as JSON
        print(json.dumps(run_variant(args._variant, args.rows, args.d_in, args.dir)))
        return
    gb = args.rows * args.d_in * 2 / 1e9
    for _ in range(args.repeats):
        for variant in ("in_memory", "streamed"):  # alternating: the disk's speed drifts
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                cmd = [sys.executable, __file__, "--_variant", variant, "--rows", str(args.rows), "--d-in",
                       str(args.d_in), "--dir", tmp]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                shutil.rmtree(tmp, ignore_errors=True)
            row = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "ring_gb": round(gb, 2)} | res
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
