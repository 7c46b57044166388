"""A static HTML dashboard of SAE features (offline, self-contained: `out_dir/index.html`), and its data as JSON
for scripts (`out_dir/features.json`: e.g. top activating contexts for automated interpretability).

    path = build_dashboard(model, sae, hook_name, token_batches, get_tokenizer("gpt2"), cfg.analysis, out_dir,
                           densities=load_feature_density(run_dir), density_tokens=eval_json["activation_tokens"],
                           ultralow_threshold=cfg.train.ultralow_threshold, dead_threshold=cfg.train.dead_threshold,
                           dense_threshold=cfg.train.dense_threshold,
                           skip_first_position=cfg.buffer.skip_first_position)

The index splits the shown features into tabs by density, as eval counts them: dense (above `dense_threshold`),
mid, ultra-low (alive and below `ultralow_threshold`) and, when any is shown, dead; each tab names its range, and
a filter box searches feature ids and top tokens. Each feature's panel has its density,
an activation histogram, direct logit effects, the ablation effect over its top contexts, a sample with the
feature pinned high (beside the page's clean sample of the same seed), and its top-k activating contexts (tokens
shaded by activation, value on hover). A feature is flagged single-token when
at least `cfg.single_token_fraction` of its top activations fall on one token id.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_stream.analysis.ablation import ablate_feature
from sae_stream.analysis.hooks import SAELike, fp32_matmuls, model_device, sae_in_eval_mode
from sae_stream.analysis.html import (
    ContextView,
    DensityBands,
    FeaturePanel,
    esc,
    matryoshka_level,
    render_page,
    svg_bars,
    visible,
)
from sae_stream.analysis.logits import logit_effects
from sae_stream.analysis.scan import FeatureScan, scan_features
from sae_stream.analysis.steering import pinned_hooks, sample
from sae_stream.checkpoint import atomic_write_json, atomic_write_text
from sae_stream.config import AnalysisConfig
from sae_stream.metrics import resolves
from sae_stream.tracking import json_safe


class TokenText:
    """Cached single-token decoding; ids the tokenizer cannot decode show as <id>."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.n_vocab: int | None = getattr(tokenizer, "n_vocab", None)  # an LM's d_vocab may pad past it
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            try:
                text = self.tokenizer.decode([token_id])
                if "\ufffd" in text:  # part of a UTF-8 character: its bytes, so different ids look different
                    text = _token_bytes(self.tokenizer, token_id) or text
                self.cache[token_id] = text
            except (ValueError, KeyError, IndexError, OverflowError):
                self.cache[token_id] = f"<{token_id}>"
        return self.cache[token_id]


def _token_bytes(tokenizer: Any, token_id: int) -> str | None:
    """A token's bytes shown as text with the non-UTF-8 ones escaped (b'\\xe2\\x80' -> '\\xe2\\x80'), or None when
    the tokenizer cannot say (tiktoken's encoding, the byte tokenizer, or an HF tokenizer's own token string)."""
    encoding = getattr(tokenizer, "encoding", None)
    if encoding is not None and hasattr(encoding, "decode_single_token_bytes"):
        raw = encoding.decode_single_token_bytes(token_id)
    elif getattr(tokenizer, "name", None) == "byte" and 0 <= token_id < 256:
        raw = bytes([token_id])
    elif hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.convert_ids_to_tokens(token_id)
    else:
        return None
    return raw.decode("utf-8", errors="backslashreplace")


def select_features(density_F: Tensor, n: int, dead_threshold: float = 0.0) -> list[int]:
    """`n` alive features (density > `dead_threshold`) evenly spaced over the ranking by density (descending), so
    every density range shows."""
    alive = (density_F > dead_threshold).nonzero()[:, 0]
    order = alive[density_F[alive].double().sort(descending=True, stable=True).indices]
    if order.numel() <= n:
        return order.tolist()
    picks = torch.linspace(0, order.numel() - 1, n).round().long().unique()
    return order[picks].tolist()


