"""evaluate.py: loss recovered, KL, activation statistics and densities against brute force, on tiny random models.

The SAEs here are stand-ins satisfying the encode/decode protocol, so these tests do not depend on the trainer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_stream.evaluate as evaluate_module
from sae_stream.analysis.hooks import final_residual, spliced_logits, take_contexts, unembed_rows
from sae_stream.analysis.plots import plot_density_histogram
from sae_stream.config import EvalConfig, TrainConfig
from sae_stream.evaluate import density_counts, evaluate, load_feature_density, read_eval, write_eval

MLP = "blocks.0.mlp.hook_post"
D_MLP, VOCAB, T = 48, 61, 12


class IdentitySAE(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.d_in = self.d_sae = d

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        return feats_BF


class ConstantSAE(nn.Module):
    """Never fires; reconstructs a fixed vector (zeros, or the mean activation)."""

    def __init__(self, out_D: torch.Tensor, d_sae: int = 8) -> None:
        super().__init__()
        self.out_D, self.d_in, self.d_sae = out_D, out_D.numel(), d_sae

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD.new_zeros(x_BD.shape[0], self.d_sae)

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        return self.out_D.expand(feats_BF.shape[0], -1).clone()


class LinearReLUSAE(nn.Module):
    def __init__(self, d: int, f: int, seed: int = 0, bias: float = -0.05) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc_DF = nn.Parameter(torch.randn(d, f, generator=g) / d**0.5)
        self.b_enc_F = nn.Parameter(torch.full((f,), bias))
        self.W_dec_FD = nn.Parameter(torch.randn(f, d, generator=g) / f**0.5)
        self.b_dec_D = nn.Parameter(torch.randn(d, generator=g) * 0.01)
        self.d_in, self.d_sae = d, f

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu((x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F)

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        return feats_BF @ self.W_dec_FD + self.b_dec_D


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=1, d_model=24, n_ctx=T, d_head=6, n_heads=4, d_mlp=D_MLP, d_vocab=VOCAB,
                                  act_fn="relu", seed=0, device="cpu")
    m = HookedTransformer(cfg)
    with torch.no_grad():  # larger MLP output so ablations move the loss clearly
        m.blocks[0].mlp.W_out.mul_(6.0)
    return m.eval()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (5, T), generator=g) for _ in range(3)]


def _cfg(**kw: int) -> EvalConfig:
    return EvalConfig(**{"tokens": 10_000, "batch_contexts": 4, **kw})


def _acts(model: HookedTransformer, hook: str, tokens_NT: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens_NT, names_filter=hook)
    return cache[hook].reshape(*tokens_NT.shape, -1)


def test_evaluate__identity_sae_recovers_all_loss(model, batches):
    r = evaluate(model, IdentitySAE(D_MLP), MLP, batches, _cfg(), TrainConfig())
    assert r["ce_loss"]["sae"] == r["ce_loss"]["clean"]
    assert r["ce_loss_recovered"] == {"zero": 1.0, "mean": 1.0}
    assert r["kl_clean_sae"] == 0.0 and r["mse"] == 0.0 and r["fvu"] == 0.0
    # Ablations must move the loss (a random model may even gain), or "recovered" would be meaningless.
    assert abs(r["ce_loss"]["zero_ablation"] - r["ce_loss"]["clean"]) > 1e-3
    assert abs(r["ce_loss"]["mean_ablation"] - r["ce_loss"]["clean"]) > 1e-3


def test_evaluate__sae_outputting_the_ablation_recovers_nothing(model, batches):
    zero = evaluate(model, ConstantSAE(torch.zeros(D_MLP)), MLP, batches, _cfg(), TrainConfig())
    assert zero["ce_loss"]["sae"] == zero["ce_loss"]["zero_ablation"]
    assert zero["ce_loss_recovered"]["zero"] == 0.0
    assert zero["l0"] == 0.0 and zero["density"]["dead"] == 8
    tokens_NT = torch.cat(batches)
    mean_D = _acts(model, MLP, tokens_NT)[:, 1:].reshape(-1, D_MLP).double().mean(0).float()
    mean = evaluate(model, ConstantSAE(mean_D), MLP, batches, _cfg(), TrainConfig(), mean_activation=mean_D)
    assert mean["ce_loss_recovered"]["mean"] == 0.0
    assert mean["fvu"] == pytest.approx(1.0, abs=1e-5)  # reconstructing the mean explains no variance


def test_evaluate__computed_mean_matches_brute_force(model, batches):
    tokens_NT = torch.cat(batches)
    mean_D = _acts(model, MLP, tokens_NT)[:, 1:].reshape(-1, D_MLP).double().mean(0).float()
    given = evaluate(model, ConstantSAE(mean_D), MLP, batches, _cfg(), TrainConfig(), mean_activation=mean_D)
    computed = evaluate(model, ConstantSAE(mean_D), MLP, batches, _cfg(), TrainConfig())
    assert computed["ce_loss"]["mean_ablation"] == pytest.approx(given["ce_loss"]["mean_ablation"], abs=1e-6)
    assert computed["ce_loss_recovered"]["mean"] == pytest.approx(0.0, abs=1e-4)


def test_evaluate__statistics_match_brute_force(model, batches):
    sae = LinearReLUSAE(D_MLP, 40)
    r = evaluate(model, sae, MLP, batches, _cfg(batch_contexts=3), TrainConfig(dense_threshold=0.3))
    tokens_NT = torch.cat(batches)
    with torch.no_grad():
        x_ND = _acts(model, MLP, tokens_NT)[:, 1:].reshape(-1, D_MLP)
        feats_NF = sae.encode(x_ND)
        recon_ND = sae.decode(feats_NF)
        density_F = (feats_NF > 0).double().mean(0)
        assert r["activation_tokens"] == x_ND.shape[0] == tokens_NT.shape[0] * (T - 1)
        assert torch.equal(torch.tensor(r["feature_density"], dtype=torch.float64), density_F.float().double())
        assert r["l0"] == pytest.approx(float((feats_NF > 0).sum(1).double().mean()), rel=1e-9)
        assert r["mse"] == pytest.approx(float((x_ND - recon_ND).pow(2).mean()), rel=1e-5)
        fvu = (x_ND - recon_ND).pow(2).sum() / (x_ND - x_ND.mean(0)).pow(2).sum()
        assert r["fvu"] == pytest.approx(float(fvu), rel=1e-5)
        assert r["density"]["dense"] == int((density_F > 0.3).sum())
        assert r["density"]["dead"] == int((density_F == 0).sum())
        clean_loss = model(tokens_NT, return_type="loss")
        assert r["ce_loss"]["clean"] == pytest.approx(float(clean_loss), rel=1e-5)
        logits_sae = spliced_logits(model, MLP, tokens_NT, lambda x: sae.decode(sae.encode(x)), True)
        p_clean = model(tokens_NT)[:, :-1].log_softmax(-1)
        p_sae = logits_sae[:, :-1].log_softmax(-1)
        kl = (p_clean.exp() * (p_clean - p_sae)).sum(-1).mean()
    assert r["kl_clean_sae"] == pytest.approx(float(kl), rel=1e-4)
    assert r["kl_clean_sae"] > 0


def test_evaluate__each_contexts_ce_is_credited_to_it_whatever_the_chunks_and_logit_slices(model, batches,
                                                                                           monkeypatch):
    """The interval resamples per-context CE sums: they equal each context's sums from full forwards, with chunks
    of 3 or 7 contexts and logit slices of 5 rows that cross contexts."""
    sae = LinearReLUSAE(D_MLP, 40)
    tokens_NT = torch.cat(batches)
    mean_D = _acts(model, MLP, tokens_NT)[:, 1:].reshape(-1, D_MLP).double().mean(0).float()
    with torch.no_grad():
        logits = {"clean": model(tokens_NT)}
        for run, replace in (("sae", lambda x: sae.decode(sae.encode(x))), ("zero", torch.zeros_like),
                             ("mean", lambda x: mean_D.expand_as(x))):
            logits[run] = spliced_logits(model, MLP, tokens_NT, replace, True)
    want_RC = torch.stack([-(lg[:, :-1].log_softmax(-1).gather(-1, tokens_NT[:, 1:, None])[..., 0]).double().sum(1)
                           for lg in logits.values()])
    seen = []
    real = evaluate_module._bootstrap_recovered
    monkeypatch.setattr(evaluate_module, "_bootstrap_recovered",
                        lambda sums_RC, context_len: seen.append((sums_RC, context_len)) or real(sums_RC, context_len))
    evaluate(model, sae, MLP, batches, _cfg(batch_contexts=3), TrainConfig())
    monkeypatch.setattr(evaluate_module, "LOGIT_ELEMENTS", {"cpu": 5 * VOCAB})
    evaluate(model, sae, MLP, batches, _cfg(batch_contexts=7), TrainConfig())
    for sums_RC, context_len in seen:
        assert context_len == T
        torch.testing.assert_close(sums_RC, want_RC, rtol=1e-5, atol=1e-6)


def test_bootstrap_recovered__resamples_blocks_of_consecutive_contexts(monkeypatch):
    """40 contexts of 256 tokens in blocks of 1024 tokens: 10 blocks of 4, resampled 1000 times in draws of 50 from
    one seeded generator, the interval the 2.5% and 97.5% points of the resampled ratio."""
    g = torch.Generator().manual_seed(5)
    clean = 100 + 10 * torch.rand(40, generator=g, dtype=torch.float64)
    sums_RC = torch.stack([clean, clean + 2 + torch.rand(40, generator=g, dtype=torch.float64),
                           clean + 50 + 5 * torch.rand(40, generator=g, dtype=torch.float64), clean + 20])
    got = evaluate_module._bootstrap_recovered(sums_RC, context_len=256)
    blocks_RK = sums_RC.view(4, 10, 4).sum(-1)
    draw = torch.Generator().manual_seed(0)
    picks = torch.cat([torch.randint(0, 10, (50, 10), generator=draw) for _ in range(20)])
    t = blocks_RK[:, picks].sum(-1)
    for name, ablated in (("zero", t[2]), ("mean", t[3])):
        want = torch.quantile((ablated - t[1]) / (ablated - t[0]), torch.tensor([0.025, 0.975], dtype=torch.float64))
        assert got[name] == pytest.approx(want.tolist(), rel=1e-12)
        estimate = float((sums_RC[2 if name == "zero" else 3] - sums_RC[1]).sum()
                         / (sums_RC[2 if name == "zero" else 3] - sums_RC[0]).sum())
        assert got[name][0] < estimate < got[name][1] and got[name][1] - got[name][0] < 0.05
    # identical blocks: every resample is the estimate; one block (or a zero gap): no interval
    same = sums_RC[:, :4].repeat(1, 10)
    ratio = float((same[2] - same[1]).sum() / (same[2] - same[0]).sum())
    assert evaluate_module._bootstrap_recovered(same, 256)["zero"] == pytest.approx([ratio, ratio], rel=1e-12)
    assert evaluate_module._bootstrap_recovered(sums_RC[:, :4], 256) == {"zero": None, "mean": None}
    flat = sums_RC.clone()
    flat[3] = flat[0]
    assert evaluate_module._bootstrap_recovered(flat, 256)["mean"] is None


def test_print_eval__shows_the_interval_in_brackets(capsys):
    from sae_stream.report import _print_eval

    r = {"tokens": 100, "l0": 3.0, "fvu": 0.1, "kl_clean_sae": 0.01, "density": {},
         "ce_loss": {"clean": 1.0, "sae": 1.1, "zero_ablation": 3.0, "mean_ablation": 2.0},
         "ce_loss_recovered": {"zero": 0.95, "mean": 0.9}, "ce_loss_recovered_ci95": {"zero": [0.94, 0.96],
                                                                                   "mean": None}}
    _print_eval(r, "eval.json")
    assert "loss recovered 0.9500 [0.9400, 0.9600] (vs zero) 0.9000 (vs mean)" in capsys.readouterr().out


def test_evaluate__chunking_does_not_change_results(model, batches):
    sae = LinearReLUSAE(D_MLP, 40)
    a = evaluate(model, sae, MLP, batches, _cfg(batch_contexts=2), TrainConfig())
    b = evaluate(model, sae, MLP, batches, _cfg(batch_contexts=15), TrainConfig())
    for key in ("l0", "mse", "fvu", "kl_clean_sae"):
        assert a[key] == pytest.approx(b[key], rel=1e-5)
    for run in a["ce_loss"]:
        assert a["ce_loss"][run] == pytest.approx(b["ce_loss"][run], rel=1e-6)
    assert a["feature_density"] == b["feature_density"]


def test_evaluate__logit_slices_do_not_change_results(model, batches, monkeypatch):
    """The logits are made LOGIT_ELEMENTS at a time: 7 positions a slice (ragged against 4 contexts * 11
    predictions) must give what one slice per chunk gives."""
    sae = LinearReLUSAE(D_MLP, 40)
    monkeypatch.setattr(evaluate_module, "LOGIT_ELEMENTS", {"cpu": 10**9})
    whole = evaluate(model, sae, MLP, batches, _cfg(), TrainConfig())
    rows_seen: list[int] = []

    def counted(model: HookedTransformer, resid_ND: torch.Tensor) -> torch.Tensor:
        rows_seen.append(resid_ND.shape[0])
        return unembed_rows(model, resid_ND)

    monkeypatch.setattr(evaluate_module, "LOGIT_ELEMENTS", {"cpu": 7 * VOCAB + 3})
    monkeypatch.setattr(evaluate_module, "unembed_rows", counted)
    sliced = evaluate(model, sae, MLP, batches, _cfg(), TrainConfig())
    assert max(rows_seen) == 7 and sum(rows_seen) == 4 * 15 * (T - 1)  # 4 runs, every prediction once
    for run in whole["ce_loss"]:
        assert sliced["ce_loss"][run] == pytest.approx(whole["ce_loss"][run], rel=1e-6)
    assert sliced["kl_clean_sae"] == pytest.approx(whole["kl_clean_sae"], rel=1e-5)
    assert sliced["kl_clean_sae"] > 0


@pytest.mark.parametrize("norm,cap,hook", [("LN", None, MLP), ("LN", None, "ln_final.hook_normalized"),
                                           ("LNPre", 5.0, "ln_final.hook_scale"), ("RMS", None, MLP),
                                           (None, 3.0, "blocks.0.hook_resid_post")])
def test_final_residual__its_unembedded_rows_are_the_forward_logits(norm, cap, hook):
    """final_residual + unembed_rows is the model's own tail (ln_final, unembedding, soft cap), with a hook
    replaced anywhere before it, ln_final's own hooks included."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=T, d_head=4, n_heads=4, d_mlp=32, d_vocab=VOCAB,
                                  act_fn="gelu", normalization_type=norm, output_logits_soft_cap=cap or -1.0,
                                  seed=3, device="cpu")
    m = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(2))

    def scale(act: torch.Tensor, hook: object) -> torch.Tensor:
        return act * 1.7 + 0.1

    with torch.no_grad():
        want = m.run_with_hooks(tokens, fwd_hooks=[(hook, scale)])
        unhooked = m(tokens)
        resid_BTD = final_residual(m, tokens, [(hook, scale)])
    got = unembed_rows(m, resid_BTD.reshape(-1, 16)).reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - unhooked).abs().max() > 1e-2  # the hook must change the logits for this to test anything
    if cap:
        assert want.abs().max() < cap


