"""`sae-stream compare`: feature matching by decoder cosine and activation correlation, against references."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sae_stream.analysis.matching import (
    CorrelationTotals,
    Matches,
    by_density,
    decoder_matches,
    partners_per_feature,
    top_splits,
)
from sae_stream.cli import main
from sae_stream.compare import COMPARE_JSON, COMPARE_PNG, COMPARE_TENSORS
from sae_stream.config import SAEConfig
from sae_stream.export import export_saelens, load_saelens
from sae_stream.sae import build_sae


def test_decoder_matches__equal_brute_force_in_ragged_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    a_FD, b_GD = torch.randn(11, 6, generator=g), torch.randn(7, 6, generator=g)
    b_GD[3] = 0  # a zero row: no direction, so no match either way
    cos_FG = torch.nn.functional.normalize(a_FD, dim=1) @ torch.nn.functional.normalize(b_GD, dim=1).T
    cos_FG[:, 3] = -2.0
    a_in_b, b_in_a = decoder_matches(a_FD * 3.0, b_GD, block_rows=4)  # (row norms do not matter)
    torch.testing.assert_close(a_in_b.value_F, cos_FG.max(1).values)
    assert torch.equal(a_in_b.index_F, cos_FG.argmax(1)) and 3 not in a_in_b.index_F
    torch.testing.assert_close(b_in_a.value_F[[0, 1, 2, 4, 5, 6]], cos_FG.max(0).values[[0, 1, 2, 4, 5, 6]])
    assert torch.equal(b_in_a.index_F, torch.where(torch.arange(7) == 3, -1, cos_FG.argmax(0)))
    assert torch.isnan(b_in_a.value_F[3])


def _features(n: int, seed: int) -> torch.Tensor:
    """[n, 5] activations: sparse ReLU features, a never-firing one, one with a large mean and small spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, 5, generator=g) - 1.0)
    x[:, 2] = 0
    x[:, 4] = 1000.0 + 0.01 * torch.randn(n, generator=g)
    return x


def test_correlation_totals__equal_numpy_corrcoef_over_chunks() -> None:
    a_NF = _features(3000, 0)
    b_NG = torch.cat([a_NF[:, :3] * 2 + 0.1 * torch.rand(3000, 3), _features(3000, 1)[:, 3:]], dim=1)
    b_NG[:, 2] = 0  # never fires
    b_NG[:, 4] += a_NF[:, 4]  # correlated with A's large-mean feature, in its small spread
    totals = CorrelationTotals(5, 5)
    for i in range(0, 3000, 700):  # ragged chunks
        totals.update(a_NF[i : i + 700], b_NG[i : i + 700])
    with np.errstate(invalid="ignore"):  # (a constant feature: NaN, as expected)
        ref = np.corrcoef(a_NF.double().numpy().T, b_NG.double().numpy().T)[:5, 5:]
    got = totals.correlation_rows(0, 5).numpy()
    defined = ~np.isnan(ref)
    assert (np.isnan(got) == ~defined).all() and defined.sum() == 16  # A's and B's feature 2: undefined
    np.testing.assert_allclose(got[defined], ref[defined], atol=1e-6)
    a_in_b, b_in_a = totals.matches(block_rows=2)
    assert a_in_b.index_F.tolist() == [0, 1, -1, int(np.nanargmax(ref[3])), 4]
    assert torch.isnan(a_in_b.value_F[2]) and torch.isnan(b_in_a.value_F[2])
    with np.errstate(invalid="ignore"):
        cols = [0, 1, 3, 4]
        np.testing.assert_allclose(b_in_a.value_F[cols].numpy(), np.nanmax(ref[:, cols], axis=0), atol=1e-6)
        assert b_in_a.index_F[cols].tolist() == np.nanargmax(ref[:, cols], axis=0).tolist()
    density_a, _ = totals.densities()
    torch.testing.assert_close(density_a, (a_NF > 0).double().mean(0))


def test_correlation_totals__refuse_too_many_pairs() -> None:
    with pytest.raises(ValueError, match="--no-correlation"):
        CorrelationTotals(1000, 1000, max_pairs=999_999)


def test_partners_per_feature__counts_by_hand() -> None:
    b_in_a = Matches(torch.zeros(7), torch.tensor([0, 0, 0, 0, 1, 2, 2]))
    assert partners_per_feature(b_in_a, d_a=4) == {"0": 1, "1": 1, "2-3": 1, "4+": 1}
    undefined = Matches(torch.full((2,), float("nan")), torch.tensor([-1, 1]))
    assert partners_per_feature(undefined, d_a=2) == {"0": 1, "1": 1, "2-3": 0, "4+": 0}


