"""analysis/: streaming top-k and histograms against full computations, ablation, logit effects, the dashboard."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_stream.analysis.ablation import ablate_feature
from sae_stream.analysis.dashboard import build_dashboard, select_features
from sae_stream.analysis.histogram import StreamingHistogram
from sae_stream.analysis.hooks import spliced_logits
from sae_stream.analysis.html import FeaturePanel, matryoshka_level, panel_html, visible
from sae_stream.analysis.logits import decoder_directions, logit_effects
from sae_stream.analysis.scan import scan_features, window_activations
from sae_stream.analysis.topk import StreamingTopK
from sae_stream.config import AnalysisConfig

sys.path.insert(0, str(Path(__file__).parent))
from browser_check import CHROMIUM, build_demo, check_page  # noqa: E402
from test_evaluate import LinearReLUSAE  # noqa: E402

MLP = "blocks.0.mlp.hook_post"
VOCAB, T, D_MLP = 40, 16, 32


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=T, d_head=4, n_heads=4, d_mlp=D_MLP, d_vocab=VOCAB,
                                  act_fn="relu", seed=0, device="cpu")
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (4, T), generator=g) for _ in range(3)]


def _reference_topk(values_NF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full stable sort of every feature's firing values: value descending, earlier token first on ties."""
    n, f = values_NF.shape
    vals, ids = torch.full((f, k), -torch.inf), torch.full((f, k), -1, dtype=torch.long)
    for j in range(f):
        firing = sorted((-float(values_NF[i, j]), i) for i in range(n) if values_NF[i, j] > 0)[:k]
        for slot, (neg, i) in enumerate(firing):
            vals[j, slot], ids[j, slot] = -neg, i
    return vals, ids


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_streaming_topk__equals_full_sort_with_ties(chunk):
    g = torch.Generator().manual_seed(chunk)
    values_NF = torch.randint(-2, 4, (60, 9), generator=g).float()  # many ties and non-firing entries
    values_NF[:, 0] = 0.0  # never fires
    values_NF[:50, 1] = 0.0  # fires on fewer tokens than k
    k = 12
    topk = StreamingTopK(9, k, payload_shape=(2,))
    for start in range(0, 60, chunk):
        ids_N = torch.arange(start, min(start + chunk, 60))
        payload = lambda rows_FK, ids_N=ids_N: torch.stack([ids_N[rows_FK], -ids_N[rows_FK]], -1).float()  # noqa: E731
        topk.update(values_NF[ids_N], ids_N, payload)
    got = topk.result()
    ref_vals, ref_ids = _reference_topk(values_NF, k)
    assert torch.equal(got.values_FK, ref_vals) and torch.equal(got.ids_FK, ref_ids)
    filled = got.ids_FK >= 0
    assert torch.equal(got.payload_FK[..., 0][filled], got.ids_FK[filled].float())
    assert torch.isnan(got.payload_FK[~filled]).all()


def test_streaming_topk__rejects_ids_out_of_order():
    topk = StreamingTopK(2, 3)
    topk.update(torch.ones(2, 2), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="increase"):
        topk.update(torch.ones(2, 2), torch.tensor([5, 6]))


def test_streaming_histogram__equals_histogram_with_final_edges():
    g = torch.Generator().manual_seed(0)
    bins, chunks = 16, []
    for scale in (1.0, 0.5, 2.5, 40.0, 3.0, 90.0, 900.0):  # the range grows by one, two and many doublings
        chunk = torch.rand(25, 5, generator=g) * scale - 0.3 * scale
        chunk[:, 0] = 0.0  # never fires
        chunks.append(chunk)
    chunks[0][:, 1] = 0.0  # fires only from the second chunk on
    hist = StreamingHistogram(5, bins)
    for chunk in chunks:
        hist.update(chunk)
    counts_FB, width_F = hist.result()
    all_NF = torch.cat(chunks).double()
    assert width_F[0] == 0 and counts_FB[0].sum() == 0
    for f in range(1, 5):
        firing = all_NF[:, f][all_NF[:, f] > 0].numpy()
        ref, _ = np.histogram(firing, bins=bins, range=(0.0, float(width_F[f]) * bins))
        assert counts_FB[f].tolist() == ref.tolist()
        assert firing.max() <= float(width_F[f]) * bins < 2 * firing.max() + 1e-12