def test_evaluate__attention_hook_z_is_flattened(model, batches):
    hook = "blocks.0.attn.hook_z"  # [B, T, H, d_head] -> D = 4 * 6
    r = evaluate(model, IdentitySAE(24), hook, batches, _cfg(), TrainConfig())
    assert r["ce_loss_recovered"] == {"zero": 1.0, "mean": 1.0} and r["kl_clean_sae"] == 0.0
    lin = evaluate(model, LinearReLUSAE(24, 16), hook, batches, _cfg(), TrainConfig())
    assert lin["kl_clean_sae"] > 0 and len(lin["feature_density"]) == 16


def test_splice__skip_first_position_keeps_position_zero_clean(model, batches):
    tokens = batches[0]
    clean = model(tokens)
    kept = spliced_logits(model, MLP, tokens, torch.zeros_like, skip_first_position=True)
    all_ = spliced_logits(model, MLP, tokens, torch.zeros_like, skip_first_position=False)
    # One layer: the MLP at position 0 only feeds position 0's logits.
    assert torch.equal(kept[:, 0], clean[:, 0])
    assert not torch.allclose(all_[:, 0], clean[:, 0])
    assert torch.equal(kept[:, 1:], all_[:, 1:])
    r = evaluate(model, IdentitySAE(D_MLP), MLP, batches, _cfg(), TrainConfig(), skip_first_position=False)
    assert r["activation_tokens"] == 15 * T


