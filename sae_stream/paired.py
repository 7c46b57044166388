"""Is SAE B's loss recovered better than SAE A's? A paired test from the two runs' evals, without running a model.

    paired = paired_loss_recovered(run_a, run_b)     # {"a": ..., "b": ..., "b_minus_a": ..., "b_minus_a_ci95": ...}

Each eval keeps every held-out context's CE sums (clean, SAE spliced in, zero- and mean-ablated) in
eval_ce.safetensors. When two evals read the same contexts through the same LM (their clean, zero- and
mean-ablated sums agree context by context), the difference of loss recovered, B − A =
(L_sae,A − L_sae,B) / (L_ablated − L_clean), is estimated on those same predictions, and its 95% interval
comes from resampling the same blocks of contexts for both (eval's block bootstrap). The text's own noise is
then shared by A and B instead of added: the interval of the difference is much narrower than the two
separate intervals suggest. It speaks for this held-out text and LM, not for SAEs trained again with
other seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_stream.evaluate import CE_FILE, block_bootstrap, ci95, load_eval_ce, read_eval
from sae_stream.report import current_eval

# contexts whose clean / ablated CE sums differ by more than this (relative) come from other text or another LM;
# the same ones evaluated on other hardware (a GPU and the CPU) agree far closer than this
SAME_CONTEXT_RTOL = 1e-4
ABLATIONS = {"zero": 2, "mean": 3}  # their rows in load_eval_ce's [clean, sae, zero_ablation, mean_ablation]


def _why_not(run_dir: Path | None, label: str) -> str | None:
    if run_dir is None:
        return f"{label} is not a run directory (no eval of it to read)"
    if not (run_dir / "eval.json").is_file():
        return f"{label} has no eval: run `sae-stream eval {run_dir}`"
    if current_eval(run_dir) is None:
        return f"{label}'s eval.json describes an earlier SAE: run `sae-stream eval {run_dir}` again"
    if not (run_dir / CE_FILE).is_file():
        return f"{label}'s eval predates per-context losses: run `sae-stream eval {run_dir}` again"
    return None


def paired_loss_recovered(a_dir: str | Path | None, b_dir: str | Path | None) -> dict[str, Any]:
    """Loss recovered of A and B on the same held-out contexts, B − A and its paired 95% interval; or
    {"skipped": why} when either run has no usable eval or the two evals read different contexts or LMs."""
    dirs = [Path(d) if d is not None else None for d in (a_dir, b_dir)]
    for d, label in zip(dirs, "AB"):
        why = _why_not(d, label)
        if why is not None:
            return {"skipped": why}
    sums_a, sums_b = load_eval_ce(dirs[0]), load_eval_ce(dirs[1])
    shared = [0, *ABLATIONS.values()]
    if sums_a.shape != sums_b.shape or not torch.allclose(sums_a[shared], sums_b[shared], rtol=SAME_CONTEXT_RTOL,
                                                          atol=0.0):
        return {"skipped": "the two evals read different held-out contexts or LMs (their clean and ablated losses "
                           "differ): evaluate both on the same LM, data and eval.tokens"}
    ev = read_eval(dirs[0])
    context_len = round(ev["tokens"] / ev["contexts"])
    # [clean, sae A, sae B, zero, mean]: one resample of blocks for all five
    totals_RS, n_blocks = block_bootstrap(torch.cat([sums_a[:2], sums_b[1:2], sums_a[2:]]), context_len)
    point_R = torch.cat([sums_a[:2], sums_b[1:2], sums_a[2:]]).sum(-1)
    out: dict[str, Any] = {"contexts": int(sums_a.shape[1]), "tokens": ev["tokens"], "a": {}, "b": {},
                           "b_minus_a": {}, "b_minus_a_ci95": {}, "resamples_b_better": {}}
    for name, row in ABLATIONS.items():
        r = row + 1  # (the stacked rows: A's SAE row pushed them down by one)
        gap, gap_S = point_R[r] - point_R[0], totals_RS[r] - totals_RS[0]
        if gap == 0 or bool((gap_S == 0).any()):
            for key in ("a", "b", "b_minus_a", "b_minus_a_ci95", "resamples_b_better"):
                out[key][name] = None
            continue
        out["a"][name] = float((point_R[r] - point_R[1]) / gap)
        out["b"][name] = float((point_R[r] - point_R[2]) / gap)
        out["b_minus_a"][name] = float((point_R[1] - point_R[2]) / gap)
        diff_S = (totals_RS[1] - totals_RS[2]) / gap_S
        out["b_minus_a_ci95"][name] = ci95(diff_S) if n_blocks >= 2 else None
        out["resamples_b_better"][name] = float((diff_S > 0).double().mean())
    return out
