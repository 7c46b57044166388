"""Held-out evaluation of an SAE spliced into its language model: L0, MSE, FVU, CE loss recovered, KL, densities.

    result = evaluate(model, sae, "blocks.0.mlp.hook_post", token_batches, cfg.eval, cfg.train,
                      skip_first_position=cfg.buffer.skip_first_position)
    write_eval(run_dir, result)   # eval.json, feature_density.safetensors, eval_ce.safetensors, density_histogram.png

Definitions (also written into eval.json under "definitions"):
- activation statistics (L0, MSE, FVU, densities) count every evaluated position except position 0 when
  `skip_first_position` is set; spliced runs then keep position 0's clean activation (the SAE never saw it).
- L0 = mean number of features with activation > 0 per token.
- MSE = mean over tokens and input dims of (x - x_hat)^2.
- FVU = sum ||x - x_hat||^2 / sum ||x - mean_x||^2, mean_x the mean activation over the evaluated positions.
- CE losses average the next-token cross-entropy over all T-1 predictions of every context (position 0's
  prediction included: when position 0 is kept clean it is identical in every run, so it cancels in the
  loss-recovered differences and only scales them equally).
- loss recovered (ablation A in {zero, mean}) = (L_A - L_sae) / (L_A - L_clean): 1 = the SAE loses nothing,
  0 = as bad as ablating the hook. The seed logged its complement (L_sae - L_clean) / (L_A - L_clean).
- its 95% interval: percentiles over BOOTSTRAP_SAMPLES resamples (with replacement, seeded) of blocks of
  consecutive contexts, BOOTSTRAP_BLOCK_TOKENS tokens each (`_bootstrap_recovered`); each context's CE sums are
  kept (eval_ce.safetensors), so two evals on the same contexts compare paired (paired.py).
- matryoshka (Matryoshka SAEs only): FVU of each nested dictionary's reconstruction alone, and the L0 of its features.
- KL = KL(p_clean || p_sae) summed over the vocabulary, averaged over the same predictions as the CE.
- density of a feature = fraction of evaluated tokens where it fires (> 0); dead: density <= train.dead_threshold;
  ultra-low: alive and density < train.ultralow_threshold (null when the evaluated tokens cannot resolve it);
  dense: density > train.dense_threshold.

Memory is bounded by one chunk of `eval.batch_contexts` contexts (its [B*T, d_sae] features, for a Matryoshka
SAE also one masked copy of them at a time, and four [B, T, d_model] final residuals, one a run) and by
LOGIT_ELEMENTS: the logits are made from those residuals for a slice of positions at a time, never as a whole
[B, T, d_vocab] tensor (0.4 GB in fp32 for 16 contexts of 128 GPT-2 tokens, 3.3 GB at context 1024). Only the
token ids of the held-out set are kept, so the mean activation (needed before mean ablation) is a first pass over
the same contexts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_stream.analysis.hooks import (
    SAELike,
    check_not_unembed,
    check_sae,
    chunks,
    final_residual,
    first_position,
    fp32_matmuls,
    hook_activations,
    model_device,
    sae_decode,
    sae_features,
    sae_in_eval_mode,
    splice_hook,
    take_contexts,
    unembed_rows,
)
from sae_stream.analysis.plots import plot_density_histogram
from sae_stream.checkpoint import atomic_write_bytes, atomic_write_json
from sae_stream.config import EvalConfig, TrainConfig
from sae_stream.hook_points import check_hook_names
from sae_stream.metrics import density_counts
from sae_stream.tracking import json_safe

EVAL_JSON = "eval.json"
DENSITY_FILE = "feature_density.safetensors"
CE_FILE = "eval_ce.safetensors"
DENSITY_PNG = "density_histogram.png"

BOOTSTRAP_SAMPLES = 1000  # resamples for loss recovered's 95% interval (seeded: the same interval every time)
BOOTSTRAP_BLOCK_TOKENS = 1024  # consecutive contexts resampled as one block: those cut from one document go together
BOOTSTRAP_CHUNK = 50  # resamples drawn at a time: 4 x 50 x blocks float64 of memory, whatever eval.tokens

DEFINITIONS = {
    "l0": "mean number of features with activation > 0 per token",
    "mse": "mean over tokens and input dims of (x - x_hat)^2",
    "fvu": "sum ||x - x_hat||^2 / sum ||x - mean_x||^2, mean_x = mean activation over the evaluated positions",
    "ce_loss_recovered_ci95": f"2.5% and 97.5% points of loss recovered over {BOOTSTRAP_SAMPLES} bootstrap "
                              f"resamples of blocks of {BOOTSTRAP_BLOCK_TOKENS} consecutive tokens' contexts: the "
                              "noise of this text's sample, approximate (documents longer than a block still tie "
                              "blocks together); null with one block, or where a resample's ablation gap is 0",
    "ce_loss_recovered": "(L_ablated - L_sae) / (L_ablated - L_clean) for ablated = zero and mean; "
                         "1 = no loss from splicing the SAE in, 0 = as bad as the ablation (the seed logged 1 - this)",
    "matryoshka": "per nested dictionary of a Matryoshka SAE (features 0..m-1): FVU of its reconstruction with the "
                  "other features zeroed, and the L0 of its features",
    "kl_clean_sae": "KL(p_clean || p_sae) in nats, averaged over next-token predictions",
    "ce_positions": "CE and KL average all T-1 next-token predictions of each context",
    "activation_positions": "L0/MSE/FVU/density use every position except position 0 when skip_first_position; "
                            "spliced runs then keep position 0 clean",
    "density": "fraction of evaluated tokens where a feature is > 0; dead: <= dead_threshold; "
               "ultralow: alive and < ultralow_threshold (null when resolution >= ultralow_threshold: no alive "
               "feature can then be below it; raise eval.tokens past 1 / ultralow_threshold); "
               "dense: > dense_threshold; resolution: 1 / evaluated tokens, the smallest density this eval can tell "
               "from 0",
}


class _ActivationTotals:
    """Running sums over evaluated tokens, in float64 so a million tokens add up without drift."""

    def __init__(self, prefixes: tuple[int, ...] = ()) -> None:
        self.n = 0
        self.fire_F: Tensor | None = None
        self.sq_err = self.sum_sq = 0.0
        self.sum_D: Tensor | None = None
        self.prefixes, self.prefix_sq_err = prefixes, [0.0] * len(prefixes)  # (Matryoshka's nested dictionaries)

    def update(self, x_ND: Tensor, feats_NF: Tensor, recon_ND: Tensor, prefix_recons: Iterable[Tensor] = ()) -> None:
        x_ND = x_ND.double()
        if self.fire_F is None or self.sum_D is None:
            self.fire_F = torch.zeros(feats_NF.shape[1], dtype=torch.float64, device=x_ND.device)
            self.sum_D = torch.zeros(x_ND.shape[1], dtype=torch.float64, device=x_ND.device)
        self.fire_F += (feats_NF > 0).sum(0)
        self.sq_err = self.sq_err + (x_ND - recon_ND.double()).pow(2).sum()
        for i, prefix_ND in enumerate(prefix_recons):
            self.prefix_sq_err[i] = self.prefix_sq_err[i] + (x_ND - prefix_ND.double()).pow(2).sum()
        self.sum_sq = self.sum_sq + x_ND.pow(2).sum()
        self.sum_D += x_ND.sum(0)
        self.n += x_ND.shape[0]

    def summary(self) -> dict[str, Any]:
        if self.fire_F is None or self.sum_D is None or self.n == 0:
            raise ValueError("no activation positions evaluated: contexts need >= 2 tokens with skip_first_position")
        total_var = float(self.sum_sq) - float(self.sum_D.pow(2).sum()) / self.n
        sq_err = float(self.sq_err)
        nested = {"matryoshka": [{"features": m, "fvu": float(e) / total_var if total_var > 0 else None,
                                  "l0": float(self.fire_F[:m].sum()) / self.n}
                                 for m, e in zip(self.prefixes, self.prefix_sq_err)]} if self.prefixes else {}
        return {"activation_tokens": self.n, "l0": float(self.fire_F.sum()) / self.n,
                "mse": sq_err / (self.n * self.sum_D.numel()),
                "fvu": sq_err / total_var if total_var > 0 else None, **nested,
                "density_F": (self.fire_F / self.n).float().cpu()}


CE_RUNS = ("clean", "sae", "zero_ablation", "mean_ablation")  # the rows of per-context CE sums (load_eval_ce)


class _LossTotals:
    RUNS = CE_RUNS

    def __init__(self) -> None:
        self.ce_C: dict[str, list[Tensor]] = {run: [] for run in self.RUNS}  # per context: its CE summed (float64)
        self.kl = 0.0
        self.n = 0
        self.context_len = 1

    def summary(self) -> dict[str, Any]:
        sums_RC = torch.stack([torch.cat(self.ce_C[run]).cpu() for run in self.RUNS])
        ce = {run: float(row.sum()) / self.n for run, row in zip(self.RUNS, sums_RC)}
        return {"ce_loss": ce,
                "ce_loss_recovered": {"zero": _recovered(ce, "zero_ablation"), "mean": _recovered(ce, "mean_ablation")},
                "ce_loss_recovered_ci95": _bootstrap_recovered(sums_RC, self.context_len),
                "kl_clean_sae": float(self.kl) / self.n, "predictions": self.n,
                "ce_per_context": {run: row.tolist() for run, row in zip(self.RUNS, sums_RC)}}


def block_bootstrap(sums_RC: Tensor, context_len: int) -> tuple[Tensor, int]:
    """([R, BOOTSTRAP_SAMPLES] totals of per-context sums_RC over resamples, the number of blocks): each resample
    draws, with replacement, as many blocks of consecutive contexts (BOOTSTRAP_BLOCK_TOKENS tokens, at least one
    context) as there are; the held-out text is cut into contexts in order, so one document's contexts mostly
    share a block. Seeded: the same resamples every time, for every caller with as many contexts."""
    per_block = max(1, BOOTSTRAP_BLOCK_TOKENS // context_len)
    block_C = torch.arange(sums_RC.shape[1]) // per_block
    n_blocks = int(block_C[-1]) + 1
    sums_RK = torch.zeros(sums_RC.shape[0], n_blocks, dtype=torch.float64).index_add_(1, block_C, sums_RC.double())
    generator = torch.Generator().manual_seed(0)
    totals = []
    for start in range(0, BOOTSTRAP_SAMPLES, BOOTSTRAP_CHUNK):
        picks_SK = torch.randint(0, n_blocks, (min(BOOTSTRAP_CHUNK, BOOTSTRAP_SAMPLES - start), n_blocks),
                                 generator=generator)
        totals.append(sums_RK[:, picks_SK].sum(-1))
    return torch.cat(totals, dim=1), n_blocks


def ci95(samples_S: Tensor) -> list[float]:
    q = torch.quantile(samples_S.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def _bootstrap_recovered(sums_RC: Tensor, context_len: int) -> dict[str, list[float] | None]:
    """95% percentile intervals of loss recovered over block_bootstrap's resamples. Loss recovered is a ratio of
    differences of CE sums over the same predictions, so blocks of unequal size need no weights. None with fewer
    than two blocks, or where some resample's ablation gap is exactly 0."""
    totals_RS, n_blocks = block_bootstrap(sums_RC, context_len)
    clean, sae = totals_RS[0], totals_RS[1]
    out: dict[str, list[float] | None] = {}
    for name, ablated in (("zero", totals_RS[2]), ("mean", totals_RS[3])):
        gap = ablated - clean
        out[name] = None if n_blocks < 2 or bool((gap == 0).any()) else ci95((ablated - sae) / gap)
    return out


