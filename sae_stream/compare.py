"""`sae-stream compare A B`: how the features of two SAEs correspond.

    sae-stream compare runs/sweep/d1024 runs/sweep/d4096 --out runs/d1024-vs-d4096   # feature splitting
    sae-stream compare runs/seed0 runs/seed1                                        # universality across LMs

A and B are run directories (ours, or a sweep's RUN_DIR/<name>) or SAELens directories (cfg.json and weights).
Two measures (sae_stream/analysis/matching.py):
- decoder cosine, when both SAEs read the same activations (the same LM, by the sha256 of its weights or its
  transformer-lens name, and the same hook);
- activation correlation on the held-out text of the first run directory, each side's features computed from its
  own LM (a SAELens directory borrows the other side's LM, which must be the one its cfg.json names, if it names
  one). Needs a run directory on at least one side.

--out (default runs/compare-<timestamp>) gets compare.json (the summary, with definitions), compare.safetensors
(each feature's best match and its value, densities on the text) and feature_matches.png (histograms).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from sae_stream.analysis.hooks import (
    check_sae,
    first_position,
    fp32_matmuls,
    hook_activations,
    model_device,
    sae_features,
)
from sae_stream.analysis.matching import (
    CorrelationTotals,
    Matches,
    by_density,
    check_correlation_size,
    decoder_matches,
    match_summary,
    partners_per_feature,
    top_splits,
)
from sae_stream.analysis.plots import plot_feature_matches
from sae_stream.checkpoint import atomic_write_bytes, atomic_write_json, sha256_file
from sae_stream.config import Config, load_config
from sae_stream.data import heldout_batches
from sae_stream.export import load_saelens
from sae_stream.hook_points import check_hook_names
from sae_stream.paired import format_difference, paired_loss_recovered
from sae_stream.report import SAE_DIR, check_lm_fits, load_trained, own_lm
from sae_stream.rundir import UserError, fresh_out_dir
from sae_stream.tracking import json_safe

COMPARE_JSON, COMPARE_TENSORS, COMPARE_PNG = "compare.json", "compare.safetensors", "feature_matches.png"

DEFINITIONS = {
    "decoder_cosine": "for each feature, the largest cosine similarity between its decoder direction and any "
                      "decoder direction of the other SAE (only when both read the same LM and hook)",
    "activation_correlation": "for each feature, the largest Pearson correlation of its activations with any "
                              "feature of the other SAE, over the same held-out tokens; undefined (null, index -1) "
                              "for a feature that never fired there. A feature that fired on a few tokens only can "
                              "correlate highly by chance: read the rare bands of *_by_density with that in mind",
    "a_by_density / b_by_density": "the mean best match of the features in each band of their density (fraction "
                                   "of tokens they fire on; density_source says which tokens), and the count",
    "a_in_b / b_in_a": "the best matches of A's features among B's, and of B's among A's; *_fired_10: the same "
                       "over the features that fired on at least 10 tokens of the text (activation correlation)",
    "partners": "how many features of one SAE are the best match of 0, 1, 2-3, 4+ features of the other: with "
                "B larger, an A feature with several partners split into them",
    "splits": "the A features that are the best match (>= min_value) of the most B features, with those B "
              "features, by the last measure computed (activation correlation when there is one; then only B "
              "features that fired on >= min_fires tokens count: rarer ones correlate highly by chance)",
    "loss_recovered": "from the two runs' evals when they read the same held-out contexts through the same LM: "
                      "each SAE's loss recovered, B - A, its 95% interval from resampling the same blocks of "
                      "contexts for both (paired), and the fraction of resamples where B recovers more",
}


@dataclasses.dataclass
class Side:
    path: Path
    sae: Any
    hook_name: str
    cfg: Config | None = None  # a run directory's config (None: a SAELens directory)
    model: Any = None
    lm: str | None = None  # its LM: "sha256:..." of an `lm train` directory's weights, a model name; None: unknown

    @property
    def run_dir(self) -> Path | None:
        """The run directory this SAE belongs to (itself, or the run a `sae/` export sits in), if any."""
        if self.cfg is not None:
            return self.path
        return self.path.parent if self.path.name == SAE_DIR and (self.path.parent / "config.yaml").is_file() else None

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "run_dir": str(self.run_dir) if self.run_dir else None,
                "hook_name": self.hook_name, "d_in": self.sae.d_in, "d_sae": self.sae.d_sae,
                "architecture": self.sae.cfg.architecture, "lm": self.lm}


def lm_identity(path_or_name: str | None) -> str | None:
    """Which LM: the sha256 of an `lm train` directory's weights (copies of one LM agree), else the name; None when
    unknown (no name, or a path that is gone: a moved run's export still names where its LM was)."""
    path = Path(str(path_or_name)).expanduser()
    if not path_or_name or path_or_name == "unknown" or (path.is_absolute() and not path.exists()):
        return None
    weights = path / "model.safetensors"
    return f"sha256:{sha256_file(weights)}" if weights.is_file() else str(path_or_name)


def _load_run_side(path: Path, overrides: list[str], others: list[Side]) -> Side:
    cfg = own_lm(path, load_config(path / "config.yaml", overrides), overrides)
    lm = lm_identity(str(cfg.lm.path))
    shared = next((s.model for s in others if s.lm == lm and s.model is not None), None)  # (loaded once)
    cfg, model, sae = load_trained(path, overrides, shared)
    return Side(path, sae.to(model_device(model)), cfg.buffer.hook_name, cfg, model, lm)  # (train.device may differ)


def _load_saelens_side(path: Path, overrides: list[str], others: list[Side]) -> Side:
    meta = json.loads((path / "cfg.json").read_text())
    nested = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}  # (SAELens 6 keeps them there)
    hook = meta.get("hook_name") or meta.get("hook_point") or nested.get("hook_name")
    if not hook:
        raise UserError(f"{path / 'cfg.json'} names no hook_name: it is not a SAELens SAE directory")
    device = model_device(others[0].model) if others else torch.device("cpu")
    side = Side(path, load_saelens(path, device=device), str(hook))
    run = side.run_dir
    if run is not None:  # a run's own export: its LM is the run's, wherever the run has moved
        named = str(own_lm(run, load_config(run / "config.yaml", overrides), overrides).lm.path)
    else:
        named = meta.get("model_name") or nested.get("model_name")
    side.lm = lm_identity(named)
    host = others[0] if others else None
    if host is not None and (side.lm is None or side.lm == host.lm):  # its LM is the run's: borrow that model
        side.model = host.model
        if side.lm is None:
            side.lm = host.lm
    return side


