"""The paired loss-recovered comparison of two evals (sae_stream/paired.py), on per-context losses made here."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_stream.evaluate import _bootstrap_recovered
from sae_stream.paired import paired_loss_recovered

CONTEXT_LEN, CONTEXTS = 128, 400


def _shared(seed: int = 0) -> dict[str, torch.Tensor]:
    """Clean and ablated CE sums per context, and how hard each context is for any SAE (`hard`, not a file's):
    all vary from context to context, as text does."""
    g = torch.Generator().manual_seed(seed)
    clean = (3.0 + 2.0 * torch.rand(CONTEXTS, generator=g, dtype=torch.float64)) * (CONTEXT_LEN - 1)
    hard = torch.empty(CONTEXTS, dtype=torch.float64).exponential_(generator=g)
    return {"clean": clean, "zero_ablation": clean * 2.2, "mean_ablation": clean * 1.5, "hard": hard}


def _run(path: Path, shared: dict[str, torch.Tensor], sae_C: torch.Tensor, **ev) -> Path:
    """A run directory with what an eval writes for these per-context sums (eval.json's fields paired.py reads)."""
    path.mkdir(parents=True)
    save_file({f"ce_{k}_C": v for k, v in {**shared, "sae": sae_C}.items() if k != "hard"},
              path / "eval_ce.safetensors")
    contexts, predictions = len(sae_C), len(sae_C) * (CONTEXT_LEN - 1)
    ce = {k: float(v.sum()) / predictions for k, v in {**shared, "sae": sae_C}.items() if k != "hard"}
    ce = {k: v if math.isfinite(v) else None for k, v in ce.items()}  # (as eval.json holds a diverged SAE's NaN)
    (path / "eval.json").write_text(json.dumps({
        "tokens": contexts * CONTEXT_LEN, "contexts": contexts, "predictions": predictions, "ce_loss": ce,
        "hook_name": "blocks.0.mlp.hook_post", "skip_first_position": True,
        "ce_per_context_file": "eval_ce.safetensors", **ev}))
    return path


def _sae_sums(shared: dict[str, torch.Tensor], share: float, noise: float, seed: int) -> torch.Tensor:
    """An SAE losing about `share` of the zero-ablation gap, more on the hard contexts, with noise of its own."""
    g = torch.Generator().manual_seed(seed)
    gap = shared["zero_ablation"] - shared["clean"]
    own = noise * torch.randn(CONTEXTS, generator=g, dtype=torch.float64)
    return shared["clean"] + gap * share * (shared["hard"] + own)


def test_paired__difference_by_hand_and_narrower_than_the_separate_intervals(tmp_path: Path) -> None:
    shared = _shared()
    # B loses a tenth less of the gap than A on every context, plus a little noise of each own
    a_C, b_C = _sae_sums(shared, 0.010, 0.05, 1), _sae_sums(shared, 0.009, 0.05, 2)
    a, b = _run(tmp_path / "a", shared, a_C), _run(tmp_path / "b", shared, b_C)
    r = paired_loss_recovered(a, b)
    for name, ablated in (("zero", shared["zero_ablation"]), ("mean", shared["mean_ablation"])):
        gap = float((ablated - shared["clean"]).sum())
        assert r["a"][name] == pytest.approx(float((ablated - a_C).sum()) / gap, rel=1e-12)
        assert r["b"][name] == pytest.approx(float((ablated - b_C).sum()) / gap, rel=1e-12)
        assert r["b_minus_a"][name] == pytest.approx(r["b"][name] - r["a"][name], abs=1e-12)
        lo, hi = r["b_minus_a_ci95"][name]
        assert 0 < lo < r["b_minus_a"][name] < hi  # B is better, and the interval says so
        # the interval written out: blocks of 1024 tokens (8 contexts), drawn as eval's bootstrap draws them, and
        # each resample's difference over that resample's own ablation gap
        g = torch.Generator().manual_seed(0)
        picks_SK = torch.cat([torch.randint(0, CONTEXTS // 8, (50, CONTEXTS // 8), generator=g) for _ in range(20)])
        a_S, b_S, abl_S, clean_S = (c.view(-1, 8).sum(1)[picks_SK].sum(1) for c in (a_C, b_C, ablated, shared["clean"]))
        diff_S = (a_S - b_S) / (abl_S - clean_S)
        want = torch.quantile(diff_S, torch.tensor([0.025, 0.975], dtype=torch.float64))
        assert [lo, hi] == pytest.approx(want.tolist(), rel=1e-9)
        assert r["resamples_b_better"][name] == pytest.approx(float((diff_S > 0).double().mean()))
        # unpaired, each SAE's own interval is wide: which contexts the resample holds swamps the difference
        sums = [torch.stack([shared["clean"], c, shared["zero_ablation"], shared["mean_ablation"]]) for c in (a_C, b_C)]
        own = [_bootstrap_recovered(s, CONTEXT_LEN)[name] for s in sums]
        assert own[0][1] > own[1][0]  # (the two separate intervals overlap)
        assert hi - lo < 0.5 * min(own[0][1] - own[0][0], own[1][1] - own[1][0])
    assert r["resamples_b_better"]["zero"] == 1.0
    # swapped: the same resamples, so the difference and its interval change sign exactly
    swapped = paired_loss_recovered(b, a)
    assert swapped["b_minus_a"]["zero"] == pytest.approx(-r["b_minus_a"]["zero"], abs=1e-15)
    assert swapped["b_minus_a_ci95"]["zero"] == pytest.approx([-hi for hi in r["b_minus_a_ci95"]["zero"][::-1]])


def test_paired__the_same_sae_differs_by_nothing(tmp_path: Path) -> None:
    shared = _shared()
    sae_C = _sae_sums(shared, 0.01, 0.05, 1)
    r = paired_loss_recovered(_run(tmp_path / "a", shared, sae_C), _run(tmp_path / "b", shared, sae_C))
    assert r["b_minus_a"] == {"zero": 0.0, "mean": 0.0}
    assert r["b_minus_a_ci95"]["zero"] == [0.0, 0.0] and r["resamples_b_better"]["zero"] == 0.0


def test_paired__other_contexts_or_missing_evals_are_skipped_with_the_reason(tmp_path: Path) -> None:
    shared, other = _shared(0), _shared(1)
    a = _run(tmp_path / "a", shared, _sae_sums(shared, 0.01, 0.05, 1))
    b = _run(tmp_path / "b", other, _sae_sums(other, 0.01, 0.05, 1))
    assert "read different held-out contexts or LMs" in paired_loss_recovered(a, b)["skipped"]
    (tmp_path / "c").mkdir()
    assert paired_loss_recovered(a, tmp_path / "c")["skipped"] == f"B has no eval: run `sae-stream eval {tmp_path}/c`"
    assert "A is not a run directory" in paired_loss_recovered(None, b)["skipped"]
    c = _run(tmp_path / "c2", shared, _sae_sums(shared, 0.01, 0.05, 2), hook_name="blocks.0.hook_resid_post")
    assert paired_loss_recovered(a, c)["skipped"] == (
        "the two SAEs were evaluated at different hooks (blocks.0.mlp.hook_post and blocks.0.hook_resid_post): "
        "loss recovered is paired only on the same ablations")
    # per-context losses that are not this eval's: none named (an older eval), or another count of contexts
    for d, ev in ((tmp_path / "old", {"ce_per_context_file": None}), (tmp_path / "other", {"contexts": 10})):
        _run(d, shared, _sae_sums(shared, 0.01, 0.05, 2), **ev)
        assert paired_loss_recovered(a, d)["skipped"] == ("B's eval has no per-context losses of its own: run "
                                                          f"`sae-stream eval {d}` again")
    stale = _run(tmp_path / "stale", shared, _sae_sums(shared, 0.01, 0.05, 2))  # another SAE's file, same contexts
    shutil.copy(a / "eval_ce.safetensors", stale / "eval_ce.safetensors")
    assert "has no per-context losses of its own" in paired_loss_recovered(a, stale)["skipped"]
    (b / "eval_ce.safetensors").unlink()
    assert "has no per-context losses of its own" in paired_loss_recovered(b, a)["skipped"]


def test_paired__one_block_gives_points_and_no_interval(tmp_path: Path) -> None:
    shared = {k: v[:8] for k, v in _shared().items()}  # 8 contexts of 128 tokens: one block of 1024
    a_C, b_C = shared["clean"] * 1.1, shared["clean"] * 1.05
    r = paired_loss_recovered(_run(tmp_path / "a", shared, a_C), _run(tmp_path / "b", shared, b_C))
    assert r["b_minus_a"]["zero"] > 0
    assert r["b_minus_a_ci95"] == r["resamples_b_better"] == {"zero": None, "mean": None}


def test_paired__a_diverged_sae_gives_nan_not_an_error(tmp_path: Path) -> None:
    shared = _shared()
    a = _run(tmp_path / "a", shared, _sae_sums(shared, 0.01, 0.05, 1))
    nan_C = _sae_sums(shared, 0.01, 0.05, 2)
    nan_C[3] = float("nan")
    r = paired_loss_recovered(a, _run(tmp_path / "b", shared, nan_C))
    assert "skipped" not in r and math.isnan(r["b_minus_a"]["zero"]) and math.isnan(r["b"]["zero"])
    assert r["a"]["zero"] == pytest.approx(paired_loss_recovered(a, a)["a"]["zero"])
