"""SAE architectures: losses against hand computations, decoder surgery, TopK / BatchTopK sparsity, init."""

from __future__ import annotations

import math

import pytest
import torch

from sae_stream.config import SAEConfig
from sae_stream.geometric_median import geometric_median
from sae_stream.sae import AnthropicSAE, BatchTopKSAE, TopKSAE, build_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _set(sae, W_enc, b_enc, W_dec, b_dec):
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.tensor(W_enc))
        sae.b_enc_F.copy_(torch.tensor(b_enc))
        sae.W_dec_FD.copy_(torch.tensor(W_dec))
        sae.b_dec_D.copy_(torch.tensor(b_dec))


def test_anthropic_loss__matches_hand_computation():
    sae = build_sae(SAEConfig(architecture="anthropic", d_sae=2, l1_coeff=0.5), d_in=2)
    _set(sae, W_enc=[[1.0, -1.0], [2.0, 0.5]], b_enc=[0.1, -0.2], W_dec=[[1.0, 0.0], [0.0, 1.0]], b_dec=[0.5, -0.5])
    x = torch.tensor([[1.5, 0.5], [0.5, 0.5]])
    # row 1: x̄ = (1, 1); pre = (1+2+0.1, -1+0.5-0.2) = (3.1, -0.7); f = (3.1, 0); x̂ = (3.6, -0.5)
    # row 2: x̄ = (0, 1); pre = (2.1, 0.3); f = (2.1, 0.3); x̂ = (2.6, -0.2)
    err = [(3.6 - 1.5) ** 2, (-0.5 - 0.5) ** 2, (2.6 - 0.5) ** 2, (-0.2 - 0.5) ** 2]
    mse = sum(err) / 4  # mean over batch and d_in
    l1 = ((3.1 + 0.0) + (2.1 + 0.3)) / 2  # Σ over features, mean over batch
    out = sae(x)
    torch.testing.assert_close(out.feats, torch.tensor([[3.1, 0.0], [2.1, 0.3]]))
    torch.testing.assert_close(out.recon, torch.tensor([[3.6, -0.5], [2.6, -0.2]]))
    assert out.mse.item() == pytest.approx(mse, rel=1e-6)
    assert out.l1.item() == pytest.approx(l1, rel=1e-6)
    assert out.loss.item() == pytest.approx(mse + 0.5 * l1, rel=1e-6)
    assert out._fields == ("recon", "feats", "loss", "mse", "l1", "aux", "prefix_mse") and out.prefix_mse is None
    assert sae(x, l1_coeff=0.0).loss.item() == pytest.approx(mse, rel=1e-6)


def test_april_loss__l1_weighted_by_decoder_norm_in_scaled_space():
    sae = build_sae(SAEConfig(architecture="april", d_sae=2, l1_coeff=0.1), d_in=2)
    _set(sae, W_enc=[[1.0, 0.0], [0.0, 1.0]], b_enc=[0.0, 0.0], W_dec=[[2.0, 0.0], [0.0, 0.5]], b_dec=[0.0, 0.0])
    sae.input_scale.fill_(2.0)
    x = torch.tensor([[1.0, 3.0]])
    # scaled x = (2, 6); no b_dec subtraction; f = (2, 6); scaled x̂ = (4, 3); recon = (2, 1.5) in raw space
    out = sae(x)
    torch.testing.assert_close(out.feats, torch.tensor([[2.0, 6.0]]))
    torch.testing.assert_close(out.recon, torch.tensor([[2.0, 1.5]]))
    assert out.mse.item() == pytest.approx(((4 - 2) ** 2 + (3 - 6) ** 2) / 2)
    assert out.l1.item() == pytest.approx(2.0 * 2.0 + 6.0 * 0.5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)


