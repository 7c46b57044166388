"""Straight-through pseudo-derivatives for JumpReLU SAEs (Rajamanoharan et al. 2024, "Jumping Ahead").

JumpReLU_θ(z) = z·H(z − θ) has a zero derivative in θ almost everywhere, and the step H(z − θ), whose sum over
features is the L0 norm, has none in z or θ. The paper trains the thresholds with pseudo-derivatives built from
a kernel K of bandwidth ε, here the rectangle K(u) = 1[|u| < 1/2]:

    ∂/∂θ JumpReLU_θ(z) := −(θ/ε)·K((z − θ)/ε)        ∂/∂θ H(z − θ) := −(1/ε)·K((z − θ)/ε)

In z both keep their true derivatives (H(z − θ) and 0): the L0 penalty moves only the thresholds, while the
reconstruction moves the encoder and the thresholds. Only pre-activations within ε/2 of a threshold give it a
gradient, so ε is in the units of the pre-activations (hence the SAE's input normalisation).

Dead features: a feature that never fires gets no gradient from either term. With cfg.jumprelu_pre_act_coeff
= λ_P > 0 the loss (sae.JumpReLUSAE) adds λ_P·Σ_f ReLU(θ_f − pre_f)·‖W_d,f‖ (mean over the batch; ‖W_d,f‖ = 1
there), the "pre-act loss" of Anthropic's January 2025 update: every position where a feature stays below its
threshold pulls its pre-activation up and θ down, by an amount that alive features' other gradients swamp.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _near_threshold(pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """K((z − θ)/ε) for the rectangle kernel: 1 where |z − θ| < ε/2."""
    return ((pre_BF.float() - theta_F).abs() < bandwidth / 2).float()


class JumpReLUWithL0(torch.autograd.Function):
    """(feats, L0) in one pass: feats = JumpReLU_θ(pre) = pre·[pre > θ], whose θ gradient is -(θ/ε)·K((pre - θ)/ε)
    and pre gradient [pre > θ]; L0 = Σ_f [pre > θ] averaged over the batch, whose θ gradient is
    -(1/ε)·K((pre - θ)/ε) and pre gradient none. Training needs both: one mask and one window over [B, d_sae]
    serve the two."""

    @staticmethod
    def forward(ctx: Any, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
        fires_BF = pre_BF > theta_F
        ctx.save_for_backward(pre_BF, theta_F, fires_BF)
        ctx.bandwidth = bandwidth
        l0 = torch.sum(fires_BF, dtype=torch.float32) / pre_BF.shape[0]
        return pre_BF * fires_BF, l0

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor, grad_l0: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre_BF, theta_F, fires_BF = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_BF * fires_BF if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            near = _near_threshold(pre_BF, theta_F, eps)
            # Σ_b grad_b·K·(-θ/ε) from the features, Σ_b (grad_l0 / B)·K·(-1/ε) from the L0
            from_feats_F = (grad_BF.float() * near).sum(0) * (-theta_F / eps)
            from_l0_F = near.sum(0) * (-grad_l0.float() / (eps * pre_BF.shape[0]))
            grad_theta = (from_feats_F + from_l0_F).to(theta_F.dtype)
        return grad_pre, grad_theta, None