def load_side(path: str | Path, overrides: list[str], others: list[Side] = ()) -> Side:
    """One SAE to compare: a run directory (with its LM) or a SAELens directory (with the LM of `others`' first
    run, when its cfg.json names that LM or none)."""
    path = Path(path)
    others = [s for s in others if s.model is not None]
    if (path / "config.yaml").is_file():
        return _load_run_side(path, overrides, others)
    if (path / "cfg.json").is_file():
        return _load_saelens_side(path, overrides, others)
    raise UserError(f"{str(path)!r} is neither a run directory (config.yaml) nor a SAELens SAE directory "
                    "(cfg.json): pass a run's --out, a sweep's RUN_DIR/<name>, or an exported sae/ directory")


def load_sides(a: str | Path, b: str | Path, overrides: list[str]) -> tuple[Side, Side]:
    """Both sides, run directories first (a SAELens directory may borrow their LM)."""
    paths = {"a": Path(a), "b": Path(b)}
    order = sorted(paths, key=lambda k: not (paths[k] / "config.yaml").is_file())
    loaded: dict[str, Side] = {}
    for key in order:
        loaded[key] = load_side(paths[key], overrides, list(loaded.values()))
    return loaded["a"], loaded["b"]


def same_activations(a: Side, b: Side) -> str | None:
    """None when A and B read the same activations (so decoder directions compare); else why not."""
    if a.hook_name != b.hook_name:
        return f"different hooks ({a.hook_name} and {b.hook_name})"
    if a.sae.d_in != b.sae.d_in:
        return f"different widths (d_in {a.sae.d_in} and {b.sae.d_in})"
    if a.lm is not None and b.lm is not None and a.lm != b.lm:
        hashed = a.lm.startswith("sha256:") and b.lm.startswith("sha256:")
        return "different LMs " + ("(their weights differ)" if hashed else f"({a.lm} and {b.lm})")
    return None


