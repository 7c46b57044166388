"""Anthropic resampling: dead features come back, nothing else changes (weights and Adam moments bit-for-bit)."""

from __future__ import annotations

import pytest
import torch

from sae_stream.config import ResampleConfig, SAEConfig
from sae_stream.resample import FiringTracker, per_input_loss, resample_dead_, resample_steps
from sae_stream.sae import build_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_sae_with_dead(d_in=16, d_sae=48, dead=(2, 5, 17, 40), steps=5):
    """An SAE with some features forced dead (b_enc very negative) and Adam moments populated; the optimizer's
    parameter list is deliberately in an unusual order, so a reset by list position would hit the wrong tensors."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="anthropic", d_sae=d_sae, l1_coeff=1e-3), d_in=d_in)
    with torch.no_grad():
        sae.b_enc_F[list(dead)] = -1e4
    params = [sae.b_dec_D, sae.W_dec_FD, sae.b_enc_F, sae.W_enc_DF]
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(steps):
        sae(torch.randn(64, d_in)).loss.backward()
        opt.step()
        opt.zero_grad()
    dead_F = torch.zeros(d_sae, dtype=torch.bool)
    dead_F[list(dead)] = True
    return sae, opt, dead_F


def _snapshot(sae, opt):
    snap = {}
    for name, p in sae.named_parameters():
        snap[name] = p.detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            snap[f"{name}.{key}"] = opt.state[p][key].clone()
    return snap


def test_resample__dead_fire_again_and_alive_untouched_bit_for_bit():
    sae, opt, dead_F = _trained_sae_with_dead()
    pool = torch.randn(2048, 16) * 3
    before = _snapshot(sae, opt)
    assert (sae.encode(pool)[:, dead_F] > 0).sum() == 0
    cfg = ResampleConfig(pool_size=2048, encoder_scale=0.2)
    n = resample_dead_(sae, opt, dead_F, lambda k: pool[:k], cfg, torch.Generator().manual_seed(0))
    assert n == int(dead_F.sum())
    after = _snapshot(sae, opt)
    alive = ~dead_F
    for key in ("W_enc_DF", "W_enc_DF.exp_avg", "W_enc_DF.exp_avg_sq"):
        assert torch.equal(before[key][:, alive], after[key][:, alive]), key
    for key in ("W_dec_FD", "b_enc_F", "W_dec_FD.exp_avg", "W_dec_FD.exp_avg_sq", "b_enc_F.exp_avg",
                "b_enc_F.exp_avg_sq"):
        assert torch.equal(before[key][alive], after[key][alive]), key
    for key in ("b_dec_D", "b_dec_D.exp_avg", "b_dec_D.exp_avg_sq"):
        assert torch.equal(before[key], after[key]), key
    # the changed rows/columns: moments zeroed, b_enc zeroed, decoder = a pool input's direction
    for key in ("W_dec_FD.exp_avg", "W_dec_FD.exp_avg_sq", "b_enc_F.exp_avg", "b_enc_F.exp_avg_sq"):
        assert torch.all(after[key][dead_F] == 0), key
    for key in ("W_enc_DF.exp_avg", "W_enc_DF.exp_avg_sq"):
        assert torch.all(after[key][:, dead_F] == 0), key
    assert torch.all(sae.b_enc_F[dead_F] == 0)
    dirs = pool / pool.norm(dim=1, keepdim=True)
    best = (sae.W_dec_FD[dead_F].detach() @ dirs.T).max(dim=1).values
    torch.testing.assert_close(best, torch.ones_like(best))
    # encoder columns: same direction, norm = 0.2 x mean alive encoder norm
    enc = sae.W_enc_DF.detach()
    mean_alive = before["W_enc_DF"][:, alive].norm(dim=0).mean()
    torch.testing.assert_close(enc[:, dead_F].norm(dim=0), (0.2 * mean_alive).expand(int(dead_F.sum())))
    torch.testing.assert_close(enc[:, dead_F].T / enc[:, dead_F].norm(dim=0)[:, None], sae.W_dec_FD[dead_F].detach())
    fires = (sae.encode(pool)[:, dead_F] > 0).sum(dim=0)
    assert torch.all(fires > 0)


def test_resample__an_empty_pool_warns_and_changes_nothing():
    # a finite stream drained right at a resampling step gives no pool: training goes on to its end-of-stream message
    sae, opt, dead_F = _trained_sae_with_dead()
    before = _snapshot(sae, opt)
    with pytest.warns(UserWarning, match="4 dead features not resampled: the resampling pool is empty"):
        n = resample_dead_(sae, opt, dead_F, lambda k: torch.zeros(0, 16), ResampleConfig(pool_size=2048),
                           torch.Generator().manual_seed(0))
    assert n == 0
    after = _snapshot(sae, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resample__picks_in_proportion_to_loss_squared():
    torch.manual_seed(0)
    d_sae = 3000
    sae = build_sae(SAEConfig(architecture="anthropic", d_sae=d_sae), d_in=4)
    opt = torch.optim.Adam(sae.parameters())
    pool = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    loss = per_input_loss(sae, pool)
    p_first = (loss[0] ** 2 / (loss ** 2).sum()).item()
    dead_F = torch.ones(d_sae, dtype=torch.bool)  # more dead than inputs: drawn with replacement
    resample_dead_(sae, opt, dead_F, lambda k: pool, ResampleConfig(pool_size=2), torch.Generator().manual_seed(1))
    frac_first = (sae.W_dec_FD[:, 0] > 0.99).float().mean().item()
    sigma = (p_first * (1 - p_first) / d_sae) ** 0.5
    assert abs(frac_first - p_first) < 4 * sigma + 1e-3


def test_per_input_loss__chunked_equals_direct_and_accepts_bf16_pool():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_sae=32), d_in=8)
    pool = torch.randn(100, 8)
    direct = (sae.decode(sae.encode(pool)) - pool).pow(2).sum(dim=1)
    torch.testing.assert_close(per_input_loss(sae, pool, chunk=7), direct.detach())
    bf = pool.bfloat16()
    torch.testing.assert_close(per_input_loss(sae, bf, chunk=7),
                               (sae.decode(sae.encode(bf.float())) - bf.float()).pow(2).sum(dim=1).detach())


def test_resample_steps__fractions_explicit_and_bounds():
    assert resample_steps(ResampleConfig(), 1_000_000) == [25_000, 50_000, 75_000, 100_000]
    with pytest.warns(UserWarning, match=r"resample.at_steps \[100, 500\] at or past the run's last step \(100\): "
                                         "never reached"):
        assert resample_steps(ResampleConfig(at_steps=[30, 10, 10, 500, 100]), 100) == [10, 30]
    assert resample_steps(ResampleConfig(at_fractions=[0.001]), 100) == []  # rounds to step 0: never


def test_firing_tracker__dead_window_capped_by_last_resample():
    tr = FiringTracker(3)
    tr.update_(torch.tensor([True, False, False]), step=1)
    tr.update_(torch.tensor([False, True, False]), step=8)
    assert tr.resample_dead_mask(step=10, dead_window=5).tolist() == [True, False, True]
    assert tr.resample_dead_mask(step=10, dead_window=100).tolist() == [False, False, True]
    tr.last_resample_step = 9  # only the one step since the last resample counts
    assert tr.resample_dead_mask(step=10, dead_window=100).tolist() == [True, True, True]
