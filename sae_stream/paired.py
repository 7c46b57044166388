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

import math
from pathlib import Path
from typing import Any

import torch

from sae_stream.evaluate import CE_FILE, CE_RUNS, block_bootstrap, ci95, load_eval_ce
from sae_stream.report import current_eval

# contexts whose clean / ablated CE sums differ by more than this (relative) come from other text or another LM;
# the same ones evaluated on other hardware (a GPU and the CPU) agree far closer than this
SAME_CONTEXT_RTOL = 1e-4
ABLATIONS = {"zero": CE_RUNS.index("zero_ablation"), "mean": CE_RUNS.index("mean_ablation")}  # rows of load_eval_ce


def _load(run_dir: Path | None, label: str) -> tuple[dict[str, Any], torch.Tensor] | str:
    """(eval.json, its per-context CE sums) of a run, or why there are none to pair."""
    if run_dir is None:
        return f"{label} is not a run directory (no eval of it to read)"
    if not (run_dir / "eval.json").is_file():
        return f"{label} has no eval: run `sae-stream eval {run_dir}`"
    ev = current_eval(run_dir)
    if ev is None:
        return f"{label}'s eval.json describes an earlier SAE: run `sae-stream eval {run_dir}` again"
    # the file this eval.json names, with its contexts and its SAE's loss: not one left from another eval
    sums_RC = load_eval_ce(run_dir) if ev.get("ce_per_context_file") == CE_FILE and (run_dir / CE_FILE).is_file() \
        else None
    if sums_RC is None or not _matches(sums_RC, ev):
        return f"{label}'s eval has no per-context losses of its own: run `sae-stream eval {run_dir}` again"
    return ev, sums_RC


def _matches(sums_RC: torch.Tensor, ev: dict[str, Any]) -> bool:
    """The per-context sums add up to eval.json's CE of each run, over as many contexts."""
    if sums_RC.shape[1] != ev.get("contexts") or not ev.get("predictions"):
        return False
    return all(_same(float(row.sum()) / ev["predictions"], ev["ce_loss"][run]) for row, run in zip(sums_RC, CE_RUNS))


def _same(mean: float, saved: float | None) -> bool:
    """eval.json's figure for this mean: null where it is not finite (a diverged SAE's NaN), else equal."""
    return not math.isfinite(mean) if saved is None else math.isclose(mean, saved, rel_tol=1e-9)


def _why_unpaired(ev_a: dict[str, Any], ev_b: dict[str, Any]) -> str | None:
    for key, what in (("hook_name", "hooks"), ("skip_first_position", "skip_first_position settings")):
        if ev_a.get(key) != ev_b.get(key):
            return (f"the two SAEs were evaluated at different {what} ({ev_a.get(key)} and {ev_b.get(key)}): "
                    "loss recovered is paired only on the same ablations")
    return None


def paired_loss_recovered(a_dir: str | Path | None, b_dir: str | Path | None) -> dict[str, Any]:
    """Loss recovered of A and B on the same held-out contexts, B − A and its paired 95% interval; or
    {"skipped": why} when either run has no usable eval or the two evals read different contexts or LMs."""
    loaded = [_load(Path(d) if d is not None else None, label) for d, label in ((a_dir, "A"), (b_dir, "B"))]
    for why in loaded:
        if isinstance(why, str):
            return {"skipped": why}
    (ev_a, sums_a_RC), (ev_b, sums_b_RC) = loaded
    why = _why_unpaired(ev_a, ev_b)
    if why is not None:
        return {"skipped": why}
    shared = [0, *ABLATIONS.values()]
    if sums_a_RC.shape != sums_b_RC.shape or not torch.allclose(sums_a_RC[shared], sums_b_RC[shared],
                                                                rtol=SAME_CONTEXT_RTOL, atol=0.0):
        return {"skipped": "the two evals read different held-out contexts or LMs (their clean and ablated losses "
                           "differ): evaluate both on the same LM, data and eval.tokens"}
    # [clean, sae A, sae B, zero, mean], resampled together: the same blocks for every row
    sums_RC = torch.cat([sums_a_RC[:2], sums_b_RC[1:2], sums_a_RC[2:]])
    totals_RS, n_blocks = block_bootstrap(sums_RC, round(ev_a["tokens"] / ev_a["contexts"]))
    point_R = sums_RC.sum(-1)
    out: dict[str, Any] = {"contexts": int(sums_RC.shape[1]), "tokens": ev_a["tokens"], "a": {}, "b": {},
                           "b_minus_a": {}, "b_minus_a_ci95": {}, "resamples_b_better": {}}
    for name, row in ABLATIONS.items():
        r = row + 1  # (B's SAE row sits before the ablations)
        gap = point_R[r] - point_R[0]
        point = {"a": (point_R[r] - point_R[1]) / gap, "b": (point_R[r] - point_R[2]) / gap,
                 "b_minus_a": (point_R[1] - point_R[2]) / gap} if gap != 0 else {}
        for key in ("a", "b", "b_minus_a"):
            out[key][name] = float(point[key]) if point else None
        gap_S = totals_RS[r] - totals_RS[0]
        diff_S = (totals_RS[1] - totals_RS[2]) / gap_S
        resampled = n_blocks >= 2 and not bool((gap_S == 0).any())
        out["b_minus_a_ci95"][name] = ci95(diff_S) if resampled else None
        out["resamples_b_better"][name] = float((diff_S > 0).double().mean()) if resampled else None
    return out


def format_difference(diff: float | None, ci: list[float] | None) -> str:
    """B − A and its interval as printed: '+0.00022 [+0.00011, +0.00033]' ('n/a' without a difference)."""
    if diff is None:
        return "n/a"
    return f"{diff:+.5f}" + (f" [{ci[0]:+.5f}, {ci[1]:+.5f}]" if ci else "")
