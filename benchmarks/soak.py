"""Soak: a long CPU training run through the real stream -> ring -> trainer path, watching resident memory.

    python benchmarks/soak.py --tokens 20000000 --out runs/soak.jsonl

A small random HookedTransformer (the paper's shape scaled down) streams activations from random tokens into the
ring buffer; the real Trainer trains an Anthropic SAE on them with metrics, resampling and atomic checkpoints every
--checkpoint-every steps. A sampler thread records RSS (from /proc/self/statm) once a second. Growth is measured
after warm-up (the first --warmup fraction of the tokens): (max RSS after warm-up - RSS at warm-up) / RSS at warm-up.
Prints one JSON line per sample (to --out too) and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_stream.activations import ActivationStream
from sae_stream.buffer import ShuffleBuffer
from sae_stream.checkpoint_writer import CheckpointWriter
from sae_stream.config import config_from_dict
from sae_stream.sae import build_sae
from sae_stream.tracking import NullTracker
from sae_stream.trainer import Trainer

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def token_batches(vocab: int, context_len: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (batch, context_len), generator=gen)


class RSSSampler(threading.Thread):
    """Samples (seconds, tokens consumed, RSS) every `interval` seconds until stopped."""

    def __init__(self, buffer: ShuffleBuffer, interval: float) -> None:
        super().__init__(daemon=True)
        self.buffer, self.interval = buffer, interval
        self.samples: list[dict[str, Any]] = []
        self._stop_event = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append({"t": round(time.perf_counter() - self._t0, 2), "tokens": self.buffer.consumed,
                                 "rss_mb": round(rss_bytes() / 2**20, 1)})
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def summarise(samples: list[dict[str, Any]], total: int, warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s["tokens"] >= warmup * total]
    if not after:
        return {"error": "no samples after warm-up: run longer or lower --warmup"}
    base = after[0]["rss_mb"]
    peak = max(s["rss_mb"] for s in after)
    return {"summary": True, "tokens": samples[-1]["tokens"], "seconds": samples[-1]["t"],
            "rss_at_warmup_mb": base, "rss_max_after_warmup_mb": peak, "rss_final_mb": samples[-1]["rss_mb"],
            "growth_after_warmup": round((peak - base) / base, 4), "samples": len(samples)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=20_000_000)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--capacity", type=int, default=131072)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--checkpoints", choices=("background", "sync"), default="background",
                   help="written on a thread into the buffer's kept snapshot memory (what `sae-stream train` does), "
                   "or before training continues")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    torch.manual_seed(0)
    lm = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=64, n_heads=4, d_head=16, d_mlp=128,
                                                   d_vocab=1024, n_ctx=64, act_fn="relu")).eval()
    cfg = config_from_dict({
        "data": {"context_len": 64}, "lm": {"n_ctx": 64},
        "buffer": {"capacity": args.capacity, "lm_batch_size": 64},
        "sae": {"d_sae": args.d_sae, "l1_coeff": 1e-3},
        "train": {"device": "cpu", "total_tokens": args.tokens, "batch_size": args.batch, "log_every": 100,
                  "checkpoint_every": args.checkpoint_every, "density_window_tokens": 1_000_000},
        "resample": {"pool_size": 16384, "dead_window": 200},
    })
    stream = ActivationStream(lm, ["blocks.0.mlp.hook_post"], token_batches(1024, 64, 64, 0), cfg.buffer,
                              context_len=64)
    buffer = ShuffleBuffer(stream, cfg.buffer, "cpu", d_in=stream.d_in, seed=0)
    sae = build_sae(cfg.sae, stream.d_in, seed=0)
    sampler = RSSSampler(buffer, args.interval)
    writer = CheckpointWriter(background=args.checkpoints == "background")

    def buffer_state() -> dict[str, Any]:  # as sae_stream.pipeline.Session._buffer_state
        if not writer.background:
            return {"buffer": buffer.state_dict()}
        writer.wait()
        return {"buffer": buffer.state_dict(reuse_host_memory=True)}

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(sae, cfg, run_dir, NullTracker(), pool_fn=buffer.sample_pool, extra_state=buffer_state,
                          writer=writer)
        sampler.start()
        trainer.fit(buffer.batches(cfg.train.batch_size))
        sampler.stop()
    out = open(args.out, "a") if args.out else None
    for row in [*sampler.samples, summarise(sampler.samples, args.tokens, args.warmup)]:
        line = json.dumps({"bench": "soak", "checkpoints": args.checkpoints, **row})
        print(line)
        if out:
            out.write(line + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
