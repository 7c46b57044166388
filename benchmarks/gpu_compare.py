"""Side by side on one card: our whole loop, our SAE step alone, the LM alone, the disk-dump baseline (and SAELens,
run by peer-bench's script in its own process), for several dictionary sizes.

    python benchmarks/gpu_compare.py --out benchmarks/results/gpu.jsonl
    python benchmarks/gpu_compare.py --device cpu --d-sae 512 --batch 1024 --context-len 64 --seconds 1  # smoke

One JSON line per measurement (stdout, and appended to --out) with the fields date, card, torch, variant, d_sae,
batch, tokens_per_s, peak_gpu_gb, peak_host_gb (+ details), then a markdown table. Every measurement goes through
the project's own classes (Trainer, ShuffleBuffer, ActivationStream), configured as `sae-stream train` would be:
  step_*       Trainer on one fixed batch: eager autograd (the plain PyTorch step), the hand-written backward,
               CUDA-graph replay, bf16 / TF32 matmuls; `*_stats_encoder` the best step in session 15's layout
               (f's column sums in Triton's encoder), `*_triton_encoder` / `*_cublas_encoder` with that encoder
               without them (the sums in the backward's epilogue); the best times stats against cublas
  lm_*_ctx*    the LM forward up to the hook (bf16 autocast): `native` = the GPT's own forward (fused attention,
               lm/fused.py's Triton kernels on CUDA: what `sae-stream train` uses for an `lm train` LM),
               `*_into_ring` with positions 1.. stored into a ring's random slots by its last kernel (the loop's
               refills), `*_into_chunk` the same through session 15's two copies (positions 1.. sliced out of
               the forward's output, then copied into the slots),
               `native_torch_ops` = the same with torch's ops only, `native_flash` / `_efficient` / `_cudnn` =
               with that attention kernel forced, `tl` = transformer-lens hooks
  loop_*       LM -> ring (GPU or pinned host) -> shuffled batches -> Trainer (best step), several ring refills;
               every position of every context is used; the ring in the dtype the LM gives (bf16 on CUDA);
               `*_no_priority` with the step on the default stream (train.stream_priority=false: same priority
               as the LM's refills); `*_chunk_writes` with the LM's vectors written into chunks, then copied into
               the ring's slots, where by default its last kernel stores them in the slots
               (direct_write_fraction: the share it stored); `*_lm_batch_div4` / `_x4` with a quarter / 4x the
               contexts per LM forward (--lm-tokens); `*_fp32_ring_torch_ops` the loop as
               before (fp32 ring, the LM in torch's ops); fed random tokens,
               or `*_text_*` text as `sae-stream train` reads it, `*_ids_*` the same tokenized ahead
  disk_*       the materialised baseline: LM -> fp16 np.memmap on local disk, then shuffled batches read back and
               trained on with the same best step
  saelens_*    SAELens's trainer on the same model shape / hook / d_sae / batch, run by peer-bench's script
               (--saelens PATH: shared/peer-bench/bench_saelens.py, with sae-lens importable) in its own process;
               --fast (TF32 + autocast + compiled SAE) at the first size, its defaults at the others
A measurement that fails is recorded with its error and the run goes on. peak_gpu_gb is torch's peak allocation
during the measurement; peak_host_gb is the process's resident high-water mark so far (it only grows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from buffer_throughput import HOOK, sync  # noqa: E402
from gpu_setup import (  # noqa: E402
    BEST,
    IN_PLACE,
    LARGE_STEP_VARIANTS,
    LOOP_BEFORE,
    LOOP_VARIANTS,
    STEP_VARIANTS,
    TARGET_STEPS,
    buffer_cfg,
    build_lm,
    environment,
    lm_kernels,
    make_stream,
    make_trainer,
    scratch_ring,
    text_batches,
    timed_steps,
)
from peer_saelens import measure_saelens  # noqa: E402
from recorder import Recorder  # noqa: E402

from lm.capture import GPTCapture  # noqa: E402
from sae_stream.activations import HookCapture  # noqa: E402
from sae_stream.buffer import ShuffleBuffer  # noqa: E402
from sae_stream.config import BufferConfig, load_config  # noqa: E402

ATTENTION = {"cuda": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"), "cpu": ("MATH",)}  # forced ones
PAPER_A1 = Path(__file__).resolve().parent.parent / "configs" / "paper_a1.yaml"  # the run the projection is for


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: a smoke run at tiny sizes)")
    p.add_argument("--d-sae", default="4096,16384,65536", help="comma list of dictionary sizes")
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--context-len", type=int, default=1024, help="LM context for the loop (paper: 1024)")
    p.add_argument("--capacity", type=int, default=2**21, help="ring vectors (2M x 512 fp32 = 4.3 GB)")
    p.add_argument("--lm-tokens", type=int, default=65536, help="tokens per LM forward (contexts x context_len)")
    p.add_argument("--seconds", type=float, default=3.0, help="target length of each timed window")
    p.add_argument("--disk-tokens", type=int, default=4_000_000, help="vectors written for the disk baseline")
    p.add_argument("--steps", default=None, help=f"comma list of step variants to time (default all; {BEST}: ratios)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: steps,lm,loop,text,pinned,disk")
    p.add_argument("--text-dir", default=str(Path(tempfile.gettempdir()) / "gpu_compare_text"),
                   help="where the loop_*_text variants' .jsonl is written (kept for the next run)")
    p.add_argument("--text-mb", type=float, default=20.0, help="size of that .jsonl (looped over)")
    p.add_argument("--saelens", default=None, help="path of peer-bench's bench_saelens.py: also run SAELens")
    p.add_argument("--kernels", default="auto", help="train.kernels of variants that set none (auto: Triton on CUDA)")
    p.add_argument("--saelens-d-sae", default=None, help="comma list: run SAELens at these sizes only (default: all)")
    p.add_argument("--saelens-tokens", type=int, default=8_000_000, help="tokens at the first size, halved per size")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.d_saes = [int(d) for d in args.d_sae.split(",")]
    args.skip = set(filter(None, args.skip.split(",")))
    args.steps = args.steps.split(",") if args.steps else None
    if set(args.steps or []) - STEP_VARIANTS.keys():
        p.error(f"--steps: {args.steps} names a variant that is not one of {', '.join(STEP_VARIANTS)}")
    args.saelens_d_saes = [int(d) for d in args.saelens_d_sae.split(",")] if args.saelens_d_sae else args.d_saes
    return args


# ---------------------------------------------------------------------------------------------- measurements


def measure_steps(args: argparse.Namespace, rec: Recorder, d_sae: int, part: str = "all") -> dict[str, float | None]:
    """The step variants at this size (the first: all of STEP_VARIANTS, in two parts: `targets`, TARGET_STEPS;
    `rest`, the other architectures and baselines)."""
    x_BD = torch.randn(args.batch, 512, generator=torch.Generator().manual_seed(0)).relu_().to(args.device)
    names = STEP_VARIANTS if d_sae == args.d_saes[0] else LARGE_STEP_VARIANTS
    if part != "all":
        names = [n for n in names if (n in TARGET_STEPS) == (part == "targets")]
    names = [n for n in names if args.steps is None or n in args.steps]
    out = {}
    for name in names:
        def fn(name: str = name) -> tuple[float, dict]:
            with environment(STEP_VARIANTS[name].get("env", {})):
                trainer = make_trainer(args, d_sae, STEP_VARIANTS[name])
                x = x_BD
                if STEP_VARIANTS[name].get("input") == "in_place_bf16":
                    x = trainer.batch_input(args.batch, torch.bfloat16)
                    if x is None:  # (steps not graphed: CPU, or graphs off)
                        x = x_BD.to(torch.bfloat16)
                    x.copy_(x_BD)
                return timed_steps(args, trainer, itertools.repeat(x))
        out[name] = rec.guarded(name, d_sae, fn)
    return out


def measure_lm(args: argparse.Namespace, rec: Recorder, context_len: int, native: bool,
               kernels: str | None = None, attention: str | None = None, into: str = "") -> float | None:
    """The LM to the hook; `kernels` (native only): lm/fused.py's or torch's, None = as `sae-stream train`;
    `attention`: force one scaled_dot_product_attention backend (FLASH_ATTENTION, EFFICIENT_ATTENTION, ...)
    instead of torch's pick; `into` (native only) `ring`: positions 1.. written into random slots of a ring in the
    LM's dtype as the loop's refills do (GPTCapture.write), `chunk`: the same through session 15's two copies."""
    kernels = kernels or lm_kernels(args)

    def fn() -> tuple[float, dict]:
        gpt, hooked = build_lm(context_len, args.device)
        lm_batch = max(1, args.lm_tokens // context_len)
        tokens = torch.randint(0, 50304, (lm_batch, context_len), device=args.device)
        cap = GPTCapture(gpt, [HOOK], kernels=kernels) if native else HookCapture(hooked, HOOK)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
        rows = lm_batch * (context_len - 1)
        ring, slots = scratch_ring(rows, args.device) if into else (None, None)

        def backend() -> contextlib.AbstractContextManager:  # (anew per use: sdpa_kernel's enters only once)
            return sdpa_kernel(getattr(SDPBackend, attention)) if attention else contextlib.nullcontext()

        def once() -> None:
            if into == "ring":
                cap.write(tokens, 1, ring, slots)
            elif into == "chunk":
                ring.index_copy_(0, slots, cap(tokens)[:, 1:].reshape(rows, -1).to(ring.dtype))
            else:
                cap(tokens)

        def run(n: int) -> float:
            sync(args.device)
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast, backend():
                for _ in range(n):
                    once()
            sync(args.device)
            return time.perf_counter() - t0

        run(3)
        dt = run(5)
        n = max(5, int(args.seconds * 5 / dt))
        rate = n * tokens.numel() / run(n)  # kernels: what ran (a failing Triton kernel falls back to torch's)
        return rate, {"context_len": context_len, "kernels": cap.kernels if native else None, "attention": attention}
    name = ("native" if kernels == lm_kernels(args) else f"native_{kernels}_ops") if native else "tl"
    name += (f"_{attention.split('_')[0].lower()}" if attention else "") + (f"_into_{into}" if into else "")
    return rec.guarded(f"lm_{name}_ctx{context_len}", None, fn)


def measure_loop(args: argparse.Namespace, rec: Recorder, d_sae: int, storage: str, context_len: int,
                 step_rate: float | None, native: bool = True, before: bool = False,
                 text_prefetch: int | None = None, feed: str = "text", variant: str = "",
                 in_place_rate: float | None = None) -> float | None:
    """LM -> ring -> batches -> the best step, configured as `sae-stream train` (buffer.dtype auto: the dtype the
    LM gives; the LM's LayerNorms by --kernels), or with `before` as LOOP_BEFORE; fed random tokens, or with
    `text_prefetch` real text (`feed`: text_batches') read as data.prefetch=text_prefetch does; `variant`: a
    LOOP_VARIANTS suffix (the trainer's or the buffer's settings changed)."""
    settings = dict(LOOP_VARIANTS[variant])  # the trainer's, once the buffer's and the loop's are taken out:
    lm_batch_scale, direct_writes = settings.pop("lm_batch_scale", 1), settings.pop("direct_writes", True)
    into_input, metrics_every = settings.pop("into_input", True), settings.pop("metrics_every", 64)
    capacity = args.capacity * settings.pop("capacity_scale", 1)

    def fn() -> tuple[float, dict]:
        bcfg = buffer_cfg(args, storage, context_len, LOOP_BEFORE["dtype"] if before else "auto")
        bcfg = dataclasses.replace(bcfg, lm_batch_size=max(1, round(bcfg.lm_batch_size * lm_batch_scale)),
                                   capacity=capacity)
        kernels = LOOP_BEFORE["kernels"] if before else lm_kernels(args)
        text = None if text_prefetch is None else text_batches(args, context_len, bcfg.lm_batch_size, text_prefetch,
                                                               feed)
        with contextlib.closing(text) if text is not None else contextlib.nullcontext():
            return run_loop(bcfg, kernels, text)

    def run_loop(bcfg: BufferConfig, kernels: str, text: Iterable[Tensor] | None) -> tuple[float, dict]:
        stream = make_stream(context_len, args.device, bcfg, args.device, native, kernels, text)
        buffer = ShuffleBuffer(stream, bcfg, args.device, d_in=512, direct_writes=direct_writes,
                               metrics_every=metrics_every)
        trainer = make_trainer(args, d_sae, STEP_VARIANTS[BEST] | settings)
        dtype = trainer.input_dtype(buffer.dtype)
        out = trainer.batch_input(args.batch, dtype) if into_input else None
        rate, extra = timed_steps(args, trainer, buffer.batches(args.batch, dtype=dtype, out=out))
        extra |= {"storage": storage, "context_len": context_len, "capacity": bcfg.capacity,
                  "refills": buffer.refills, "merge_lag": buffer.merge_lag, "ring_dtype": buffer.dtype_name,
                  "lm_batch_size": bcfg.lm_batch_size,
                  "direct_write_fraction": round(buffer.direct_rows / max(1, buffer.produced), 3),
                  "batch_dtype": str(dtype).removeprefix("torch."), "into_graph_input": out is not None,
                  "lm_kernels": stream.capture.kernels if native else None}  # (what ran: see measure_lm)
        if step_rate:
            extra["ratio_to_step"] = round(rate / step_rate, 3)
        if in_place_rate:  # (the stricter ratio: that step copies nothing in)
            extra["ratio_to_step_in_place"] = round(rate / in_place_rate, 3)
        return rate, extra
    suffix = variant + ("" if native else "_tl") + ("_fp32_ring_torch_ops" if before else "") + \
        ("" if text_prefetch is None else f"_{feed}" + ("_prefetched" if text_prefetch else "_inline"))
    return rec.guarded(f"loop_{storage}_ctx{context_len}{suffix}", d_sae, fn)


def measure_fed_loops(args: argparse.Namespace, rec: Recorder, d_sae: int, storage: str, step_rate: float | None,
                      tokens: int) -> None:
    """The loop fed by text read ahead by a child process (as on CUDA) and inline, and by the same documents
    tokenized ahead, read ahead; A/1 projected at the read-ahead rates."""
    for feed, prefetch in (("text", 32), ("text", 0), ("ids", 32)):
        rate = measure_loop(args, rec, d_sae, storage, args.context_len, step_rate, text_prefetch=prefetch, feed=feed)
        if rate and prefetch:
            rec.emit(f"projection_paper_a1_{feed}", d_sae, None, minutes=round(tokens / rate / 60, 1),
                     note=f"{tokens:,} tokens at loop_{storage}_ctx{args.context_len}_{feed}_prefetched's rate")


def measure_disk(args: argparse.Namespace, rec: Recorder, d_sae: int) -> None:
    """The seed's way: write activations to an fp16 memmap first, then train from shuffled reads of it."""
    context_len = args.context_len
    bcfg = buffer_cfg(args, "cpu", context_len)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.f16"
        n_total = args.disk_tokens

        def write() -> tuple[float, dict]:
            stream = make_stream(context_len, args.device, bcfg, "cpu", native=True)
            mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(n_total, 512))
            t0 = time.perf_counter()
            i = 0
            while i < n_total:
                acts = next(stream).acts
                take = min(len(acts), n_total - i)
                mm[i:i + take] = acts[:take].to(torch.float16).numpy()
                i += take
            mm.flush()
            return n_total / (time.perf_counter() - t0), {"gb_on_disk": round(n_total * 1024 / 1e9, 2)}

        if rec.guarded("disk_write", None, write) is None:
            return

        def train() -> tuple[float, dict]:
            rmm = np.memmap(path, dtype=np.float16, mode="r", shape=(n_total, 512))
            perm = np.random.default_rng(0).permutation(n_total)

            def batches() -> Iterator[Tensor]:
                for i in itertools.cycle(range(0, n_total - args.batch + 1, args.batch)):
                    rows = np.sort(perm[i:i + args.batch])
                    yield torch.from_numpy(rmm[rows]).to(args.device, torch.float32)

            trainer = make_trainer(args, d_sae, STEP_VARIANTS[BEST])
            rate, extra = timed_steps(args, trainer, batches())
            return rate, extra | {"note": "file in page cache"}

        rec.guarded("disk_read_train", d_sae, train)


