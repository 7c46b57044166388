"""`eval` and `analyze` of a trained run directory (one SAE, or each SAE of a sweep), and what they need.

Run directory: see pipeline.py. `eval` writes eval.json (with the sha256 of the SAE it describes), the density
histogram and feature_density.safetensors; `analyze` writes dashboard/ and reuses eval.json's densities only while
they still describe the exported SAE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

from sae_stream.activations import hook_dim
from sae_stream.checkpoint import atomic_write_json, sha256_file
from sae_stream.config import Config, ConfigError, config_from_dict, load_config, parse_overrides, raw_config, to_dict
from sae_stream.data import heldout_batches
from sae_stream.evaluate import DENSITY_PNG, evaluate, load_feature_density, read_eval, write_eval
from sae_stream.export import load_saelens
from sae_stream.hook_points import check_hook_names, enable_optional_hooks, untrainable
from sae_stream.lm_bridge import lm_run_config, load_lm
from sae_stream.process import resolve_device
from sae_stream.rundir import UserError, require_run_dir
from sae_stream.tokenizer import get_tokenizer, same_tokenizer
from sae_stream.tracking import json_safe

SAE_DIR, DASHBOARD_DIR, CURVES_PNG, LM_DIR = "sae", "dashboard", "training_curves.png", "lm"
SELECTED_DASHBOARD_DIR = "dashboard-features"  # `analyze --features`: beside the run's dashboard, not over it
SWEEP_JSON, SWEEP_PNG = "sweep_summary.json", "sweep_frontier.png"


def plot_sae_curves(run_dir: Path, cfg: Config) -> Path | None:
    """training_curves.png from the run's metrics.jsonl (None if it has no records)."""
    from sae_stream.analysis.curves import SAE_PANELS, plot_training_curves
    from sae_stream.tracking import read_records

    title = f"SAE training: {cfg.sae.architecture}, d_sae {cfg.sae.d_sae}, {cfg.buffer.hook_name}"
    penalised = cfg.sae.architecture in ("anthropic", "april", "jumprelu")  # (topk's λ is logged but unused)
    panels = tuple(p for p in SAE_PANELS if penalised or "l1_coeff" not in p[1])
    return plot_training_curves(read_records(run_dir / "metrics.jsonl"), run_dir / CURVES_PNG, panels, title=title)


def sae_digest(run_dir: Path) -> str | None:
    weights = run_dir / SAE_DIR / "sae_weights.safetensors"
    return sha256_file(weights) if weights.is_file() else None


def current_eval(run_dir: Path) -> dict[str, Any] | None:
    """eval.json if it describes the exported SAE (one from before the digest was kept: assumed to), else None."""
    if not (run_dir / "eval.json").is_file():
        return None
    ev = read_eval(run_dir)
    saved = ev.get("sae_weights_sha256")
    return ev if saved is None or saved == sae_digest(run_dir) else None


def own_lm(run_dir: Path, cfg: Config, overrides: list[str] = ()) -> Config:
    """cfg with lm.path at the LM `run` trained for this run (RUN_DIR/lm, or a sweep's, one level up) when there
    is one: it travels with a copied or moved run, where the absolute lm.path still names the original place.
    An --lm.path override wins."""
    if any(o.startswith("--lm.path") for o in overrides):
        return cfg
    homes = [run_dir]
    parent = sweep_of(run_dir)
    if parent is not None:
        homes.append(parent)
    for home in homes:
        if (home / LM_DIR / "model.safetensors").is_file():
            return dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, path=str((home / LM_DIR).resolve())))
    return cfg


def _sweep_members(run_dir: Path) -> list[Path]:
    if not (run_dir / "config.yaml").is_file():
        return []
    try:
        return sweep_dirs(run_dir)
    except (ConfigError, ValueError, OSError):
        return []  # no run of ours


def sweep_of(run_dir: Path) -> Path | None:
    """The sweep run directory `run_dir` is one SAE of (its parent), or None."""
    parent = run_dir.resolve().parent
    return parent if run_dir.resolve() in [d.resolve() for d in _sweep_members(parent)] else None


TRAINED_SECTIONS = ("sae", "resample", "sweep", "lm_train")  # what made the trained SAE: no override changes it


