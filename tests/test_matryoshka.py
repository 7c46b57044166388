"""Matryoshka losses (sae.matryoshka) on TopK / BatchTopK SAEs: what training with them does to the nested
dictionaries, export, the config (the loss and its gradients against a reference: test_sae.py; eval's per-level
figures: test_evaluate.py)."""

from __future__ import annotations

import pytest
import torch

from sae_stream.config import ConfigError, SAEConfig, config_from_dict
from sae_stream.export import export_saelens, load_saelens
from sae_stream.fused_ops import firing_counts
from sae_stream.metrics import RunningMetrics
from sae_stream.sae import build_sae
from sae_stream.topk_kernels import Selected, SparseDecode, by_group
from sae_stream.trainer import Trainer
from tests._trainer_helpers import D_IN, ListLogger, _atoms, _cfg, sparse_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("via", ["spmm", "index"])
def test_by_group__one_decode_gives_each_groups_part_of_each_row(via):
    """Row 1 empty, row 0 without group 1, a column on a bound (4, 8): each (row, group) part of the one decode
    equals the sum over that row's entries in that group, and so do the gradients."""
    rows, cols = torch.tensor([0, 0, 2, 2, 2, 3, 3]), torch.tensor([1, 3, 4, 5, 8, 0, 9])
    offsets = torch.searchsorted(rows, torch.arange(4))
    sel, bounds = Selected(rows, cols, offsets, (4, 10)), (0, 4, 8, 10)
    grouped = by_group(sel, bounds)
    assert grouped.rows_N.tolist() == [0, 0, 7, 7, 8, 9, 11] and grouped.shape == (12, 10)
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(7, generator=g, requires_grad=True)
    W = torch.randn(10, 3, generator=g, requires_grad=True)
    out = SparseDecode.apply(vals, W, grouped, via).view(4, 3, 3)
    want = torch.zeros(4, 3, 3)
    for r, c, v in zip(rows.tolist(), cols.tolist(), vals):
        want[r, sum(c >= b for b in bounds[1:-1])] += v * W[c]
    torch.testing.assert_close(out, want)
    weights = torch.randn(4, 3, 3, generator=g)
    got = torch.autograd.grad((out * weights).sum(), (vals, W))
    for a, b in zip(got, torch.autograd.grad((want * weights).sum(), (vals, W))):
        torch.testing.assert_close(a, b)
    assert by_group(sel, (0, 10)) is sel


def _fvu(sae, x, m: int | None = None) -> float:
    sae.eval()
    with torch.no_grad():
        f = sae.encode(x)
        if m is not None:
            f = f * (torch.arange(f.shape[1]) < m)
        r = sae.decode(f)
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_matryoshka_training__the_first_features_learn_to_reconstruct_alone():
    """Sparse codes over 64 known atoms: a plain BatchTopK SAE spreads them over all its features, so its first 8 or
    24 alone explain little; with Matryoshka levels [8, 24] those prefixes were trained to reconstruct alone."""
    atoms = _atoms()
    x = next(sparse_batches(atoms, seed=99, batch=4096))
    fvu = {}
    for name, over in (("plain", {}), ("matryoshka", {"sae__matryoshka": [8, 24]})):
        cfg = _cfg("batchtopk", steps=300, train__log_every=100, **over)
        sae = build_sae(cfg.sae, D_IN)
        log = ListLogger()
        Trainer(sae, cfg, None, log).fit(sparse_batches(atoms))
        fvu[name] = (_fvu(sae, x, 8), _fvu(sae, x, 24), _fvu(sae, x))
        levels = {k for _, m in log.rows for k in m if k.startswith("fvu_first_")}
        assert levels == ({"fvu_first_8", "fvu_first_24"} if over else set()), levels  # (logged as training goes)
    (plain8, plain24, plain_all), (mat8, mat24, mat_all) = fvu["plain"], fvu["matryoshka"]
    assert mat8 < plain8 - 0.1 and mat24 < plain24 - 0.15, fvu
    assert mat_all < 0.3 and plain_all < 0.2, fvu  # the whole dictionary still reconstructs (a little worse)
    # the last interval's logged prefix FVUs track the trained SAE's (its last batches, not the held-out one)
    last = log.rows[-1][1]
    assert last["fvu_first_8"] == pytest.approx(mat8, abs=0.1) and last["fvu_first_24"] == pytest.approx(mat24, abs=0.1)


