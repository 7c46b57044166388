"""One typed config tree for every command.

Loaded from YAML (``configs/*.yaml``), then overridden on the command line with
``--section.field=value``. Each field's docstring (the string literal right below it)
is its ``--help`` text. Unknown keys and wrong types raise ``ConfigError`` naming the key.

    cfg = load_config("configs/default.yaml", ["--sae.d_sae=2048", "--train.lr=1e-3"])
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value: the message names the key and how to fix it."""


@dataclass
class DataConfig:
    source: str = "embedded"
    """'embedded' (Python's own docs, offline), a local file/dir/glob (.txt/.jsonl/.parquet), or a HF dataset name."""
    hf_subset: str | None = None
    """HF dataset configuration name (e.g. 'en' for allenai/c4); None for the default."""
    split: str = "train"
    """HF split to stream for training."""
    text_field: str = "text"
    """Column holding the text in HF / jsonl / parquet records."""
    tokenizer: str = "gpt2"
    """'gpt2' (tiktoken BPE, shipped offline) or 'byte' (256 byte ids + end-of-text, for tiny tests)."""
    context_len: int = 128
    """Tokens per context (documents are joined with end-of-text and cut to this length)."""
    heldout_fraction: float = 0.05
    """Fraction of documents (by hash) held out for evaluation; HF sources use the split `heldout_split` instead."""
    heldout_split: str | None = None
    """HF split used for held-out data; None holds out documents by hash from `split`."""
    shuffle_buffer: int = 1000
    """Documents in the streaming shuffle buffer (HF streaming shuffle / local shuffle)."""
    loop: bool = True
    """When the source is exhausted: True starts another epoch (reshuffled), False stops the stream."""
    seed: int = 0
    """Seed for document order."""

    def __post_init__(self) -> None:
        _positive(self, "data", "context_len", "shuffle_buffer")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError("data.heldout_fraction must be in [0, 1)")
        if self.tokenizer not in ("gpt2", "byte"):
            raise ConfigError(f"data.tokenizer must be 'gpt2' or 'byte', got {self.tokenizer!r}")


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
        _positive(self, "lm", "n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "vocab_size")
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
        _positive(self, "lm_train", "tokens", "batch_size", "eval_every", "eval_tokens", "checkpoint_every",
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
        _positive(self, "buffer", "capacity", "lm_batch_size", "reuse")
        if self.merge_lag is not None and self.merge_lag < 0:
            raise ConfigError("buffer.merge_lag must be >= 0")
        if not 0.0 < self.refill_fraction <= 1.0:
            raise ConfigError("buffer.refill_fraction must be in (0, 1]")
        if self.storage not in ("auto", "cuda", "pinned", "cpu"):
            raise ConfigError(f"buffer.storage must be auto, cuda, pinned or cpu, got {self.storage!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"buffer.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.positions_per_context is not None and self.positions_per_context <= 0:
            raise ConfigError("buffer.positions_per_context must be > 0 or null")


ARCHITECTURES = ("anthropic", "april", "topk", "batchtopk")


@dataclass
class SAEConfig:
    architecture: str = "anthropic"
    """'anthropic' (2023 paper), 'april' (Apr-2024 update), 'topk' (with AuxK) or 'batchtopk'."""
    d_in: int | None = None
    """Input width; None takes it from the hook. Must match the hook if set."""
    d_sae: int = 4096
    """Dictionary size (features)."""
    l1_coeff: float = 1e-3
    """λ (anthropic/april): loss = MSE (mean over elements) + λ·Σ_f|f| (april |f|·‖W_d,f‖); = λ_paper / d_in."""
    k: int = 32
    """Active features per input (topk) or on average per input (batchtopk)."""
    auxk_coeff: float = 1 / 32
    """AuxK loss coefficient (topk/batchtopk)."""
    auxk_k: int | None = None
    """Dead latents used by AuxK; None = d_in // 2."""
    dead_tokens_auxk: int = 10_000_000
    """A latent is dead for AuxK after this many tokens without firing."""
    init_b_dec: str = "geometric_median"
    """'geometric_median' of a buffer sample (paper), 'mean', or 'zeros'."""
    topk_kernels: str = "auto"
    """topk/batchtopk: 'sparse' (touch only the selected entries), 'dense', or 'auto' (sparse on CPU, dense on CUDA)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"sae.architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        _positive(self, "sae", "d_sae", "k", "dead_tokens_auxk")
        if self.d_in is not None and self.d_in <= 0:
            raise ConfigError("sae.d_in must be > 0 or null")
        if self.architecture in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ConfigError(f"sae.k ({self.k}) must be <= sae.d_sae ({self.d_sae})")
        if self.l1_coeff < 0:
            raise ConfigError("sae.l1_coeff must be >= 0")
        if self.init_b_dec not in ("geometric_median", "mean", "zeros"):
            raise ConfigError("sae.init_b_dec must be geometric_median, mean or zeros")
        if self.topk_kernels not in ("auto", "sparse", "dense"):
            raise ConfigError(f"sae.topk_kernels must be auto, sparse or dense, got {self.topk_kernels!r}")


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
    """Tokens over which feature densities are accumulated for metrics."""
    nan_policy: str = "stop"
    """Non-finite activations: 'stop' (error with the step) or 'skip' (drop and count those rows)."""
    step_impl: str = "auto"
    """'fused' (hand-written backward, anthropic only), 'autograd', or 'auto' (fused where it applies)."""
    kernels: str = "auto"
    """'triton' (fused step passes, decoder-norm constraint, the native LM's kernels), 'torch', 'auto' (triton on
    CUDA)."""
    cuda_graphs: bool = True
    """CUDA: replay the whole step (fwd, bwd, Adam, constraints, metrics) as one graph (not with nan skip / DDP)."""
    tf32: bool = True
    """On CUDA, let fp32 matmuls use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)."""
    cpu_malloc_tuning: bool = True
    """On CPU (glibc), keep freed memory in the heap (mallopt): no page faults per step, ~10-25% faster steps."""

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def __post_init__(self) -> None:
        _positive(self, "train", "total_tokens", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
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
        _positive(self, "resample", "dead_window", "pool_size")
        if any(not 0.0 < f < 1.0 for f in self.at_fractions):
            raise ConfigError("resample.at_fractions must all be in (0, 1)")


@dataclass
class EvalConfig:
    tokens: int = 1_000_000
    """Held-out tokens for `sae-stream eval`."""
    batch_contexts: int = 16
    """Contexts per eval forward."""
    histogram_bins: int = 60
    """Bins of the log10 density histogram."""

    def __post_init__(self) -> None:
        _positive(self, "eval", "tokens", "batch_contexts", "histogram_bins")


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

    def __post_init__(self) -> None:
        _positive(self, "analysis", "features", "top_k", "tokens", "batch_contexts", "logit_k", "histogram_bins",
                  "ablation_contexts")
        if self.window < 0:
            raise ConfigError("analysis.window must be >= 0")
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


# What one LM forward and one buffer fix for every SAE of a sweep: the batches, the step count, and when
# checkpoints and metric records happen (all members checkpoint together); tf32 is a process-wide torch switch.
SWEEP_SHARED_TRAIN = ("device", "total_tokens", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                      "background_checkpoints", "nan_policy", "cpu_malloc_tuning", "tf32")
SWEEP_SHARED_RESAMPLE = ("pool_size", "pool_dtype")  # one pool, drawn once per step, for every member resampling
SWEEP_SECTIONS = ("sae", "train", "resample")
SWEEP_RESERVED = ("checkpoints", "sae", "lm", "dashboard")


@dataclass
class SweepConfig:
    saes: list[dict] = field(default_factory=list)
    """SAEs fed by one LM + buffer: {name, sae, train, resample} overrides, one run subdir each; [] = one SAE."""

    def __post_init__(self) -> None:
        names = []
        for i, entry in enumerate(self.saes):
            name = entry.get("name")
            where = f"sweep.saes[{i}]"
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ConfigError(f"{where} needs a name of letters, digits, '_' or '-' (it names the run's "
                                  f"subdirectory), got {name!r}")
            if name in SWEEP_RESERVED:
                raise ConfigError(f"{where}: name {name!r} is reserved in the run directory; choose another")
            if name in names:
                raise ConfigError(f"{where}: duplicate name {name!r}: each SAE of a sweep needs its own name")
            names.append(name)
            for key, value in entry.items():
                if key != "name" and key not in SWEEP_SECTIONS:
                    raise ConfigError(f"{where} ({name}): unknown key {key!r}; a sweep entry overrides only "
                                      f"{', '.join(SWEEP_SECTIONS)}")
                if key != "name" and not isinstance(value, dict):
                    raise ConfigError(f"{where} ({name}).{key}: expected a mapping of fields, got {value!r}")
            shared = [f"train.{k}" for k in sorted(set(entry.get("train", {})) & set(SWEEP_SHARED_TRAIN))]
            shared += [f"resample.{k}" for k in sorted(set(entry.get("resample", {})) & set(SWEEP_SHARED_RESAMPLE))]
            if shared:
                raise ConfigError(f"{where} ({name}): {shared[0]} is shared by every SAE of a sweep (one stream, one "
                                  f"step count, one pool): set it in the top-level section")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    lm_train: LMTrainConfig = field(default_factory=LMTrainConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def sweep_members(self) -> list[tuple[str, Config]]:
        """(name, full config) of each SAE of the sweep, in order; [] without a sweep. Raises ConfigError."""
        if not self.sweep.saes:
            return []
        base = {**to_dict(self), "sweep": {"saes": []}}
        members = []
        for i, entry in enumerate(self.sweep.saes):
            try:
                cfg = config_from_dict(merge(base, {k: v for k, v in entry.items() if k != "name"}))
            except ConfigError as e:
                raise ConfigError(f"sweep.saes[{i}] ({entry['name']}): {e}") from None
            members.append((entry["name"], cfg))
        widths = {cfg.sae.d_in for _, cfg in members} | {self.sae.d_in}
        if len(widths - {None}) > 1:
            raise ConfigError(f"sweep: sae.d_in differs between SAEs ({sorted(widths - {None})}) but they read one "
                              "hook: leave sae.d_in null (taken from the hook) or set it once at the top level")
        return members

    def __post_init__(self) -> None:
        if self.buffer.capacity < 2 * self.train.batch_size:
            raise ConfigError(
                f"buffer.capacity ({self.buffer.capacity}) must be >= 2 * train.batch_size ({self.train.batch_size})")
        if self.data.context_len > self.lm.n_ctx:
            raise ConfigError(f"data.context_len ({self.data.context_len}) must be <= lm.n_ctx ({self.lm.n_ctx})")
        if self.train.step_impl == "fused" and self.sae.architecture != "anthropic":
            raise ConfigError(f"train.step_impl=fused covers sae.architecture=anthropic only, not "
                              f"{self.sae.architecture!r}: use step_impl=auto or autograd")
        if self.sweep.saes:
            if self.wandb.enabled:
                raise ConfigError("wandb.enabled is not supported with sweep.saes yet (one wandb run per process): "
                                  "set wandb.enabled=false; each SAE logs to RUN_DIR/NAME/metrics.jsonl")
            self.sweep_members()  # every member must validate now, before any run starts


# ---------------------------------------------------------------------------------------------- helpers


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {getattr(obj, name)}")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_check_type(key, v, a) for v, a in zip(value, args))
        return [_check_type(key, v, args[0]) for v in value]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{where}' (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name] or {}, key)
        else:
            kwargs[f.name] = _check_type(key, raw[f.name], tp)
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data."""
    return _build(Config, raw or {}, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        return v

    return {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()} for f in fields(cfg)}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.field=value` (or `--section.field value`) -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value: use {arg}=VALUE")
        section, _, name = key.partition(".")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.setdefault(section, {})[name] = value
        i += 1
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        if not isinstance(values, dict) or not isinstance(out.get(section, {}), dict):
            out[section] = values
            continue
        out.setdefault(section, {}).update(values)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found: pass a YAML file such as configs/default.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or the embedded default) + `--section.field=value` overrides -> validated Config."""
    raw = read_yaml(path) if path is not None else read_yaml(default_config_path())
    return config_from_dict(merge(raw, parse_overrides(overrides or [])))


def default_config_path() -> Path:
    """The embedded default config, shipped inside the package (also in configs/default.yaml)."""
    return Path(__file__).parent / "assets" / "default.yaml"


def save_config(cfg: Config, path: str | Path) -> None:
    from sae_stream.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------- --help


def field_docs(cls: type) -> dict[str, str]:
    """The docstring literal below each field of a dataclass (its --help text)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # one line (a table cell)
    return docs


def help_text(markdown: bool = False) -> str:
    """Every field as `--section.field (type, default): doc`, or as markdown tables (the README's reference)."""
    lines = []
    for f in fields(Config):
        cls = _hints(Config)[f.name]
        docs, hints, default = field_docs(cls), _hints(cls), f.default_factory()  # type: ignore[misc]
        lines += [f"\n**{f.name}**\n", "| field | type | default | meaning |", "|---|---|---|---|"] if markdown \
            else [f"\n{f.name}:"]
        for sub in fields(cls):
            value, doc, tp = getattr(default, sub.name), docs.get(sub.name, ""), _type_name(hints[sub.name])
            if markdown:
                cell = doc.replace("|", "\\|")
                lines.append(f"| `{f.name}.{sub.name}` | {tp.replace('|', 'or')} | `{value!r}` | {cell} |")
            else:
                lines += [f"  --{f.name}.{sub.name} ({tp}, default {value!r})", f"      {doc}"]
    return "\n".join(lines).strip("\n")