def _contexts(scan: FeatureScan, f: int, text: TokenText) -> tuple[list[ContextView], list[int]]:
    """The feature's top contexts as token windows, and the token id at each activating position."""
    n_pos = scan.tokens_NT.shape[1]
    views, centre_ids = [], []
    for slot, g in enumerate(scan.top.ids_FK[f].tolist()):
        if g < 0:
            break
        row, pos = divmod(g, n_pos)
        lo, hi = max(0, pos - scan.left), min(n_pos, pos + scan.right + 1)
        ids = scan.tokens_NT[row, lo:hi].tolist()
        window = scan.top.payload_FK[f, slot] if scan.top.payload_FK is not None else None
        acts = window[lo - pos + scan.left : hi - pos + scan.left].tolist() if window is not None else []
        views.append(ContextView([text(i) for i in ids], acts, pos - lo, float(scan.top.values_FK[f, slot])))
        centre_ids.append(int(scan.tokens_NT[row, pos]))
    return views, centre_ids


def _single_token(centre_ids: list[int], threshold: float, text: TokenText) -> tuple[str, float] | None:
    if len(centre_ids) < 2:
        return None
    token_id, count = Counter(centre_ids).most_common(1)[0]
    frac = count / len(centre_ids)
    return (text(token_id), frac) if frac >= threshold else None


def _named(pairs: list[tuple[int, float]], text: TokenText) -> list[tuple[str, float]]:
    return [(text(i), v) for i, v in pairs]


def _top_effects(effects_V: Tensor, k: int, text: TokenText) -> tuple[list[tuple[str, float]], ...]:
    """The k most promoted and most suppressed tokens (padding ids past the tokenizer's vocabulary left out)."""
    effects_V = effects_V[: text.n_vocab]
    k = min(k, effects_V.numel())
    up, down = effects_V.topk(k), (-effects_V).topk(k)
    return (_named(list(zip(up.indices.tolist(), up.values.tolist())), text),
            _named(list(zip(down.indices.tolist(), (-down.values).tolist())), text))