@pytest.mark.parametrize("maxima", [(8.0, 16.0), (8.0, 8.0, 33.0), (8.0, 1000.0), (3.0, 6.0, 12.0, 13.0)])
def test_streaming_histogram__a_value_on_the_top_edge_lands_in_its_bin_once_the_range_grows(maxima):
    # the first chunk's max sits on the top edge (clamped into the last bin); after a doubling that edge is an
    # inner one and the value belongs to the bin it starts
    bins = 8
    hist = StreamingHistogram(1, bins)
    for m in maxima:
        hist.update(torch.tensor([[m], [m / 3]]))
    counts_FB, width_F = hist.result()
    values = np.array([v for m in maxima for v in (m, m / 3)])
    ref, _ = np.histogram(values, bins=bins, range=(0.0, float(width_F[0]) * bins))
    assert counts_FB[0].tolist() == ref.tolist()


def test_window_activations__gathers_the_window_around_each_token():
    feats_BTF = torch.randn(3, 5, 2)
    rows_FK = torch.tensor([[0, 7, 14], [9, 10, 4]])  # rows b * 5 + t
    got = window_activations(feats_BTF, rows_FK, left=2, right=1)
    for f in range(2):
        for k in range(3):
            b, t = divmod(int(rows_FK[f, k]), 5)
            for j, o in enumerate(range(-2, 2)):
                expected = feats_BTF[b, t + o, f] if 0 <= t + o < 5 else torch.tensor(float("nan"))
                assert torch.equal(got[f, k, j], expected) or (expected.isnan() and got[f, k, j].isnan())


def test_scan_features__matches_brute_force(model, batches):
    sae = LinearReLUSAE(D_MLP, 24, bias=-0.1)
    cfg = AnalysisConfig(top_k=5, window=3, tokens=10_000, batch_contexts=5, histogram_bins=8)
    scan = scan_features(model, sae, MLP, batches, cfg)
    tokens_NT = torch.cat(batches)
    _, cache = model.run_with_cache(tokens_NT, names_filter=MLP)
    with torch.no_grad():
        feats_NTF = sae.encode(cache[MLP])
    counted = feats_NTF.clone()
    counted[:, 0] = 0
    ref_vals, ref_ids = _reference_topk(counted.reshape(-1, 24), 5)
    assert torch.equal(scan.top.ids_FK, ref_ids) and torch.allclose(scan.top.values_FK, ref_vals)
    assert torch.equal(scan.fire_count_F, (counted > 0).sum((0, 1)))
    assert scan.n_tokens == tokens_NT.shape[0] * (T - 1)
    assert torch.equal(scan.histogram.counts_FB.sum(1), scan.fire_count_F)


def test_ablate_feature__zero_decoder_row_changes_nothing(model, batches):
    sae = LinearReLUSAE(D_MLP, 24, bias=0.2)
    with torch.no_grad():
        sae.W_dec_FD[3] = 0
        _, cache = model.run_with_cache(batches[0], names_filter=MLP)
        acts_BT = sae.encode(cache[MLP])[..., 3]
    positions = acts_BT[:, 1:].argmax(1) + 1  # where the feature fires most (position 0 is skipped)
    r = ablate_feature(model, sae, MLP, batches[0], 3, positions)
    assert torch.equal(r.delta_logprob_V, torch.zeros(VOCAB))
    assert torch.allclose(r.activation_B, acts_BT[torch.arange(4), positions])
    assert (r.activation_B > 0).all()  # the feature does fire there: it is the zero decoder row that makes it inert


