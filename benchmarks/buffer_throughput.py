"""Throughput of the streaming pipeline against its parts and against a materialized (on-disk) baseline.

    python benchmarks/buffer_throughput.py --device cpu --out runs/bench_buffer.jsonl
    python benchmarks/buffer_throughput.py --device cuda --batch 8192 --tokens 20000000

One JSON line per measurement on stdout (and appended to --out), then a markdown table. tokens/s counts activation
vectors delivered (for the LM alone: token positions run through it). Measured, all in one run:
  (a) lm:            LM forward to the hook (random-init 1-layer model of the paper's shape), both stop modes
  (b) buffer:        the ring alone, fed by a free synthetic producer
  (c) lm+buffer:     LM -> ring -> shuffled batches
  (d) sae_step:      a bare SAE step (512 -> d_sae, MSE + L1, Adam, decoder renorm) on a fixed batch
  (e) loop:          LM -> ring -> SAE step; (d) and (e) are interleaved --repeats times and the medians compared
  (f) materialized:  the seed's way: activations written to an fp16 np.memmap, then read back in shuffled batches
GPU runs repeat (b), (c), (e) for ring storage 'cuda' and 'pinned'. On the CPU, (e) also runs with the producer in a
background thread ('threaded'), to decide whether one helps. (d) and (e) report all their windows pooled (total
vectors / total time: refills land in some windows only) and the median window.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_stream.activations import ActivationStream, HookCapture
from sae_stream.buffer import ShuffleBuffer
from sae_stream.config import BufferConfig

HOOK = "blocks.0.mlp.hook_post"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=None, help="SAE batch (default 8192 on cuda, 4096 on cpu)")
    p.add_argument("--tokens", type=int, default=None, help="vectors per throughput measurement of (a)-(c)")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--lm-batch", type=int, default=None,
                   help="contexts per LM forward (default 32 on cpu, 65536 tokens' worth on cuda)")
    p.add_argument("--capacity", type=int, default=None, help="ring vectors (default 16 batches)")
    p.add_argument("--refill-fraction", type=float, default=0.5)
    p.add_argument("--buffer-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="ring dtype (auto: what the LM gives, as sae-stream train; the synthetic source is fp32)")
    p.add_argument("--steps", type=int, default=None, help="SAE steps per (d)/(e) window (default: refill period / 4)")
    p.add_argument("--repeats", type=int, default=8, help="interleaved (d)/(e) windows (default 8: two refill periods)")
    p.add_argument("--disk-tokens", type=int, default=None, help="vectors for the materialized baseline")
    p.add_argument("--skip", default="", help="comma list of parts to skip: lm,buffer,lm_buffer,loop,disk")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    cuda = device_and_batch(args)
    args.lm_batch = args.lm_batch or (max(1, 65536 // args.context_len) if cuda else 32)
    args.capacity = args.capacity or 16 * args.batch
    args.tokens = args.tokens or (20_000_000 if cuda else 400_000)
    args.disk_tokens = args.disk_tokens or (4_000_000 if cuda else 262_144)
    args.steps = args.steps or max(1, round(args.capacity * args.refill_fraction / args.batch / 4))
    return args


def device_and_batch(args: argparse.Namespace) -> bool:
    """Resolve --device auto and the default SAE batch (8192 on cuda, 4096 on cpu) in place; True on cuda."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.batch = args.batch or (8192 if cuda else 4096)
    return cuda


# ---------------------------------------------------------------------------------------------- parts


