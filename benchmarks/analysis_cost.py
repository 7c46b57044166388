"""What the dashboard's pinned samples add to `sae-stream analyze`, and what eval's loss-recovered interval costs.

- `dashboard_steer_<n>`: build_dashboard with analysis.steer_tokens = n (0: no pinned samples), the rest equal;
  `ratio_to_steer_0` against the variant without samples, from the same run.
- `bootstrap_<contexts>`: evaluate's `_bootstrap_recovered` on per-context CE sums of that many contexts (1000
  resamples in blocks of 1024 tokens), with the process's peak RSS before and after.

The model is a random-init LM of the paper's shape (1 layer, d_model 128, 4 heads, MLP 512 ReLU, GPT-2's vocabulary
of 50257, context --context-len) with a random 512 -> --d-sae SAE at `blocks.0.mlp.hook_post`, on random tokens: the
cost does not depend on the weights (the samples' text does, and is not looked at).

    python benchmarks/analysis_cost.py --out benchmarks/results/analysis_cost.jsonl
    python benchmarks/analysis_cost.py --features 4 --tokens 4096 --bootstrap-contexts 100       # smoke

One JSON line per variant: date, machine, torch, variant, seconds (median of --repeats), rounds, and the
variant's settings (features, steer_tokens, tokens; contexts, base_host_gb, peak_host_gb).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorder import append_line, machine, peak_rss_gb, random_paper_model  # noqa: E402


def _timed(fn, repeats: int) -> list[float]:
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rounds.append(time.perf_counter() - t0)
    return rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, default=64, help="features shown (analysis.features; the default run's)")
    p.add_argument("--steer-tokens", default="0,16", help="comma list of analysis.steer_tokens (0 first: the base)")
    p.add_argument("--tokens", type=int, default=65536, help="held-out tokens the dashboard scans")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--bootstrap-contexts", default="512,15625",
                   help="comma list: contexts for the interval (512: the default eval; 15625: 2M tokens at 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    import sae_stream.evaluate as ev
    from sae_stream.analysis.dashboard import build_dashboard
    from sae_stream.config import AnalysisConfig
    from sae_stream.tokenizer import get_tokenizer

    model, sae = random_paper_model(args.context_len, args.d_sae, args.threads)
    n_ctx = max(1, args.tokens // args.context_len)
    tokens_NT = torch.randint(0, 50257, (n_ctx, args.context_len), generator=torch.Generator().manual_seed(1))
    tokenizer = get_tokenizer("gpt2")
    common = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch": torch.__version__}
    rows = []

    def emit(row: dict) -> None:
        rows.append(common | row)
        append_line(rows[-1], args.out)

    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for steer in (int(s) for s in args.steer_tokens.split(",")):
            acfg = AnalysisConfig(features=args.features, tokens=n_ctx * args.context_len, steer_tokens=steer)
            rounds = _timed(lambda acfg=acfg: build_dashboard(model, sae, "blocks.0.mlp.hook_post", [tokens_NT],
                                                              tokenizer, acfg, Path(tmp)), args.repeats)
            seconds = statistics.median(rounds)
            base = seconds if base is None else base
            emit({"variant": f"dashboard_steer_{steer}", "seconds": round(seconds, 3),
                  "rounds": [round(r, 3) for r in rounds], "features": args.features, "steer_tokens": steer,
                  "tokens": n_ctx * args.context_len, "ratio_to_steer_0": round(seconds / base, 3)})
    for contexts in (int(c) for c in args.bootstrap_contexts.split(",")):
        sums_RC = 100 + torch.rand(4, contexts, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        sums_RC[2:] += 50  # (ablated runs: a gap well away from 0)
        before = peak_rss_gb()
        rounds = _timed(lambda sums_RC=sums_RC: ev._bootstrap_recovered(sums_RC, args.context_len), args.repeats)
        emit({"variant": f"bootstrap_{contexts}", "seconds": round(statistics.median(rounds), 4),
              "rounds": [round(r, 4) for r in rounds], "contexts": contexts, "base_host_gb": round(before, 3),
              "peak_host_gb": round(peak_rss_gb(), 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