def test_by_density__band_means_by_hand() -> None:
    m = Matches(torch.tensor([0.9, 0.1, float("nan"), 0.3, 0.5]), torch.tensor([0, 1, -1, 2, 3]))
    got = by_density(m, torch.tensor([0.5, 0.5, 0.0, 5e-5, 1e-4]))
    assert got["never fired"] == {"features": 1, "mean": None}
    assert got["(0.01, 1]"] == {"features": 2, "mean": pytest.approx(0.5)}
    assert got["(0, 0.0001]"] == {"features": 2, "mean": pytest.approx(0.4)}  # (1e-4 is the band's top)
    assert got["(0.0001, 0.001]"] == {"features": 0, "mean": None}


def test_top_splits__most_partners_first_and_only_strong_eligible_ones() -> None:
    #                        B's feature:  0    1    2    3    4    5    6    7
    b_in_a = Matches(torch.tensor([0.9, 0.6, 0.7, 0.95, 0.8, 0.4, 0.99, float("nan")]),
                     torch.tensor([2, 2, 2, 5, 5, 5, 1, -1]))
    assert top_splits(b_in_a, min_value=0.5) == [{"a": 2, "b": [0, 2, 1], "values": [0.9, 0.7, 0.6]},
                                                 {"a": 5, "b": [3, 4], "values": [0.95, 0.8]}]
    eligible = torch.tensor([True, False, True, True, False, True, True, True])
    assert top_splits(b_in_a, min_value=0.5, eligible_G=eligible) == [{"a": 2, "b": [0, 2], "values": [0.9, 0.7]}]
    assert top_splits(b_in_a, n=1, min_value=0.3)[0]["a"] == 5  # (3 partners each: the higher best value first)


def _copy_run(run: Path, to: Path, dashboard: bool = False) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("checkpoints", *(() if dashboard else ("dashboard",))))
    return to


def _permuted_sae(run: Path, out: Path, perm: torch.Tensor) -> None:
    """The run's SAE with its features reordered by `perm` and its decoder rows rescaled (same activations)."""
    sae = load_saelens(run / "sae")
    with torch.no_grad():
        sae.W_enc_DF.copy_(sae.W_enc_DF[:, perm])
        sae.b_enc_F.copy_(sae.b_enc_F[perm])
        sae.W_dec_FD.copy_(sae.W_dec_FD[perm] * torch.linspace(0.5, 2.0, sae.d_sae)[:, None])
    export_saelens(sae, out, "blocks.0.mlp.hook_post", model_name=str(run / "lm"))


def _compare(a: Path, b: Path, out: Path, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    assert main(["compare", str(a), str(b), "--out", str(out), *extra]) == 0
    assert (out / COMPARE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / COMPARE_JSON).read_text()), load_file(out / COMPARE_TENSORS)


