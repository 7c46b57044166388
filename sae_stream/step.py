"""The fast training step: a hand-written backward for the Anthropic SAE, and CUDA-graph replay of a whole step.

    out, stats = anthropic_grads_(sae, x_BD, lam, torch.bfloat16, "triton")  # sets .grad of the 4 parameters
    step = GraphedStep(body)                                   # body(x_BD): one sync-free optimisation step
    step(x_BD, key=auxk_on)                                    # eager warm-up, then capture once, then replay
    with priority_stream(device): ...                          # training ahead of the LM's refills on the GPU

Why by hand: autograd's version of the Anthropic loss makes several more passes over the [B, d_sae] activations
(ReLU backward, the λ gradient expanded and added separately, a bool firing mask) and, at 4096 features, a step is
~40 kernels whose launches cost more than their work. The hand-written backward reads the activations a minimum
number of times; the graph turns the ~40 launches into one. Both are checked against autograd / eager in tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from sae_stream.config import ConfigError
from sae_stream.fused_ops import (
    center,
    encode_relu,
    relu_backward,
    residual,
    step_layout,
    triton_available,
    triton_probe,
)
from sae_stream.process import as_reported
from sae_stream.sae import SAE, AnthropicSAE, SAEOutput

GRAPH_WARMUP_STEPS = 3  # eager steps (on a side stream) before capture: lazy optimizer state, cuBLAS workspaces


HIGH_PRIORITY = -1  # CUDA stream priorities: lower is higher; 0 (every stream's default) is the lowest


@contextlib.contextmanager
def priority_stream(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run the block (training: batch draws, steps, metrics) on a CUDA stream of high priority, ordered after the
    work already queued on the current stream, which then waits for it. The LM's refills run on the buffer's
    producer stream at the default (lowest) priority: when both have work ready, the SMs that free up take the
    step's blocks first, and the LM fills what the step's small kernels leave idle (running blocks are never
    preempted). A no-op off CUDA, when `enabled` is false, or when the current stream has high priority already."""
    if device.type != "cuda" or not enabled or torch.cuda.current_stream(device).priority <= HIGH_PRIORITY:
        yield
        return
    outer = torch.cuda.current_stream(device)
    inner = torch.cuda.Stream(device, priority=HIGH_PRIORITY)
    inner.wait_stream(outer)
    try:
        with torch.cuda.stream(inner):
            yield
    finally:
        outer.wait_stream(inner)


def supports_fused(sae: SAE) -> bool:
    """The hand-written backward covers exactly the Anthropic 2023 loss (ReLU, Σf penalty, x − b_dec input)."""
    return type(sae) is AnthropicSAE


def resolve_kernels(choice: str, device: torch.device) -> str:
    """train.kernels -> 'triton' or 'torch' for this device (one-line errors where Triton cannot run)."""
    if choice == "auto":
        if device.type != "cuda" or not triton_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return "torch"  # (under the interpreter Triton would run on the host: slow)
        why = triton_probe(device)
        if why is not None:
            warnings.warn(f"Triton kernels unusable on {device} ({why}); using train.kernels=torch", stacklevel=2)
            return "torch"
        return "triton"
    if choice == "triton":
        if not triton_available():
            raise ConfigError("train.kernels=triton needs the triton package (pip install triton), or use "
                              "train.kernels=torch")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("train.kernels=triton runs on CUDA (on CPU only under TRITON_INTERPRET=1, Triton's "
                              "slow interpreter): use train.kernels=auto or torch")
    return choice


class StepStats(NamedTuple):
    """What the hand-written step computes on the way that the metrics would otherwise recompute."""
    counts_F: Tensor  # rows with f > 0 per feature (int64)
    var_sq: Tensor  # Σ_rows ‖x − mean(x)‖² (fp64): the FVU's denominator
    finite: Tensor  # bool 0-dim: every entry of x is finite
    layout: str  # where f's column sums were taken (fused_ops.step_layout): 'stats' but with Triton on CUDA


