"""The sections of the config tree (config.py): one dataclass per section, each field with its default and, in the
string literal right below it, its `--help` text; `__post_init__` checks the values a section can check alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad config value: the message names the key and how to fix it."""


@dataclass
class DataConfig:
    source: str = "embedded"
    """'embedded' (Python's own docs, offline), a local file/dir/glob (.txt/.jsonl/.parquet), or a HF dataset name.
    Documents: a record each; a .txt file each, but a single .txt file is split at empty lines (a paragraph each)."""
    hf_subset: str | None = None
    """HF dataset configuration name (e.g. 'en' for allenai/c4); None for the default."""
    hf_revision: str | None = None
    """HF dataset revision (a commit sha, branch or tag; None: the default branch), resolved to its commit sha when
    a run starts and kept in its config.yaml, so the run and its resume read the same data."""
    split: str = "train"
    """HF split to stream for training."""
    text_field: str = "text"
    """Column of each record's text, or of its token ids (e.g. input_ids: joined as they are, no end-of-text added)."""
    tokenizer: str = "gpt2"
    """'gpt2' (tiktoken BPE, shipped offline), 'byte' (256 byte ids + end-of-text, for tiny tests), or
    'hf:NAME_OR_DIR', a Hugging Face tokenizer (another LM family's: hf:EleutherAI/pythia-70m for Pythia)."""
    context_len: int = 128
    """Tokens per context (documents are joined with end-of-text and cut to this length)."""
    heldout_fraction: float = 0.05
    """Fraction of documents (by hash) held out for evaluation; HF sources use the split `heldout_split` instead."""
    heldout_split: str | None = None
    """HF split used for held-out data; None holds out documents by hash from `split`."""
    shuffle_buffer: int = 1000
    """Documents in the shuffle buffer of a streamed source (local files, HF dataset), read after its files in a
    seeded order; a checkpoint holds the buffer's texts."""
    stream_retries: int = 5
    """HF datasets: times a read that fails with a network error is retried (after `datasets`' own), from the record
    reached, waiting 2, 4, 8, ... s (at most 60); 0 stops at the first. Local files are never retried."""
    loop: bool = True
    """When the source is exhausted: True starts another epoch (reshuffled), False stops the stream."""
    seed: int = 0
    """Seed for document order."""
    tokenizer_threads: int | None = None
    """Threads tokenizing a streamed source's documents in parallel (tiktoken releases the GIL); None: the cores this
    process may use, at most 16. Any count gives the same tokens."""
    prefetch: int | None = None
    """Training: token batches (of buffer.lm_batch_size / lm_train.batch_size contexts) a background process reads
    and tokenizes ahead, so text never stalls a GPU loop; 0 reads them inline. None: 32 when training on CUDA, else
    0. The same batches in the same order either way."""

    def __post_init__(self) -> None:
        check_positive(self, "data", "context_len", "shuffle_buffer", "tokenizer_threads")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError("data.heldout_fraction must be in [0, 1)")
        check_positive(self, "data", "stream_retries", "prefetch", zero_ok=True)
        if self.tokenizer not in ("gpt2", "byte") and not (self.tokenizer.startswith("hf:") and self.tokenizer[3:]):
            raise ConfigError(f"data.tokenizer must be 'gpt2', 'byte' or 'hf:NAME_OR_DIR' (a Hugging Face "
                              f"tokenizer), got {self.tokenizer!r}")
        if self.tokenizer.startswith("hf:") and Path(self.tokenizer[3:]).expanduser().is_dir():
            # a local directory, named absolutely: the run's config.yaml then works from anywhere
            self.tokenizer = "hf:" + str(Path(self.tokenizer[3:]).expanduser().resolve())