def test_evaluate__token_budget_and_bad_inputs(model, batches):
    r = evaluate(model, IdentitySAE(D_MLP), MLP, batches, _cfg(tokens=50), TrainConfig())
    assert r["contexts"] == math.ceil(50 / T) and r["tokens"] == r["contexts"] * T
    assert take_contexts(iter(batches), 10**6).shape == (15, T)
    with pytest.raises(ValueError, match="d_in"):
        evaluate(model, IdentitySAE(7), MLP, batches, _cfg(), TrainConfig())
    with pytest.raises(ValueError, match=r"hook .blocks.9.mlp.hook_post. is not in the model \(1 layer\(s\)\): "
                                         r"did you mean .blocks.0.mlp.hook_post."):
        evaluate(model, IdentitySAE(D_MLP), "blocks.9.mlp.hook_post", batches, _cfg(), TrainConfig())
    with pytest.raises(ValueError, match="mean_activation"):
        evaluate(model, IdentitySAE(D_MLP), MLP, batches, _cfg(), TrainConfig(), mean_activation=torch.zeros(3))
    with pytest.raises(ValueError, match="no token batches"):
        evaluate(model, IdentitySAE(D_MLP), MLP, [], _cfg(), TrainConfig())
    with pytest.raises(ValueError, match="ln_final.hook_normalized"):
        evaluate(model, IdentitySAE(24), "unembed.hook_in", batches, _cfg(), TrainConfig())