def anthropic_grads_(sae: SAE, x_BD: Tensor, lam: float | Tensor, dtype: torch.dtype = torch.float32,
                     kernels: str = "torch", layout: str | None = None) -> tuple[SAEOutput, StepStats]:
    """Loss of AnthropicSAE.forward and its gradients, written into the parameters' .grad (replacing them).

    Matmuls run in `dtype` (bf16: as under autocast), reductions and the loss in fp32; `kernels` picks how the
    passes between the matmuls run (sae_stream.fused_ops); `layout` pins fused_ops.step_layout's pick (Triton: a
    resumed run keeps its checkpoint's). x may be bf16/fp16 (a bf16 ring): it is read as fp32, so the step equals
    the step on x.float(). Maths (B rows, D = d_in):
        x̄ = x − b_d;  f = ReLU(x̄ W_e + b_e);  x̂ = f W_d + b_d;  r = x̂ − x;  L = Σr²/(B·D) + λ·Σf/B
        g_r = 2r/(B·D);  ∂W_d = fᵀ g_r;  g_pre = [f > 0]·(g_r W_dᵀ + λ/B);  ∂W_e = x̄ᵀ g_pre;  ∂b_e = Σ_B g_pre
        ∂b_d = Σ_B g_r − W_e ∂b_e   (b_d enters the encoder through x̄)
    """
    n, d = x_BD.shape
    W_enc, b_enc, W_dec, b_dec = sae.W_enc_DF, sae.b_enc_F, sae.W_dec_FD, sae.b_dec_D
    acc = W_dec.dtype  # the parameters' dtype (fp32): gradients, reductions and the loss
    with torch.no_grad():
        xc_BD, var_sq, finite = center(x_BD, b_dec, dtype, kernels)
        W_dec_c, W_enc_c = W_dec.to(dtype), W_enc.to(dtype)
        # Triton: f's column sums in the encoder's epilogue, or in the backward's (which loads f anyway) beside a
        # cuBLAS encoder, whichever step_layout found faster
        layout = step_layout(xc_BD, W_enc_c, b_enc, W_dec_c, pin=layout) if kernels == "triton" else "stats"
        split = layout != "stats"
        feats_BF, fsum_F, counts_F = encode_relu(xc_BD, W_enc_c, b_enc, kernels, stats=not split, impl=layout)
        recon_BD = torch.addmm(b_dec.to(dtype), feats_BF, W_dec_c)
        c = 2.0 / (n * d)
        g_recon_c, sq, rsum_D = residual(recon_BD, x_BD, c, dtype, kernels)  # g_r in the matmul dtype
        mse = sq / (n * d)
        W_dec.grad = _mm_to(feats_BF.T, g_recon_c, acc)
        add = (lam / n).to(acc) if isinstance(lam, Tensor) else torch.tensor(lam / n, dtype=acc, device=x_BD.device)
        if split:
            g_pre_BF, g_benc_F, fsum_F, counts_F = relu_backward(g_recon_c, W_dec_c, feats_BF, add, kernels, True)
        else:
            g_pre_BF, g_benc_F = relu_backward(g_recon_c, W_dec_c, feats_BF, add, kernels)
        l1 = fsum_F.sum() / n
        W_enc.grad = _mm_to(xc_BD.T, g_pre_BF, acc)
        b_enc.grad = g_benc_F.to(acc)
        b_dec.grad = rsum_D.to(acc) * c - W_enc @ b_enc.grad
    zero = mse.new_zeros(())
    out = SAEOutput(recon_BD, feats_BF, mse + lam * l1, mse, l1, zero)  # recon and feats in `dtype`
    return out, StepStats(counts_F, var_sq, finite, layout)


@functools.cache
def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """torch.mm(..., out_dtype=) for these operands on this device (CUDA, torch >= 2.9): probed once, outside
    any graph capture (the first eager step), never inside the hot path's error handling."""
    a = torch.ones(2, 2, dtype=dtype, device=device)
    try:
        return torch.equal(torch.mm(a, a, out_dtype=torch.float32), torch.full((2, 2), 2.0, device=device))
    except (RuntimeError, TypeError):
        return False


