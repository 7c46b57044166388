"""gpu_compare.py's JSON lines: one per measurement, the fields issue 6 asks for (date, card, torch, variant, d_sae,
batch, tokens_per_s, peak_gpu_gb, peak_host_gb) plus details, printed, appended to --out, and tabled at the end."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def machine() -> str:
    """The CPU's model name and the cores, e.g. 'AMD EPYC, 2 cores'."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def random_paper_model(context_len: int, d_sae: int, threads: int) -> tuple[Any, Any]:
    """(model, sae), seeded: a random-init LM of the paper's shape (1 layer, d_model 128, 4 heads, MLP 512 ReLU,
    GPT-2's vocabulary of 50257) and a random 512 -> d_sae SAE, on the CPU with `threads` threads. What eval and
    analysis cost does not depend on the weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_stream.config import SAEConfig
    from sae_stream.sae import build_sae

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = HookedTransformerConfig(n_layers=1, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=50257,
                                  n_ctx=context_len, act_fn="relu", normalization_type="LN", device="cpu")
    return HookedTransformer(cfg).eval(), build_sae(SAEConfig(d_sae=d_sae), 512).eval()


def append_line(row: dict, out: str | None) -> None:
    """Print `row` as a JSON line, and append it to the file `out` when one is given."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


class Recorder:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows = args, []
        cuda = args.device == "cuda"
        self.common = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                       "card": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch}

    def start(self) -> None:
        if self.args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def emit(self, variant: str, d_sae: int | None, tokens_per_s: float | None, **extra: Any) -> dict:
        peak_gpu = torch.cuda.max_memory_allocated() / 1e9 if self.args.device == "cuda" else 0.0
        peak_host = peak_rss_gb()
        row = {"variant": variant, "d_sae": d_sae,
               "tokens_per_s": round(tokens_per_s) if tokens_per_s is not None else None,
               "peak_gpu_gb": round(peak_gpu, 3), "peak_host_gb": round(peak_host, 3)} | extra
        row = self.common | row
        self.rows.append(row)
        append_line(row, self.args.out)
        return row

    def guarded(self, variant: str, d_sae: int | None, fn: Callable[[], tuple[float, dict]]) -> float | None:
        self.start()
        t0 = time.perf_counter()  # wall_s: what the variant cost, warm-up included (to plan a short device call)
        try:
            rate, extra = fn()
        except Exception as exc:  # noqa: BLE001 — one broken variant must not lose the others' numbers
            traceback.print_exc()
            self.emit(variant, d_sae, None, error=f"{type(exc).__name__}: {str(exc)[:300]}",
                      wall_s=round(time.perf_counter() - t0, 1))
            return None
        self.emit(variant, d_sae, rate, **extra, wall_s=round(time.perf_counter() - t0, 1))
        return rate

    def table(self) -> str:
        lines = ["| variant | d_sae | tokens/s | peak GPU GB | notes |", "|---|---:|---:|---:|---|"]
        for r in self.rows:
            rate = f"{r['tokens_per_s']:,}" if r["tokens_per_s"] is not None else "failed" if "error" in r else "-"
            notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in (*self.common, "variant", "d_sae",
                                                                             "tokens_per_s", "peak_gpu_gb",
                                                                             "peak_host_gb"))
            lines.append(f"| {r['variant']} | {r['d_sae'] or ''} | {rate} | {r['peak_gpu_gb']} | {notes} |")
        return "\n".join(lines)