def load_trained(run_dir: Path, overrides: list[str], model: Any = None) -> tuple[Config, Any, Any]:
    for section, fields in parse_overrides(overrides).items():
        if section in TRAINED_SECTIONS:
            name = f"{section}.{next(iter(fields))}" if isinstance(fields, dict) and fields else section
            raise UserError(f"--{name}: the SAE is read as trained from {run_dir / SAE_DIR} (its {section}.* "
                            "settings are in its config.yaml), so this override would change nothing: drop it")
    cfg = own_lm(run_dir, load_config(run_dir / "config.yaml", overrides), overrides)
    if not (run_dir / SAE_DIR / "cfg.json").is_file():
        members = [d.name for d in _sweep_members(run_dir)]
        if members:
            raise UserError(f"{run_dir} is a sweep: each SAE is in RUN_DIR/<name> ({', '.join(members)})")
        raise UserError(f"{run_dir} has no trained SAE in {SAE_DIR}/: run or resume `sae-stream train` first")
    trained_on = json.loads((run_dir / SAE_DIR / "cfg.json").read_text()).get("hook_name")
    if trained_on is not None and trained_on != cfg.buffer.hook_name:
        raise UserError(f"the SAE in {run_dir / SAE_DIR} was trained on hook {trained_on!r} ({SAE_DIR}/cfg.json), not "
                        f"buffer.hook_name={cfg.buffer.hook_name!r}: drop that override")
    device = resolve_device(cfg.train.device)
    model = model if model is not None else load_lm(cfg.lm.path, device)
    check_lm_fits(model, cfg)
    enable_optional_hooks(model, [cfg.buffer.hook_name])  # (e.g. attn.hook_result fires only when asked for)
    sae = load_saelens(run_dir / SAE_DIR, device=device)
    return cfg, model, sae


PROBE_TEXT = "The quick brown fox, 1234 \u00fcn\u00efcode\n\n  def f(x): return x  # 2.5e-3"


def check_lm_fits(model: Any, cfg: Config) -> None:
    """The text settings must suit the LM: its own tokenizer (an `lm train` dir's config.yaml says which), contexts
    no longer than its position embeddings, token ids inside its vocabulary (else a shape error or an index error
    deep in the forward, or, for a smaller tokenizer, numbers from text the LM never saw); an LM that carries its
    own tokenizer (transformer-lens's from the Hub) must encode a probe text as data.tokenizer does."""
    _check_text(cfg, lm_run_config(cfg.lm.path), model.cfg.n_ctx)
    tok = get_tokenizer(cfg.data.tokenizer)
    own = getattr(model, "tokenizer", None)  # a transformer-lens model from the Hub carries its own
    named = getattr(own, "name_or_path", "") if own is not None else ""
    fix = (f"set --data.tokenizer=hf:{named}" if named else
           "use the tokenizer the LM was trained with (its config.yaml's data.tokenizer)")
    if tok.n_vocab > model.cfg.d_vocab:
        raise UserError(f"data.tokenizer {cfg.data.tokenizer!r} gives {tok.n_vocab} token ids but the LM knows "
                        f"{model.cfg.d_vocab}: {fix}")
    if own is not None and own(PROBE_TEXT, add_special_tokens=False)["input_ids"] != tok.encode(PROBE_TEXT):
        raise UserError(f"data.tokenizer {cfg.data.tokenizer!r} encodes text differently from the LM's own "
                        f"tokenizer ({named or type(own).__name__}): {fix}")


def _check_text(cfg: Config, trained: Config | None, n_ctx: int) -> None:
    """data.tokenizer is the one the LM was trained with (`trained`: an `lm train` dir's config, if any) and
    contexts fit its n_ctx positions."""
    if trained is not None and not same_tokenizer(trained.data.tokenizer, cfg.data.tokenizer):
        raise UserError(f"data.tokenizer={cfg.data.tokenizer!r} but the LM in {cfg.lm.path} was trained with "
                        f"{trained.data.tokenizer!r} (its config.yaml): set --data.tokenizer={trained.data.tokenizer}")
    if cfg.data.context_len > n_ctx:
        raise UserError(f"data.context_len ({cfg.data.context_len}) exceeds the LM's context of {n_ctx} "
                        f"tokens: set --data.context_len={n_ctx} or less")


def check_sae_inputs(model: Any, cfg: Config) -> int:
    """What the SAE side needs of the LM, checked before any work: the text fits it, the hook exists and gives a
    vector per position, `sae.d_in` (if set, for every SAE of a sweep) is the hook's width. Returns that width."""
    check_lm_fits(model, cfg)
    hook = cfg.buffer.hook_name
    check_hook_names(model, [hook])
    why = untrainable(hook)  # (first: an unembed hook never fires in the forward hook_dim runs)
    if why is not None:
        raise UserError(why)
    d_in = hook_dim(model, hook, cfg.data.context_len)
    why = untrainable(hook, d_in)
    if why is not None:
        raise UserError(why)
    for c in [cfg, *(m for _, m in cfg.sweep_members())]:
        if c.sae.d_in is not None and c.sae.d_in != d_in:
            raise UserError(f"sae.d_in={c.sae.d_in} does not match hook {hook!r} (width {d_in}): "
                            f"set --sae.d_in={d_in} or leave it null")
    return d_in


