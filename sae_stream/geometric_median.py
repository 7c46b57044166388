"""The geometric median of a sample: the 2023 paper's starting point for the decoder bias b_d (sae.py)."""

from __future__ import annotations

from torch import Tensor


def geometric_median(x_ND: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld iterations: the point minimising Σ_n ‖x_n − y‖ (robust to the heavy tails of activations)."""
    x_ND = x_ND.double()
    y_D = x_ND.mean(0)
    for _ in range(iters):
        # 1/distance weights; the clamp avoids dividing by zero when y lands on a sample
        w_N = 1.0 / (x_ND - y_D).norm(dim=1).clamp_min(1e-12)
        y_new_D = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
        shift = (y_new_D - y_D).norm() / y_D.norm().clamp_min(1e-12)
        y_D = y_new_D
        if shift < tol:
            break
    return y_D.float()
