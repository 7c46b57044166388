"""JumpReLU SAEs: the paper's pseudo-derivatives against hand computation, the loss, training (λ trades L0 for MSE
and the dictionary is found), exact resume, a run end to end. (SAELens files of other writers: test_export.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_stream.config import ConfigError, SAEConfig
from sae_stream.export import load_saelens
from sae_stream.jumprelu import JumpReLUWithL0
from sae_stream.sae import JumpReLUSAE, build_sae
from sae_stream.trainer import Trainer
from tests._trainer_helpers import D_IN, ListLogger, _atoms, _cfg, _recovered, sparse_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def test_jumprelu__pseudo_derivatives_are_the_papers():
    """d/dθ JumpReLU = -(θ/ε)·K((z-θ)/ε), d/dθ H = -(1/ε)·K((z-θ)/ε), K the rectangle; in z: H(z-θ) and 0."""
    eps = 0.2
    theta = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    # feature 0 (θ 0.5): 0.45 and 0.59 are inside the window (|z - θ| < 0.1), 0.35 and 0.7 outside
    # feature 1 (θ 1.0): 0.95 inside (below θ: does not fire), 1.05 inside (fires), 2.0 fires outside
    pre = torch.tensor([[0.45, 0.95], [0.59, 1.05], [0.35, 2.0], [0.7, -1.0]], dtype=torch.float64,
                       requires_grad=True)
    w = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0], [13.0, 17.0]], dtype=torch.float64)
    fires = torch.tensor([[0, 0], [1, 1], [0, 1], [1, 0]], dtype=torch.float64)
    near = torch.tensor([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=torch.float64)

    feats, l0 = JumpReLUWithL0.apply(pre, theta, eps)
    assert torch.equal(feats, pre.detach() * fires) and l0.item() == fires.sum().item() / 4
    (feats * w).sum().backward()  # the features alone
    assert torch.equal(pre.grad, w * fires)
    want = torch.tensor([-(0.5 / eps) * (1.0 + 3.0), -(1.0 / eps) * (2.0 + 5.0)], dtype=torch.float64)
    torch.testing.assert_close(theta.grad, want)

    pre.grad, theta.grad = None, None  # the L0 alone: θ gets -(1/ε)·K per row / B, pre nothing
    feats, l0 = JumpReLUWithL0.apply(pre, theta, eps)
    (0.7 * l0).backward()
    assert pre.grad is None or torch.equal(pre.grad, torch.zeros_like(pre))
    torch.testing.assert_close(theta.grad, -0.7 / (4 * eps) * near.sum(0))

    pre.grad, theta.grad = None, None  # both: the sum
    feats, l0 = JumpReLUWithL0.apply(pre, theta, eps)
    ((feats * w).sum() + 0.7 * l0).backward()
    assert torch.equal(pre.grad, w * fires)
    torch.testing.assert_close(theta.grad, want - 0.7 / (4 * eps) * near.sum(0))


def test_jumprelu_sae__loss_is_mse_plus_lambda_l0_by_hand():
    sae = build_sae(SAEConfig(architecture="jumprelu", d_sae=2, l1_coeff=0.25), d_in=2)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        sae.b_enc_F.copy_(torch.tensor([0.0, -0.5]))
        sae.W_dec_FD.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        sae.b_dec_D.copy_(torch.tensor([0.1, 0.0]))
        sae.log_threshold_F.copy_(torch.tensor([0.5, 0.2]).log())
        sae.input_scale.fill_(2.0)
    x = torch.tensor([[1.0, 0.5], [0.2, 1.0]])
    # scaled x = (2, 1) and (0.4, 2); no b_dec subtraction: pre = (2, 0.5) and (0.4, 1.5)
    # θ = (0.5, 0.2): row 1 keeps (2, 0.5), row 2 keeps (0, 1.5); scaled x̂ = (2.1, 0.5) and (0.1, 1.5)
    out = sae(x)
    torch.testing.assert_close(out.feats, torch.tensor([[2.0, 0.5], [0.0, 1.5]]))
    torch.testing.assert_close(out.recon, torch.tensor([[1.05, 0.25], [0.05, 0.75]]))
    mse = ((2.1 - 2) ** 2 + (0.5 - 1) ** 2 + (0.1 - 0.4) ** 2 + (1.5 - 2) ** 2) / 4
    assert out.mse.item() == pytest.approx(mse, rel=1e-6)
    assert out.l1.item() == 1.5  # the L0 term: 2 + 1 firing features over 2 rows
    assert out.loss.item() == pytest.approx(mse + 0.25 * 1.5, rel=1e-6)
    assert sae(x, l1_coeff=0.0).loss.item() == pytest.approx(mse, rel=1e-6)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)


def test_jumprelu_sae__pre_act_loss_by_hand():
    """λ_P·mean_b Σ_f ReLU(θ_f − pre_bf) joins the loss (aux logs the sum); its gradient lifts the pre-activations
    below θ (−λ_P/B each) and lowers θ (+λ_P/B per such position); off (0) it is not computed."""
    cfg = SAEConfig(architecture="jumprelu", d_sae=2, l1_coeff=0.0, jumprelu_pre_act_coeff=0.5)
    grads = {}
    for coeff in (0.0, 0.5):
        cfg.jumprelu_pre_act_coeff = coeff
        sae = build_sae(cfg, d_in=2)
        with torch.no_grad():
            for p, v in ((sae.W_enc_DF, [[1.0, 0.0], [0.0, 1.0]]), (sae.b_enc_F, [0.0, -0.5]),
                         (sae.W_dec_FD, [[1.0, 0.0], [0.0, 1.0]]), (sae.b_dec_D, [0.1, 0.0])):
                p.copy_(torch.tensor(v))
            sae.log_threshold_F.copy_(torch.tensor([0.5, 2.0]).log())
            sae.input_scale.fill_(2.0)
        # pre = (2, 0.5) and (0.4, 1.5); θ = (0.5, 2): below θ are (row 1, f 1) by 1.5, (row 2, f 0) by 0.1 and
        # (row 2, f 1) by 0.5
        out = sae(torch.tensor([[1.0, 0.5], [0.2, 1.0]]))
        out.loss.backward()
        grads[coeff] = (sae.b_enc_F.grad.clone(), sae.log_threshold_F.grad.clone(), out)
    (b0, t0, off), (b1, t1, on) = grads[0.0], grads[0.5]
    assert off.aux.item() == 0.0 and on.aux.item() == pytest.approx((1.5 + 0.1 + 0.5) / 2, rel=1e-6)
    assert on.loss.item() == pytest.approx(on.mse.item() + 0.5 * on.aux.item(), rel=1e-6)
    torch.testing.assert_close(b1 - b0, torch.tensor([-0.5 * 1 / 2, -0.5 * 2 / 2]))
    theta = torch.tensor([0.5, 2.0])  # d/d log θ = θ·d/dθ
    torch.testing.assert_close(t1 - t0, theta * torch.tensor([0.5 * 1 / 2, 0.5 * 2 / 2]))


def test_jumprelu_sae__pre_act_loss_revives_dead_features():
    """16 of 64 features start dead (b_e = −20: no position reaches θ). Without the pre-act loss nothing reaches
    them and they stay dead, untouched; with it (λ_P = 1e-3) they fire again, while the dictionary is still
    found and L0 stays near the data's ~3."""
    results = {}
    for coeff in (0.0, 1e-3):
        cfg = _cfg("jumprelu", steps=300, sae__l1_coeff=0.1, sae__jumprelu_bandwidth=0.5,
                   sae__jumprelu_init_threshold=0.5, sae__jumprelu_pre_act_coeff=coeff, train__lr=1e-2,
                   train__log_every=100)
        sae = build_sae(cfg.sae, d_in=D_IN, seed=0)
        with torch.no_grad():
            sae.b_enc_F[:16] = -20.0
        start = sae.W_enc_DF[:, :16].clone()
        Trainer(sae, cfg, None, ListLogger()).fit(sparse_batches(_atoms()))
        sae.eval()
        x = torch.cat([b for _, b in zip(range(8), sparse_batches(_atoms(), seed=5))])
        with torch.no_grad():
            fired_F = (sae.encode(x) > 0).any(0)
        results[coeff] = (sae, fired_F, start)
    sae, fired, start = results[0.0]
    assert not fired[:16].any() and torch.equal(sae.W_enc_DF[:, :16], start)
    sae, fired, _ = results[1e-3]
    assert fired[:16].sum() >= 14
    assert _recovered(sae, _atoms()).median() > 0.95
    with torch.no_grad():
        assert (sae.encode(x) > 0).float().sum(-1).mean() < 5