def test_density_counts__thresholds():
    density_F = torch.tensor([0.0, 0.0, 5e-7, 1e-6, 1e-3, 0.2, 0.5])
    t = TrainConfig(dead_threshold=0.0, ultralow_threshold=1e-6, dense_threshold=0.2)
    c = density_counts(density_F, t)
    assert (c["dead"], c["ultralow"], c["dense"], c["d_sae"]) == (2, 1, 1, 7)
    # measured over 2M tokens a density of 5e-7 is one firing: resolvable
    assert density_counts(density_F, t, tokens=2_000_000)["ultralow"] == 1
    # over 1M tokens (or fewer) no alive feature can be below 1e-6: not a count of 0 but unknown
    for tokens in (1_000_000, 65_024):
        assert density_counts(density_F, t, tokens=tokens)["ultralow"] is None


def test_evaluate__ultralow_is_null_when_the_eval_cannot_resolve_the_threshold(model, batches):
    sae = LinearReLUSAE(D_MLP, 40, bias=-0.6)
    n = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)  # position 0 skipped
    resolvable = evaluate(model, sae, MLP, batches, _cfg(), TrainConfig(ultralow_threshold=2 / n))
    assert resolvable["density"]["resolution"] == 1 / n and resolvable["density"]["ultralow"] is not None
    too_few = evaluate(model, sae, MLP, batches, _cfg(), TrainConfig(ultralow_threshold=1 / n))
    assert too_few["density"]["ultralow"] is None and too_few["density"]["dead"] == resolvable["density"]["dead"]


