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

--mode resume: data-parallel rank 1 resuming a checkpoint of --ranks ranks' rings of --rows each: rank 0's file (its
ring with the shared part) and rank 1's own, loaded and rank 1's ring copied out; peak RSS above the process's start,
`load_own_part` (memory-mapped: rank 0's ring is never read) against reading both files whole.

--mode dp-save: one checkpoint of a data-parallel run, --ranks gloo processes on this machine each holding a ring
snapshot of --rows: every rank writing its own part in the background (`rank_state`, `rank_dir`: what training
does) against the way of sessions 3-5, every rank's part gathered (pickled) to rank 0, which writes them all. Per
rank: the training thread's stall, the time until on disk, peak RSS above the rank's start (with its ring built).

    python benchmarks/checkpoint_write.py --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --mode stall --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --mode resume --rows 1048576 --out benchmarks/results/checkpoint.jsonl
    python benchmarks/checkpoint_write.py --mode dp-save --rows 786432 --out benchmarks/results/checkpoint.jsonl
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
import os
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
    from sae_stream.checkpoint_writer import CheckpointWriter

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


class _Rank:
    """Rank `rank` of `world` as load_own_part sees it (no process group needed to read files)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world_size, self.is_main = rank, world, rank == 0


def run_resume(variant: str, rows: int, d_in: int, directory: str, ranks: int) -> dict:
    from sae_stream.checkpoint import load_own_part, rank_dir, verify_checkpoint

    path, own_path = Path(directory) / "step_00000001", rank_dir(directory, 1) / "step_00000001"
    base = _peak_rss_bytes()
    t0 = time.perf_counter()
    if variant == "mapped":
        state = load_own_part(path, _Rank(1, ranks))
    else:
        for p in (path, own_path):
            verify_checkpoint(p)
        state = {**torch.load(path / "state.pt", weights_only=False),
                 **torch.load(own_path / "state.pt", weights_only=False)}
    own = state["extra"]["buffer"]["acts"].clone()  # what rank 1's ring takes from its file
    seconds = time.perf_counter() - t0
    peak = (_peak_rss_bytes() - base) / 1e9
    return {"variant": f"resume_{variant}", "ranks": ranks, "seconds": round(seconds, 2),
            "peak_rss_gb": round(peak, 2), "own_part_gb": round(own.numel() * own.element_size() / 1e9, 2)}


def write_ranks_checkpoint(directory: str, rows: int, d_in: int, ranks: int) -> None:
    """A data-parallel checkpoint as training writes it: rank 0's state and every other rank's own part."""
    from sae_stream.checkpoint import rank_dir, rank_state, save_checkpoint

    for r in range(ranks):
        state = {"step": 1, "sae": {"W": torch.zeros(4)}, "trainer": {}, "rng": {},
                 "extra": {"buffer": {"acts": torch.randn(rows, d_in, dtype=torch.bfloat16)}}}
        save_checkpoint(rank_dir(directory, r), 1, rank_state(state, _Rank(r, ranks)), keep=1)


def _dp_save_worker(rank: int, world: int, port: int, variant: str, rows: int, d_in: int, directory: str,
                    results: str) -> None:
    import torch.distributed as tdist

    from sae_stream.checkpoint import rank_dir, rank_state
    from sae_stream.checkpoint_writer import CheckpointWriter
    from sae_stream.distributed import Distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = Distributed.from_env()
    ring = torch.randn(rows, d_in, dtype=torch.bfloat16)  # the ring's snapshot, as ShuffleBuffer hands it over
    state = {"step": 1, "sae": {"W": torch.zeros(512, 4096)}, "trainer": {}, "rng": {},
             "extra": {"buffer": {"acts": ring, "slots": torch.arange(rows)}}}
    base = _peak_rss_bytes()
    dist.barrier()
    t0 = time.perf_counter()
    if variant == "per_rank":  # what training does now
        writer = CheckpointWriter(background=True, dist=dist)
        writer.make_room(1)
        writer.save(rank_dir(directory, rank), 1, rank_state(state, dist), keep=1)
    else:  # sessions 3-5: every rank's own part pickled to rank 0, which writes the lot in the background
        writer = CheckpointWriter(background=rank == 0)
        parts = [None] * world if rank == 0 else None
        tdist.gather_object({k: state[k] for k in ("trainer", "rng", "extra")}, parts, dst=0)
        if parts is not None:
            writer.save(directory, 1, {"step": 1, "sae": state["sae"], "per_rank": parts}, keep=1)
    stall = time.perf_counter() - t0
    writer.wait()
    dist.barrier()  # (gathered: the others' memory and time end with rank 0's write)
    write = time.perf_counter() - t0
    row = {"rank": rank, "stall_s": round(stall, 3), "write_s": round(write, 2),
           "peak_rss_gb": round((_peak_rss_bytes() - base) / 1e9, 2)}
    Path(results, f"rank{rank}.json").write_text(json.dumps(row))
    dist.close()


def run_dp_save(variant: str, rows: int, d_in: int, directory: str, ranks: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = tempfile.mkdtemp()
    mp.start_processes(_dp_save_worker, args=(ranks, port, variant, rows, d_in, directory, results), nprocs=ranks,
                       start_method="spawn")
    per_rank = [json.loads(Path(results, f"rank{r}.json").read_text()) for r in range(ranks)]
    shutil.rmtree(results)
    others = per_rank[1:]
    return {"variant": f"dp_save_{variant}", "ranks": ranks,
            "rank0": {k: v for k, v in per_rank[0].items() if k != "rank"},
            "others_max": {k: max(r[k] for r in others) for k in ("stall_s", "write_s", "peak_rss_gb")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4 * 2**20)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", choices=("write", "stall", "snapshot", "resume", "dp-save"), default="write")
    p.add_argument("--ranks", type=int, default=4, help="--mode resume / dp-save: data-parallel ranks")
    p.add_argument("--device", default="cpu", help="--mode snapshot: where the ring lives")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir on the default temp disk)")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._variant:  # a child: one measurement, printed as JSON
        run = {"stall": run_stall, "snapshot": run_snapshot, "write": run_variant, "resume": run_resume,
               "dp-save": run_dp_save}[args.mode]
        extra = (args.ranks,) if args.mode in ("resume", "dp-save") else ()
        print(json.dumps(run(args._variant, args.rows, args.d_in, args.dir, *extra)))
        return
    gb = args.rows * args.d_in * 2 / 1e9
    variants = {"stall": ("sync", "background"), "snapshot": (args.device,), "resume": ("mapped", "read_whole"),
                "write": ("in_memory", "streamed"), "dp-save": ("gathered_on_rank0", "per_rank")}[args.mode]
    for _ in range(args.repeats):
        for variant in variants:  # alternating: the disk's speed drifts
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                if args.mode == "resume":
                    write_ranks_checkpoint(tmp, args.rows, args.d_in, args.ranks)
                cmd = [sys.executable, __file__, "--_variant", variant, "--mode", args.mode, "--rows",
                       str(args.rows), "--d-in", str(args.d_in), "--dir", tmp, "--ranks", str(args.ranks)]
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
