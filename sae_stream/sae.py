"""Sparse autoencoder architectures: Anthropic 2023, Anthropic April-2024 update, TopK (+AuxK), BatchTopK, JumpReLU;
Matryoshka (nested-prefix) losses for the TopK two.

    sae = build_sae(cfg.sae, d_in=512)
    sae.init_from_sample_(x_ND)           # b_dec (and april's input scale) from a buffer sample
    out = sae(x_BD, l1_coeff=1e-3)        # SAEOutput(recon, feats, loss, mse, l1, aux)

Every architecture has the same parameters (`W_enc_DF`, `b_enc_F`, `W_dec_FD`, `b_dec_D`; JumpReLU adds
`log_threshold_F`) and a scalar buffer `input_scale`; `encode`/`decode` work in the original activation space for
all of them.

Loss normalisation (to compare λ with the papers): `mse` is the MEAN over batch AND d_in of the squared error;
the sparsity term is summed over features and averaged over the batch. The Anthropic papers write the
reconstruction term as the squared L2 norm summed over d_in, averaged over the batch (assumed: the paper text was
not available to quote), so λ_ours = λ_paper / d_in (A/5's λ=0.004 at d_in=512 is ≈ 7.8e-6; April's λ=5 ≈ 9.8e-3).
AuxK uses the same mean-over-elements MSE of the residual (OpenAI's 1/32 then weighs it against our main MSE, as
SAELens does with its own, un-normalised MSE).
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae_stream.config import SAEConfig
from sae_stream.fused_ops import normalize_rows_, project_out_rows_
from sae_stream.geometric_median import geometric_median
from sae_stream.jumprelu import JumpReLUWithL0
from sae_stream.topk_kernels import GatherEncode, Selected, SparseDecode, by_group, rowwise

# Running-mean rate of BatchTopK's inference threshold (an EMA with ~100-step memory, like SAELens's default):
# a plain cumulative mean would be dominated by the very different activations of early training.
BATCHTOPK_THRESHOLD_RATE = 0.01
# April update: decoder rows start at this norm (their note: "fixed L2 norm of 0.05 to 1"; we take 0.1).
APRIL_DECODER_INIT_NORM = 0.1


class SAEOutput(NamedTuple):
    recon: Tensor  # [B, d_in], original activation space
    feats: Tensor  # [B, d_sae]
    loss: Tensor  # scalar: mse + λ·l1 + auxk_coeff·aux (+ Matryoshka prefixes' MSE; jumprelu: mse + λ·L0 + λ_P·aux)
    mse: Tensor  # scalar, mean over batch and d_in (april: in the scaled space it trains in)
    l1: Tensor  # scalar, Σ_features |f| (april: |f|·‖W_d,f‖; jumprelu: L0), mean over the batch; 0 for topk/batchtopk
    aux: Tensor  # scalar AuxK loss (0 unless dead latents were passed); jumprelu: its pre-act loss (0 if off)
    prefix_mse: Tensor | None = None  # [levels] Matryoshka: each nested prefix's MSE (its terms of `loss`)


class SAE(nn.Module):
    """Shared parameters, encode/decode/forward and weight surgery; subclasses choose the activation and losses."""

    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows held at unit norm (parallel-gradient removal before, renormalisation after every step)."""
    subtract_b_dec: ClassVar[bool] = True
    """Encoder sees x − b_dec (SAELens's apply_b_dec_to_input)."""
    scales_input: ClassVar[bool] = False
    """Inputs are multiplied by `input_scale` (april) so that E‖x‖ = √d_in."""

    def __init__(self, cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.d_sae = cfg.d_sae
        self.W_enc_DF = nn.Parameter(torch.empty(d_in, cfg.d_sae))
        self.b_enc_F = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec_FD = nn.Parameter(torch.empty(cfg.d_sae, d_in))
        self.b_dec_D = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.init_weights_(generator)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights_(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform (ReLU gain, fan_in = d_in) encoder and decoder, independently drawn; unit decoder rows."""
        bound = math.sqrt(6.0 / self.d_in)
        self.W_enc_DF.uniform_(-bound, bound, generator=generator)
        self.W_dec_FD.uniform_(-bound, bound, generator=generator)
        self.normalize_decoder_()

    @torch.no_grad()
    def init_from_sample_(self, x_ND: Tensor) -> None:
        """Set b_dec (cfg.init_b_dec: geometric median / mean / zeros; auto: zeros for april) and april's input scale
        from a sample."""
        x_ND = x_ND.detach().to(self.b_dec_D.device, torch.float32)
        x_ND = x_ND[torch.isfinite(x_ND).all(dim=1)]
        if x_ND.shape[0] == 0:
            raise ValueError("init_from_sample_: the sample has no finite rows; check the activation source")
        if self.scales_input:
            self.input_scale.fill_(math.sqrt(self.d_in) / x_ND.norm(dim=1).mean().clamp_min(1e-12).item())
            x_ND = x_ND * self.input_scale
        init = self.cfg.init_b_dec
        if init == "auto":
            init = "zeros" if self.cfg.architecture == "april" else "geometric_median"
        if init == "geometric_median":
            self.b_dec_D.copy_(geometric_median(x_ND))
        elif init == "mean":
            self.b_dec_D.copy_(x_ND.mean(0))
        else:
            self.b_dec_D.zero_()

    # ------------------------------------------------------------------ surgery

    @torch.no_grad()
    def normalize_decoder_(self, kernels: str = "torch") -> None:
        """Renormalise every decoder row (a dictionary vector) to unit L2 norm (kernels: see fused_ops)."""
        normalize_rows_(self.W_dec_FD, kernels)

    @torch.no_grad()
    def remove_parallel_grad_(self, kernels: str = "torch") -> None:
        """Drop the gradient component along each decoder row, so Adam moves rows on (the tangent of) the sphere."""
        if self.W_dec_FD.grad is not None:
            project_out_rows_(self.W_dec_FD.grad, self.W_dec_FD, kernels)

    # ------------------------------------------------------------------ forward

    def pre_acts(self, xs_BD: Tensor) -> Tensor:
        """Encoder pre-activations of (already scaled) inputs.

        (x − b_dec)·W_enc + b_enc is computed as x·W_enc + (b_enc − b_dec·W_enc): identical maths, but the
        gradient of b_dec then costs a vector-matrix product instead of a [B, d_sae]×[d_sae, d_in] matmul.
        """
        return torch.addmm(self.encoder_bias(), xs_BD, self.W_enc_DF)

    def encoder_bias(self) -> Tensor:
        return self.b_enc_F - self.b_dec_D @ self.W_enc_DF if self.subtract_b_dec else self.b_enc_F

    def activate(self, pre_BF: Tensor) -> Tensor:
        return torch.relu(pre_BF)

    def sparsity_loss(self, feats_BF: Tensor) -> Tensor:
        # feats are ReLU outputs (>= 0), so Σ|f| = Σf; summing in fp32 keeps bf16 autocast from losing the tail
        return torch.sum(feats_BF, dtype=torch.float32) / feats_BF.shape[0]

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.activate(self.pre_acts(self._scale_in(x_BD)))

    def decode(self, feats_BF: Tensor) -> Tensor:
        return self._scale_out(torch.addmm(self.b_dec_D, feats_BF.to(self.W_dec_FD.dtype), self.W_dec_FD))

    def forward(self, x_BD: Tensor, l1_coeff: float | None = None, dead_F: Tensor | None = None) -> SAEOutput:
        """Loss on a batch. l1_coeff overrides cfg.l1_coeff (λ warm-up); dead_F (bool [d_sae]) turns AuxK on."""
        xs_BD = self._scale_in(x_BD)
        pre_BF = self.pre_acts(xs_BD)
        feats_BF = self.activate(pre_BF)
        recon_s_BD = torch.addmm(self.b_dec_D, feats_BF, self.W_dec_FD)
        resid_BD = xs_BD - recon_s_BD
        mse = resid_BD.pow(2).mean()
        l1 = self.sparsity_loss(feats_BF)
        aux = mse.new_zeros(())  # AuxK lives in TopKSAE.forward
        lam = self.cfg.l1_coeff if l1_coeff is None else l1_coeff
        return SAEOutput(self._scale_out(recon_s_BD), feats_BF, mse + lam * l1, mse, l1, aux)

    def _scale_in(self, x_BD: Tensor) -> Tensor:
        return x_BD * self.input_scale if self.scales_input else x_BD

    def _scale_out(self, r_BD: Tensor) -> Tensor:
        return r_BD / self.input_scale if self.scales_input else r_BD


class AnthropicSAE(SAE):
    """Towards Monosemanticity (2023): x̄ = x − b_d; f = ReLU(W_e x̄ + b_e); x̂ = W_d f + b_d;
    loss = MSE + λ·Σ_f f; unit-norm decoder rows; b_d at the geometric median; neuron resampling (resample.py)."""


class AprilSAE(SAE):
    """April-2024 update: f = ReLU(W_e x + b_e) (no b_d subtraction); loss = MSE + λ·Σ_f f_f·‖W_d,f‖; no norm
    constraint; inputs scaled so E‖x‖ = √d_in; W_e starts as W_dᵀ, b_e = b_d = 0 (λ warm-up and the lr tail live in
    TrainConfig)."""

    unit_norm_decoder = False
    subtract_b_dec = False
    scales_input = True

    @torch.no_grad()
    def init_weights_(self, generator: torch.Generator | None = None) -> None:
        self.W_dec_FD.normal_(generator=generator)
        self.W_dec_FD.mul_(APRIL_DECODER_INIT_NORM / self.W_dec_FD.norm(dim=1, keepdim=True))
        self.W_enc_DF.copy_(self.W_dec_FD.T)
        self.b_enc_F.zero_()

    def sparsity_loss(self, feats_BF: Tensor) -> Tensor:
        norms_F = self.W_dec_FD.norm(dim=1)
        # Σ_b Σ_f f_bf·‖W_d,f‖ as a matrix-vector product: no [B, d_sae] temporary
        return (feats_BF @ norms_F.to(feats_BF.dtype)).float().sum() / feats_BF.shape[0]


class TopKSAE(SAE):
    """OpenAI 2024: f = TopK_k(W_e (x − b_pre) + b_e), then ReLU; exactly k latents per row whenever k of the
    pre-activations are positive. AuxK: the residual x − x̂ is reconstructed by the top auxk_k DEAD latents
    (dead mask supplied by the trainer), loss aux = mean((ê − e)²), weighted by cfg.auxk_coeff.

    With sparse kernels (cfg.topk_kernels; by default on CPU) forward() builds no autograd graph over [B, d_sae]:
    the encoder matmul runs without autograd, the selected entries get sparse kernels (topk_kernels.py; ~2x faster
    steps on CPU). On CUDA the default decodes the selection densely; `topk_kernels=sparse` there uses a gather /
    index_add backward (graph-capturable). `encode`/`decode` are the dense versions (same values). cfg.matryoshka
    (m_1 < ... < d_sae): the loss adds each prefix's MSE, of b_d + Σ_{f < m_i} f·W_d,f (Bussmann et al. 2025).
    """

    sparse_kernels: bool | None = None
    """Override of cfg.topk_kernels (tests): True sparse, False dense, None as configured."""
    sparse_backward: str | None = None
    """Override of the sparse backward ('spmm' | 'index'); None: spmm on CPU, index on CUDA."""

    @torch.no_grad()
    def init_weights_(self, generator: torch.Generator | None = None) -> None:
        super().init_weights_(generator)
        self.W_enc_DF.copy_(self.W_dec_FD.T)  # OpenAI: encoder starts as the decoder's transpose

    def sparsity_loss(self, feats_BF: Tensor) -> Tensor:
        return feats_BF.new_zeros((), dtype=torch.float32)  # sparsity comes from TopK, not a penalty

    def activate(self, pre_BF: Tensor) -> Tensor:
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, idx_BK, vals_BK.relu())

    def select(self, pre_BF: Tensor) -> tuple[Selected, Tensor]:
        """Positions kept from the (no-grad) pre-activations, and their values."""
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        sel, order_BK = rowwise(idx_BK, self.d_sae)
        return sel, vals_BK.gather(-1, order_BK).flatten()

    def forward(self, x_BD: Tensor, l1_coeff: float | None = None, dead_F: Tensor | None = None) -> SAEOutput:
        sparse = self.sparse_kernels
        if sparse is None:
            sparse = self.cfg.topk_kernels == "sparse" or (self.cfg.topk_kernels == "auto" and not x_BD.is_cuda)
        via = self.sparse_backward or ("index" if x_BD.is_cuda else "spmm")
        bias_F = self.encoder_bias()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
            pre_BF = torch.addmm(bias_F, x_BD, self.W_enc_DF)
        sel, pre_N = self.select(pre_BF.detach())
        feats_BF, parts = self._decode_selected(x_BD, bias_F, pre_BF, sel, pre_N, sparse, via, groups=True)
        recon_BD, prefix_mse = self.b_dec_D, []
        for part_BD in parts[:-1]:  # Matryoshka: each prefix's reconstruction is scored too
            recon_BD = recon_BD + part_BD
            prefix_mse.append((x_BD - recon_BD).pow(2).mean())
        recon_BD = recon_BD + parts[-1]
        resid_BD = x_BD - recon_BD
        mse = resid_BD.pow(2).mean()
        aux = zero = mse.new_zeros(())
        if dead_F is not None:
            # alive latents get -inf so the top auxk_k are dead ones; when fewer are dead, the mask zeroes the rest
            top = pre_BF.detach().masked_fill(~dead_F, float("-inf")).topk(self.auxk_k, dim=-1, sorted=False)
            aux_sel, order_BK = rowwise(top.indices, self.d_sae)
            aux_pre_N = top.values.gather(-1, order_BK).flatten()
            _, (aux_dec_BD,) = self._decode_selected(x_BD, bias_F, pre_BF, aux_sel, aux_pre_N, sparse, via, dead_F)
            aux = (aux_dec_BD - resid_BD.detach()).pow(2).mean()
        return SAEOutput(recon_BD, feats_BF, mse + sum(prefix_mse) + self.cfg.auxk_coeff * aux, mse, zero, aux,
                         torch.stack(prefix_mse) if prefix_mse else None)

    def _decode_selected(self, x_BD: Tensor, bias_F: Tensor, pre_BF: Tensor, sel: Selected, pre_N: Tensor,
                         sparse: bool, via: str, keep_F: Tensor | None = None, groups: bool = False
                         ) -> tuple[Tensor, list[Tensor]]:
        """(feats, [feats·W_dec without bias]) for the selected entries: sparse kernels, or dense autograd; with
        `groups`, one part per Matryoshka group of features (bounds), summing to the whole."""
        if sparse:
            vals_N = GatherEncode.apply(pre_N, x_BD, self.W_enc_DF, bias_F, sel, via).relu()
        else:
            vals_N = pre_BF[sel.rows_N, sel.cols_N].relu()
        if keep_F is not None:
            vals_N = vals_N * keep_F[sel.cols_N]
        feats_BF = torch.zeros_like(pre_BF).index_put((sel.rows_N, sel.cols_N), vals_N)
        bounds = self.bounds if groups else (0, self.d_sae)
        if sparse:  # one decode: entry (row, col) adds into row (row, col's group) of [B·groups, d_in]
            dec_BGD = SparseDecode.apply(vals_N, self.W_dec_FD, by_group(sel, bounds), via)
            return feats_BF, list(dec_BGD.view(pre_BF.shape[0], len(bounds) - 1, -1).unbind(1))
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        return feats_BF, [f_BG @ w_GD for f_BG, w_GD in zip(feats_BF.split(sizes, 1), self.W_dec_FD.split(sizes))]

    def prefix_decodes(self, feats_BF: Tensor) -> list[Tensor]:
        """Matryoshka: b_d + Σ_{f < m} f·W_d,f for each level m (not d_sae), group by group: one decode's cost."""
        out, f_BF, bounds = [self.b_dec_D], feats_BF.to(self.W_dec_FD.dtype), self.bounds
        for a, b in zip(bounds[:-2], bounds[1:-1]):
            out.append(torch.addmm(out[-1], f_BF[:, a:b], self.W_dec_FD[a:b]))
        return out[1:]

    @property
    def auxk_k(self) -> int:
        return min(self.cfg.auxk_k or self.d_in // 2, self.d_sae)

    @property
    def bounds(self) -> tuple[int, ...]:
        """(0, m_1, ..., d_sae): where the Matryoshka groups of features start and end ((0, d_sae) without)."""
        return (0, *self.cfg.matryoshka_sizes, self.d_sae)


class BatchTopKSAE(TopKSAE):
    """Bussmann et al. 2024: keep the top k·B activations of the whole batch (k per row on average). Inference
    (eval mode: `encode`, forward) cannot depend on the rest of the batch: f = pre · [pre > θ], θ a running mean
    (EMA, rate BATCHTOPK_THRESHOLD_RATE) of the smallest positive activation kept in each training batch, updated
    on device by forward() in train mode (AuxK too is train-mode only). Exported to SAELens as a 'jumprelu' SAE
    with threshold θ for every feature (as SAELens itself saves BatchTopK SAEs)."""

    def __init__(self, cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, d_in, generator)
        self.register_buffer("threshold", torch.tensor(0.0))

    def activate(self, pre_BF: Tensor) -> Tensor:
        if not self.training:
            return pre_BF * (pre_BF > self.threshold.clamp_min(0.0))
        vals, flat_idx = pre_BF.flatten().topk(self.cfg.k * pre_BF.shape[0], sorted=False)
        return torch.zeros_like(pre_BF).flatten().scatter_(0, flat_idx, vals.relu()).view_as(pre_BF)

    def select(self, pre_BF: Tensor) -> tuple[Selected, Tensor]:
        n_rows, d_sae = pre_BF.shape
        vals, flat_idx = pre_BF.flatten().topk(self.cfg.k * n_rows, sorted=False)
        self._update_threshold_(vals.relu())
        # rows own a varying number of the kept entries: sorting the flat indices groups them row by row
        # (sorted as float64 — exact below 2^53 — because torch's CPU int64 sort is ~6x slower)
        flat_idx, order = flat_idx.double().sort()
        flat_idx = flat_idx.long()
        rows_N = torch.div(flat_idx, d_sae, rounding_mode="floor")
        offsets_B = torch.searchsorted(rows_N, torch.arange(n_rows, device=rows_N.device))
        return Selected(rows_N, flat_idx - rows_N * d_sae, offsets_B, (n_rows, d_sae)), vals[order]

    def forward(self, x_BD: Tensor, l1_coeff: float | None = None, dead_F: Tensor | None = None) -> SAEOutput:
        if self.training:
            return super().forward(x_BD, l1_coeff, dead_F)
        out = SAE.forward(self, x_BD, l1_coeff, None)  # the threshold: rows independent of their batch
        mse_L = [(x_BD - r_BD).pow(2).mean() for r_BD in self.prefix_decodes(out.feats)]  # Matryoshka, as in TopK's
        return out._replace(loss=out.loss + sum(mse_L), prefix_mse=torch.stack(mse_L)) if mse_L else out

    @torch.no_grad()
    def _update_threshold_(self, kept: Tensor) -> None:
        min_pos = kept.float().masked_fill(kept <= 0, float("inf")).min()
        # no positive activation in the batch: keep θ (a device-side select, no host sync)
        new = torch.where(torch.isfinite(min_pos), min_pos, self.threshold)
        # the first update (θ still 0) takes the batch value outright instead of crawling up from 0
        self.threshold.copy_(torch.where(self.threshold > 0, self.threshold.lerp(new, BATCHTOPK_THRESHOLD_RATE), new))


class JumpReLUSAE(SAE):
    """Rajamanoharan et al. 2024 ("Jumping Ahead"; the architecture of Gemma Scope): f = pre·[pre > θ] with
    pre = W_e x + b_e and a learned threshold θ_f > 0 per feature (kept as log θ, so it stays positive);
    loss = MSE + λ·L0, the L0 and θ trained through straight-through pseudo-derivatives (jumprelu.py, bandwidth
    cfg.jumprelu_bandwidth). Inputs are scaled so E‖x‖ = √d_in, as the paper normalises them (θ and the bandwidth
    live in that scale; the scale is folded into the weights on export); no b_d subtraction before the encoder;
    W_e starts as W_dᵀ and θ at cfg.jumprelu_init_threshold. Decoder rows are kept at unit norm: the L0 penalty
    does not see decoder norms, so the constraint only removes a scale symmetry between W_e and W_d. With
    cfg.jumprelu_pre_act_coeff > 0 the loss adds the pre-act loss against dead features (jumprelu.py); `aux` logs
    its unweighted sum."""

    subtract_b_dec = False
    scales_input = True

    def __init__(self, cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, d_in, generator)
        self.log_threshold_F = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    @torch.no_grad()
    def init_weights_(self, generator: torch.Generator | None = None) -> None:
        super().init_weights_(generator)
        self.W_enc_DF.copy_(self.W_dec_FD.T)

    @property
    def threshold_F(self) -> Tensor:
        return self.log_threshold_F.exp()

    def activate(self, pre_BF: Tensor) -> Tensor:  # (encode: no straight-through gradients, forward() has them)
        return pre_BF * (pre_BF > self.threshold_F)

    def forward(self, x_BD: Tensor, l1_coeff: float | None = None, dead_F: Tensor | None = None) -> SAEOutput:
        """Loss on a batch; l1_coeff overrides cfg.l1_coeff, here λ of the L0 term (its warm-up).

        The encoder runs in fp32 even under bf16 autocast: bf16 pre-activations are spaced ~0.004 apart near
        θ ~ 1, wider than the paper's ε = 0.001, so the window around θ would hold a rounded bucket or nothing
        and most thresholds would get no gradient."""
        xs_BD = self._scale_in(x_BD)
        with torch.autocast(x_BD.device.type, enabled=False):
            pre_BF = self.pre_acts(xs_BD.float())
        feats_BF, l0 = JumpReLUWithL0.apply(pre_BF, self.threshold_F, self.cfg.jumprelu_bandwidth)
        recon_s_BD = torch.addmm(self.b_dec_D, feats_BF, self.W_dec_FD)
        mse = (xs_BD - recon_s_BD).pow(2).mean()
        lam = self.cfg.l1_coeff if l1_coeff is None else l1_coeff
        loss, pre_act = mse + lam * l0, mse.new_zeros(())
        if self.cfg.jumprelu_pre_act_coeff > 0:
            pre_act = (self.threshold_F - pre_BF).relu().sum(-1).mean()
            loss = loss + self.cfg.jumprelu_pre_act_coeff * pre_act
        return SAEOutput(self._scale_out(recon_s_BD), feats_BF, loss, mse, l0, pre_act)


SAE_CLASSES: dict[str, type[SAE]] = {
    "anthropic": AnthropicSAE,
    "april": AprilSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
}


def build_sae(cfg: SAEConfig, d_in: int, seed: int | None = 0) -> SAE:
    """The SAE named by cfg.architecture, initialised from `seed` (None: torch's global RNG)."""
    if cfg.architecture not in SAE_CLASSES:
        raise ValueError(f"unknown sae.architecture {cfg.architecture!r}: use one of {', '.join(SAE_CLASSES)}")
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise ValueError(f"sae.d_in ({cfg.d_in}) does not match the hook's width ({d_in}): set sae.d_in={d_in} or null")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SAE_CLASSES[cfg.architecture](cfg, d_in, generator)