def _mm_to(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b as `dtype` (fp32 weight gradients from bf16 operands): on CUDA straight out of the matmul (no
    rounding to bf16, no cast kernel), elsewhere a matmul then a cast."""
    if a.is_cuda and a.dtype != dtype and dtype == torch.float32 and _mm_out_dtype_works(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


class DeviceScalar:
    """A 0-d device tensor that a CUDA graph reads (the lr, λ), refilled only when its value changes: a fill is a
    queued kernel, ~2 µs of the GPU's time, and the schedules hold lr and λ constant for most of a run."""

    def __init__(self, value: float, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.tensor = torch.full((), value, dtype=dtype, device=device)
        self.value = value

    def set(self, value: float) -> None:
        if value != self.value:
            self.tensor.fill_(value)
            self.value = value


class GraphedStep:
    """Runs `body(x_BD)` (device work only: no host syncs, no Python state that changes between steps) as a CUDA
    graph: per `key` (e.g. AuxK on/off: different kernels), GRAPH_WARMUP_STEPS eager calls on a side stream, then
    one capture, then replays. The batch is copied into a static input, unless it is that input already (`input`:
    a buffer that gathers each batch there saves the copy); once a graph is captured, a batch of another shape,
    dtype or device runs eagerly, as after a failed capture (warned once). Graphs hold the addresses of every
    tensor they touch: call `reset()` after replacing any of them (loading a checkpoint, moving devices)."""

    def __init__(self, body: Callable[[Tensor], None], before_capture: Callable[[], None],
                 warmup: int = GRAPH_WARMUP_STEPS) -> None:
        self.body, self.before_capture, self.warmup = body, before_capture, warmup
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.static_x: Tensor | None = None
        self.eager_calls: dict[Hashable, int] = {}
        self.disabled = False
        self._pool = None

    def reset(self) -> None:
        """Forget the graphs (the static input stays: no graph owns it, and a buffer may be gathering into it)."""
        self.graphs.clear()
        self.eager_calls.clear()
        self._pool = None

    def input(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The static input the graphs read, allocated here if it is missing or of another shape/dtype/device
        (before any capture; a replaced one means recapturing, so only while no graph holds the old one)."""
        x, device = self.static_x, as_reported(device)
        if x is None or (x.shape, x.dtype, x.device) != (torch.Size(shape), dtype, device):
            assert not self.graphs, "the static input of captured graphs cannot be replaced (reset() first)"
            self.static_x = torch.empty(shape, dtype=dtype, device=device)
        return self.static_x

    def _load(self, x_BD: Tensor) -> None:
        """x_BD into the static input, unless it is the static input."""
        x = self.static_x
        if not (x_BD.data_ptr() == x.data_ptr() and x_BD.stride() == x.stride()):
            x.copy_(x_BD)

    def __call__(self, x_BD: Tensor, key: Hashable = None) -> None:
        x = self.static_x
        mismatch = x is not None and (x_BD.shape, x_BD.dtype, x_BD.device) != (x.shape, x.dtype, x.device)
        if self.disabled or (mismatch and self.graphs):  # e.g. a last, shorter batch: eager
            self.body(x_BD)
            return
        if mismatch:  # nothing captured yet (e.g. moved to another device): the static input follows the batch
            self.static_x = None
        if key in self.graphs:
            self._load(x_BD)
            self.graphs[key].replay()
            return
        if self.eager_calls.get(key, 0) < self.warmup:
            self.eager_calls[key] = self.eager_calls.get(key, 0) + 1
            self._on_side_stream(x_BD)
            return
        self._capture_and_run(x_BD, key)

    def _on_side_stream(self, x_BD: Tensor) -> None:
        main = torch.cuda.current_stream(x_BD.device)
        side = torch.cuda.Stream(x_BD.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.body(x_BD)
        main.wait_stream(side)

    def _capture_and_run(self, x_BD: Tensor, key: Hashable) -> None:
        self.input(x_BD.shape, x_BD.dtype, x_BD.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # graphs for different keys never run at once: share memory
        self._load(x_BD)
        self.before_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(x_BD.device)
            with torch.cuda.graph(graph, pool=self._pool):
                self.body(self.static_x)
        except Exception as exc:  # noqa: BLE001 — any capture failure falls back to the (identical) eager step
            self.disabled = True
            self.before_capture()
            cause = exc.__context__ or exc  # the op that broke the capture, when capture_end reports it second-hand
            warnings.warn(f"CUDA graph capture of the training step failed ({type(cause).__name__}: "
                          f"{str(cause).splitlines()[0] if str(cause) else ''}); continuing with eager steps "
                          "(set train.cuda_graphs=false to skip the attempt)", stacklevel=3)
            self.body(x_BD)
            return
        self.graphs[key] = graph
        graph.replay()