def _text_side(a: Side, b: Side) -> Side | None:
    return next((s for s in (a, b) if s.cfg is not None), None)


def _no_correlation(a: Side, b: Side) -> str | None:
    """Why activation correlations cannot be computed for A and B (None: they can)."""
    if _text_side(a, b) is None:
        return "need an LM and text: pass a run directory as A or B"
    lost = next((s for s in (a, b) if s.model is None), None)
    if lost is not None:
        return (f"need the LM {lost.path} was trained on ({lost.lm}, its cfg.json), which is not the run's: "
                "pass its run directory instead")
    return None


@fp32_matmuls()  # (TF32, left on by training in this process, would move a correlation of 1 by ~2e-4)
def correlate(a: Side, b: Side, tokens: int | None = None) -> CorrelationTotals:
    """Accumulate the two SAEs' activation moments over the held-out text of the first run directory."""
    why = _no_correlation(a, b)
    if why is not None:
        raise UserError(f"activation correlations {why}")
    text = _text_side(a, b)
    for s in (a, b):
        check_hook_names(s.model, s.hook_name)
        if s.cfg is not None and s is not text:
            check_lm_fits(s.model, dataclasses.replace(s.cfg, data=text.cfg.data))
    n_tokens, what = (tokens, "--tokens") if tokens else (text.cfg.eval.tokens, f"eval.tokens of {text.path}")
    skip = any(s.cfg.buffer.skip_first_position for s in (a, b) if s.cfg is not None)
    start, device = first_position(skip), model_device(a.model)
    totals = CorrelationTotals(a.sae.d_sae, b.sae.d_sae, device)
    batches = heldout_batches(text.cfg.data, text.cfg.eval.batch_contexts, n_tokens, what=what)
    shared = a.model is b.model and a.hook_name == b.hook_name
    with torch.no_grad():
        for tokens_BT in tqdm(batches, desc="compare", disable=None):
            tokens_BT = tokens_BT.to(device)
            x_a = hook_activations(a.model, a.hook_name, tokens_BT)[:, start:]
            x_b = x_a if shared else hook_activations(b.model, b.hook_name,
                                                      tokens_BT.to(model_device(b.model)))[:, start:]
            check_sae(a.sae, x_a.shape[-1], a.hook_name)
            check_sae(b.sae, x_b.shape[-1], b.hook_name)
            totals.update(sae_features(a.sae, x_a).flatten(0, 1),
                          sae_features(b.sae, x_b).flatten(0, 1).to(device))
    return totals


def _training_density(side: Side) -> torch.Tensor | None:
    """The feature densities an export recorded in training (sparsity.safetensors: log10), or None."""
    path = (side.path / SAE_DIR if side.cfg is not None else side.path) / "sparsity.safetensors"
    if not path.is_file():
        return None
    log10_F = load_safetensors(path.read_bytes()).get("sparsity")
    if log10_F is None or log10_F.shape != (side.sae.d_sae,):
        return None
    return torch.pow(10.0, log10_F.double()).float()  # (-inf: never fired, density 0)


MEASURES = {"decoder_cosine": "decoder cosine", "activation_correlation": "activation correlation"}
SPLIT_MIN = 0.5  # (a partner for `splits`: well above chance, ~0.2 for decoders of 512 dims against thousands)
SPLIT_MIN_FIRES = 10  # (and, with correlations, a B feature that fired on at least this many tokens of the text)


def _measure(a_in_b: Matches, b_in_a: Matches, d_a: int, d_b: int) -> dict[str, Any]:
    return {"a_in_b": match_summary(a_in_b), "b_in_a": match_summary(b_in_a),
            "a_partners": partners_per_feature(b_in_a, d_a), "b_partners": partners_per_feature(a_in_b, d_b)}