def test_evaluate__batchtopk_sae_left_in_train_mode_is_evaluated_with_its_threshold(model, batches):
    from sae_stream.analysis.ablation import ablate_feature
    from sae_stream.analysis.scan import scan_features
    from sae_stream.config import AnalysisConfig, SAEConfig
    from sae_stream.sae import build_sae

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_sae=64, k=4), d_in=D_MLP)
    _, cache = model.run_with_cache(torch.cat(batches), names_filter=MLP)
    sae.train()
    sae(cache[MLP].reshape(-1, D_MLP))  # a training step: sets the threshold, leaves the SAE in train mode
    got = evaluate(model, sae, MLP, batches, _cfg(), TrainConfig())
    scan = scan_features(model, sae, MLP, batches, AnalysisConfig(tokens=10_000, batch_contexts=5))
    ablation = ablate_feature(model, sae, MLP, batches[0], 0, torch.full((batches[0].shape[0],), 5))
    assert sae.training  # given back as it came
    sae.eval()
    assert got == evaluate(model, sae, MLP, batches, _cfg(), TrainConfig())
    ref = scan_features(model, sae, MLP, batches, AnalysisConfig(tokens=10_000, batch_contexts=5))
    assert torch.equal(scan.fire_count_F, ref.fire_count_F)
    assert torch.equal(ablation.delta_logprob_V,
                       ablate_feature(model, sae, MLP, batches[0], 0, torch.full((batches[0].shape[0],), 5))
                       .delta_logprob_V)


