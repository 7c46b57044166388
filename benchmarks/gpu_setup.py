"""What the GPU benchmarks build and time (gpu_compare.py, profile_step.py): the LM, its activation stream, text
feeds, trainers configured as `sae-stream train` configures them, and the timed-steps harness."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from buffer_throughput import HOOK, sync, token_batches
from data_throughput import write_corpus
from torch import Tensor

from lm.capture import GPTCapture
from lm.hooked import to_hooked
from lm.model import GPT
from sae_stream.activations import ActivationStream
from sae_stream.config import BufferConfig, DataConfig, LMConfig, config_from_dict
from sae_stream.data import ContextBatches
from sae_stream.fused_ops import ENCODE_ENV, tuned_configs
from sae_stream.prefetch import PrefetchedBatches, training_batches
from sae_stream.pretokenize import FIELD, MANIFEST, tokenize_source
from sae_stream.sae import build_sae
from sae_stream.step import resolve_kernels
from sae_stream.tracking import NullTracker
from sae_stream.trainer import Trainer

GRAPHED_BF16 = {"cuda_graphs": True, "autocast": "bfloat16"}
STEP_VARIANTS = {  # name: train overrides
    "step_eager_autograd_tf32": {"step_impl": "autograd", "cuda_graphs": False, "autocast": "none"},
    "step_eager_autograd_bf16": {"step_impl": "autograd", "cuda_graphs": False, "autocast": "bfloat16"},
    "step_graph_autograd_bf16": {"step_impl": "autograd", "cuda_graphs": True, "autocast": "bfloat16"},
    "step_eager_fused_bf16": {"step_impl": "fused", "cuda_graphs": False, "autocast": "bfloat16"},
    "step_graph_fused_tf32": {"step_impl": "fused", "cuda_graphs": True, "autocast": "none"},
    "step_graph_fused_bf16": {"step_impl": "fused", "cuda_graphs": True, "autocast": "bfloat16"},
    # the same step with plain PyTorch ops between the matmuls instead of the Triton epilogue kernels
    "step_graph_fused_bf16_torch_ops": {"step_impl": "fused", "cuda_graphs": True, "autocast": "bfloat16",
                                        "kernels": "torch"},
    # TopK (k = 32): dense decoding against the sparse gather / index_add kernels, both graphed
    "topk_graph_dense_bf16": {**GRAPHED_BF16, "sae": {"architecture": "topk", "topk_kernels": "dense"}},
    "topk_graph_sparse_bf16": {**GRAPHED_BF16, "sae": {"architecture": "topk", "topk_kernels": "sparse"}},
    # BatchTopK (k = 32), plain and with Matryoshka levels [d_sae/16, d_sae/4] (the decoder split into 3 slices)
    "batchtopk_graph_dense_bf16": {**GRAPHED_BF16, "sae": {"architecture": "batchtopk", "topk_kernels": "dense"}},
    "batchtopk_matryoshka_graph_dense_bf16": {**GRAPHED_BF16, "sae": {"architecture": "batchtopk", "topk_kernels":
                                                                      "dense", "matryoshka": "d_sae/16,d_sae/4"}},
    # JumpReLU (autograd; its encoder stays fp32 under autocast, see sae.JumpReLUSAE.forward)
    "jumprelu_graph_bf16": {**GRAPHED_BF16, "sae": {"architecture": "jumprelu"}},
}
BEST = "step_graph_fused_bf16"
# the best step in each of its layouts (fused_ops.ENCODE_ENV; BEST times `stats` against `cublas` and keeps the
# faster): `stats` as session 15 measured it (f's column sums in Triton's encoder), `triton` / `cublas` that
# encoder without them, the sums in the backward's epilogue
LAYOUT_STEPS = {f"{BEST}_{enc}_encoder": {**STEP_VARIANTS[BEST], "env": {ENCODE_ENV: enc}}
                for enc in ("triton", "cublas", "stats")}
STEP_VARIANTS |= LAYOUT_STEPS
# BEST fed as the loop feeds it: a bf16 batch (the ring's dtype) already in the graph's input (Trainer.batch_input),
# so no copy; BEST itself copies an fp32 batch in each step, as sessions 3-15 measured it
IN_PLACE = f"{BEST}_in_place"
STEP_VARIANTS[IN_PLACE] = {**STEP_VARIANTS[BEST], "input": "in_place_bf16"}
# what the loop is compared with, measured before it: the best step in each layout and fed in place
TARGET_STEPS = (BEST, *LAYOUT_STEPS, IN_PLACE)
LARGE_STEP_VARIANTS = ("step_eager_autograd_tf32", "step_graph_autograd_bf16", "step_graph_fused_bf16",
                       "step_graph_fused_bf16_torch_ops", "topk_graph_dense_bf16", "topk_graph_sparse_bf16")
# the whole loop as `sae-stream train` runs it (""), and with one setting changed: name suffix -> train overrides
# the loop's variants: the trainer's settings changed, or the buffer's (`direct_writes`; `lm_batch_scale`: contexts
# per LM forward, times --lm-tokens' share; `into_input`: batches gathered into the step graph's input, or copied;
# `metrics_every`: the buffer's shuffle-quality sample every that many batches, 0 = none; train's default is 64;
# `capacity_scale`: times --capacity, so 2 is configs/paper_a1.yaml's 4M ring at the default 2M)
LOOP_VARIANTS = {"": {}, "_no_priority": {"stream_priority": False}, "_chunk_writes": {"direct_writes": False},
                 "_lm_batch_div4": {"lm_batch_scale": 0.25}, "_lm_batch_x4": {"lm_batch_scale": 4},
                 "_copied_input": {"into_input": False}, "_no_shuffle_metrics": {"metrics_every": 0},
                 "_ring_x2": {"capacity_scale": 2}}

def build_lm(context_len: int, device: str) -> tuple[GPT, object]:
    """Random-init 1-layer GPT of the paper's shape (d_model 128, 4 heads, MLP 512 ReLU, vocab 50304) and the
    HookedTransformer computing the same function."""
    torch.manual_seed(0)
    gpt = GPT(LMConfig(n_layers=1, d_model=128, n_heads=4, d_mlp=512, n_ctx=context_len, vocab_size=50304))
    gpt = gpt.to(device).eval()
    return gpt, to_hooked(gpt)


def make_stream(context_len: int, device: str, bcfg: BufferConfig, out_device: str, native: bool,
                kernels: str = "torch", tokens: Iterable[Tensor] | None = None) -> ActivationStream:
    """The LM's activation stream over `tokens` (default: random token batches made on the host)."""
    gpt, hooked = build_lm(context_len, device)
    tokens = tokens if tokens is not None else token_batches(bcfg.lm_batch_size, context_len, "cpu")
    return ActivationStream(hooked, HOOK, tokens, bcfg, out_device,
                            capture=GPTCapture(gpt, [HOOK], kernels=kernels) if native else None)