def load_for_lm(config: str | Path | None, overrides: list[str]) -> Config:
    """load_config, with the lm section (but lm.path) of the `lm train` dir that lm.path names in place of the
    config's: a run's config.yaml then describes the LM it used, and checks such as context_len <= lm.n_ctx hold
    against that LM. An --lm.FIELD override that contradicts the LM is refused; a transformer-lens name (or no
    LM) leaves the config as it is."""
    raw = raw_config(config, overrides)
    lm_raw = raw.get("lm") if isinstance(raw.get("lm"), dict) else {}
    trained = lm_run_config(lm_raw.get("path")) if isinstance(lm_raw.get("path"), str) else None
    if trained is None:
        return config_from_dict(raw)
    theirs = to_dict(trained)["lm"]
    for name, mine in parse_overrides(overrides).get("lm", {}).items():  # (the ones given explicitly)
        if name != "path" and name in theirs and mine != theirs[name]:
            raise UserError(f"--lm.{name}={mine}: the LM in {lm_raw['path']} has {name} {theirs[name]} (its "
                            "config.yaml), and the lm section describes that LM: drop the override")
    raw["lm"] = {**lm_raw, **theirs, "path": lm_raw["path"]}  # (a misspelt key stays, to be named as unknown)
    cfg = config_from_dict(raw)
    _check_text(cfg, trained, trained.lm.n_ctx)
    return cfg


def sweep_dirs(run_dir: Path) -> list[Path]:
    """The per-SAE directories of a sweep run (empty for a single run)."""
    return [run_dir / entry["name"] for entry in load_config(run_dir / "config.yaml").sweep.saes]


def _each_member(run_dir: Path, overrides: list[str] | None, fn: Any) -> dict[str, Any]:
    """fn(member_dir, loaded) for every SAE of a sweep, loading the LM once."""
    out, model = {}, None
    for member in sweep_dirs(run_dir):
        loaded = load_trained(require_run_dir(member), overrides or [], model)
        model = loaded[1]
        out[member.name] = fn(member, loaded=loaded)
    return out


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, loaded: tuple | None = None) -> dict:
    """eval.json for a run (for each SAE of a sweep, in RUN_DIR/<name>/, then the sweep's summary: {name: result})."""
    run_dir = require_run_dir(run_dir).resolve()  # (printed paths absolute, as `run` prints them)
    if loaded is None and sweep_dirs(run_dir):
        results = _each_member(run_dir, overrides, evaluate_run)
        summarize_sweep(run_dir, results)
        return results
    cfg, model, sae = loaded or load_trained(run_dir, overrides or [])
    batches = heldout_batches(cfg.data, cfg.eval.batch_contexts, cfg.eval.tokens, what="eval.tokens")
    result = evaluate(model, sae, cfg.buffer.hook_name, batches, cfg.eval, cfg.train,
                      skip_first_position=cfg.buffer.skip_first_position)
    result["sae_weights_sha256"] = sae_digest(run_dir)  # which SAE this describes (a later train may replace it)
    path = write_eval(run_dir, result, cfg.eval.histogram_bins)
    _print_eval(result, path)
    if result["tokens"] + cfg.data.context_len <= cfg.eval.tokens:  # fewer whole contexts than asked for
        print(f"eval: the held-out split ended after {result['tokens']:,} tokens, short of eval.tokens="
              f"{cfg.eval.tokens:,} (more held-out text: data.heldout_fraction or a larger data.source)")
    parent = sweep_of(run_dir) if loaded is None else None  # (a sweep's own eval summarizes once, at its end)
    if parent is not None:  # one SAE of a sweep evaluated again: its row of the sweep's summary is now out of date
        summarize_sweep(parent)
    return result