def test_init_from_sample__april_scale_gives_sqrt_d_norm_and_b_dec_median():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 7 + 3
    april = build_sae(SAEConfig(architecture="april", d_sae=8, init_b_dec="mean"), d_in=16)
    april.init_from_sample_(x)
    assert (x * april.input_scale).norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-5)
    torch.testing.assert_close(april.b_dec_D, (x * april.input_scale).mean(0))
    anth = build_sae(SAEConfig(architecture="anthropic", d_sae=8), d_in=16)
    anth.init_from_sample_(x)
    assert anth.input_scale.item() == 1.0
    torch.testing.assert_close(anth.b_dec_D, geometric_median(x))


def test_init_from_sample__auto_b_dec_is_zero_for_april_and_the_median_otherwise():
    """init_b_dec=auto (the default): the April update starts b_d at 0; the 2023 recipe at the geometric median."""
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 7 + 3
    for arch in ("april", "anthropic", "topk"):
        sae = build_sae(SAEConfig(architecture=arch, d_sae=32), d_in=16)
        assert sae.cfg.init_b_dec == "auto"
        sae.init_from_sample_(x)
        want = torch.zeros(16) if arch == "april" else geometric_median(x)
        torch.testing.assert_close(sae.b_dec_D, want)


def test_geometric_median__is_robust_and_minimises_distance_sum():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    torch.testing.assert_close(geometric_median(pts), torch.tensor([2.0, 0.0]), atol=1e-3, rtol=0)
    torch.manual_seed(1)
    x = torch.randn(300, 5).pow(3)
    gm = geometric_median(x)
    cost = (x - gm).norm(dim=1).sum()
    for _ in range(20):
        assert cost <= (x - (gm + 0.05 * torch.randn(5))).norm(dim=1).sum() + 1e-4
    assert cost < (x - x.mean(0)).norm(dim=1).sum()


def test_remove_parallel_grad__leaves_zero_component():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="anthropic", d_sae=64), d_in=16)
    sae.W_dec_FD.grad = torch.randn(64, 16)
    before = sae.W_dec_FD.grad.clone()
    sae.remove_parallel_grad_()
    g, w = sae.W_dec_FD.grad, sae.W_dec_FD.detach()
    assert (g * w).sum(dim=1).abs().max() < 1e-6
    # only the parallel part was removed: what was taken out is a multiple of each row
    removed = before - g
    cos = torch.nn.functional.cosine_similarity(removed, w, dim=1).abs()
    assert torch.all(cos > 1 - 1e-4)


def test_normalize_decoder__rows_unit_norm():
    sae = build_sae(SAEConfig(architecture="anthropic", d_sae=32), d_in=8)
    with torch.no_grad():
        sae.W_dec_FD.mul_(torch.linspace(0.1, 5, 32)[:, None])
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(32))


def test_topk__exactly_k_active_per_row_and_they_are_the_largest():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_sae=64, k=5), d_in=16)
    with torch.no_grad():
        sae.b_enc_F.fill_(10.0)  # every pre-activation positive, so TopK is the only sparsifier
    x = torch.randn(32, 16)
    feats = sae.encode(x)
    assert torch.all((feats > 0).sum(dim=1) == 5)
    pre = sae.pre_acts(x)
    kth = pre.topk(5, dim=1).values[:, -1:]
    assert torch.all(feats[feats > 0] == pre[feats > 0])
    assert torch.all((pre >= kth) == (feats > 0))


def test_batchtopk__k_times_batch_active_in_total_and_threshold_for_inference():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_sae=64, k=4), d_in=16)
    assert isinstance(sae, BatchTopKSAE)
    with torch.no_grad():
        sae.b_enc_F.fill_(10.0)
    x = torch.randn(32, 16) * torch.linspace(0.1, 3, 32)[:, None]  # rows of very different size
    sae.train()
    feats = sae(x).feats
    per_row = (feats > 0).sum(dim=1)
    assert int(per_row.sum()) == 4 * 32
    assert per_row.min() != per_row.max()  # batch-level, not per-row, selection
    min_kept = feats[feats > 0].min()
    assert sae.threshold.item() == pytest.approx(min_kept.item())  # first update takes the batch value
    sae.eval()
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))