def test_ablate_feature__equals_full_forward_difference(model, batches):
    sae = LinearReLUSAE(D_MLP, 24, bias=0.2)
    tokens, positions = batches[1], torch.tensor([4, 11, 1, 15])
    r = ablate_feature(model, sae, MLP, tokens, 7, positions, k=4)

    def recon(x, ablate):
        feats = sae.encode(x)
        if ablate:
            feats = feats.clone()
            feats[..., 7] = 0
        return sae.decode(feats)

    with torch.no_grad():
        rows = torch.arange(4)
        base = spliced_logits(model, MLP, tokens, lambda x: recon(x, False), True)[rows, positions].log_softmax(-1)
        abl = spliced_logits(model, MLP, tokens, lambda x: recon(x, True), True)[rows, positions].log_softmax(-1)
    expected_V = (abl - base).mean(0)
    assert torch.allclose(r.delta_logprob_V, expected_V, atol=1e-5)
    assert expected_V.abs().max() > 1e-3
    assert r.raised[0][0] == int(expected_V.argmax()) and r.lowered[0][0] == int(expected_V.argmin())
    with pytest.raises(ValueError):
        ablate_feature(model, sae, MLP, tokens, 99, positions)


def test_logit_effects__match_manual_products(model):
    sae = LinearReLUSAE(D_MLP, 24)
    feats = [0, 5, 23]
    assert torch.allclose(decoder_directions(sae, feats), sae.W_dec_FD[feats].detach())
    effects, note = logit_effects(model, sae, MLP, feats)
    with torch.no_grad():
        resid = sae.W_dec_FD[feats] @ model.W_out[0]
        resid = (resid - resid.mean(-1, keepdim=True)) * model.ln_final.w
        assert torch.allclose(effects, resid @ model.W_U, atol=1e-5)
    assert "W_out[0]" in note and "1/sigma" in note
    resid_sae = LinearReLUSAE(16, 8)
    effects, note = logit_effects(model, resid_sae, "blocks.0.hook_resid_post", [1])
    with torch.no_grad():
        d = resid_sae.W_dec_FD[[1]]
        assert torch.allclose(effects, ((d - d.mean(-1, keepdim=True)) * model.ln_final.w) @ model.W_U, atol=1e-5)
    assert logit_effects(model, resid_sae, "blocks.0.attn.hook_q", [1])[0] is None


def test_select_features__alive_and_evenly_spread():
    density_F = torch.tensor([0.0, 0.5, 1e-7, 0.01, 0.0, 0.2, 1e-4, 3e-3])
    assert select_features(density_F, 100) == [1, 5, 3, 7, 6, 2]
    picks = select_features(density_F, 3)
    assert picks == [1, 3, 2]  # densest, middle (rank 2.5 rounds to 2), rarest alive
    assert select_features(density_F, 100, dead_threshold=1e-6) == [1, 5, 3, 7, 6]  # 1e-7 counts as dead


def test_visible__escapes_and_marks_whitespace():
    assert visible('<a\'x="y">&') == "&lt;a&#x27;x=&quot;y&quot;&gt;&amp;"
    assert visible(" \n\t\x01") == ('<span class="ws">·</span><span class="ws">↵</span><span class="ws">⇥</span>'
                                    '<span class="ws">\\x01</span>')


class AngleTokenizer:
    """Stand-in tokenizer: every token shows as <id>, which must come out escaped; id 0 is whitespace."""

    def decode(self, ids: list[int]) -> str:
        return " \n" if ids[0] == 0 else f"<{ids[0]}>"


