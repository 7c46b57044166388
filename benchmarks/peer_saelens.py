"""SAELens's trainer on the same model shape / hook / d_sae / batch as gpu_compare.py's measurements, run by
peer-bench's script (shared/peer-bench/bench_saelens.py, with sae-lens importable) in its own process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from recorder import Recorder


def saelens_row(record: dict) -> tuple[str, int, float, dict]:
    """(variant, d_sae, tokens/s, extra) from bench_saelens.py's 'training' JSON line."""
    variant = "saelens_trainer_fast" if record.get("fast") else "saelens_trainer"
    extra = {"peak_gpu_gb": None, "peak_host_gb": round(record["peak_rss_mib"] * 2**20 / 1e9, 3),
             "training_tokens": record["training_tokens"], "compile": record.get("compile"),
             "context_len": record.get("context_size")}
    return variant, record["d_sae"], record["end_to_end_tokens_per_s_median"], extra


def measure_saelens(args: argparse.Namespace, rec: Recorder, d_sae: int, fast: bool, tokens: int) -> float | None:
    def fn() -> tuple[float, dict]:
        cmd = [sys.executable, args.saelens, "--device", args.device, "--only", "train", "--d-sae", str(d_sae),
               "--batch-tokens", str(args.batch), "--train-repeats", "1", "--warmup-train-tokens", "1000000",
               "--train-tokens", str(tokens), *(["--fast"] if fast else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        training = [r for r in records if r.get("bench") == "training"]
        if not training:
            raise RuntimeError(f"bench_saelens.py printed no training line: {out[-300:]}")
        _, _, rate, extra = saelens_row(training[-1])
        return rate, extra | {"note": "its own process (peak_host_gb is that process's)"}
    return rec.guarded("saelens_trainer_fast" if fast else "saelens_trainer", d_sae, fn)
