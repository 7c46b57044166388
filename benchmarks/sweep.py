"""K SAEs from one stream (a sweep) against K separate runs, each with its own LM forward and ring buffer.

    python benchmarks/sweep.py --device cpu --out benchmarks/results/sweep_cpu.jsonl
    python benchmarks/sweep.py --device cuda --tokens 20000000 --batch 8192 --out benchmarks/results/sweep_gpu.jsonl

The real path (ActivationStream -> ShuffleBuffer -> Trainer, sweep.fit_together for the sweep) with a random-init
LM (default: the paper's 1 layer, d_model 128, MLP 512, vocab 50304; --lm-layers/--lm-d-model for a costlier one;
weights built once and shared, so only the forwards are counted) and K anthropic SAEs d_in -> d_sae (d_in from
--hook) with different λ. One JSON line per measurement: wall time
of K separate runs, of the sweep, and their ratio (sweep / separate: 1/K would mean the SAE steps are free).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from buffer_throughput import build_lm, device_and_batch, token_batches  # noqa: E402
from recorder import append_line  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from sae_stream.activations import ActivationStream, hook_dim  # noqa: E402
from sae_stream.buffer import ShuffleBuffer  # noqa: E402
from sae_stream.config import config_from_dict  # noqa: E402
from sae_stream.pipeline import batch_dtype  # noqa: E402
from sae_stream.sae import build_sae  # noqa: E402
from sae_stream.sweep import fit_together  # noqa: E402
from sae_stream.tracking import NullTracker  # noqa: E402
from sae_stream.trainer import Trainer  # noqa: E402

HOOK = "blocks.0.mlp.hook_post"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--k", type=int, default=3, help="SAEs in the sweep")
    p.add_argument("--d-sae", type=int, nargs="+", default=[1024, 4096], help="dictionary sizes measured")
    p.add_argument("--batch", type=int, default=None, help="SAE batch (default 8192 on cuda, 4096 on cpu)")
    p.add_argument("--tokens", type=int, default=None, help="activation vectors each SAE trains on")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--lm-batch", type=int, default=None, help="contexts per LM forward")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lm-layers", type=int, default=1, help="LM depth (1 with --lm-d-model 128: the paper's LM)")
    p.add_argument("--lm-d-model", type=int, default=128, help="LM width (heads of 32, MLP 4x)")
    p.add_argument("--hook", default=HOOK, help="hook the SAEs read (e.g. blocks.3.hook_resid_post)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    cuda = device_and_batch(args)
    args.tokens = args.tokens or (20_000_000 if cuda else 81_920)
    args.lm_batch = args.lm_batch or (512 if cuda else 32)
    return args


def _cfg(args: argparse.Namespace, d_sae: int, l1: float):
    return config_from_dict({
        "sae": {"d_sae": d_sae, "l1_coeff": l1, "init_b_dec": "mean"},
        "train": {"device": args.device, "total_tokens": args.tokens, "batch_size": args.batch,
                  "log_every": 10**9, "checkpoint_every": 10**9},
        "resample": {"enabled": False},
        "buffer": {"capacity": 8 * args.batch, "lm_batch_size": args.lm_batch, "storage": "auto"},
    })


def build_model(args: argparse.Namespace):
    """The paper's 1-layer LM, or (--lm-layers/--lm-d-model) a deeper/wider random-init one: a costlier forward,
    as when the SAEs read a larger model (where a sweep saves most)."""
    if (args.lm_layers, args.lm_d_model) == (1, 128):
        return build_lm(args.context_len, args.device)
    torch.manual_seed(0)
    d = args.lm_d_model
    cfg = HookedTransformerConfig(n_layers=args.lm_layers, d_model=d, n_heads=d // 32, d_head=32, d_mlp=4 * d,
                                  d_vocab=50304, n_ctx=args.context_len, act_fn="relu", normalization_type="LN",
                                  default_prepend_bos=False, device=args.device)
    return HookedTransformer(cfg).eval()


def _buffer(args: argparse.Namespace, model, cfg) -> ShuffleBuffer:
    device = torch.device(args.device)
    stream = ActivationStream(model, [args.hook], token_batches(args.lm_batch, args.context_len, args.device),
                              cfg.buffer, device, context_len=args.context_len)
    return ShuffleBuffer(stream, cfg.buffer, device, d_in=stream.d_in)


def _trainer(args: argparse.Namespace, cfg) -> Trainer:
    return Trainer(build_sae(cfg.sae, args.d_in).to(args.device), cfg, None, NullTracker())


def _sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def _fit(trainers: list, buffer, batch: int) -> None:
    """One trainer's fit, or several fed the same batches, drawn as `sae-stream train` draws them."""
    batches = buffer.batches(batch, dtype=batch_dtype(buffer.dtype, trainers))
    if len(trainers) == 1:
        trainers[0].fit(batches)
    else:
        fit_together(trainers, batches, save_stream=lambda step: None)


def measure(args: argparse.Namespace, model, d_sae: int) -> dict:
    cfgs = [_cfg(args, d_sae, l1) for l1 in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)[:args.k]]
    _sync(args)
    t0 = time.perf_counter()
    for cfg in cfgs:  # K separate runs: each streams its own activations
        _fit([_trainer(args, cfg)], _buffer(args, model, cfg), args.batch)
    _sync(args)
    separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    _fit([_trainer(args, cfg) for cfg in cfgs], _buffer(args, model, cfgs[0]), args.batch)
    _sync(args)
    sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    _fit([_trainer(args, cfgs[0])], _buffer(args, model, cfgs[0]), args.batch)
    _sync(args)
    one = time.perf_counter() - t0
    sae_tokens = args.k * args.tokens
    return {"bench": "sweep", "device": args.device, "k": args.k, "d_in": args.d_in, "d_sae": d_sae,
            "batch": args.batch,
            "lm": f"{args.lm_layers}L d_model {args.lm_d_model}, ctx {args.context_len}", "hook": args.hook,
            "tokens_per_sae": args.tokens, "one_run_s": round(one, 3), "separate_s": round(separate, 3),
            "sweep_s": round(sweep, 3), "ratio_sweep_vs_separate": round(sweep / separate, 4),
            "sae_tokens_per_s_separate": round(sae_tokens / separate),
            "sae_tokens_per_s_sweep": round(sae_tokens / sweep),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    args.d_in = hook_dim(model, args.hook, args.context_len)
    rows = []
    for d_sae in args.d_sae:
        row = measure(args, model, d_sae)
        rows.append(row)
        append_line(row, args.out)
    print("\n| d_sae | 1 run (s) | K separate (s) | sweep of K (s) | sweep / separate |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['d_sae']} | {r['one_run_s']} | {r['separate_s']} | {r['sweep_s']} | "
              f"{r['ratio_sweep_vs_separate']:.3f} |")


if __name__ == "__main__":
    main()