@dataclass
class LMConfig:
    path: str | None = None
    """Trained LM: a run dir of `sae-stream lm train`, or a transformer-lens model name. None: train one first."""
    n_layers: int = 1
    """Transformer blocks (the paper: 1)."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads."""
    d_mlp: int = 512
    """MLP hidden width (the neurons the SAE reads)."""
    act_fn: str = "relu"
    """MLP activation: 'relu' (the paper) or 'gelu' (nanoGPT / the seed)."""
    n_ctx: int = 1024
    """Maximum context length (position embeddings)."""
    vocab_size: int = 50304
    """Vocabulary size (GPT-2's 50257 padded to a multiple of 64 like nanoGPT)."""
    dropout: float = 0.0
    """Dropout during LM training."""

    def __post_init__(self) -> None:
        check_positive(self, "lm", "n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "vocab_size")
        if self.act_fn not in ("relu", "gelu"):
            raise ConfigError(f"lm.act_fn must be 'relu' or 'gelu', got {self.act_fn!r}")
        if self.d_model % self.n_heads:
            raise ConfigError("lm.d_model must be divisible by lm.n_heads")


@dataclass
class LMTrainConfig:
    tokens: int = 2_000_000
    """Total training tokens for the LM."""
    batch_size: int = 32
    """Contexts per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient norm clip; 0 disables."""
    eval_every: int = 100
    """Steps between held-out evaluations."""
    eval_tokens: int = 32768
    """Held-out tokens per evaluation."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    compile: bool = False
    """torch.compile the model (GPU runs)."""
    autocast: str = "auto"
    """'auto' (bfloat16 on CUDA and on CPUs with native bf16: avx512_bf16/amx), 'bfloat16' or 'none'."""
    log_every: int = 10
    """Steps between training-loss records in metrics.jsonl."""

    def __post_init__(self) -> None:
        check_positive(self, "lm_train", "tokens", "batch_size", "eval_every", "eval_tokens", "checkpoint_every",
                       "log_every")
        if self.autocast not in ("auto", "bfloat16", "none"):
            raise ConfigError(f"lm_train.autocast must be auto, bfloat16 or none, got {self.autocast!r}")


@dataclass
class BufferConfig:
    hook_name: str = "blocks.0.mlp.hook_post"
    """Hook point whose activations train the SAE (any hook of the model; `sae-stream hooks` lists them)."""
    capacity: int = 262_144
    """Ring capacity in activation vectors."""
    refill_fraction: float = 0.5
    """Refill the slots already read once this fraction of the ring has been consumed."""
    storage: str = "auto"
    """'auto' (cuda if the device is cuda, else cpu), 'cuda', 'pinned' (host memory, GPU consumer) or 'cpu'."""
    dtype: str = "auto"
    """Storage dtype: 'auto' (the dtype the LM gives the hook in: lossless; bf16 for our GPT's MLP under CUDA
    autocast, fp32 on CPU), float32, bfloat16 or float16."""
    lm_batch_size: int = 32
    """Contexts per LM forward."""
    skip_first_position: bool = True
    """Drop position 0 of each context (its activations are atypical: attention sinks on BOS-like tokens)."""
    positions_per_context: int | None = None
    """Sample this many positions per context (paper 250, seed 200); None keeps all (sampling discards LM work)."""
    reuse: int = 1
    """Times each streamed vector is consumed before its slot is refilled."""
    merge_lag: int | None = None
    """Batches drawn after a refill starts before its vectors join; null: 2 on CPU, on GPU 1/4 of unread (2..32)."""
    lm_native: bool = True
    """`lm train` LM + block hooks: produce with the GPT's own forward (fused attention; same values, faster)."""
    max_memory_gb: float | None = None
    """Refuse a ring larger than this (GB); None checks against free device/host memory."""

    def __post_init__(self) -> None:
        check_positive(self, "buffer", "capacity", "lm_batch_size", "reuse", "positions_per_context")
        check_positive(self, "buffer", "merge_lag", zero_ok=True)
        if not 0.0 < self.refill_fraction <= 1.0:
            raise ConfigError("buffer.refill_fraction must be in (0, 1]")
        if self.storage not in ("auto", "cuda", "pinned", "cpu"):
            raise ConfigError(f"buffer.storage must be auto, cuda, pinned or cpu, got {self.storage!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"buffer.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class TrainConfig:
    device: str = "auto"
    """'auto' (cuda if available), 'cuda', 'cpu'."""
    seed: int = 0
    """Seed for SAE init, buffer sampling and resampling."""
    total_tokens: int = 4_000_000
    """Activation vectors to train on (paper: 8B)."""
    batch_size: int = 4096
    """Activation vectors per step (paper: 8192)."""
    lr: float = 1e-3
    """Adam learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    lr_schedule: str = "constant"
    """'constant', 'warmup' (linear warm-up, then constant), 'linear_tail' (warm-up, then to 0 over decay_fraction)."""
    warmup_steps: int = 0
    """Linear lr warm-up steps."""
    decay_fraction: float = 0.2
    """Fraction of steps at the end over which 'linear_tail' decays lr to 0."""
    l1_warmup_fraction: float = 0.0
    """Fraction of steps over which λ ramps linearly from 0 (april: 0.05)."""
    grad_clip: float = 0.0
    """Gradient norm clip; 0 disables."""
    autocast: str = "none"
    """'none' or 'bfloat16' autocast for the SAE step."""
    log_every: int = 50
    """Steps between metric records."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted; under torchrun or in a sweep also the step before the newest)."""
    background_checkpoints: bool = True
    """Write checkpoints on a thread while training goes on (A/1's 4.3 GB ring takes seconds to write)."""
    dead_threshold: float = 0.0
    """A feature with density <= this over the logging window counts as dead."""
    ultralow_threshold: float = 1e-6
    """Density below this is 'ultra-low' (paper: 1e-6)."""
    dense_threshold: float = 0.1
    """Density above this is 'dense'."""
    density_window_tokens: int = 1_000_000
    """Tokens over which feature densities are accumulated for metrics and the export (at most a quarter of
    total_tokens, so the last window describes the end of training; a window closes at the first log step past
    it); started again after a resampling."""
    nan_policy: str = "stop"
    """Non-finite activations: 'stop' (error with the step) or 'skip' (drop and count those rows)."""
    step_impl: str = "auto"
    """'fused' (hand-written backward, anthropic only), 'autograd', or 'auto' (fused where it applies)."""
    kernels: str = "auto"
    """'triton' (fused step passes, decoder-norm constraint, the native LM's kernels), 'torch', 'auto' (triton on
    CUDA)."""
    cuda_graphs: bool = True
    """CUDA: replay the whole step (fwd, bwd, Adam, constraints, metrics) as one graph (not with nan skip / DDP)."""
    stream_priority: bool = True
    """CUDA: train on a high-priority stream, so the LM's refills (a default-priority stream) take the SMs the step
    leaves idle rather than delaying its kernels."""
    tf32: bool = True
    """On CUDA, let fp32 matmuls use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)."""
    cpu_malloc_tuning: bool = True
    """On CPU (glibc), keep freed memory in the heap (mallopt): no page faults per step, ~10-25% faster steps."""

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def __post_init__(self) -> None:
        check_positive(self, "train", "total_tokens", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                       "density_window_tokens")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if self.lr_schedule not in ("constant", "warmup", "linear_tail"):
            raise ConfigError("train.lr_schedule must be constant, warmup or linear_tail")
        if self.autocast not in ("none", "bfloat16"):
            raise ConfigError("train.autocast must be 'none' or 'bfloat16'")
        if self.device not in ("auto", "cuda", "cpu") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device must be auto, cuda or cpu, got {self.device!r}")
        if self.step_impl not in ("auto", "fused", "autograd"):
            raise ConfigError(f"train.step_impl must be auto, fused or autograd, got {self.step_impl!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"train.kernels must be auto, triton or torch, got {self.kernels!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError("train.nan_policy must be 'stop' or 'skip'")
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"train.total_tokens ({self.total_tokens}) must be >= train.batch_size ({self.batch_size})")


@dataclass
class ResampleConfig:
    enabled: bool = True
    """Anthropic neuron resampling (anthropic architecture only)."""
    at_fractions: list[float] = field(default_factory=lambda: [0.025, 0.05, 0.075, 0.1])
    """When to resample, as fractions of total steps (paper: 25k,50k,75k,100k of 1M steps)."""
    at_steps: list[int] | None = None
    """Explicit resample steps; overrides at_fractions."""
    dead_window: int = 12_500
    """Dead = fired on no input in this many steps before a resample (capped at the steps since the last one)."""
    pool_size: int = 819_200
    """Inputs drawn from the live buffer to score the reconstruction loss."""
    pool_dtype: str = "float32"
    """Pool storage dtype (bfloat16 halves memory)."""
    encoder_scale: float = 0.2
    """New encoder rows = input direction x this x mean alive encoder norm."""

    def __post_init__(self) -> None:
        check_positive(self, "resample", "dead_window", "pool_size")
        if any(not 0.0 < f < 1.0 for f in self.at_fractions):
            raise ConfigError("resample.at_fractions must all be in (0, 1)")


@dataclass
class EvalConfig:
    tokens: int = 2_000_000
    """Held-out tokens for `sae-stream eval` (ultra-low densities need more positions than 1 / its threshold)."""
    batch_contexts: int = 16
    """Contexts per eval forward."""
    histogram_bins: int = 60
    """Bins of the log10 density histogram."""

    def __post_init__(self) -> None:
        check_positive(self, "eval", "tokens", "batch_contexts", "histogram_bins")


@dataclass
class AnalysisConfig:
    features: int = 256
    """Features shown in the dashboard: evenly spaced over the alive features ranked by density (all if fewer)."""
    top_k: int = 20
    """Top-activating contexts kept per feature."""
    window: int = 12
    """Tokens shown left of the activating token (right: window // 3)."""
    tokens: int = 500_000
    """Held-out tokens scanned for top activations."""
    batch_contexts: int = 16
    """Contexts per forward while scanning."""
    logit_k: int = 10
    """Top positive / negative logit effects shown."""
    histogram_bins: int = 32
    """Bins of each feature's activation histogram (a power of two: bins merge pairwise as the range grows)."""
    single_token_fraction: float = 0.8
    """Flag a feature as single-token when at least this fraction of its top activations sit on one token id."""
    ablation: bool = True
    """Show each feature's ablation effect (next-token log-prob change over its top contexts)."""
    ablation_contexts: int = 8
    """Top contexts per feature used for the ablation (each costs one forward and an SAE pass over the context)."""
    steer_tokens: int = 16
    """Tokens of each feature's pinned sample (the feature at 5× its top activation; `sae-stream steer`); 0: none."""

    def __post_init__(self) -> None:
        check_positive(self, "analysis", "features", "top_k", "tokens", "batch_contexts", "logit_k", "histogram_bins",
                       "ablation_contexts")
        check_positive(self, "analysis", "window", "steer_tokens", zero_ok=True)
        if self.histogram_bins & (self.histogram_bins - 1):
            raise ConfigError(f"analysis.histogram_bins must be a power of two, got {self.histogram_bins}")
        if not 0.0 < self.single_token_fraction <= 1.0:
            raise ConfigError("analysis.single_token_fraction must be in (0, 1]")


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (off by default)."""
    project: str = "sae-stream"
    """W&B project."""
    entity: str | None = None
    """W&B entity."""
    run_name: str | None = None
    """W&B run name."""
    init_timeout_s: float = 20.0
    """Seconds to wait for wandb.init before falling back to offline mode."""


def check_positive(obj: Any, section: str, *names: str, zero_ok: bool = False) -> None:
    """Each field > 0 (>= 0 with zero_ok) or None (where None means "not set": the field's default)."""
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(f"{section}.{name} must be {'>=' if zero_ok else '>'} 0, got {value}")