def test_compare__recovers_a_permutation_of_the_features(tiny_run: Path, tmp_path: Path) -> None:
    b = _copy_run(tiny_run, tmp_path / "b")
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(3))
    _permuted_sae(tiny_run, b / "sae", perm)
    result, t = _compare(tiny_run, b, tmp_path / "cmp")
    assert result["same_activations"]  # (b's LM is a copy of a's: the same weights)
    assert result["decoder_cosine"]["a_in_b"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(t["decoder_cosine.b_index"], perm)  # B's feature j is A's perm[j]
    assert torch.equal(t["decoder_cosine.a_index"][perm], torch.arange(128))
    corr = result["activation_correlation"]
    fired = t["density.a"] > 0
    assert corr["tokens"] == 2048 - 2048 // 32  # eval.tokens, position 0 of each context left out
    assert corr["never_fired"]["a"] == corr["never_fired"]["b"] == int((~fired).sum())
    torch.testing.assert_close(t["activation_correlation.a_value"][fired], torch.ones(int(fired.sum())))
    assert torch.isnan(t["activation_correlation.a_value"][~fired]).all()
    assert torch.equal(t["density.b"], t["density.a"][perm])
    # on one context some features fire on fewer than 10 tokens: the *_fired_10 summaries leave them out
    short, ts = _compare(tiny_run, b, tmp_path / "short", "--tokens", "32")
    corr_s = short["activation_correlation"]
    fires = (ts["density.a"].double() * corr_s["tokens"]).round()
    assert 0 < int((fires >= 10).sum()) < int((fires > 0).sum())  # (both kinds)
    assert corr_s["a_in_b"]["defined"] == int((fires > 0).sum())
    assert corr_s["a_in_b_fired_10"]["defined"] == corr_s["b_in_a_fired_10"]["defined"] == int((fires >= 10).sum())
    assert corr_s["a_in_b_fired_10"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert corr["a_partners"] == {"0": int((~fired).sum()), "1": int(fired.sum()), "2-3": 0, "4+": 0}
    assert result["splits"]["features"] == []  # (a permutation splits nothing)
    for measure in ("decoder_cosine", "activation_correlation"):  # every feature in one band
        assert sum(band["features"] for band in result[measure]["a_by_density"].values()) == 128
    assert result["activation_correlation"]["a_by_density"]["never fired"]["features"] == int((~fired).sum())
    # loss recovered, paired: B's eval.json (copied from A) describes A's SAE, not B's permuted one
    assert "describes an earlier SAE: run `sae-stream eval" in result["loss_recovered"]["skipped"]


def test_compare__paired_loss_recovered_from_the_two_evals(tiny_run: Path, tmp_path: Path) -> None:
    b = _copy_run(tiny_run, tmp_path / "b")
    sae = load_saelens(tiny_run / "sae")
    perm = torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the same SAE, its features in another order: the same reconstructions up to rounding
        sae.W_enc_DF.copy_(sae.W_enc_DF[:, perm])
        sae.b_enc_F.copy_(sae.b_enc_F[perm])
        sae.W_dec_FD.copy_(sae.W_dec_FD[perm])
    export_saelens(sae, b / "sae", "blocks.0.mlp.hook_post", model_name=str(tiny_run / "lm"))
    assert main(["eval", str(b)]) == 0
    paired = _compare(tiny_run, b, tmp_path / "paired", "--no-correlation")[0]["loss_recovered"]
    own = json.loads((tiny_run / "eval.json").read_text())["ce_loss_recovered"]
    for name in ("zero", "mean"):
        assert paired["a"][name] == pytest.approx(own[name], rel=1e-12)
        assert abs(paired["b_minus_a"][name]) < 1e-6
        lo, hi = paired["b_minus_a_ci95"][name]
        assert lo <= paired["b_minus_a"][name] <= hi and hi - lo < 1e-5


def test_compare__another_lm_skips_decoders_and_runs_both_lms(tiny_run: Path, tmp_path: Path) -> None:
    b = _copy_run(tiny_run, tmp_path / "b")
    weights = load_file(b / "lm/model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
               else v for k, v in weights.items()}, b / "lm/model.safetensors")
    result, t = _compare(tiny_run, b, tmp_path / "cmp")
    assert not result["same_activations"] and "different LMs" in result["decoder_cosine"]["skipped"]
    assert "decoder_cosine.a_value" not in t
    value = t["activation_correlation.a_value"]
    value = value[~value.isnan()]
    assert value.median() > 0.8 and value.min() < 0.999  # the same SAE on a perturbed LM: close, not identical


def test_compare__saelens_dirs_and_another_hook(tiny_run: Path, tmp_path: Path) -> None:
    sae = build_sae(SAEConfig(d_sae=16), d_in=32, seed=0)  # on the residual stream (d_model 32)
    resid = export_saelens(sae, tmp_path / "resid", "blocks.0.hook_resid_post", model_name=str(tiny_run / "lm"))
    result, t = _compare(tiny_run, resid, tmp_path / "cmp")
    assert "different hooks" in result["decoder_cosine"]["skipped"]
    assert result["b"]["hook_name"] == "blocks.0.hook_resid_post" and result["b"]["d_sae"] == 16
    assert t["activation_correlation.a_value"].shape == (128,) and t["activation_correlation.b_value"].shape == (16,)
    corr = result["activation_correlation"]
    for side, density in (("a_in_b", t["density.a"]), ("b_in_a", t["density.b"])):  # each side its own fire counts
        often = int(((density.double() * corr["tokens"]).round() >= 10).sum())
        assert corr[f"{side}_fired_10"]["defined"] == often
    # two SAELens directories: no LM, so decoder cosines only (the run's own sae/ against itself)
    with pytest.warns(UserWarning, match="hold the same SAE"):
        result, t = _compare(tiny_run / "sae", tiny_run / "sae", tmp_path / "cmp2")
    assert "run directory" in result["activation_correlation"]["skipped"]
    assert torch.equal(t["decoder_cosine.a_index"], torch.arange(128))


def test_compare__saelens_exports_borrow_the_runs_lm(tiny_run: Path, tmp_path: Path) -> None:
    """A run's own sae/ (the same SAE: exact matches, and a warning), and a copy whose cfg.json keeps hook and model
    only under `metadata` (SAELens 6) and names an LM path that is gone: both read the run's LM."""
    with pytest.warns(UserWarning, match="hold the same SAE"):
        result, t = _compare(tiny_run, tiny_run / "sae", tmp_path / "own")
    fired = t["density.a"] > 0
    torch.testing.assert_close(t["activation_correlation.a_value"][fired], torch.ones(int(fired.sum())))
    assert result["same_activations"] and result["decoder_cosine"]["a_in_b"]["mean"] == pytest.approx(1.0)
    moved = shutil.copytree(tiny_run / "sae", tmp_path / "elsewhere" / "exported")
    cfg = json.loads((moved / "cfg.json").read_text())
    nested = {"hook_name": cfg.pop("hook_name"), "model_name": "/gone/lm"}
    cfg.pop("model_name")
    cfg["metadata"] = {**cfg.get("metadata", {}), **nested}
    (moved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="hold the same SAE"):  # (--overwrite of nothing: fine)
        result, t = _compare(tiny_run, moved, tmp_path / "moved", "--overwrite")
    assert result["same_activations"] and result["b"]["hook_name"] == "blocks.0.mlp.hook_post"
    torch.testing.assert_close(t["activation_correlation.b_value"][fired], torch.ones(int(fired.sum())))
    with pytest.warns(UserWarning, match="hold the same SAE"):  # (and replaces the one before)
        result, t = _compare(tiny_run, moved, tmp_path / "moved", "--overwrite", "--no-correlation")
    assert "skipped" in result["activation_correlation"]
    assert result["density_source"].startswith("training")  # (the exports' sparsity.safetensors, both the same)
    assert sum(band["features"] for band in result["decoder_cosine"]["a_by_density"].values()) == 128
    assert torch.equal(t["density.a"], t["density.b"]) and (t["density.a"] > 0).any()


def test_analyze__features_shows_exactly_those(tiny_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    run = _copy_run(tiny_run, tmp_path / "run", dashboard=True)
    main_page = (run / "dashboard/index.html").read_bytes()
    assert main(["analyze", str(run), "--features", "7,3,7", "--analysis.ablation=false"]) == 0
    page = (run / "dashboard-features/index.html").read_text()
    assert re.findall(r'<section class="feature" id="f(\d+)"', page) == ["7", "3"]
    assert (run / "dashboard/index.html").read_bytes() == main_page  # the run's own dashboard stays
    for bad, needle in (("3,128", "--features 128 is not a feature of this SAE: ids run from 0 to 127"),
                        ("3,x", "give feature ids separated by commas")):
        capsys.readouterr()
        assert main(["analyze", str(run), "--features", bad]) == 2
        assert needle in capsys.readouterr().err


def test_compare__bad_input_exits_2_and_keeps_what_is_there(tiny_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # (without --out, compare writes runs/compare-*/ here)
    resid = export_saelens(build_sae(SAEConfig(d_sae=16), d_in=32, seed=0), tmp_path / "resid",
                           "blocks.0.hook_resid_post")
    cases = [([str(tmp_path / "nowhere"), str(tiny_run)], "neither a run directory"),
             ([str(resid), str(tiny_run / "sae"), "--no-correlation"], "nothing to compare"),
             ([str(tiny_run), str(tiny_run), "--tokens", "0"], "--tokens must be positive"),
             ([str(tiny_run), str(tiny_run), "--out", str(tiny_run)], "exists: pass --overwrite"),
             ([str(tiny_run), str(tiny_run), "--out", str(tiny_run), "--overwrite"], "not the output of")]
    before = sorted(p.name for p in tiny_run.iterdir())
    for args, needle in cases:
        assert main(["compare", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tiny_run.iterdir()) == before
    assert list((tmp_path / "cwd").iterdir()) == []  # not even an empty default runs/


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compare__runs_saved_for_different_devices_share_the_gpu_lm(tiny_run: Path, tmp_path: Path) -> None:
    """B's config says cpu, A's the GPU: B borrows A's LM on the GPU, and its SAE follows it there."""
    b = _copy_run(tiny_run, tmp_path / "b")
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["train"]["device"] = "cpu"
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.warns(UserWarning, match="hold the same SAE"):
        result, t = _compare(tiny_run, b, tmp_path / "cmp")  # (A: train.device auto, the GPU)
    fired = t["density.a"] > 0
    torch.testing.assert_close(t["activation_correlation.b_value"][fired], torch.ones(int(fired.sum())))
