"""Where the device time goes: torch.profiler kernel tables of the best SAE step alone, of the LM's forward to
the hook alone (writing into a ring as the refills do), of the whole loop (LM -> ring -> step; its profiled window
spans at least one refill, so the LM's kernels are in the per-step figures), as gpu_compare.py configures them;
and last the step once more without its CUDA graph, its ops (which a graph replay hides) tabled by input shape
with the device time of the kernels each launched. (In that order: a run cut short by a time limit loses the
least needed table.)

    python benchmarks/profile_step.py                                  # cuda: d_sae 4096, batch 8192, context 1024
    python benchmarks/profile_step.py --device cpu --d-sae 512 --batch 1024 --context-len 64   # smoke

Prints per table `== name: wall µs/unit (tokens/s); kernels/unit, busy µs/unit (units profiled)` and the top
kernels by total device time (CPU ops on CPU). A step's kernel time near its wall time means the device is the
bottleneck; the loop's busy time less the step's is what producing the activations costs, which the LM's table
breaks down."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from buffer_throughput import HOOK, sync  # noqa: E402
from gpu_setup import (  # noqa: E402
    BEST,
    STEP_VARIANTS,
    buffer_cfg,
    build_lm,
    lm_kernels,
    make_stream,
    make_trainer,
    scratch_ring,
)

from lm.capture import GPTCapture  # noqa: E402
from sae_stream.buffer import ShuffleBuffer  # noqa: E402
from sae_stream.fused_ops import tuned_configs  # noqa: E402
from sae_stream.trainer import Trainer  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--capacity", type=int, default=2**21)
    p.add_argument("--lm-tokens", type=int, default=65536, help="tokens per LM forward (contexts x context_len)")
    p.add_argument("--steps", type=int, default=200, help="timed steps (after 20 warm-up steps)")
    p.add_argument("--profiled", type=int, default=20, help="steps under the profiler")
    p.add_argument("--rows", type=int, default=30, help="kernels listed per table")
    p.add_argument("--kernels", default="auto", help="train.kernels (auto: Triton on CUDA)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.seconds = 0.0  # (gpu_compare's helpers read it; unused here)
    return args


def profile_run(args: argparse.Namespace, label: str, run: Callable[[int], None], tokens: int, profiled: int,
                unit: str = "step", by_op: bool = False) -> None:
    """Time `run(n)` (n units of `tokens` tokens each, synchronised at the end) after a warm-up, then print its
    kernel table over `profiled` units; `by_op`: a table of the ops that launched them, by input shape (for an
    eager run: a graph replay hides them)."""
    run(20)  # warm-up: autotuning, graph capture, the ring's first fill
    t0 = time.perf_counter()
    run(args.steps)
    dt = (time.perf_counter() - t0) / args.steps
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    activities += [ProfilerActivity.CPU] if by_op and cuda else []
    with profile(activities=activities, record_shapes=by_op) as prof:
        run(profiled)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind]
    busy = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / profiled
    print(f"== {label}: wall {dt * 1e6:.0f} us/{unit} ({tokens / dt / 1e6:.2f}M tokens/s); "
          f"{len(events) / profiled:.0f} {'kernels' if cuda else 'ops'}/{unit}, {busy:.0f} us/{unit} busy "
          f"({profiled} profiled)", flush=True)
    sort = "device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=by_op).table(sort_by=sort, row_limit=args.rows,
                                                                max_name_column_width=90, max_shapes_column_width=70)
    print(table, flush=True)


def trainer_run(args: argparse.Namespace, trainer: Trainer, batches: Iterator[Tensor]) -> Callable[[int], None]:
    def run(n: int) -> None:
        trainer.total_steps = trainer.step + n
        trainer.fit(batches)
        sync(args.device)
    return run


def lm_run(args: argparse.Namespace) -> tuple[Callable[[int], None], int]:
    """The native LM's forward to the hook as the loop's refills call it (--lm-tokens per call, bf16 autocast on
    CUDA, positions 1.. written into random slots of a ring: GPTCapture.write), and the tokens per call."""
    gpt, _ = build_lm(args.context_len, args.device)
    capture = GPTCapture(gpt, [HOOK], kernels=lm_kernels(args))
    tokens_BT = torch.randint(0, 50304, (max(1, args.lm_tokens // args.context_len), args.context_len),
                              device=args.device)
    ring_RD, slots_N = scratch_ring(len(tokens_BT) * (args.context_len - 1), args.device)

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=args.device == "cuda"):
            for _ in range(n):
                capture.write(tokens_BT, 1, ring_RD, slots_N)
        sync(args.device)
    return run, tokens_BT.numel()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    x_BD = torch.randn(args.batch, 512, generator=torch.Generator().manual_seed(0)).relu_().to(args.device)
    step = trainer_run(args, make_trainer(args, args.d_sae, STEP_VARIANTS[BEST]), itertools.repeat(x_BD))
    profile_run(args, f"step {BEST}", step, args.batch, args.profiled)
    if args.device == "cuda":  # the autotuner's block sizes and the encoder the first step's timing picked
        print(f"   Triton picks: {tuned_configs()}", flush=True)
    lm, lm_tokens = lm_run(args)
    profile_run(args, f"lm ctx{args.context_len} ({lm_kernels(args)} kernels, into a ring)", lm, lm_tokens, 5,
                unit="forward")
    storage = "cuda" if args.device == "cuda" else "cpu"
    bcfg = buffer_cfg(args, storage, args.context_len)
    stream = make_stream(args.context_len, args.device, bcfg, args.device, True, lm_kernels(args))
    buffer = ShuffleBuffer(stream, bcfg, args.device, d_in=512)
    trainer = make_trainer(args, args.d_sae, STEP_VARIANTS[BEST])
    dtype = trainer.input_dtype(buffer.dtype)
    out = trainer.batch_input(args.batch, dtype)  # batches gathered into the step graph's input, as train does
    loop = trainer_run(args, trainer, buffer.batches(args.batch, dtype=dtype, out=out))
    refill_steps = math.ceil(bcfg.capacity * bcfg.refill_fraction / args.batch)  # (the window holds a refill)
    profile_run(args, f"loop ctx{args.context_len} (ring {buffer.dtype_name})", loop, args.batch,
                max(args.profiled, refill_steps))
    eager = trainer_run(args, make_trainer(args, args.d_sae, {**STEP_VARIANTS[BEST], "cuda_graphs": False}),
                        itertools.repeat(x_BD))
    profile_run(args, f"step {BEST} without the graph, by op and shape", eager, args.batch, args.profiled, by_op=True)


if __name__ == "__main__":
    main()