def test_build_dashboard__one_escaped_panel_per_feature(model, batches, tmp_path):
    sae = LinearReLUSAE(D_MLP, 24, bias=-0.1)
    cfg = AnalysisConfig(features=6, top_k=4, window=3, tokens=10_000, batch_contexts=6, logit_k=3)
    batches = [b.clone() for b in batches]
    batches[0][0, 3] = 0
    path = build_dashboard(model, sae, MLP, batches, AngleTokenizer(), cfg, tmp_path)
    page = path.read_text()
    shown = re.findall(r'<section class="feature" id="f(\d+)"', page)
    assert len(shown) == 6 == len(set(shown))
    assert len(re.findall(r'<tr class="frow"', page)) == 6
    assert "&lt;" in page and re.search(r">&lt;\d+&gt;<", page)
    assert not re.search(r"<\d+>", page)  # no raw token text leaked into the markup
    assert re.search(r'<span class="t a\d+ hot" title="&#x27;&lt;\d+&gt;&#x27;: \d', page)  # hover shows the value
    assert '<span class="ws">·</span><span class="ws">↵</span>' in page  # token 0 is " \n", drawn visibly
    assert "Ablation" in page and "W_out[0]" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_build_dashboard__features_json_holds_each_panels_data(model, batches, tmp_path):
    import json

    sae = LinearReLUSAE(D_MLP, 24, bias=-0.1)
    cfg = AnalysisConfig(features=6, top_k=4, window=3, tokens=10_000, batch_contexts=6, logit_k=3)
    page = build_dashboard(model, sae, MLP, batches, AngleTokenizer(), cfg, tmp_path).read_text()
    data = json.loads((tmp_path / "features.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    shown = [int(f) for f in re.findall(r'<section class="feature" id="f(\d+)"', page)]
    assert [f["feature"] for f in data["features"]] == shown and data["hook_name"] == MLP
    _, cache = model.run_with_cache(torch.cat(batches), names_filter=MLP)
    with torch.no_grad():
        acts_NTF = sae.encode(cache[MLP])[:, 1:]  # (position 0 is not read: skip_first_position)
    for f in data["features"]:
        values = [c["value"] for c in f["contexts"]]
        assert values == sorted(values, reverse=True) and 1 <= len(values) <= 4
        assert values[0] == pytest.approx(float(acts_NTF[..., f["feature"]].max()), rel=1e-5)  # the scan's top
        for c in f["contexts"]:
            assert len(c["tokens"]) == len(c["acts"]) and c["acts"][c["center"]] == pytest.approx(c["value"])
            assert all(re.fullmatch(r"<\d+>|[ \n]+", t) for t in c["tokens"])  # raw token text, not HTML
        assert len(f["logits_pos"]) == len(f["logits_neg"]) == 3 and f["band"] in ("dense", "mid", "low", "dead")
        assert sum(f["hist_counts"]) > 0


class EotTokenizer(AngleTokenizer):
    """AngleTokenizer with an end-of-text id, so the dashboard can sample; decodes a sequence id by id."""

    eot, n_vocab = 39, 39

    def decode(self, ids: list[int]) -> str:
        return "".join(super(EotTokenizer, self).decode([i]) for i in ids)


def test_build_dashboard__pinned_samples_hold_each_feature_at_five_times_its_top_activation(model, batches, tmp_path):
    """Each panel's pinned sample is `sample` after an end-of-text with the feature pinned at 5x its largest
    scanned activation (found here by brute force), one seed for all and the clean sample in the header; none
    for a feature that never fired, and none at all with steer_tokens=0."""
    from sae_stream.analysis.hooks import hook_activations
    from sae_stream.analysis.steering import pinned_hooks, sample

    sae = LinearReLUSAE(D_MLP, 24, bias=-0.1)
    with torch.no_grad():
        sae.b_enc_F[5] = -1e3  # never fires
    cfg = AnalysisConfig(features=6, top_k=4, window=3, tokens=10_000, batch_contexts=6, logit_k=3, steer_tokens=7)
    tok = EotTokenizer()
    page = build_dashboard(model, sae, MLP, batches, tok, cfg, tmp_path, features=[1, 2, 5]).read_text()
    tops = sae.encode(hook_activations(model, MLP, torch.cat(batches))[:, 1:].reshape(-1, D_MLP)).amax(0).detach()
    start = torch.tensor([[tok.eot]])
    clean = tok.decode(sample(model, start, 7, 1, 1.0, 0, tok.n_vocab)[0].tolist())
    assert f'<span class="sample">{visible(clean)}</span>' in page
    texts = []
    for f in (1, 2):
        value = 5 * float(tops[f])
        texts.append(tok.decode(sample(model, start, 7, 1, 1.0, 0, tok.n_vocab,
                                       pinned_hooks(sae, MLP, f, value))[0].tolist()))
        section = page.split(f'id="f{f}"')[1].split("</section>")[0]
        assert f"feature held at {value:.4g}" in section
        assert f'<div class="sample">{visible(texts[-1])}</div>' in section
    assert any(text != clean for text in texts)  # (a pin that moved nothing would pass the lines above)
    assert "Pinned sample" not in page.split('id="f5"')[1].split("</section>")[0]
    assert page.count("Pinned sample") == 2
    cfg.steer_tokens = 0
    assert "Pinned sample" not in build_dashboard(model, sae, MLP, batches, tok, cfg, tmp_path).read_text()


class PaddedVocabTokenizer(AngleTokenizer):
    """A tokenizer of 30 ids for the 40-logit model: ids 30..39 are padding (as GPT-2's 50257 in a 50304 LM)."""

    n_vocab = 30


def test_build_dashboard__padding_logits_hidden_and_ultralow_means_alive_and_below(model, batches, tmp_path):
    sae = LinearReLUSAE(D_MLP, 24, bias=-0.1)
    cfg = AnalysisConfig(features=6, top_k=4, window=3, tokens=10_000, batch_contexts=6, logit_k=8)
    density_F = torch.full((24,), 0.01)
    density_F[0], density_F[1] = 0.0, 1e-3  # dead; ultra-low at a threshold of 2e-3

    def shown_ids(page: str) -> set[int]:  # ids in the promoted / suppressed lists (contexts hold ids < 40 too)
        lists = re.findall(r"<h4>(?:promoted|suppressed|raised|lowered)</h4><ol>.*?</ol>", page, flags=re.S)
        return {int(i) for part in lists for i in re.findall(r"&lt;(\d+)&gt;", part)}

    # 16 of 40 ids per feature: without the tokenizer's size the 10 padding ids show up
    unfiltered = build_dashboard(model, sae, MLP, batches, AngleTokenizer(), cfg, tmp_path, density_F,
                                 features=[0, 1, 2], ultralow_threshold=2e-3, density_tokens=10_000).read_text()
    assert max(shown_ids(unfiltered)) >= 30
    page = build_dashboard(model, sae, MLP, batches, PaddedVocabTokenizer(), cfg, tmp_path, density_F,
                           features=[0, 1, 2], ultralow_threshold=2e-3, density_tokens=10_000).read_text()
    assert shown_ids(page) and max(shown_ids(page)) < 30
    low_tab = page[page.index('id="tab-low"'): page.index("</table>", page.index('id="tab-low"'))]
    assert re.findall(r'href="#f(\d+)"', low_tab) == ["1"]  # not the dead feature 0
    # densities over 10,000 tokens cannot go below 1e-4 unless 0: with a threshold of 1e-5 the tab says so
    page = build_dashboard(model, sae, MLP, batches, AngleTokenizer(), cfg, tmp_path, density_F, features=[0, 1, 2],
                           ultralow_threshold=1e-5, density_tokens=10_000).read_text()
    assert "densities over 10,000 tokens cannot go below 1/10,000" in page


def test_build_dashboard__flags_single_token_features(tmp_path):
    # At hook_embed the activation is the token's embedding, so DetectorSAE's first features fire on one token.
    html_path = build_demo(tmp_path)
    page = html_path.read_text()
    panel_0 = page[page.index('id="f0"'): page.index("</section>", page.index('id="f0"'))]
    assert "single-token: <span class=\"ws\">·</span> (100%)" in panel_0  # feature 0 detects the space byte
    assert "Ultra-low density (" in page and 'data-tab="low"' in page


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium")
def test_browser_check__dashboard_renders_without_js_errors(tmp_path):
    html_path = build_demo(tmp_path / "dash")
    report = check_page(html_path, tmp_path / "shot.png", "f3")
    assert report.errors == [] and report.ready
    assert report.screenshot.read_bytes()[:4] == b"\x89PNG" and report.screenshot.stat().st_size > 10_000
    # The check must see errors when there are some: break the page on purpose.
    broken = tmp_path / "broken.html"
    broken.write_text(html_path.read_text().replace(
        "</body>", "<script>console.error('logged problem');noSuchFunction();</script></body>"))
    bad = check_page(broken, tmp_path / "broken.png")
    assert any("logged problem" in e for e in bad.errors) and any("noSuchFunction" in e for e in bad.errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_topk__cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    values_NF = torch.randint(-2, 4, (300, 40), generator=g).float()
    cpu, gpu = StreamingTopK(40, 16), StreamingTopK(40, 16, device="cuda")
    for start in range(0, 300, 64):
        ids = torch.arange(start, min(start + 64, 300))
        cpu.update(values_NF[ids], ids)
        gpu.update(values_NF[ids].cuda(), ids.cuda())
    assert torch.equal(gpu.result().ids_FK.cpu(), cpu.result().ids_FK)


def test_curve_panels__series_follow_the_records_and_mark_each_resampling() -> None:
    from sae_stream.analysis.curves import LM_PANELS, SAE_PANELS, curve_panels

    records = [
        {"step": 10, "tokens": 100, "fvu": 0.5, "l0": 30.0, "loss": 1.0, "mse": 0.4, "dead": 0, "dense": 3,
         "lr": 0.0, "l1_coeff": 1e-3, "resampled": 0},
        {"step": 20, "tokens": 200, "fvu": 0.3, "l0": 20.0, "loss": 0.8, "mse": 0.3, "dead": 5, "dense": 2,
         "lr": 1e-3, "l1_coeff": 1e-3, "resampled": 7},                       # resampled between 100 and 200
        {"step": 25, "fvu": 0.1},                                             # no x: left out
        {"step": 30, "tokens": 300, "fvu": None, "l0": 15.0, "loss": 0.7, "mse": 0.2, "dead": 1, "dense": 2,
         "lr": 1e-3, "l1_coeff": 1e-3, "resampled": 7},                       # (fvu null: a gap, not a zero)
        {"step": 40, "tokens": 400, "fvu": 0.2, "l0": 12.0, "loss": 0.6, "mse": 0.1, "dead": 0, "dense": 2,
         "lr": 1e-3, "l1_coeff": 1e-3, "resampled": 9},
    ]
    curves = curve_panels(records, SAE_PANELS, "tokens")
    panels = {p.title.split(" ")[0]: p for p in curves.panels}
    assert set(panels) == {"reconstruction", "L0", "loss", "features", "learning", "sparsity"}  # no tokens_per_s
    assert panels["reconstruction"].series == {"fvu": ([100.0, 200.0, 400.0], [0.5, 0.3, 0.2])}
    assert panels["features"].series["dead"] == ([100.0, 200.0, 300.0, 400.0], [0.0, 5.0, 1.0, 0.0])
    assert panels["L0"].log and panels["sparsity"].log and not panels["learning"].log  # lr 0 once: linear
    assert curves.resampled_at == [200.0, 400.0]
    lm = curve_panels([{"step": 0, "lm/heldout_loss": 10.8}, {"step": 5, "lm/loss": 9.0, "lm/lr": 1e-3}],
                      LM_PANELS, "step")
    assert lm.panels[0].series == {"lm/loss": ([5.0], [9.0]), "lm/heldout_loss": ([0.0], [10.8])}
    assert curve_panels([{"step": 1}], SAE_PANELS, "tokens").panels == []
    # a Matryoshka run's prefix FVUs join the FVU panel, smallest dictionary first
    nested = [{"tokens": 100, "fvu": 0.2, "fvu_first_256": 0.4, "fvu_first_64": 0.7}, {"tokens": 200, "fvu": 0.1}]
    (fvu_panel,) = curve_panels(nested, SAE_PANELS[:1], "tokens").panels
    assert list(fvu_panel.series) == ["fvu", "fvu_first_64", "fvu_first_256"]
    assert fvu_panel.series["fvu_first_64"] == ([100.0], [0.7])


def test_plot_training_curves__writes_a_png_only_when_there_is_data(tmp_path) -> None:
    from sae_stream.analysis.curves import plot_training_curves
    from sae_stream.tracking import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "tokens": 10, "fvu": 0.5}\n{"step": 2, "tok')  # the last line torn by a kill
    assert read_records(path) == [{"step": 1, "tokens": 10, "fvu": 0.5}]
    out = plot_training_curves(read_records(path), tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.read_bytes()[:4] == b"\x89PNG"
    assert plot_training_curves([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_token_text__partial_utf8_tokens_show_their_bytes_so_ids_differ() -> None:
    from sae_stream.analysis.dashboard import TokenText
    from sae_stream.tokenizer import get_tokenizer

    gpt2 = get_tokenizer("gpt2")
    text = TokenText(gpt2)
    ids = gpt2.encode("“quote” 日本")  # curly quotes and CJK: tokens holding parts of a character
    shown = [text(i) for i in ids]
    partial = [i for i in ids if "\ufffd" in gpt2.decode([i])]
    assert len(partial) >= 3 and len({text(i) for i in partial}) == len(set(partial))
    assert all("\ufffd" not in s for s in shown) and "quote" in shown
    assert text(partial[0]) == gpt2.encoding.decode_single_token_bytes(partial[0]).decode("utf-8", "backslashreplace")
    assert [TokenText(get_tokenizer("byte"))(b) for b in "é".encode()] == ["\\xc3", "\\xa9"]


class MaskedSAE(LinearReLUSAE):
    """Zeroes non-firing units by a mask multiply, as batchtopk does: a negative pre-activation becomes -0.0."""

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre = (x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F
        return pre * (pre > 0)


def test_build_dashboard__tabs_follow_the_runs_density_thresholds_and_name_their_ranges(model, batches, tmp_path):
    sae = MaskedSAE(D_MLP, 24, bias=-0.1)
    cfg = AnalysisConfig(features=6, top_k=4, window=3, tokens=10_000, batch_contexts=6, logit_k=3, ablation=False)
    density_F = torch.full((24,), 0.01, dtype=torch.float64)
    density_F[0], density_F[1], density_F[2], density_F[3] = 0.0, 1e-3, 0.5, 0.1  # 0.1 itself is not dense (>)

    def tab(page: str, key: str) -> list[str]:
        start = page.index(f'id="tab-{key}"')
        return re.findall(r'href="#f(\d+)"', page[start: page.index("</table>", start)])

    page = build_dashboard(model, sae, MLP, batches, AngleTokenizer(), cfg, tmp_path, density_F,
                           features=[0, 1, 2, 3, 4], ultralow_threshold=2e-3, dense_threshold=0.1,
                           density_tokens=10_000).read_text()
    assert (tab(page, "dense"), tab(page, "mid"), tab(page, "low"), tab(page, "dead")) == (["2"], ["3", "4"], ["1"],
                                                                                            ["0"])
    assert "High density" not in page and 'id="tab-high"' not in page
    for label in ("Dense (1) <small>&gt; 0.1</small>", "Mid density (2) <small>0.002 – 0.1</small>",
                  "Ultra-low density (1) <small>&lt; 0.002</small>", "Dead (1) <small>≤ 0</small>"):
        assert label in page
    assert "densities from eval.json&#x27;s feature_density (over its 10,000 activation tokens)" in page
    # batchtopk-style -0.0 activations show as 0 on hover, never "-0"
    titles = re.findall(r'title="&#x27;[^"]*&#x27;: ([^"]*)"', page)
    assert "0" in titles and not any(t.startswith("-0") and float(t) == 0 for t in titles)
    # densities of the scan itself: no dead tab when none is shown, and the header says what was counted
    page = build_dashboard(model, sae, MLP, batches, AngleTokenizer(), cfg, tmp_path, features=[1, 2],
                           dense_threshold=0.1).read_text()
    assert 'id="tab-dead"' not in page and 'data-tab="dead"' not in page
    assert f"densities from this scan (over its {len(batches) * 4 * (T - 1):,} activation tokens)" in page


def test_matryoshka_level__the_smallest_nested_dictionary_holding_the_feature() -> None:
    where = {f: matryoshka_level(f, [64, 256], 1024) for f in (0, 63, 64, 255, 256, 1023)}
    assert where[0] == where[63] == "nested dictionary 1 of 3 (features 0-63)"
    assert where[64] == where[255] == "nested dictionary 2 of 3 (features 64-255)"
    assert where[256] == where[1023] == "nested dictionary 3 of 3 (features 256-1023)"
    assert matryoshka_level(5, None, 1024) is None and matryoshka_level(5, [], 1024) is None
    panel = FeaturePanel(feature=70, density=0.01, ultralow=False, contexts=[], hist_counts=[1], hist_width=1.0,
                         top_tokens=[], level=where[64])
    assert "density 0.01 (log10 -2.00); nested dictionary 2 of 3 (features 64-255)</p>" in panel_html(panel, "")
    assert "nested dictionary" not in panel_html(FeaturePanel(70, 0.01, False, [], [1], 1.0, []), "")