def _print_eval(r: dict[str, Any], path: Path) -> None:
    ce, rec = r["ce_loss"], r["ce_loss_recovered"]
    print(f"eval: {r['tokens']} tokens, L0 {_fmt(r['l0'])}, FVU {_fmt(r['fvu'])}, CE clean {_fmt(ce['clean'])} / "
          f"SAE {_fmt(ce['sae'])} / zero-abl {_fmt(ce['zero_ablation'])} / mean-abl {_fmt(ce['mean_ablation'])}, "
          f"loss recovered {_fmt(rec['zero'])}{_ci(r, 'zero')} (vs zero) {_fmt(rec['mean'])}{_ci(r, 'mean')} "
          f"(vs mean), KL {_fmt(r['kl_clean_sae'])}")
    if r.get("matryoshka"):
        print("eval: nested dictionaries alone: " + ", ".join(f"features < {p['features']}: FVU {_fmt(p['fvu'])} "
                                                              f"L0 {_fmt(p['l0'])}" for p in r["matryoshka"]))
    d = r.get("density", {})
    ultralow = d.get("ultralow")
    if ultralow is None and "thresholds" in d:  # too few tokens to see a density below the threshold
        need = math.ceil(1 / d["thresholds"]["ultralow"])
        ultralow = f"n/a (below {d['thresholds']['ultralow']:g} needs > {need:,} positions: raise eval.tokens)"
    dead = d.get("dead")
    if "resolution" in d:  # a feature rarer than one in the positions evaluated reads dead here too
        dead = f"{dead} (none fired in {round(1 / d['resolution']):,} positions)"
    print(f"eval: dead {dead}, ultra-low {ultralow}, dense {d.get('dense')} of {d.get('d_sae')} "
          f"features -> {path}")


def analyze_run(run_dir: str | Path, overrides: list[str] | None = None, loaded: tuple | None = None,
                features: list[int] | None = None) -> Path:
    """dashboard/ for a run (each SAE of a sweep); `features`: a dashboard of those ids instead of
    analysis.features, in dashboard-features/ (replaced by the next such call; dashboard/ is left as it is)."""
    from sae_stream.analysis.dashboard import build_dashboard

    run_dir = require_run_dir(run_dir).resolve()
    if loaded is None and sweep_dirs(run_dir):
        if features is not None:
            raise UserError(f"--features names features of one SAE, and {run_dir} is a sweep: pass RUN_DIR/<name>")
        return next(iter(_each_member(run_dir, overrides, analyze_run).values()), run_dir)
    cfg, model, sae = loaded or load_trained(run_dir, overrides or [])
    wrong = [f for f in features or [] if not 0 <= f < sae.d_sae]
    if wrong:
        raise UserError(f"--features {wrong[0]} is not a feature of this SAE: ids run from 0 to {sae.d_sae - 1}")
    ev = current_eval(run_dir)
    if ev is None and (run_dir / "eval.json").is_file():
        warnings.warn(f"{run_dir / 'eval.json'} predates the SAE in {SAE_DIR}/ (trained further since): the "
                      "dashboard uses its own scan's densities; `sae-stream eval` refreshes eval.json", stacklevel=2)
    densities = load_feature_density(run_dir) if ev is not None else None
    density_tokens = ev.get("activation_tokens") if ev is not None else None
    batches = heldout_batches(cfg.data, cfg.eval.batch_contexts, cfg.analysis.tokens,
                              what="analysis.tokens")
    curves = plot_sae_curves(run_dir, cfg)  # (also for runs trained before the curves were drawn)
    plots = [("training curves", CURVES_PNG)] + ([("density histogram", DENSITY_PNG), ("eval.json", "eval.json")]
                                                 if ev is not None else [])  # (not an eval of an older SAE)
    links = [(label, f"../{name}") for label, name in plots if (run_dir / name).is_file()]
    path = build_dashboard(model, sae, cfg.buffer.hook_name, batches, get_tokenizer(cfg.data.tokenizer), cfg.analysis,
                           run_dir / (DASHBOARD_DIR if features is None else SELECTED_DASHBOARD_DIR), densities,
                           ultralow_threshold=cfg.train.ultralow_threshold,
                           dead_threshold=cfg.train.dead_threshold, dense_threshold=cfg.train.dense_threshold,
                           density_tokens=density_tokens, features=features,
                           skip_first_position=cfg.buffer.skip_first_position, links=links)
    print(f"dashboard: {path}" + (f"; training curves: {curves}" if curves else ""))
    return path