def test_topk_auxk__gradient_reaches_only_dead_latents():
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="topk", d_sae=32, k=2, auxk_k=4, auxk_coeff=1.0)
    sae = build_sae(cfg, d_in=8)
    assert isinstance(sae, TopKSAE)
    with torch.no_grad():
        sae.b_enc_F.fill_(1.0)
    x = torch.randn(16, 8)
    assert sae(x).aux.item() == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7, 11, 20, 30]] = True
    out = sae(x, dead_F=dead)
    assert out.aux.item() > 0
    out.aux.backward()
    grad_rows = sae.W_dec_FD.grad.abs().sum(dim=1) > 0
    assert grad_rows[dead].any() and not grad_rows[~dead].any()


def test_build_sae__unknown_architecture_is_a_one_line_error():
    cfg = SAEConfig()
    cfg.architecture = "gated"
    with pytest.raises(ValueError, match="unknown sae.architecture 'gated'") as e:
        build_sae(cfg, d_in=8)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="sae.d_in"):
        build_sae(SAEConfig(d_in=16), d_in=8)


def test_build_sae__seeded_kaiming_init_and_unit_decoder():
    a = build_sae(SAEConfig(d_sae=64), d_in=32, seed=3)
    b = build_sae(SAEConfig(d_sae=64), d_in=32, seed=3)
    assert isinstance(a, AnthropicSAE)
    assert torch.equal(a.W_enc_DF, b.W_enc_DF) and torch.equal(a.W_dec_FD, b.W_dec_FD)
    assert a.W_enc_DF.abs().max() <= math.sqrt(6 / 32)
    torch.testing.assert_close(a.W_dec_FD.norm(dim=1), torch.ones(64))
    april = build_sae(SAEConfig(architecture="april", d_sae=64), d_in=32)
    torch.testing.assert_close(april.W_enc_DF, april.W_dec_FD.T)
    assert april.b_enc_F.abs().max() == 0


@pytest.mark.parametrize("kernels", ["spmm", "index", "dense"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("levels", [None, [5, 20]])
def test_topk_forward__sparse_and_dense_paths_match_a_dense_reference(arch, kernels, levels):
    """Both sparse backwards (spmm: CPU default; index: the graph-capturable one used on CUDA) and the dense path;
    with Matryoshka levels, each prefix's reconstruction error is added (decoded by slicing here)."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture=arch, d_sae=64, k=6, auxk_k=6, auxk_coeff=0.5, matryoshka=levels),
                    d_in=16)
    sae.sparse_kernels = kernels != "dense"
    sae.sparse_backward = kernels if kernels != "dense" else None
    with torch.no_grad():
        sae.b_enc_F.normal_(0.0, 0.5)
        sae.b_dec_D.normal_()
    x = torch.randn(24, 16, requires_grad=True)  # the input's gradient too (the kernels' dx branch)
    dead = torch.rand(64) < 0.3
    out = sae(x, dead_F=dead)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    grads["x"], x.grad = x.grad.clone(), None
    sae.zero_grad()
    # dense reference: feats from activate(), decode as a plain matmul, AuxK as a dense masked top-k
    pre = sae.pre_acts(x)
    feats = torch.relu(pre) * (out.feats > 0)
    recon = feats @ sae.W_dec_FD + sae.b_dec_D
    prefix_mse = [(x - feats[:, :m] @ sae.W_dec_FD[:m] - sae.b_dec_D).pow(2).mean() for m in levels or []]
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(6, dim=-1)
    aux_feats = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    aux = (aux_feats @ sae.W_dec_FD - (x - recon).detach()).pow(2).mean()
    mse = (x - recon).pow(2).mean()
    loss = mse + sum(prefix_mse) + 0.5 * aux
    loss.backward()
    assert all((p - mse).abs() > 1e-4 for p in prefix_mse)  # (the test can tell a prefix term from the whole)
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.mse, mse)  # (with levels, the logged MSE stays the whole dictionary's)
    torch.testing.assert_close(out.loss, loss)
    for n, p in [*sae.named_parameters(), ("x", x)]:
        torch.testing.assert_close(grads[n], p.grad, msg=n)