def measure_lms(args: argparse.Namespace, rec: Recorder) -> None:
    """The LM alone: as the loop runs it, writing into a ring or through chunks, torch's ops, each attention
    backend, transformer-lens; at the loop's context and at 128."""
    ctxs = [args.context_len] if args.context_len == 128 else [args.context_len, 128]
    for ctx in ctxs:
        measure_lm(args, rec, ctx, native=True)
        if ctx == ctxs[0]:  # what writing the vectors into the ring adds, and by which path
            for into in ("ring", "chunk"):
                measure_lm(args, rec, ctx, native=True, into=into)
        if lm_kernels(args) != "torch":
            measure_lm(args, rec, ctx, native=True, kernels="torch")
        if ctx == ctxs[0]:  # which attention kernel is fastest at head dim 32 (CPU: the smoke run's one)
            for attention in ATTENTION[args.device]:
                measure_lm(args, rec, ctx, native=True, attention=attention)
        measure_lm(args, rec, ctx, native=False)


def measure_first_size(args: argparse.Namespace, rec: Recorder, d_sae: int, storage: str,
                       steps: dict[str, float | None], rate: float | None) -> None:
    """After the best step and the loop at the first size: the rest of what issue 6's targets are read from (the
    loop's variants, A/1's projections, SAELens), then the other steps, the LM alone, the loops fed otherwise and
    the disk baseline. In that order, so that a device call cut short still has the targets."""
    best, in_place = steps.get(BEST), steps.get(IN_PLACE)
    tokens = load_config(PAPER_A1).train.total_tokens
    if "loop" not in args.skip:
        rates = {variant: measure_loop(args, rec, d_sae, storage, args.context_len, best, variant=variant,
                                       in_place_rate=in_place) for variant in list(LOOP_VARIANTS)[1:]}
        measure_loop(args, rec, d_sae, storage, args.context_len, best, before=True)
        for suffix, r in (("", rate), ("_ring_x2", rates["_ring_x2"])):  # (x2: A/1's own ring at the default)
            if r:
                rec.emit(f"projection_paper_a1{suffix}", d_sae, None, minutes=round(tokens / r / 60, 1),
                         note=f"{tokens:,} tokens ({PAPER_A1.name}) at loop_{storage}_ctx{args.context_len}{suffix}'s "
                              "rate")
    if args.saelens and d_sae in args.saelens_d_saes:
        measure_saelens(args, rec, d_sae, fast=True, tokens=max(1_000_000, args.saelens_tokens))
    if "steps" not in args.skip:
        measure_steps(args, rec, d_sae, part="rest")
    if "lm" not in args.skip:
        measure_lms(args, rec)
    if "loop" not in args.skip:
        if "text" not in args.skip:
            measure_fed_loops(args, rec, d_sae, storage, best, tokens)
        measure_loop(args, rec, d_sae, storage, args.context_len, best, native=False)
        if args.context_len != 128:
            measure_loop(args, rec, d_sae, storage, 128, best)
        if args.device == "cuda" and "pinned" not in args.skip:
            measure_loop(args, rec, d_sae, "pinned", args.context_len, best)
    if "disk" not in args.skip:
        measure_disk(args, rec, d_sae)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rec = Recorder(args)
    storage = "cuda" if args.device == "cuda" else "cpu"
    for i, d_sae in enumerate(args.d_saes):
        steps = measure_steps(args, rec, d_sae, "targets" if i == 0 else "all") if "steps" not in args.skip else {}
        rate = None
        if "loop" not in args.skip:
            rate = measure_loop(args, rec, d_sae, storage, args.context_len, steps.get(BEST),
                                in_place_rate=steps.get(IN_PLACE))
        if i == 0:
            measure_first_size(args, rec, d_sae, storage, steps, rate)
        elif args.saelens and d_sae in args.saelens_d_saes:
            measure_saelens(args, rec, d_sae, fast=False, tokens=max(1_000_000, args.saelens_tokens >> i))
    print(rec.table())


if __name__ == "__main__":
    main()