def test_jumprelu_sae__bf16_autocast_keeps_the_threshold_gradients():
    """The encoder runs in fp32 under autocast: bf16 pre-activations near θ = 0.5 are 2^-9 apart, wider than
    ε = 0.001, and would give most thresholds no gradient (or a rounded bucket's worth)."""
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="jumprelu", d_sae=64, l1_coeff=0.1, jumprelu_bandwidth=0.001,
                    jumprelu_init_threshold=0.5)
    x = torch.randn(32768, 16)
    grads = {}
    for autocast in (False, True):
        sae = build_sae(cfg, d_in=16, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sae(x).loss.backward()
        grads[autocast] = sae.log_threshold_F.grad
    assert (grads[False] != 0).float().mean() > 0.9  # the windows hold samples in fp32
    assert torch.equal(grads[True] != 0, grads[False] != 0)
    torch.testing.assert_close(grads[True], grads[False], rtol=0.05, atol=1e-3)


def _train(lam: float, steps: int = 300, **over):
    cfg = _cfg("jumprelu", steps=steps, sae__l1_coeff=lam, sae__jumprelu_bandwidth=0.5,
               sae__jumprelu_init_threshold=0.5, train__lr=1e-2, train__log_every=100, **over)
    sae = build_sae(cfg.sae, d_in=D_IN, seed=0)
    log = ListLogger()
    Trainer(sae, cfg, None, log).fit(sparse_batches(_atoms()))
    return sae, log.rows[-1][1]


def test_jumprelu_sae__lambda_trades_l0_for_mse_and_the_dictionary_is_found():
    """~3 of 64 unit atoms active per input: with λ the thresholds rise until about that many features fire, and
    the decoder rows line up with the atoms; without λ the thresholds fall and many more features fire."""
    free, m_free = _train(0.0)
    sparse, m_sparse = _train(0.1)
    assert m_sparse["l0"] < 4 < 20 < m_free["l0"]
    assert m_free["mse"] < m_sparse["mse"]
    assert sparse.threshold_F.mean() > 1.0 > 0.5 > free.threshold_F.mean()
    assert _recovered(sparse, _atoms()).median() > 0.95 > 0.7 > _recovered(free, _atoms()).median()


def test_jumprelu_sae__resume_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    """The thresholds (a parameter with its own Adam moments) come back from a checkpoint like the weights."""
    cfg = _cfg("jumprelu", steps=12, sae__l1_coeff=0.05, sae__jumprelu_bandwidth=0.5,
               sae__jumprelu_init_threshold=0.5, train__log_every=4, train__checkpoint_every=6)
    full = build_sae(cfg.sae, d_in=D_IN, seed=0)
    Trainer(full, cfg, tmp_path / "full", ListLogger()).fit(sparse_batches(_atoms()))
    fresh = build_sae(cfg.sae, d_in=D_IN, seed=1)  # a different init: everything must come from the checkpoint
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000006"
    trainer = Trainer(fresh, cfg, ckpt, ListLogger())
    trainer.resume(ckpt)
    trainer.run_dir = tmp_path / "resumed"
    trainer.fit(sparse_batches(_atoms(), start=6))
    assert not torch.equal(full.log_threshold_F, torch.full_like(full.log_threshold_F, math.log(0.5)))
    for name, p in full.state_dict().items():
        assert torch.equal(p, fresh.state_dict()[name]), name


def test_jumprelu_config__bad_bandwidth_or_threshold_is_one_line():
    with pytest.raises(ConfigError, match="sae.jumprelu_bandwidth must be > 0, got 0"):
        SAEConfig(architecture="jumprelu", jumprelu_bandwidth=0)
    with pytest.raises(ConfigError, match="sae.jumprelu_init_threshold must be > 0"):
        SAEConfig(architecture="jumprelu", jumprelu_init_threshold=-1.0)
    with pytest.raises(ConfigError, match="sae.jumprelu_pre_act_coeff must be >= 0, got -0.1"):
        SAEConfig(architecture="jumprelu", jumprelu_pre_act_coeff=-0.1)
    with pytest.raises(ConfigError, match="sae.jumprelu_pre_act_coeff is for sae.architecture=jumprelu, not topk: "
                                          "set it to 0"):
        SAEConfig(architecture="topk", jumprelu_pre_act_coeff=1e-6)


def test_run__a_jumprelu_sae_end_to_end(tmp_path):
    """`sae-stream run` with sae.architecture=jumprelu: trained thresholds exported as SAELens's `threshold`, the
    logged L0 penalty equal to the logged L0 (both count pre > θ), eval and the dashboard written."""
    from safetensors.torch import load_file

    from sae_stream.cli import main
    from sae_stream.tracking import read_records
    from tests._tiny_run import TINY

    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY, "--sae.architecture=jumprelu", "--sae.l1_coeff=0.003",
                 "--sae.jumprelu_init_threshold=0.3", "--sae.jumprelu_bandwidth=0.2"]) == 0
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
    weights = load_file(str(out / "sae" / "sae_weights.safetensors"))
    sae = load_saelens(out / "sae")
    assert isinstance(sae, JumpReLUSAE)
    torch.testing.assert_close(weights["threshold"], sae.log_threshold_F.exp().detach())
    assert weights["threshold"].std() > 0  # trained per feature, no longer all at 0.3
    records = [r for r in read_records(out / "metrics.jsonl") if "l0" in r]
    assert records and all(r["l1"] == pytest.approx(r["l0"], rel=1e-5) for r in records)
    result = json.loads((out / "eval.json").read_text())
    assert 0 < result["l0"] < 128 and 0 < result["fvu"] < 1
    assert (out / "dashboard" / "index.html").is_file()
