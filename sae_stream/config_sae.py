"""The `sae` section of the config tree (config.py): which SAE, its size and its sparsity; in a module of its own
so the architectures' options can grow beside the other sections (config_sections.py)."""

from __future__ import annotations

from dataclasses import dataclass

from sae_stream.config_sections import ConfigError, check_positive

ARCHITECTURES = ("anthropic", "april", "topk", "batchtopk", "jumprelu")


@dataclass
class SAEConfig:
    architecture: str = "anthropic"
    """'anthropic' (2023 paper), 'april' (Apr-2024 update; its schedules are train.l1_warmup_fraction,
    train.lr_schedule=linear_tail and train.grad_clip, off unless set), 'topk' (with AuxK), 'batchtopk' or
    'jumprelu' (Rajamanoharan et al. 2024: learned per-feature thresholds, L0 penalty)."""
    d_in: int | None = None
    """Input width; None takes it from the hook. Must match the hook if set."""
    d_sae: int = 4096
    """Dictionary size (features)."""
    l1_coeff: float = 1e-3
    """λ (anthropic/april): loss = MSE (mean over elements) + λ·Σ_f|f| (april |f|·‖W_d,f‖); = λ_paper / d_in.
    jumprelu: λ of its L0 term, MSE + λ·Σ_f[f > 0] (also λ_paper / d_in)."""
    k: int = 32
    """Active features per input (topk) or on average per input (batchtopk)."""
    auxk_coeff: float = 1 / 32
    """AuxK loss coefficient (topk/batchtopk)."""
    auxk_k: int | None = None
    """Dead latents used by AuxK; None = d_in // 2."""
    dead_tokens_auxk: int = 10_000_000
    """A latent is dead for AuxK after this many tokens without firing."""
    init_b_dec: str = "auto"
    """'geometric_median' of a buffer sample (2023 paper), 'mean', 'zeros', or 'auto': zeros for april (the
    update starts both biases at 0), the geometric median for the others."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: ε, the width of the window around θ where pre-activations train it (in the scaled input space)."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: θ of all features at the start (scaled inputs); the paper's 0.001 suits 1e5+ steps, short runs ~0.5."""
    jumprelu_pre_act_coeff: float = 0.0
    """jumprelu: λ_P of the pre-act loss λ_P·Σ_f ReLU(θ_f − pre_f) (Jan-2025 update): revives dead features; 0 = off."""
    topk_kernels: str = "auto"
    """topk/batchtopk: 'sparse' (touch only the selected entries), 'dense', or 'auto' (sparse on CPU, dense on CUDA)."""
    matryoshka: list[int] | None = None
    """topk/batchtopk: nested dictionary sizes m_1 < m_2 < ... (d_sae, the last, may be listed), e.g. [64, 256]: the
    loss sums the MSE of each prefix's reconstruction (features 0..m_i - 1 alone) and the full one's, as Matryoshka
    SAEs (Bussmann et al. 2025), so the first features learn to reconstruct alone. None: off."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"sae.architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        check_positive(self, "sae", "d_in", "d_sae", "k", "dead_tokens_auxk", "jumprelu_bandwidth")
        check_positive(self, "sae", "jumprelu_init_threshold")
        if self.architecture in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ConfigError(f"sae.k ({self.k}) must be <= sae.d_sae ({self.d_sae})")
        check_positive(self, "sae", "l1_coeff", "jumprelu_pre_act_coeff", zero_ok=True)
        if self.jumprelu_pre_act_coeff and self.architecture != "jumprelu":
            raise ConfigError(f"sae.jumprelu_pre_act_coeff is for sae.architecture=jumprelu, not {self.architecture}: "
                              "set it to 0")
        if self.init_b_dec not in ("auto", "geometric_median", "mean", "zeros"):
            raise ConfigError(f"sae.init_b_dec must be auto, geometric_median, mean or zeros, got {self.init_b_dec!r}")
        if self.matryoshka is not None:
            self._check_matryoshka()
        if self.topk_kernels not in ("auto", "sparse", "dense"):
            raise ConfigError(f"sae.topk_kernels must be auto, sparse or dense, got {self.topk_kernels!r}")

    def _check_matryoshka(self) -> None:
        """Sizes increasing, from 1 up to d_sae (which may close the list, as written: a sweep member that changes
        d_sae then still sees every level), at least one below d_sae."""
        sizes = list(self.matryoshka)
        if self.architecture not in ("topk", "batchtopk"):
            raise ConfigError(f"sae.matryoshka is for sae.architecture=topk or batchtopk, not {self.architecture}: "
                              "set it to null")
        example = f"e.g. [{max(1, self.d_sae // 16)}, {max(2, self.d_sae // 4)}]"
        if sizes and (sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] > self.d_sae):
            raise ConfigError(f"sae.matryoshka must be increasing sizes between 1 and sae.d_sae ({self.d_sae}), "
                              f"{example}, got {self.matryoshka}")
        if not [m for m in sizes if m < self.d_sae]:
            raise ConfigError(f"sae.matryoshka needs a size below sae.d_sae ({self.d_sae}; the whole dictionary is "
                              f"the last level anyway), {example}, got {self.matryoshka} (null turns the levels off)")

    @property
    def matryoshka_sizes(self) -> list[int]:
        """The nested dictionaries' sizes below d_sae ([] without levels): the whole dictionary is the last level."""
        return [m for m in self.matryoshka or () if m < self.d_sae]