def test_evaluate__matryoshka_sae_gets_each_nested_dictionary_alone(model, batches):
    from sae_stream.config import SAEConfig
    from sae_stream.sae import build_sae

    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_sae=32, k=4, matryoshka=[3, 10]), d_in=D_MLP)
    with torch.no_grad():
        sae.b_enc_F.fill_(0.05)
        sae.threshold.fill_(0.01)
    r = evaluate(model, sae.eval(), MLP, batches, _cfg(), TrainConfig())
    x_ND = _acts(model, MLP, torch.cat(batches))[:, 1:].reshape(-1, D_MLP)
    with torch.no_grad():
        feats_NF = sae.encode(x_ND)
        total = (x_ND - x_ND.mean(0)).pow(2).sum()
        for got, m in zip(r["matryoshka"], [3, 10]):
            recon_ND = sae.decode(feats_NF * (torch.arange(32) < m))
            assert got["features"] == m
            assert got["fvu"] == pytest.approx(float((x_ND - recon_ND).pow(2).sum() / total), rel=1e-5)
            assert got["l0"] == pytest.approx(float((feats_NF[:, :m] > 0).sum(1).double().mean()), rel=1e-9)
    assert 0 < r["matryoshka"][0]["l0"] < r["matryoshka"][1]["l0"] < r["l0"]
    plain = build_sae(SAEConfig(architecture="batchtopk", d_sae=32, k=4), d_in=D_MLP)
    assert "matryoshka" not in evaluate(model, plain.eval(), MLP, batches, _cfg(), TrainConfig())