def build_lm(context_len: int, device: str) -> HookedTransformer:
    """Random-init 1-layer model of the paper's shape: d_model 128, 4 heads, d_mlp 512 ReLU, vocab 50304."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=1, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=50304,
                                  n_ctx=context_len, act_fn="relu", normalization_type="LN",
                                  default_prepend_bos=False, device=device)
    return HookedTransformer(cfg).eval()


def token_batches(lm_batch: int, context_len: int, device: str) -> Iterator[Tensor]:
    """Endless random token batches (a few pregenerated ones, cycled: data loading is not measured here)."""
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 50304, (lm_batch, context_len), generator=g).to(device) for _ in range(8)]
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


class MiniSAE:
    """A standalone SAE step: x̄ = x - b_d, f = ReLU(x̄ W_e + b_e), x̂ = f W_d + b_d, MSE + λ L1, Adam, renorm."""

    def __init__(self, d_in: int, d_sae: int, device: str, l1_coeff: float = 1e-3) -> None:
        g = torch.Generator().manual_seed(0)
        W_enc_DF = torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in)
        self.W_enc_DF = W_enc_DF.clone().to(device).requires_grad_()
        self.W_dec_FD = (W_enc_DF.T / W_enc_DF.T.norm(dim=1, keepdim=True)).to(device).requires_grad_()
        self.b_enc_F = torch.zeros(d_sae, device=device, requires_grad=True)
        self.b_dec_D = torch.zeros(d_in, device=device, requires_grad=True)
        params = [self.W_enc_DF, self.W_dec_FD, self.b_enc_F, self.b_dec_D]
        self.opt = torch.optim.Adam(params, lr=1e-4, fused=device == "cuda")
        self.l1_coeff = l1_coeff

    def step(self, x_BD: Tensor) -> None:
        feats_BF = torch.relu((x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F)
        recon_BD = feats_BF @ self.W_dec_FD + self.b_dec_D
        loss = (recon_BD - x_BD).pow(2).mean() + self.l1_coeff * feats_BF.sum(-1).mean()
        self.opt.zero_grad(set_to_none=False)  # reuse the gradient buffers: no allocator churn
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True))


class ThreadedSource:
    """The stream produced by a background thread, `depth` chunks ahead (a CPU overlap candidate)."""

    def __init__(self, source: ActivationStream, depth: int = 2) -> None:
        self.d_in = source.d_in
        self._q: queue.Queue[Any] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source: ActivationStream) -> None:
        try:
            for chunk in source:
                self._q.put(chunk)
            self._q.put(None)
        except BaseException as e:  # hand the error to the consumer instead of leaving it waiting
            self._q.put(e)

    def __iter__(self) -> ThreadedSource:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], int], device: str) -> tuple[int, float]:
    """(vectors, seconds) of one call of fn, which returns the vectors it handled."""
    sync(device)
    t0 = time.perf_counter()
    n = fn()
    sync(device)
    return n, time.perf_counter() - t0


def drain(it: Iterator[Tensor], vectors: int) -> int:
    n = 0
    while n < vectors:
        n += len(next(it))
    return n


class Reporter:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows = args, []
        self.common = {"device": args.device, "d_sae": args.d_sae, "batch": args.batch, "context_len": args.context_len,
                       "lm_batch": args.lm_batch, "capacity": args.capacity, "buffer_dtype": args.buffer_dtype,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d")}
        if args.device == "cuda":
            self.common["gpu"] = torch.cuda.get_device_name()

    def emit(self, name: str, **fields: Any) -> None:
        row = {"name": name} | {k: (round(v) if k.endswith("_per_s") else v) for k, v in fields.items()}
        self.rows.append(row)
        line = json.dumps(row | self.common)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as f:
                f.write(line + "\n")

    def table(self) -> str:
        lines = ["| measurement | tokens/s | notes |", "|---|---:|---|"]
        for r in self.rows:
            rate = r.get("tokens_per_s", r.get("ratio", ""))
            notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("name", "tokens_per_s"))
            lines.append(f"| {r['name']} | {rate:,} | {notes} |" if isinstance(rate, (int, float)) else
                         f"| {r['name']} | {rate} | {notes} |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- measurements


def buffer_cfg(args: argparse.Namespace, storage: str) -> BufferConfig:
    return BufferConfig(hook_name=HOOK, capacity=args.capacity, refill_fraction=args.refill_fraction,
                        storage=storage, dtype=args.buffer_dtype, lm_batch_size=args.lm_batch)


def make_stream(args: argparse.Namespace, model: HookedTransformer, storage: str,
                stop: str = "raise") -> ActivationStream:
    return ActivationStream(model, HOOK, token_batches(args.lm_batch, args.context_len, args.device),
                            buffer_cfg(args, storage), args.device, stop=stop)


def measure_lm(args: argparse.Namespace, model: HookedTransformer, rep: Reporter) -> None:
    tokens = torch.randint(0, 50304, (args.lm_batch, args.context_len), device=args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    for stop in ("raise", "layer"):
        cap = HookCapture(model, HOOK, stop)

        def run(cap: HookCapture = cap) -> int:
            n = 0
            with torch.inference_mode(), autocast:
                while n < args.tokens:
                    cap(tokens)
                    n += tokens.numel()
            return n

        run()
        n, dt = timed(run, args.device)
        rep.emit(f"(a) lm_forward_{stop}", tokens_per_s=n / dt)


def synthetic_source(args: argparse.Namespace) -> Iterator[Tensor]:
    chunks = [torch.randn(args.lm_batch * (args.context_len - 1), 512, device=args.device) for _ in range(4)]
    i = 0
    while True:
        yield chunks[i % 4]
        i += 1


def measure_buffers(args: argparse.Namespace, model: HookedTransformer, storages: list[str], rep: Reporter) -> None:
    for storage in storages:
        if "buffer" not in args.skip:
            it = ShuffleBuffer(synthetic_source(args), buffer_cfg(args, storage), args.device, d_in=512).batches(
                args.batch)
            drain(it, args.capacity)  # the initial fill is start-up, not throughput
            n, dt = timed(lambda it=it: drain(it, args.tokens), args.device)
            rep.emit(f"(b) buffer_synthetic_{storage}", tokens_per_s=n / dt)
        if "lm_buffer" not in args.skip:
            it = ShuffleBuffer(make_stream(args, model, storage), buffer_cfg(args, storage), args.device).batches(
                args.batch)
            drain(it, args.capacity)
            n, dt = timed(lambda it=it: drain(it, args.tokens), args.device)
            rep.emit(f"(c) lm_buffer_{storage}", tokens_per_s=n / dt)


def measure_loop(args: argparse.Namespace, model: HookedTransformer, storages: list[str], rep: Reporter) -> None:
    """(d) and (e) windows interleaved, `--repeats` times; medians and the ratio (e)/(d)."""
    sae = MiniSAE(512, args.d_sae, args.device)
    x_BD = torch.randn(args.batch, 512, device=args.device)
    variants: dict[str, Iterator[Tensor]] = {}
    for storage in storages:
        variants[f"loop_{storage}"] = ShuffleBuffer(make_stream(args, model, storage), buffer_cfg(args, storage),
                                                    args.device).batches(args.batch)
    if args.device == "cpu":
        # its own copy of the model: hooks are registered per forward, so two threads must not share one
        threaded = ThreadedSource(make_stream(args, copy.deepcopy(model), "cpu"))
        variants["loop_cpu_threaded"] = ShuffleBuffer(threaded, buffer_cfg(args, "cpu"), "cpu").batches(args.batch)
    for it in variants.values():
        sae.step(next(it))  # initial fill + warm-up
    sae.step(x_BD)

    def sae_only() -> int:
        for _ in range(args.steps):
            sae.step(x_BD)
        return args.steps * args.batch

    def loop(it: Iterator[Tensor]) -> int:
        n = 0
        for _ in range(args.steps):
            x = next(it)
            sae.step(x)
            n += len(x)
        return n

    runs: dict[str, list[tuple[int, float]]] = {"sae_step": []} | {k: [] for k in variants}
    for _ in range(args.repeats):
        runs["sae_step"].append(timed(sae_only, args.device))
        for name, it in variants.items():
            runs[name].append(timed(lambda it=it: loop(it), args.device))

    def pooled(name: str) -> float:  # all windows together: refills fall in some windows and not others
        return sum(n for n, _ in runs[name]) / sum(dt for _, dt in runs[name])

    def median(name: str) -> float:
        return statistics.median(n / dt for n, dt in runs[name])

    base = pooled("sae_step")
    rep.emit("(d) sae_step", tokens_per_s=base, median_per_s=median("sae_step"), windows=args.repeats,
             steps_per_window=args.steps)
    for name in variants:
        rep.emit(f"(e) {name}", tokens_per_s=pooled(name), median_per_s=median(name),
                 ratio_to_sae_step=round(pooled(name) / base, 3))


def measure_materialized(args: argparse.Namespace, model: HookedTransformer, rep: Reporter) -> None:
    """The seed's way: LM -> fp16 np.memmap on disk, then shuffled batches read back from it."""
    n_total = args.disk_tokens
    stream = make_stream(args, model, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.f16"
        mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(n_total, 512))

        def write() -> int:
            i = 0
            while i < n_total:
                acts = next(stream).acts
                take = min(len(acts), n_total - i)
                mm[i:i + take] = acts[:take].to(torch.float16).cpu().numpy()
                i += take
            mm.flush()
            return i

        n, dt = timed(write, args.device)
        rep.emit("(f) materialized_write", tokens_per_s=n / dt, gb=round(n_total * 1024 / 1e9, 3))
        rmm = np.memmap(path, dtype=np.float16, mode="r", shape=(n_total, 512))
        perm = np.random.default_rng(0).permutation(n_total)

        def read() -> int:
            out = 0
            for i in range(0, n_total - args.batch + 1, args.batch):
                rows = np.sort(perm[i:i + args.batch])
                x = torch.from_numpy(rmm[rows]).to(args.device, torch.float32)
                out += len(x)
            return out

        n, dt = timed(read, args.device)
        rep.emit("(f) materialized_read_shuffled", tokens_per_s=n / dt, note="file in page cache")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rep = Reporter(args)
    model = build_lm(args.context_len, args.device)
    storages = ["cuda", "pinned"] if args.device == "cuda" else ["cpu"]
    if "lm" not in args.skip:
        measure_lm(args, model, rep)
    measure_buffers(args, model, storages, rep)
    if "loop" not in args.skip:
        measure_loop(args, model, storages, rep)
    if "disk" not in args.skip:
        measure_materialized(args, model, rep)
    print(rep.table())


if __name__ == "__main__":
    main()