class _TwoRanks:
    """Two ranks that saw the same batches: all-reduce doubles."""
    world_size = 2

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t.mul_(2)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_matryoshka_metrics__each_level_fvu_is_its_prefix_reconstructions(arch):
    """fvu_first_<m> of one step = Σ‖x − (b_d + Σ_{f<m} f·W_d,f)‖² / Σ‖x − x̄‖², from the step's own features; the
    whole dictionary's is `fvu` (no fvu_first_<d_sae>); across ranks (summary_across) the same figures."""
    cfg = _cfg(arch, steps=1, sae__matryoshka=[8, 24])
    sae = build_sae(cfg.sae, D_IN)
    x = next(sparse_batches(_atoms(), seed=3, batch=256))
    out = sae(x)
    summaries = []
    for across in (False, True):
        m = RunningMetrics(sae.d_sae, torch.device("cpu"), cfg.train, bins=10, levels=cfg.sae.matryoshka_sizes)
        m.accumulate_(out, x, firing_counts(out.feats.detach()), sae.input_scale)
        m.count_(len(x))
        summaries.append(m.summary_across(_TwoRanks())[0] if across else m.summary())
    got, two = summaries
    var = (x - x.mean(0)).pow(2).sum()
    with torch.no_grad():
        for level in (8, 24, sae.d_sae):
            recon = (out.feats * (torch.arange(sae.d_sae) < level)) @ sae.W_dec_FD + sae.b_dec_D
            key = "fvu" if level == sae.d_sae else f"fvu_first_{level}"
            assert got[key] == pytest.approx(float((x - recon).pow(2).sum() / var), rel=1e-5), key
            assert two[key] == pytest.approx(got[key], rel=1e-9), key
    assert not any(k.startswith("fvu_first_") and k not in ("fvu_first_8", "fvu_first_24") for k in got)


def test_matryoshka__export_keeps_the_levels(tmp_path):
    sae = build_sae(SAEConfig(architecture="batchtopk", d_sae=32, k=4, matryoshka=[4, 16]), d_in=8)
    export_saelens(sae, tmp_path / "sae", hook_name="blocks.0.mlp.hook_post")
    assert load_saelens(tmp_path / "sae").cfg.matryoshka == [4, 16]


@pytest.mark.parametrize(("over", "message"), [
    ({"architecture": "anthropic", "matryoshka": [8]}, "is for sae.architecture=topk or batchtopk, not anthropic"),
    ({"architecture": "batchtopk", "matryoshka": [64, 16]}, "must be increasing sizes between 1 and sae.d_sae (128)"),
    ({"architecture": "topk", "matryoshka": [0, 16]}, "must be increasing sizes"),
    ({"architecture": "topk", "matryoshka": [8, 200]}, "must be increasing sizes"),
    ({"architecture": "topk", "matryoshka": [128]}, "needs a size below sae.d_sae (128; the whole dictionary is "
                                                    "the last level anyway), e.g. [8, 32], got [128] (null turns the "
                                                    "levels off)"),
    ({"architecture": "topk", "matryoshka": [2000]}, "must be increasing sizes between 1 and sae.d_sae (128)"),
    ({"architecture": "topk", "matryoshka": []}, "needs a size below sae.d_sae (128;"),
])
def test_matryoshka_config__bad_levels_are_one_line_errors(over, message):
    with pytest.raises(ConfigError, match="^sae.matryoshka ") as e:
        config_from_dict({"sae": {"d_sae": 128, **over}})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_matryoshka_config__d_sae_may_close_the_list_and_a_sweep_member_keeps_every_level():
    cfg = config_from_dict({"sae": {"architecture": "topk", "d_sae": 128, "matryoshka": [8, 32, 128]},
                            "sweep": {"saes": [{"name": "wide", "sae": {"d_sae": 512}}]}})
    assert cfg.sae.matryoshka_sizes == [8, 32] and cfg.sae.matryoshka == [8, 32, 128]
    (_, wide), = cfg.sweep_members()
    assert wide.sae.matryoshka_sizes == [8, 32, 128]  # (the base's 128 is a level of the wider member)
    assert build_sae(wide.sae, d_in=8).bounds == (0, 8, 32, 128, 512)
    assert SAEConfig(architecture="topk", d_sae=128).matryoshka_sizes == []


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_matryoshka_eval_forward__loss_and_prefix_mse_from_each_prefix_decode(arch):
    """In eval mode (BatchTopK: its threshold) forward's loss is the whole MSE plus each level's, as in training,
    and prefix_decodes (eval's per-level reconstructions, one decode split by level) equals the masked decodes."""
    cfg = _cfg(arch, steps=1, sae__matryoshka=[8, 24])
    sae = build_sae(cfg.sae, D_IN)
    x = next(sparse_batches(_atoms(), seed=5, batch=128))
    sae.train()
    sae(x)  # (BatchTopK: one training forward sets its threshold)
    sae.eval()
    with torch.no_grad():
        out = sae(x)
        f_F = torch.arange(sae.d_sae)
        want = [(out.feats * (f_F < m)) @ sae.W_dec_FD + sae.b_dec_D for m in (8, 24)]
        got = sae.prefix_decodes(out.feats)
    assert len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    mse_L = torch.stack([(x - w).pow(2).mean() for w in want])
    torch.testing.assert_close(out.prefix_mse, mse_L, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.loss, out.mse + mse_L.sum(), rtol=1e-5, atol=1e-8)
    plain = build_sae(_cfg(arch, steps=1).sae, D_IN).eval()
    assert plain.prefix_decodes(out.feats) == [] and plain(x).prefix_mse is None
