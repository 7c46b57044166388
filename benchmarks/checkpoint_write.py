"""Writing a checkpoint that holds a large ring, each variant in its own process so that its peak RSS is its own.
Default: the paper's A/1 ring, 4M x 512 in bf16 (4.3 GB).

--mode write: seconds and peak host memory of `save_checkpoint` (torch.save streamed to the file, hashed on the
way) against serialising into memory first (the way before).
--mode stall: what a checkpoint costs the training thread. `CheckpointWriter` synchronous (training waits for the
write) against background (training waits for the snapshot handover only), with a stand-in for the training
loop's host side running meanwhile: a Python loop of small torch ops (GIL-bound, like launching a step's
kernels), whose rate during the write is compared to its rate alone.

--mode snapshot: what the training thread still pays with background writes: `ShuffleBuffer.state_dict()` of a
full ring on --device (on a GPU: the live rows gathered and copied to host memory in 256 MB chunks), into new host
memory each time or into the kept buffer (`reuse_host_memory`, what training uses; pinned for a GPU ring), 3
times each, alternating; seconds and the GPU memory it needed above the ring.

--mode resume: a data-parallel rank resuming: a checkpoint holding --ranks rings of --rows, loaded and one rank's
ring copied out; peak RSS above the process's start, `load_checkpoint` (memory-mapped) against reading it whole.

    python benchmarks/checkpoint_write.py --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --mode stall --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --mode resume --rows 1048576 --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --mode snapshot --device cuda --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --rows 65536 --repeats 1          # smoke

One JSON line per variant and repeat (write: seconds, peak_rss_gb above the process's RSS with the state built;
stall: stall_s, write_s, loop_rate_during_write / loop rate alone).
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


def _host_loop(seconds: float | None = None, until: object = None) -> tuple[int, float]:
    """Small torch ops in a Python loop (the host side of a training loop) for `seconds` or until `until()`."""
    a = torch.ones(64)
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(50):
            a = (a * 1.0001).add_(1e-6).clamp_(max=1e6)
        n += 50
        elapsed = time.perf_counter() - t0
        if (seconds is not None and elapsed >= seconds) or (until is not None and until()):
            return n, elapsed


def run_stall(variant: str, rows: int, d_in: int, directory: str) -> dict:
    from sae_stream.checkpoint import CheckpointWriter

    torch.set_num_threads(1)
    acts = torch.randn(rows, d_in, dtype=torch.bfloat16)
    state = {"extra": {"buffer": {"acts": acts, "slots": torch.arange(rows)}}}
    n, dt = _host_loop(seconds=2.0)
    alone = n / dt
    writer = CheckpointWriter(background=variant == "background")
    t0 = time.perf_counter()
    writer.save(Path(directory), 1, state, keep=1)
    stall = time.perf_counter() - t0
    during = None
    if writer.background:
        n, dt = _host_loop(until=lambda: all(f.done() for _, _, f in writer._inflight))
        during = n / dt
    writer.wait()
    write = time.perf_counter() - t0
    return {"variant": variant, "stall_s": round(stall, 3), "write_s": round(write, 2),
            "loop_rate_during_write": None if during is None else round(during / alone, 3)}


def run_snapshot(variant: str, rows: int, d_in: int, directory: str) -> dict:
    from sae_stream.buffer import ShuffleBuffer
    from sae_stream.config import BufferConfig

    device = torch.device(variant)
    chunk = 65536

    def source():  # random bf16 chunks where the LM would make them
        while True:
            yield torch.randn(chunk, d_in, device=device, dtype=torch.bfloat16)

    cfg = BufferConfig(capacity=rows, refill_fraction=0.5, storage="cuda" if device.type == "cuda" else "cpu",
                       dtype="bfloat16")
    buf = ShuffleBuffer(source(), cfg, device, d_in=d_in)
    next(buf.batches(8192))  # the first fill
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for reuse in (False, True):  # a new host tensor each time, or the kept (pinned on a GPU) one
            t0 = time.perf_counter()
            state = buf.state_dict(reuse_host_memory=reuse)
            times[reuse].append(round(time.perf_counter() - t0, 3))
            del state
    extra = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3) if cuda else None
    return {"variant": f"snapshot_{device.type}", "seconds_new_memory": times[False],
            "seconds_kept_memory": times[True], "gpu_gb_above_ring": extra,
            "card": torch.cuda.get_device_name() if cuda else None}


def _peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across fork + exec,
    which here holds the rings it wrote)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_resume(variant: str, rows: int, d_in: int, directory: str) -> dict:
    from sae_stream.checkpoint import load_checkpoint, verify_checkpoint

    path = Path(directory) / "step_00000001"
    base = _peak_rss_bytes()
    t0 = time.perf_counter()
    if variant == "mapped":
        state = load_checkpoint(path)
    else:
        verify_checkpoint(path)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    own = state["per_rank"][1]["extra"]["buffer"]["acts"].clone()  # what a rank's ring takes from the file
    seconds = time.perf_counter() - t0
    peak = (_peak_rss_bytes() - base) / 1e9
    return {"variant": f"resume_{variant}", "ranks": len(state["per_rank"]), "seconds": round(seconds, 2),
            "peak_rss_gb": round(peak, 2), "own_part_gb": round(own.numel() * own.element_size() / 1e9, 2)}


def write_ranks_checkpoint(directory: str, rows: int, d_in: int, ranks: int) -> None:
    from sae_stream.checkpoint import save_checkpoint

    parts = [{"extra": {"buffer": {"acts": torch.randn(rows, d_in, dtype=torch.bfloat16)}}} for _ in range(ranks)]
    save_checkpoint(Path(directory), 1, {"step": 1, "per_rank": parts}, keep=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4 * 2**20)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", choices=("write", "stall", "snapshot", "resume"), default="write")
    p.add_argument("--ranks", type=int, default=4, help="--mode resume: rings in the checkpoint")
    p.add_argument("--device", default="cpu", help="--mode snapshot: where the ring lives")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir on the default temp disk)")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._variant:  # a child: one measurement, printed as JSON
        run = {"stall": run_stall, "snapshot": run_snapshot, "write": run_variant, "resume": run_resume}[args.mode]
        print(json.dumps(run(args._variant, args.rows, args.d_in, args.dir)))
        return
    gb = args.rows * args.d_in * 2 / 1e9
    variants = {"stall": ("sync", "background"), "snapshot": (args.device,), "resume": ("mapped", "read_whole"),
                "write": ("in_memory", "streamed")}[args.mode]
    for _ in range(args.repeats):
        for variant in variants:  # alternating: the disk's speed drifts
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                if args.mode == "resume":
                    write_ranks_checkpoint(tmp, args.rows, args.d_in, args.ranks)
                cmd = [sys.executable, __file__, "--_variant", variant, "--mode", args.mode, "--rows",
                       str(args.rows), "--d-in", str(args.d_in), "--dir", tmp]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                shutil.rmtree(tmp, ignore_errors=True)
            row = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "mode": args.mode, "ring_gb": round(gb, 2)} | res
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