def compare_saes(a: Side, b: Side, correlation: bool = True, tokens: int | None = None
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the summary, per-feature tensors) of comparing A with B: decoder cosines when they read the same
    activations, activation correlations when `correlation` and both have an LM; each measure's mean per density
    band, by the densities on the text (or, without correlations, the exports' training densities)."""
    result: dict[str, Any] = {"a": a.describe(), "b": b.describe()}
    matches: dict[str, tuple[Matches, Matches]] = {}
    why = same_activations(a, b)
    result["same_activations"] = why is None
    if why is None:
        matches["decoder_cosine"] = decoder_matches(a.sae.W_dec_FD.detach(), b.sae.W_dec_FD.detach())
    else:
        result["decoder_cosine"] = {"skipped": f"{why}: decoder directions live in different spaces"}
    skipped = "--no-correlation" if not correlation else _no_correlation(a, b)
    tensors: dict[str, torch.Tensor] = {}
    fires_a = fires_b = None  # (how often the features fired on the text: rare ones correlate by chance)
    if skipped is None:
        totals = correlate(a, b, tokens)
        matches["activation_correlation"] = totals.matches()
        density_a, density_b = totals.densities()
        tensors.update({"density.a": density_a.float(), "density.b": density_b.float()})
        fires_a, fires_b = totals.fires_a, totals.fires_b  # (counts, exact in float64)
        result["density_source"] = f"the held-out text ({totals.n:,} tokens)"
        result["activation_correlation"] = {"tokens": totals.n, "never_fired": {"a": int((density_a == 0).sum()),
                                                                                "b": int((density_b == 0).sum())}}
    else:
        result["activation_correlation"] = {"skipped": skipped}
        trained = _training_density(a), _training_density(b)
        if trained[0] is not None and trained[1] is not None:
            tensors.update({"density.a": trained[0], "density.b": trained[1]})
            result["density_source"] = "training (each export's sparsity.safetensors)"
    for key, (a_in_b, b_in_a) in matches.items():
        result[key] = {**result.get(key, {}), **_measure(a_in_b, b_in_a, a.sae.d_sae, b.sae.d_sae)}
        if "density.a" in tensors:
            result[key]["a_by_density"] = by_density(a_in_b, tensors["density.a"])
            result[key]["b_by_density"] = by_density(b_in_a, tensors["density.b"])
        tensors.update({f"{key}.a_value": a_in_b.value_F, f"{key}.a_index": a_in_b.index_F,
                        f"{key}.b_value": b_in_a.value_F, f"{key}.b_index": b_in_a.index_F})
        eligible = fires_b >= SPLIT_MIN_FIRES if fires_b is not None else None
        if key == "activation_correlation" and fires_a is not None:
            for side, m, fires in (("a_in_b", a_in_b, fires_a), ("b_in_a", b_in_a, fires_b)):
                often = fires.to(m.value_F.device) >= SPLIT_MIN_FIRES
                result[key][f"{side}_fired_{SPLIT_MIN_FIRES}"] = match_summary(
                    m._replace(value_F=m.value_F.masked_fill(~often, float("nan"))))
        result["splits"] = {"measure": key, "min_value": SPLIT_MIN, "min_fires": SPLIT_MIN_FIRES if eligible is not
                            None else None, "features": top_splits(b_in_a, 10, SPLIT_MIN, eligible)}
    result["loss_recovered"] = paired_loss_recovered(a.run_dir, b.run_dir)  # (from the two evals: no model run)
    result["definitions"] = DEFINITIONS
    return result, {k: v.contiguous().cpu() for k, v in tensors.items()}


def compare_runs(a: str | Path, b: str | Path, overrides: list[str] | None = None, out: str | Path | None = None,
                 overwrite: bool = False, correlation: bool = True, tokens: int | None = None) -> Path:
    """`sae-stream compare`: compare A with B and write --out; returns compare.json's path."""
    if tokens is not None and tokens <= 0:
        raise UserError(f"--tokens must be positive, got {tokens}")
    with fresh_out_dir(out, "compare", overwrite, marker=COMPARE_JSON) as staged:  # (--out checked first)
        sides = load_sides(a, b, overrides or [])
        _check_comparable(*sides, correlation)
        result, tensors = compare_saes(*sides, correlation=correlation, tokens=tokens)
        atomic_write_bytes(staged.path / COMPARE_TENSORS, save_safetensors(tensors))
        title = f"A: {sides[0].path.name} ({sides[0].sae.d_sae})  vs  B: {sides[1].path.name} ({sides[1].sae.d_sae})"
        panels = [(label, tensors[f"{key}.a_value"], tensors[f"{key}.b_value"])
                  for key, label in MEASURES.items() if f"{key}.a_value" in tensors]
        plot_feature_matches(panels, staged.path / COMPARE_PNG, title=title, density_a=tensors.get("density.a"))
        result["files"] = {"tensors": COMPARE_TENSORS, "plot": COMPARE_PNG}
        atomic_write_json(staged.path / COMPARE_JSON, json_safe(result))
    _print_summary(result, staged.path)
    return staged.path / COMPARE_JSON


def _check_comparable(a: Side, b: Side, correlation: bool) -> None:
    """Refuse, before any work, a pair with nothing to compare or correlations too large to hold."""
    why, no_correlation = same_activations(a, b), _no_correlation(a, b) if correlation else "were switched off"
    if why is not None and no_correlation is not None:
        hint = ": drop --no-correlation" if not correlation else ""
        raise UserError(f"nothing to compare: {why}, so decoder cosines do not apply, and activation correlations "
                        f"{no_correlation}{hint}")
    if no_correlation is None:
        check_correlation_size(a.sae.d_sae, b.sae.d_sae)
    same_weights = a.sae.W_dec_FD.shape == b.sae.W_dec_FD.shape and all(
        torch.equal(getattr(a.sae, w).cpu(), getattr(b.sae, w).cpu()) for w in ("W_enc_DF", "b_enc_F", "W_dec_FD"))
    if why is None and same_weights:
        warnings.warn(f"{a.path} and {b.path} hold the same SAE: every match will be exact", stacklevel=3)


def _print_summary(result: dict[str, Any], out: Path) -> None:
    for key in MEASURES:
        r = result[key]
        if "skipped" in r:
            print(f"compare: {key.replace('_', ' ')} skipped: {r['skipped']}")
            continue
        parts = [f"{side} mean {_fmt(r[side]['mean'])}, >0.7 {_fmt(r[side]['fraction_above']['0.7'])}"
                 f"{_fired_mean(r, side)}" for side in ("a_in_b", "b_in_a")]
        print(f"compare: {key.replace('_', ' ')}: {'; '.join(parts)}; A partners {r['a_partners']}")
    paired = result.get("loss_recovered", {})
    if "skipped" in paired:
        print(f"compare: loss recovered, paired: skipped: {paired['skipped']}")
    elif paired:
        print("compare: loss recovered on the same " + f"{paired['tokens']:,} held-out tokens: " + "; ".join(
            f"A {_fmt(paired['a'][k], 4)}, B {_fmt(paired['b'][k], 4)}, B - A "
            f"{format_difference(paired['b_minus_a'][k], paired['b_minus_a_ci95'][k])} (vs {k})"
            for k in ("zero", "mean")))
    splits = result.get("splits", {}).get("features", [])[:3]
    if splits:
        shown = "; ".join(f"{s['a']} -> {', '.join(map(str, s['b'][:6]))}{' ...' if len(s['b']) > 6 else ''}"
                          for s in splits)
        print(f"compare: A features with the most B partners: {shown}")
        ids = {"a": [s["a"] for s in splits], "b": [b for s in splits for b in s["b"][:6]]}
        for side in ("a", "b"):  # (analyze reads run directories: a bare SAELens export has no LM or text)
            if result[side]["run_dir"]:
                print(f"compare: to look at them (in dashboard-features/): sae-stream analyze "
                      f"{result[side]['run_dir']} --features {','.join(map(str, ids[side]))}")
    print(f"compare: -> {out / COMPARE_JSON}, {out / COMPARE_PNG}")


def _fired_mean(r: dict[str, Any], side: str) -> str:
    """' (fired >= 10: mean)' where the measure has the summary over the often-fired features, else nothing."""
    fired = r.get(f"{side}_fired_{SPLIT_MIN_FIRES}")
    return f" (fired >= {SPLIT_MIN_FIRES}: {_fmt(fired['mean'])})" if fired else ""


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
