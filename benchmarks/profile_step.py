"""Where a step's device time goes: torch.profiler kernel tables of the best SAE step alone and of the whole loop
(LM -> ring -> step), as gpu_compare.py configures them, with kernels and device time per step.

    python benchmarks/profile_step.py                                  # cuda: d_sae 4096, batch 8192, context 1024
    python benchmarks/profile_step.py --device cpu --d-sae 512 --batch 1024 --context-len 64   # smoke

Prints per variant `== name: wall µs/step (tokens/s); kernels/step, kernel µs/step` and the top kernels by total
device time (CPU ops on CPU). A step's kernel time near its wall time means the device is the bottleneck; the
difference between the loop's kernel time and the step's is what producing the activations costs.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compare import BEST, STEP_VARIANTS, buffer_cfg, lm_kernels, make_stream, make_trainer, sync  # noqa: E402

from sae_stream.buffer import ShuffleBuffer  # noqa: E402
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


def profile_run(args: argparse.Namespace, label: str, trainer: Trainer, batches: Iterator[Tensor]) -> None:
    def run(n: int) -> None:
        trainer.total_steps = trainer.step + n
        trainer.fit(batches)
        sync(args.device)

    run(20)  # warm-up: autotuning, graph capture, the ring's first fill
    t0 = time.perf_counter()
    run(args.steps)
    dt = (time.perf_counter() - t0) / args.steps
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run(args.profiled)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind]
    busy = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / args.profiled
    print(f"== {label}: wall {dt * 1e6:.0f} us/step ({args.batch / dt / 1e6:.2f}M tokens/s); "
          f"{len(events) / args.profiled:.0f} {'kernels' if cuda else 'ops'}/step, {busy:.0f} us/step busy", flush=True)
    sort = "device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=90), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    x_BD = torch.randn(args.batch, 512, generator=torch.Generator().manual_seed(0)).relu_().to(args.device)
    profile_run(args, f"step {BEST}", make_trainer(args, args.d_sae, STEP_VARIANTS[BEST]), itertools.repeat(x_BD))
    storage = "cuda" if args.device == "cuda" else "cpu"
    bcfg = buffer_cfg(args, storage, args.context_len)
    stream = make_stream(args.context_len, args.device, bcfg, args.device, True, lm_kernels(args))
    buffer = ShuffleBuffer(stream, bcfg, args.device, d_in=512)
    trainer = make_trainer(args, args.d_sae, STEP_VARIANTS[BEST])
    batches = buffer.batches(args.batch, dtype=trainer.input_dtype(buffer.dtype))
    profile_run(args, f"loop ctx{args.context_len} (ring {buffer.dtype_name})", trainer, batches)


if __name__ == "__main__":
    main()
