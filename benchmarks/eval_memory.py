"""What `sae-stream eval` costs in host memory and time as the logits are made a slice of positions at a time
(`sae_stream.evaluate.LOGIT_ELEMENTS`) against all of a chunk's positions at once (`whole`: the same code with one
slice per chunk, i.e. [B, T, d_vocab] logits as the code before session 11 made them; that code also kept one
more such tensor, so `whole` understates what it cost). Each variant runs in its own process, so its peak RSS is
its own.

The model is a random-init LM of the paper's shape (1 layer, d_model 128, 4 heads, MLP 512 ReLU, GPT-2's vocabulary
of 50257) with a random 512 -> --d-sae SAE at `blocks.0.mlp.hook_post`, on random tokens: memory and speed do not
depend on the weights. Every variant must give the same CE losses and KL (checked, printed as max_rel_diff).

    python benchmarks/eval_memory.py --out benchmarks/results/eval_memory.jsonl
    python benchmarks/eval_memory.py --contexts 4 --context-len 128 --slices whole,4194304      # smoke

One JSON line per variant and context length: date, machine, torch, variant, context_len, batch_contexts,
slice_rows, tokens, seconds, tokens_per_s, peak_host_gb, base_host_gb (RSS with the model built, before eval),
ce_clean, kl_clean_sae.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recorder import append_line, machine, peak_rss_gb, random_paper_model  # noqa: E402


def child(args: argparse.Namespace) -> dict:
    """One variant in this process: build, then evaluate once; the figures as a dict."""
    import sae_stream.evaluate as ev
    from sae_stream.config import EvalConfig, TrainConfig

    model, sae = random_paper_model(args.context_len, args.d_sae, args.threads)
    g = torch.Generator().manual_seed(1)
    tokens_NT = torch.randint(0, 50257, (args.contexts, args.context_len), generator=g)
    slices = args.slice
    whole = 50257 * args.batch_contexts * args.context_len  # one slice holds a whole chunk's positions
    ev.LOGIT_ELEMENTS = {"cpu": whole if slices == "whole" else int(slices)}
    base = peak_rss_gb()
    t0 = time.perf_counter()
    r = ev.evaluate(model, sae, "blocks.0.mlp.hook_post", [tokens_NT],
                    EvalConfig(tokens=tokens_NT.numel(), batch_contexts=args.batch_contexts), TrainConfig())
    seconds = time.perf_counter() - t0
    return {"slice_rows": ev.LOGIT_ELEMENTS["cpu"] // 50257, "tokens": tokens_NT.numel(), "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens_NT.numel() / seconds), "peak_host_gb": round(peak_rss_gb(), 3),
            "base_host_gb": round(base, 3), "ce_clean": r["ce_loss"]["clean"], "ce_sae": r["ce_loss"]["sae"],
            "kl_clean_sae": r["kl_clean_sae"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="whole,1048576,4194304,16777216",
                   help="comma-separated LOGIT_ELEMENTS values to compare ('whole': one slice per chunk)")
    p.add_argument("--context-len", default="128,1024", help="comma-separated context lengths")
    p.add_argument("--contexts", type=int, default=64, help="held-out contexts evaluated per variant")
    p.add_argument("--batch-contexts", type=int, default=16, help="eval.batch_contexts")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--slice", help=argparse.SUPPRESS)  # set in the child process
    args = p.parse_args()
    if args.slice:
        args.context_len = int(args.context_len)
        print(json.dumps(child(args)))
        return
    common = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch": torch.__version__}
    for context_len in args.context_len.split(","):
        rows = []
        for slices in args.slices.split(","):
            cmd = [sys.executable, __file__, "--slice", slices, "--context-len", context_len, "--contexts",
                   str(args.contexts), "--batch-contexts", str(args.batch_contexts), "--d-sae", str(args.d_sae),
                   "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(common | {"variant": f"slices={slices}", "context_len": int(context_len),
                                  "batch_contexts": args.batch_contexts, "d_sae": args.d_sae} | res)
        spread = max(abs(r[k] - rows[0][k]) / abs(rows[0][k]) for r in rows for k in ("ce_clean", "ce_sae",
                                                                                         "kl_clean_sae"))
        for r in rows:
            r["max_rel_diff"] = float(f"{spread:.2e}")
            append_line(r, args.out)
        assert spread < 1e-4, f"variants disagree (max relative difference {spread:.2e}): a bug"


if __name__ == "__main__":
    main()