def _ablation(ablate: Callable[..., Any] | None, scan: FeatureScan, f: int, n_contexts: int, k: int,
              text: TokenText) -> dict[str, Any]:
    ids = scan.top.ids_FK[f].cpu()  # the scan may keep its top-k on the GPU; the tokens live on the host
    ids = ids[ids >= 0][:n_contexts]
    if ablate is None or ids.numel() == 0:
        return {}
    n_pos = scan.tokens_NT.shape[1]
    result = ablate(scan.tokens_NT[ids // n_pos], f, ids % n_pos, k)
    return {"ablation_raised": _named(result.raised, text), "ablation_lowered": _named(result.lowered, text)}


def _summary_html(scan: FeatureScan, density_F: Tensor, hook_name: str, source: str, dead_threshold: float) -> str:
    """The header line; `source` says where the densities come from (and over how many tokens)."""
    log_d = torch.log10(density_F[density_F > 0].double())
    dead = int((density_F <= dead_threshold).sum())
    counts, titles, lo, hi = [], [], "", ""
    if log_d.numel():
        lo_v, hi_v = float(log_d.min()), float(log_d.max()) + 1e-9
        counts = torch.histc(log_d, bins=40, min=lo_v, max=hi_v).long().tolist()
        step = (hi_v - lo_v) / 40
        titles = [f"log10 density [{lo_v + i * step:.2f}, {lo_v + (i + 1) * step:.2f}): {c}"
                  for i, c in enumerate(counts)]
        lo, hi = f"{lo_v:.1f}", f"{hi_v:.1f}"
    chart = svg_bars(counts, lo, hi, titles, width=300, height=40)
    return (f'<div class="summary">hook {hook_name} · d_sae {density_F.numel()} · {scan.tokens_NT.numel()} tokens '
            f'scanned · densities from {esc(source)} · dead {dead} · log10 density histogram: {chart}</div>')


def _low_note(tokens: int | None, ultralow_threshold: float) -> str:
    """What an empty ultra-low tab means: none among the shown features, or densities too coarse to tell."""
    if tokens is None or resolves(tokens, ultralow_threshold):
        return f"none below {ultralow_threshold:g} among the shown features"
    return (f"densities over {tokens:,} tokens cannot go below 1/{tokens:,} = {1 / max(tokens, 1):.1e} without "
            f"being 0: finding densities below {ultralow_threshold:g} needs more than "
            f"{math.ceil(1 / ultralow_threshold):,} tokens (eval.tokens)")


PIN_MULTIPLE = 5  # the dashboard's pinned samples hold a feature at this many times its top scanned activation
FEATURES_JSON = "features.json"
FEATURES_JSON_DEFINITIONS = {
    "hook_name / density_source": "where the SAE reads, and which tokens the densities were counted over",
    "features": "the page's features, each as its panel shows it; tokens are the tokenizer's text of each id",
    "feature / density / ultralow": "the feature's id, the fraction of tokens it fires on, and whether that is "
                                    "ultra-low (alive and below the run's train.ultralow_threshold)",
    "top_tokens": "the tokens its top activations fall on most often",
    "contexts": "top activating contexts, strongest first: tokens, the feature's activation at each (null where "
                "unknown), center (index of the activating token) and value (its activation)",
    "hist_counts / hist_width": "activation histogram over the scan: bin i counts activations in [i, i + 1) * width",
    "logits_pos / logits_neg": "the tokens whose logits the feature's decoder direction raises / lowers most "
                               "(logit_note says how they are computed), [token, effect]",
    "ablation_raised / ablation_lowered": "mean change of the next-token log-probs at the top contexts' activating "
                                          "positions when the feature is zeroed (ablation.py), [token, change]",
    "pinned": "[value, text]: a sample with the feature held at value (clean_sample: the same seed unpinned)",
    "single_token": "[token, fraction of top activations on it] when the feature is flagged single-token",
    "level": "a Matryoshka SAE's nested dictionary holding the feature",
    "band": "density band, as the page's tabs: dense, mid, low (ultra-low) or dead",
}


@sae_in_eval_mode
def pinned_samples(model: HookedTransformer, sae: SAELike, hook_name: str, scan: FeatureScan, shown: Sequence[int],
                   tokenizer: Any, n_tokens: int, skip_first_position: bool = True
                   ) -> tuple[str | None, dict[int, tuple[float, str]]]:
    """(the clean sample, {feature: (pinned value, its sample)}): `n_tokens` after an end-of-text, temperature 1,
    all in one batch reading the same noise (steering.sample), each feature at PIN_MULTIPLE times its top
    activation in the scan (features that never fired there have none). Nothing without n_tokens or a tokenizer
    with an end-of-text."""
    eot, n_tokens = getattr(tokenizer, "eot", None), min(n_tokens, model.cfg.n_ctx - 1)
    if eot is None or n_tokens < 1:
        return None, {}
    n_vocab = getattr(tokenizer, "n_vocab", None) or model.cfg.d_vocab_out
    fired = [(f, PIN_MULTIPLE * float(scan.top.values_FK[f, 0])) for f in shown if scan.top.values_FK[f, 0] > 0]
    # one batch: row 0 clean (a NaN pin changes nothing), then one row per feature; all read the same noise
    features = torch.tensor([fired[0][0] if fired else 0] + [f for f, _ in fired])
    values = torch.tensor([math.nan] + [v for _, v in fired], dtype=torch.float64)
    hooks = pinned_hooks(sae, hook_name, features, values, skip_first_position)
    start_11 = torch.tensor([[eot]], device=model_device(model))
    ids = sample(model, start_11, n_tokens, 1, 1.0, 0, n_vocab, hooks, copies=len(features))
    texts = [tokenizer.decode(row.tolist()) for row in ids]
    return texts[0], {f: (v, text) for (f, v), text in zip(fired, texts[1:])}


def _write_features_json(out_dir: Path, panels: list[FeaturePanel], bands: DensityBands, head: dict) -> None:
    """The page's data for scripts: `head` (hook, density source, ...), then each panel with its density band."""
    features = [{**dataclasses.asdict(p), "band": bands.band(p.density)} for p in panels]
    atomic_write_json(out_dir / FEATURES_JSON, json_safe({**head, "definitions": FEATURES_JSON_DEFINITIONS,
                                                          "features": features}))


@fp32_matmuls()  # (the same pages from `run` as from `analyze`)
def build_dashboard(model: HookedTransformer, sae: SAELike, hook_name: str, token_batches: Iterable[Tensor],
                    tokenizer: Any, cfg: AnalysisConfig, out_dir: str | Path, densities: Tensor | None = None, *,
                    features: Sequence[int] | None = None, ultralow_threshold: float = 1e-6,
                    dead_threshold: float = 0.0, dense_threshold: float = 0.1, density_tokens: int | None = None,
                    density_source: str = "eval.json's feature_density", skip_first_position: bool = True,
                    links: Sequence[tuple[str, str]] = ()) -> Path:
    """Scan `cfg.tokens` held-out tokens and write `out_dir/index.html`; returns its path.

    `densities` [d_sae] (from `density_source`, measured over `density_tokens`) choose and label the features;
    None uses the scan's own counts. Ultra-low: alive (density > `dead_threshold`) and below `ultralow_threshold`;
    dense: above `dense_threshold` (the run's train.*_threshold, so the tabs count as eval does).
    `features` overrides the selection. `links`: (label, href relative to out_dir) shown in the header, e.g. the
    run's plots.
    """
    scan = scan_features(model, sae, hook_name, token_batches, cfg, skip_first_position)
    density_F = (densities if densities is not None else scan.density_F).double().cpu()
    if density_F.numel() != scan.fire_count_F.numel():
        raise ValueError(f"densities has {density_F.numel()} entries but the SAE has {scan.fire_count_F.numel()}")
    shown = list(features) if features is not None else select_features(density_F, cfg.features, dead_threshold)
    effects_SV, logit_note = logit_effects(model, sae, hook_name, shown)
    text = TokenText(tokenizer)
    ablate = None
    if cfg.ablation:
        def ablate(tokens_BT: Tensor, f: int, positions: Tensor, k: int) -> Any:
            return ablate_feature(model, sae, hook_name, tokens_BT, f, positions, k, skip_first_position,
                                  n_vocab=text.n_vocab)
    clean, pinned = pinned_samples(model, sae, hook_name, scan, shown, tokenizer, cfg.steer_tokens,
                                   skip_first_position)
    bands = DensityBands(dead_threshold, ultralow_threshold, dense_threshold)
    panels = []
    for s, f in enumerate(shown):
        views, centre_ids = _contexts(scan, f, text)
        counts = scan.histogram.counts_FB[f].tolist()
        logits_pos, logits_neg = _top_effects(effects_SV[s], cfg.logit_k, text) if effects_SV is not None else ([], [])
        panels.append(FeaturePanel(
            feature=f, density=float(density_F[f]), contexts=views,
            ultralow=bands.band(float(density_F[f])) == "low",
            hist_counts=counts, hist_width=float(scan.histogram.width_F[f]),
            top_tokens=[text(i) for i, _ in Counter(centre_ids).most_common(3)],
            single_token=_single_token(centre_ids, cfg.single_token_fraction, text),
            logits_pos=logits_pos, logits_neg=logits_neg, pinned=pinned.get(f),
            level=matryoshka_level(f, getattr(getattr(sae, "cfg", None), "matryoshka_sizes", None), density_F.numel()),
            **_ablation(ablate, scan, f, cfg.ablation_contexts, cfg.logit_k, text)))
    tokens = density_tokens if densities is not None else scan.n_tokens
    source = density_source if densities is not None else "this scan"
    source += f" (over its {tokens:,} activation tokens)" if tokens is not None else ""
    summary = _summary_html(scan, density_F, hook_name, source, dead_threshold)
    if clean is not None:
        summary += ('<div class="summary">clean sample (after an end-of-text, seed 0; each feature\'s pinned sample '
                    f'draws the same): <span class="sample">{visible(clean)}</span></div>')
    if links:
        summary += '<div class="summary">' + " · ".join(f'<a href="{esc(href)}">{esc(label)}</a>'
                                                        for label, href in links) + "</div>"
    page = render_page(panels, f"SAE features · {hook_name}", summary, logit_note,
                       _low_note(tokens, ultralow_threshold), bands)
    _write_features_json(Path(out_dir), panels, bands, {"hook_name": hook_name, "density_source": source,
                                                        "logit_note": logit_note, "clean_sample": clean})
    path = Path(out_dir) / "index.html"
    atomic_write_text(path, page)
    return path
