"""gpu_compare.py's JSON lines: one per measurement, the fields issue 6 asks for (date, card, torch, variant, d_sae,
batch, tokens_per_s, peak_gpu_gb, peak_host_gb) plus details, printed, appended to --out, and tabled at the end."""

from __future__ import annotations

import argparse
import json
import resource
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


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
        peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        row = {"variant": variant, "d_sae": d_sae,
               "tokens_per_s": round(tokens_per_s) if tokens_per_s is not None else None,
               "peak_gpu_gb": round(peak_gpu, 3), "peak_host_gb": round(peak_host, 3)} | extra
        row = self.common | row
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as f:
                f.write(line + "\n")
        return row

    def guarded(self, variant: str, d_sae: int | None, fn: Callable[[], tuple[float, dict]]) -> float | None:
        self.start()
        try:
            rate, extra = fn()
        except Exception as exc:  # noqa: BLE001 — one broken variant must not lose the others' numbers
            traceback.print_exc()
            self.emit(variant, d_sae, None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return None
        self.emit(variant, d_sae, rate, **extra)
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