def summarize_sweep(run_dir: Path, results: dict[str, dict[str, Any]] | None = None) -> Path:
    """One row per SAE of a sweep (its settings and eval figures) -> sweep_summary.json, sweep_frontier.png (FVU
    and the CE loss gap against L0) and a table on stdout; returns the JSON's path. `results` {name: eval result};
    None reads each member's eval.json (those describing its current SAE)."""
    from sae_stream.analysis.plots import plot_sweep_frontier
    from sae_stream.paired import paired_loss_recovered

    rows = []
    first = None  # (the first member: each other's loss recovered is compared with it, paired)
    for name, r in (results if results is not None else _member_evals(run_dir)).items():
        cfg = load_config(run_dir / name / "config.yaml")
        rec = r["ce_loss_recovered"]
        topk = cfg.sae.architecture in ("topk", "batchtopk")  # (k, else λ: the one its sparsity follows)
        sparsity = {"k": cfg.sae.k} if topk else {"l1_coeff": cfg.sae.l1_coeff}
        if cfg.sae.matryoshka_sizes:
            sparsity["matryoshka"] = cfg.sae.matryoshka_sizes
        rows.append({"name": name, "architecture": cfg.sae.architecture, "d_sae": cfg.sae.d_sae,
                     **sparsity, "lr": cfg.train.lr, "l0": r["l0"],
                     "fvu": r["fvu"], "ce_loss_recovered_zero": rec["zero"], "ce_loss_recovered_mean": rec["mean"],
                     "ce_gap_zero": _gap(rec["zero"]), "ce_gap_mean": _gap(rec["mean"]),
                     **{f"ce_gap_{a}_ci95": _gap_ci(r, a) for a in ("zero", "mean")},
                     "kl": r["kl_clean_sae"], "dead": r["density"]["dead"], "dense": r["density"]["dense"]})
        first = first or name
        if name != first:
            paired = paired_loss_recovered(run_dir / first, run_dir / name)
            rows[-1]["vs_first"] = {"name": first, **{k: paired[k] for k in ("skipped", "b_minus_a", "b_minus_a_ci95")
                                                     if k in paired}}
    path = run_dir / SWEEP_JSON
    atomic_write_json(path, json_safe(rows))  # (NaN of a diverged SAE -> null: strict JSON, as eval.json)
    plotted = [{**r, "l0": math.nan if r["l0"] is None else r["l0"]} for r in rows]  # (eval.json's null L0)
    png = plot_sweep_frontier(plotted, run_dir / SWEEP_PNG, title=f"sweep {run_dir.name}: {len(rows)} SAEs")
    print(f"sweep: name | d_sae | l1_coeff / k | L0 | FVU | recovered vs zero / mean | dead | recovered vs zero "
          f"minus {first}'s, paired 95% interval")
    for r in rows:
        sparsity = r["k"] if r["architecture"] in ("topk", "batchtopk") else r["l1_coeff"]
        print(f"sweep: {r['name']} | {r['d_sae']} | {sparsity:g} | {_fmt(r['l0'], 2)} | {_fmt(r['fvu'])} | "
              f"{_fmt(r['ce_loss_recovered_zero'])} / {_fmt(r['ce_loss_recovered_mean'])} | {r['dead']} | "
              f"{_vs_first(r)}")
    print(f"sweep: -> {path}, {png}")
    return path


def _member_evals(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{name: eval.json} of the sweep's members whose eval.json describes their current SAE; the others are named."""
    evals = {member.name: current_eval(member) for member in sweep_dirs(run_dir)}
    for name, ev in evals.items():
        if ev is None:
            print(f"sweep: {name} left out of the summary: no eval.json of its current SAE "
                  f"(sae-stream eval {run_dir / name})")
    return {name: ev for name, ev in evals.items() if ev is not None}


def _vs_first(row: dict[str, Any]) -> str:
    """The row's paired difference of loss recovered (vs zero) from the sweep's first SAE, as printed."""
    vs = row.get("vs_first")
    if vs is None:
        return "-"
    if "skipped" in vs:
        return f"n/a ({vs['skipped']})"
    from sae_stream.paired import format_difference  # (paired imports this module)

    return format_difference(vs["b_minus_a"]["zero"], vs["b_minus_a_ci95"]["zero"])


def _gap(recovered: float | None) -> float | None:
    return None if recovered is None else 1.0 - recovered


def _recovered_ci(r: dict[str, Any], ablation: str) -> list[float] | None:
    """Loss recovered's 95% interval in an eval result, or None (an eval.json from before it, or one block)."""
    return (r.get("ce_loss_recovered_ci95") or {}).get(ablation)


def _gap_ci(r: dict[str, Any], ablation: str) -> list[float] | None:
    """1 − loss recovered's 95% interval, [low, high], or None."""
    ci = _recovered_ci(r, ablation)
    return [1 - ci[1], 1 - ci[0]] if ci else None


def _ci(r: dict[str, Any], ablation: str) -> str:
    """' [lo, hi]', loss recovered's 95% interval as printed, or nothing."""
    ci = _recovered_ci(r, ablation)
    return f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