def _recovered(ce: dict[str, float], ablation: str) -> float | None:
    gap = ce[ablation] - ce["clean"]
    return (ce[ablation] - ce["sae"]) / gap if gap != 0 else None


LOGIT_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
"""Logit entries made at once while evaluating, by device: LOGIT_ELEMENTS // d_vocab positions a slice (83 on the
CPU, 1335 on a GPU for GPT-2's vocabulary; 16 MB and 256 MB in fp32), so peak memory does not grow with
eval.batch_contexts * context_len. On 2 CPU cores 16 MB slices were also the fastest (benchmarks/eval_memory.py:
larger ones page-fault on every allocation, smaller ones reread W_U too often); a GPU wants fewer, larger
launches."""


def _slice_rows(model: HookedTransformer) -> int:
    elements = LOGIT_ELEMENTS.get(model_device(model).type, LOGIT_ELEMENTS["cpu"])
    return max(1, elements // model.cfg.d_vocab)


def _ce_rows(logp_NV: Tensor, targets_N: Tensor) -> Tensor:
    return -logp_NV.gather(-1, targets_N[:, None])[:, 0].double()


@torch.no_grad()
def compute_mean_activation(model: HookedTransformer, hook_name: str, tokens_NT: Tensor, batch_contexts: int,
                            skip_first_position: bool = True) -> Tensor:
    """Mean of the hook's activation [D] over all contexts' positions (position 0 left out if skipped)."""
    start, total, count = first_position(skip_first_position), None, 0
    for tokens_BT in chunks(tokens_NT, batch_contexts, model_device(model)):
        x_BTD = hook_activations(model, hook_name, tokens_BT)[:, start:].double()
        total = x_BTD.sum((0, 1)) if total is None else total + x_BTD.sum((0, 1))
        count += x_BTD.shape[0] * x_BTD.shape[1]
    if total is None or count == 0:
        raise ValueError("no positions to average: contexts need >= 2 tokens with skip_first_position")
    return (total / count).float()


@torch.no_grad()
def _eval_chunk(model: HookedTransformer, sae: SAELike, hook_name: str, tokens_BT: Tensor, mean_D: Tensor,
                skip_first_position: bool, acts: _ActivationTotals, losses: _LossTotals) -> None:
    def reconstruct(x_BTD: Tensor) -> Tensor:
        feats_BTF = sae_features(sae, x_BTD)
        recon_BTD = sae_decode(sae, feats_BTF, x_BTD)
        d, n_f = x_BTD.shape[-1], feats_BTF.shape[-1]
        if acts.prefixes and hasattr(sae, "prefix_decodes"):  # our Matryoshka SAEs: one decode, split by level
            prefixes = (r.to(x_BTD.dtype) for r in sae.prefix_decodes(feats_BTF.reshape(-1, n_f)))
        else:
            f_F = torch.arange(n_f, device=feats_BTF.device)
            prefixes = (sae_decode(sae, feats_BTF * (f_F < m), x_BTD).reshape(-1, d) for m in acts.prefixes)
        acts.update(x_BTD.reshape(-1, d), feats_BTF.reshape(-1, feats_BTF.shape[-1]), recon_BTD.reshape(-1, d),
                    prefixes)
        return recon_BTD

    replacements = {"sae": reconstruct, "zero_ablation": torch.zeros_like,
                    "mean_ablation": lambda x_BTD: mean_D.to(x_BTD).expand_as(x_BTD)}
    def predicting(resid_BTD: Tensor) -> Tensor:  # position t predicts token t + 1: the last one predicts nothing
        return resid_BTD[:, :-1].reshape(-1, resid_BTD.shape[-1])

    preds_ND = {"clean": predicting(final_residual(model, tokens_BT))}
    for run, replace in replacements.items():
        preds_ND[run] = predicting(final_residual(model, tokens_BT,
                                                  [(hook_name, splice_hook(replace, tokens_BT, skip_first_position))]))
    _add_losses(model, preds_ND, tokens_BT[:, 1:], losses)


def _add_losses(model: HookedTransformer, preds_ND: dict[str, Tensor], targets_BT: Tensor,
                losses: _LossTotals) -> None:
    """CE of every run (summed per context) and KL(clean || sae) from the runs' final residuals, [B·(T−1),
    d_model] context by context, LOGIT_ELEMENTS logits at a time."""
    rows, targets_N = _slice_rows(model), targets_BT.reshape(-1)
    ce_RN = torch.empty(len(_LossTotals.RUNS), targets_N.numel(), dtype=torch.float64, device=targets_N.device)
    for i in range(0, targets_N.numel(), rows):
        target_n = targets_N[i : i + rows]
        logp_clean = unembed_rows(model, preds_ND["clean"][i : i + rows]).float().log_softmax(-1)
        ce_RN[0, i : i + rows] = _ce_rows(logp_clean, target_n)
        for r, run in enumerate(_LossTotals.RUNS[1:], 1):
            logp = unembed_rows(model, preds_ND[run][i : i + rows]).float().log_softmax(-1)
            ce_RN[r, i : i + rows] = _ce_rows(logp, target_n)
            if run == "sae":
                losses.kl += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").double()
            del logp
    for run, ce_BT in zip(_LossTotals.RUNS, ce_RN.view(len(_LossTotals.RUNS), *targets_BT.shape)):
        losses.ce_C[run].append(ce_BT.sum(-1))
    losses.n += targets_N.numel()
    losses.context_len = targets_BT.shape[1] + 1


@sae_in_eval_mode
@torch.no_grad()
def evaluate(model: HookedTransformer, sae: SAELike, hook_name: str, token_batches: Iterable[Tensor],
             cfg: EvalConfig, train_cfg: TrainConfig, mean_activation: Tensor | None = None,
             skip_first_position: bool = True) -> dict[str, Any]:
    with fp32_matmuls():  # (eval.json the same from `run` as from `eval`)
        return _evaluate(model, sae, hook_name, token_batches, cfg, train_cfg, mean_activation, skip_first_position)


def _evaluate(model: HookedTransformer, sae: SAELike, hook_name: str, token_batches: Iterable[Tensor],
              cfg: EvalConfig, train_cfg: TrainConfig, mean_activation: Tensor | None,
              skip_first_position: bool) -> dict[str, Any]:
    """Evaluate `sae` at `hook_name` on up to `cfg.tokens` held-out tokens; returns a JSON-able dict.

    Loss recovered = (L_ablated - L_sae) / (L_ablated - L_clean) against zero- and mean-ablation of the hook
    (see the module docstring for every definition). `mean_activation` (the hook's mean activation, [D])
    is computed in a first pass over the same contexts when None. `skip_first_position` should be
    `buffer.skip_first_position`, the setting the SAE was trained with.
    """
    check_hook_names(model, hook_name)
    check_not_unembed(hook_name)
    tokens_NT = take_contexts(token_batches, cfg.tokens)
    device = model_device(model)
    d_in = hook_activations(model, hook_name, tokens_NT[:1].to(device)).shape[-1]
    check_sae(sae, d_in, hook_name)
    if mean_activation is None:
        mean_activation = compute_mean_activation(model, hook_name, tokens_NT, cfg.batch_contexts, skip_first_position)
    if mean_activation.shape != (d_in,):
        raise ValueError(f"mean_activation has shape {tuple(mean_activation.shape)}, expected [{d_in}] for {hook_name}")
    mean_D = mean_activation.to(device)
    acts, losses = _ActivationTotals(tuple(getattr(getattr(sae, "cfg", None), "matryoshka_sizes", ()))), _LossTotals()
    n_chunks = -(-tokens_NT.shape[0] // cfg.batch_contexts)
    for tokens_BT in tqdm(chunks(tokens_NT, cfg.batch_contexts, device), total=n_chunks, desc="eval", disable=None):
        _eval_chunk(model, sae, hook_name, tokens_BT, mean_D, skip_first_position, acts, losses)
    stats = acts.summary()
    density_F = stats.pop("density_F")
    return {"hook_name": hook_name, "contexts": tokens_NT.shape[0], "tokens": tokens_NT.numel(),
            "skip_first_position": skip_first_position, **stats,
            "explained_variance": 1 - stats["fvu"] if stats["fvu"] is not None else None,
            **losses.summary(), "density": {**density_counts(density_F, train_cfg, stats["activation_tokens"]),
                                          "resolution": 1 / max(stats["activation_tokens"], 1)},
            "feature_density": density_F.tolist(), "definitions": DEFINITIONS}


def log10_density(density_F: Tensor) -> Tensor:
    """log10 of densities; dead features (density 0) are -inf."""
    return torch.log10(density_F.double()).float()


def write_eval(run_dir: str | Path, result: dict[str, Any], histogram_bins: int = 60) -> Path:
    """Write eval.json (without the per-feature and per-context lists), feature_density.safetensors,
    eval_ce.safetensors (each context's CE sums, float64: `ce_<run>_C`) and density_histogram.png."""
    run_dir = Path(run_dir)
    summary = {k: v for k, v in result.items() if k not in ("feature_density", "ce_per_context")}
    density_F = torch.tensor(result["feature_density"], dtype=torch.float32)
    summary["feature_density_file"] = DENSITY_FILE
    atomic_write_bytes(run_dir / DENSITY_FILE, save_safetensors({"density_F": density_F}))
    if "ce_per_context" in result:
        summary["ce_per_context_file"] = CE_FILE
        atomic_write_bytes(run_dir / CE_FILE, save_safetensors(
            {f"ce_{run}_C": torch.tensor(v, dtype=torch.float64) for run, v in result["ce_per_context"].items()}))
    plot_density_histogram(log10_density(density_F), run_dir / DENSITY_PNG,
                           ultralow_threshold=result["density"]["thresholds"]["ultralow"], bins=histogram_bins,
                           dead_threshold=result["density"]["thresholds"]["dead"])
    atomic_write_json(run_dir / EVAL_JSON, json_safe(summary))  # NaN/inf -> null: strict JSON
    return run_dir / EVAL_JSON


def load_feature_density(run_dir: str | Path) -> Tensor:
    """The densities [d_sae] written by `write_eval`."""
    path = Path(run_dir) / DENSITY_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: run `sae-stream eval` on this run first")
    return load_safetensors(path.read_bytes())["density_F"]


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / EVAL_JSON).read_text())


def load_eval_ce(run_dir: str | Path) -> Tensor:
    """[runs (CE_RUNS), contexts] CE sums per context written by `write_eval` (float64)."""
    sums = load_safetensors((Path(run_dir) / CE_FILE).read_bytes())
    return torch.stack([sums[f"ce_{run}_C"] for run in CE_RUNS])