def text_batches(args: argparse.Namespace, context_len: int, lm_batch: int, prefetch: int,
                 feed: str = "text") -> ContextBatches | PrefetchedBatches:
    """Token batches of real text as `sae-stream train` reads them (data.prefetch batches ahead in a child
    process, or inline with 0): --text-mb of the embedded corpus's documents as a .jsonl, GPT-2 BPE, looped; with
    feed `ids`, those documents as `sae-stream tokenize` writes them (10 parquet files), read with no tokenizer."""
    path, field = Path(args.text_dir) / "docs.jsonl", "text"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_corpus(path, n_bytes=int(args.text_mb * 1e6))
    if feed == "ids":
        ids = path.parent / "ids"
        if not (ids / MANIFEST).exists():
            tokenize_source(None, [f"--data.source={path}"], str(ids), True, int(args.text_mb * 1e6 / 4 / 10))
        path, field = ids, FIELD
    cfg = DataConfig(source=str(path), text_field=field, tokenizer="gpt2", context_len=context_len,
                     heldout_fraction=0.0, prefetch=prefetch)
    return training_batches(cfg, lm_batch, torch.device(args.device))


def scratch_ring(rows: int, device: str) -> tuple[Tensor, Tensor]:
    """A ring of 2 x `rows` 512-wide vectors in the LM's dtype there (bf16 on CUDA) and `rows` random distinct
    slots of it: where an LM forward writes as a refill would."""
    ring_RD = torch.empty(2 * rows, 512, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    return ring_RD, torch.randperm(2 * rows, device=device)[:rows]


def lm_kernels(args: argparse.Namespace) -> str:
    """The native LM's LayerNorm kernels, as `sae-stream train` picks them from train.kernels (--kernels)."""
    return resolve_kernels(args.kernels, torch.device(args.device))



def make_trainer(args: argparse.Namespace, d_sae: int, train: dict) -> Trainer:
    train = dict(train)
    train.pop("env", None)  # (set by the caller around the timing: see environment)
    train.pop("input", None)  # (how the caller feeds the step: see gpu_compare.measure_steps)
    sae = {"architecture": "anthropic", "d_sae": d_sae, "l1_coeff": 1e-3} | train.pop("sae", {})
    sae["matryoshka"] = [d_sae // 16, d_sae // 4] if sae.get("matryoshka") == "d_sae/16,d_sae/4" else None
    cfg = config_from_dict({
        "sae": sae,
        "train": {"total_tokens": args.batch * 10**9, "batch_size": args.batch, "lr": 1e-4, "log_every": 10**9,
                  "checkpoint_every": 10**9, "device": args.device, "kernels": args.kernels} | train,
        "resample": {"enabled": False},
    })
    sae = build_sae(cfg.sae, 512, seed=0).to(args.device)
    return Trainer(sae, cfg, None, NullTracker())


def timed_steps(args: argparse.Namespace, trainer: Trainer, batches: Iterator[Tensor]) -> tuple[float, dict]:
    """Warm up (graph capture included), calibrate, then time a window of ~args.seconds; tokens/s."""
    def run(n: int) -> float:
        trainer.total_steps = trainer.step + n
        sync(args.device)
        t0 = time.perf_counter()
        trainer.fit(batches)
        sync(args.device)
        return time.perf_counter() - t0

    run(8)
    probe = 20
    dt = run(probe)
    steps = max(probe, int(args.seconds * probe / dt))
    dt = run(steps)
    graphed = bool(trainer._graph.graphs) and not trainer._graph.disabled
    extra = {"steps": steps, "graphed": graphed, "kernels": trainer.kernels}
    if trainer.kernels == "triton" and trainer.fused:
        extra["triton_configs"] = tuned_configs()  # the autotuner's picks (BM×BN×BK/warps/stages)
    return steps * args.batch / dt, extra



def buffer_cfg(args: argparse.Namespace, storage: str, context_len: int, dtype: str = "auto") -> BufferConfig:
    return BufferConfig(hook_name=HOOK, capacity=args.capacity, refill_fraction=0.5, storage=storage,
                        lm_batch_size=max(1, args.lm_tokens // context_len), dtype=dtype)


# the loop as session 3 measured it: an fp32 ring, the LM in torch's ops (same run, for the ratio)
LOOP_BEFORE = {"dtype": "float32", "kernels": "torch"}


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """os.environ with `env` set for the block (a variant's switches read at run time), restored after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