def test_write_eval__writes_json_densities_and_png(model, batches, tmp_path):
    r = evaluate(model, LinearReLUSAE(D_MLP, 40, bias=-0.6), MLP, batches, _cfg(), TrainConfig())
    path = write_eval(tmp_path, r)
    text = path.read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert "feature_density" not in saved and saved["feature_density_file"] == "feature_density.safetensors"
    assert saved["ce_loss_recovered"] == r["ce_loss_recovered"] and read_eval(tmp_path)["l0"] == r["l0"]
    assert "L_ablated - L_sae" in saved["definitions"]["ce_loss_recovered"]
    density_F = load_feature_density(tmp_path)
    assert torch.equal(density_F, torch.tensor(r["feature_density"], dtype=torch.float32))
    assert torch.equal(load_file(tmp_path / "feature_density.safetensors")["density_F"], density_F)
    png = (tmp_path / "density_histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plot_density_histogram__dead_features_and_bad_input(tmp_path):
    log10_F = torch.cat([torch.full((5,), -math.inf), torch.linspace(-7, -1, 50)])
    out = plot_density_histogram(log10_F, tmp_path / "h.png", ultralow_threshold=1e-6, bins=20)
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5000
    all_dead = plot_density_histogram(torch.full((4,), -math.inf), tmp_path / "dead.png")
    assert all_dead.stat().st_size > 5000
    with pytest.raises(ValueError):
        plot_density_histogram(torch.zeros(2, 2), tmp_path / "bad.png")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate__cuda_matches_cpu(model, batches):
    sae = LinearReLUSAE(D_MLP, 40)
    cpu = evaluate(model, sae, MLP, batches, _cfg(), TrainConfig())
    model_gpu = HookedTransformer(model.cfg).to("cuda")
    model_gpu.load_state_dict(model.state_dict())
    gpu = evaluate(model_gpu.eval(), LinearReLUSAE(D_MLP, 40).cuda(), MLP, batches, _cfg(), TrainConfig())
    for key in ("l0", "mse", "fvu", "kl_clean_sae"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-6)
    assert gpu["ce_loss"]["sae"] == pytest.approx(cpu["ce_loss"]["sae"], rel=1e-4)


def test_fp32_matmuls__tf32_off_inside_and_restored() -> None:
    """As a context and as a decorator (compare's correlate, the dashboard), also when the body raises."""
    from sae_stream.analysis.hooks import fp32_matmuls

    @fp32_matmuls()
    def inside(fail: bool) -> bool:
        if fail:
            raise RuntimeError("body failed")
        return torch.backends.cuda.matmul.allow_tf32

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with fp32_matmuls():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert inside(False) is False and torch.backends.cuda.matmul.allow_tf32 is True
        with pytest.raises(RuntimeError, match="body failed"):
            inside(True)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_split_dead__the_histogram_counts_dead_as_eval_does():
    from sae_stream.analysis.plots import split_dead
    from sae_stream.config import TrainConfig
    from sae_stream.metrics import density_counts

    density_F = torch.tensor([0.0, 1e-5, 9e-5, 1e-4, 2e-4, 0.3], dtype=torch.float64)
    for threshold in (0.0, 1e-4):
        alive, n_dead = split_dead(torch.log10(density_F), threshold)
        want = density_counts(density_F, TrainConfig(dead_threshold=threshold))["dead"]
        assert n_dead == want and len(alive) == 6 - want
    assert split_dead(torch.log10(density_F), 1e-4)[1] == 4  # 0, 1e-5, 9e-5 and 1e-4 itself (<=)


def test_evaluate_run__a_sweep_member_evaluated_again_refreshes_the_sweep_summary(model, batches, tmp_path,
                                                                                  monkeypatch, capsys):
    from sae_stream import report
    from sae_stream.config import config_from_dict, save_config

    sweep = config_from_dict({"buffer": {"hook_name": MLP}, "sweep": {"saes": [
        {"name": "a", "sae": {"d_sae": 40}}, {"name": "b", "sae": {"architecture": "topk", "k": 4, "d_sae": 40}}]}})
    run = tmp_path / "sw"
    members = dict(sweep.sweep_members())
    for name, cfg in [("", sweep), *members.items()]:
        (run / name).mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / name / "config.yaml")
    old_a = evaluate(model, LinearReLUSAE(D_MLP, 40, seed=1, bias=-0.6), MLP, batches, _cfg(), TrainConfig())
    b = evaluate(model, LinearReLUSAE(D_MLP, 40, seed=2), MLP, batches, _cfg(), TrainConfig())
    write_eval(run / "a", old_a)
    write_eval(run / "b", b)
    report.summarize_sweep(run)  # from the members' eval.json
    rows = {r["name"]: r for r in json.loads((run / "sweep_summary.json").read_text())}
    assert rows["a"]["l0"] == old_a["l0"] and rows["b"]["fvu"] == b["fvu"]
    assert "k" not in rows["a"] and rows["b"]["k"] == 4  # k only where the architecture uses it (and λ, not k)
    assert "l1_coeff" in rows["a"] and "l1_coeff" not in rows["b"]
    vs = rows["b"]["vs_first"]  # b's loss recovered against a's, paired on the same contexts
    assert vs["name"] == "a" and "vs_first" not in rows["a"]
    for k in ("zero", "mean"):
        assert vs["b_minus_a"][k] == pytest.approx(b["ce_loss_recovered"][k] - old_a["ce_loss_recovered"][k], abs=1e-12)
        assert vs["b_minus_a"][k] != 0

    # `sae-stream eval SW/a`: a's SAE evaluated again (here another one) rewrites the sweep's row for it
    new_sae = LinearReLUSAE(D_MLP, 40, seed=3)
    monkeypatch.setattr(report, "load_trained", lambda run_dir, overrides, model_=None: (members["a"], model, new_sae))
    monkeypatch.setattr(report, "heldout_batches", lambda *args, **kw: iter(batches))
    new_a = report.evaluate_run(run / "a")
    assert new_a["l0"] != old_a["l0"]
    rows = {r["name"]: r for r in json.loads((run / "sweep_summary.json").read_text())}
    assert (rows["a"]["l0"], rows["a"]["fvu"], rows["a"]["kl"]) == (new_a["l0"], new_a["fvu"], new_a["kl_clean_sae"])
    assert (rows["b"]["l0"], rows["b"]["dead"]) == (b["l0"], b["density"]["dead"])  # b's own eval, untouched

    # an eval.json of an SAE since replaced does not describe the member: it is left out, and said so
    stale = json.loads((run / "b" / "eval.json").read_text())
    (run / "b" / "eval.json").write_text(json.dumps({**stale, "sae_weights_sha256": "0" * 64}))
    capsys.readouterr()
    report.summarize_sweep(run)
    assert [r["name"] for r in json.loads((run / "sweep_summary.json").read_text())] == ["a"]
    assert "b left out of the summary" in capsys.readouterr().out
