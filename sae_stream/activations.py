"""Activation vectors from any hook of a HookedTransformer, streamed from token batches.

The forward stops right at the hook: a forward hook on the last hooked point raises a private exception, so
nothing after it runs (for `blocks.0.mlp.hook_post` that skips W_out, the rest of the model and the unembedding,
which alone is ~10x the cost of a 1-layer model's body). `stop="layer"` instead runs whole blocks up to the hooked
one (`model(tokens, stop_at_layer=L + 1)`). Measured on an H100 (benchmarks/buffer_throughput.py, 1-layer paper
model): 6.3M vs 3.9M tokens/s at context 1024; equal (launch-bound) at context 128 with 32-context batches.

    stream = ActivationStream(model, "blocks.0.mlp.hook_post", token_batches, cfg.buffer, device="cuda", seed=0)
    for chunk in stream:                  # ActivationChunk(acts [n, d_in], context [n], position [n])
        ...

Several hook names give one vector per position: their activations concatenated in the order given.
A hook with several trailing dims (`blocks.0.attn.hook_z` [B, T, H, d_head]) is flattened to one vector per position;
attention patterns/scores [B, H, Tq, Tk] give per query position a vector of H * Tk (so their width depends on the
context length; `sae-stream train` refuses them, since eval, analyze and load_run read one vector per position of
[B, T, ...] hooks only).

Every vector carries its provenance (context index in the stream, position): 12 bytes next to 1-2 KB of activations;
`expected_distinct` and `shuffle_metrics` (at the end) turn a batch's provenance into shuffle metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_stream.config import BufferConfig
from sae_stream.hook_points import check_hook_names
from sae_stream.process import as_reported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUERY_SECOND = ("hook_pattern", "hook_attn_scores")  # [B, H, Tq, Tk]: the query position is dim 2


class ActivationChunk(NamedTuple):
    """Activation vectors with their provenance (for shuffle metrics; -1 where unknown)."""

    acts: Tensor
    """[n, d_in] activations."""
    context: Tensor
    """[n] int64 index of the context in the stream (0, 1, 2, ... in the order the token batches gave them)."""
    position: Tensor
    """[n] int32 token position within its context."""


class _StopForward(Exception):
    """Raised by the last hook so the forward stops there."""


def _per_position(act: Tensor, name: str) -> Tensor:
    """A hook's activation as [B, T, d]: one vector per (context, position)."""
    if act.ndim == 4 and name.endswith(_QUERY_SECOND):
        act = act.permute(0, 2, 1, 3)  # [B, H, Tq, Tk] -> [B, Tq, H, Tk]
    if act.ndim == 2:
        return act.unsqueeze(-1)
    return act.flatten(2) if act.ndim > 3 else act


def _stop_layer(model: HookedTransformer, names: list[str]) -> int | None:
    """`stop_at_layer` that still runs every hooked point (None: the whole model, for ln_final / unembed hooks)."""
    layers = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "blocks":
            layers.append(int(parts[1]) + 1)
        elif name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            layers.append(0)
        else:
            return None
    return max(layers)


class HookCapture:
    """Runs the model on tokens and returns the hooked activations [B, T, d_in], stopping at the last hook."""

    def __init__(self, model: HookedTransformer, hook_names: str | Sequence[str], stop: str = "raise") -> None:
        if stop not in ("raise", "layer"):
            raise ValueError(f"stop must be 'raise' or 'layer', got {stop!r}")
        self.model = model
        self.names = check_hook_names(model, hook_names)
        self.stop = stop
        self._stop_at_layer = _stop_layer(model, self.names)
        self._got: dict[str, Tensor] = {}

    def _hook(self, name: str) -> Any:
        def fn(module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
            self._got[name] = output
            if self.stop == "raise" and len(self._got) == len(self.names):
                raise _StopForward

        return fn

    def __call__(self, tokens_BT: Tensor) -> Tensor:
        self._got = {}
        handles = [self.model.hook_dict[n].register_forward_hook(self._hook(n)) for n in self.names]
        try:
            if self.stop == "raise":
                self.model(tokens_BT, return_type=None)
            else:
                self.model(tokens_BT, stop_at_layer=self._stop_at_layer, return_type=None)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.names if n not in self._got]
        if missing:
            raise ValueError(f"hook(s) {missing} never fired in a forward: `sae-stream hooks --lm LM` lists those "
                             "that do")
        acts = [_per_position(self._got[n], n) for n in self.names]
        self._got = {}
        return acts[0] if len(acts) == 1 else torch.cat(acts, dim=-1)


@torch.inference_mode()
def hook_dim(model: HookedTransformer, hook_name: str | Sequence[str], context_len: int = 1) -> int:
    """Width of the vector one position gives at the hook(s): a `context_len`-token forward (only attention
    patterns/scores depend on it)."""
    device = next(model.parameters()).device
    tokens = torch.zeros(1, context_len, dtype=torch.long, device=device)
    return HookCapture(model, hook_name)(tokens).shape[-1]


def _autocast(device: torch.device) -> Any:
    """The LM's precision when producing: bf16 autocast on cuda, fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class _Rebatcher:
    """Token batches of any size -> batches of exactly `size` contexts (the last one may be smaller)."""

    def __init__(self, token_batches: Iterable[Tensor], size: int) -> None:
        self.source = token_batches
        self._it = iter(token_batches)
        self.size = size
        self.pending: list[Tensor] = []

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        n = sum(len(t) for t in self.pending)
        while n < self.size:
            try:
                batch = next(self._it)
            except StopIteration:
                break
            if batch.ndim != 2:
                raise ValueError(f"token batches must be LongTensor[B, T], got shape {tuple(batch.shape)}")
            self.pending.append(batch)
            n += len(batch)
        if n == 0:
            raise StopIteration
        rows = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending = [rows[self.size:]] if n > self.size else []
        return rows[: self.size]


class ActivationStream:
    """Iterator of ActivationChunk from token batches LongTensor[B, T], re-batched to `cfg.lm_batch_size` contexts.

    Per context it keeps positions 1..T-1 (`cfg.skip_first_position`) or all, or `cfg.positions_per_context` of
    them drawn without replacement by a generator seeded with `seed`: sampling discards LM work (the forward
    computes every position). The LM runs where its weights are, under inference_mode, in bf16 autocast on cuda;
    vectors are returned on `device` (None: the model's device) in `cfg.dtype` (`auto`: as the hook gives them,
    found by one probe forward at construction; `.dtype`). Hooks are registered per forward,
    so one model must not be shared by streams running in different threads. `write_into` (what ShuffleBuffer
    uses first) puts a batch's vectors straight into a ring's free slots when the capture can (lm.capture).
    """

    def __init__(self, model: HookedTransformer, hook_names: str | Sequence[str], token_batches: Iterable[Tensor],
                 cfg: BufferConfig, device: str | torch.device | None = None, *, seed: int = 0, stop: str = "raise",
                 context_len: int = 1, capture: Callable[[Tensor], Tensor] | None = None) -> None:
        self.cfg = cfg
        self.lm_device = next(model.parameters()).device
        self.device = as_reported(device) if device is not None else self.lm_device  # (compared in write_into)
        hooks = HookCapture(model, hook_names, stop)
        # `capture` computes the same activations another way (lm.capture.GPTCapture: the GPT's fused attention)
        self.capture = capture if capture is not None else hooks
        # one probe forward, as __next__ runs it: the width, and the dtype the hook gives (buffer.dtype=auto)
        tokens = torch.zeros(1, context_len, dtype=torch.long, device=self.lm_device)
        with torch.inference_mode(), _autocast(self.lm_device):
            probe = self.capture(tokens)
        self.d_in = probe.shape[-1]
        self.dtype = probe.dtype if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        self._batches = _Rebatcher(token_batches, cfg.lm_batch_size)
        self._gen = torch.Generator().manual_seed(seed)
        self.contexts_seen = 0

    def __iter__(self) -> Iterator[ActivationChunk]:
        return self

    def _span(self, T: int) -> tuple[int, bool]:
        """First usable position of a context of T tokens, and whether positions are sampled among the usable ones
        (`cfg.positions_per_context` fewer than them); a one-line error if there are too few."""
        start = 1 if self.cfg.skip_first_position else 0
        usable = T - start
        k = self.cfg.positions_per_context
        if usable <= 0:
            raise ValueError(f"contexts of {T} token(s) leave no positions: use longer contexts")
        if k is not None and k > usable:
            raise ValueError(f"buffer.positions_per_context ({k}) exceeds the {usable} usable positions per context")
        return start, k is not None and k < usable

    def _positions(self, B: int, T: int) -> tuple[int, Tensor | None]:
        """First usable position, and the [B, k] sampled positions (CPU) or None to keep every usable one."""
        start, sampled = self._span(T)
        if not sampled:
            return start, None
        k = self.cfg.positions_per_context
        return start, torch.rand(B, T - start, generator=self._gen).argsort(dim=1)[:, :k] + start

    def _to_lm(self, tokens_BT: Tensor) -> Tensor:
        """A token batch on the LM's device (through pinned memory from the host: no wait for the stream)."""
        dev = self.lm_device
        if dev.type == "cuda" and tokens_BT.device.type == "cpu":  # pageable: the copy would wait for the stream
            pinned_BT = torch.empty(tokens_BT.shape, dtype=tokens_BT.dtype, pin_memory=True)
            np.copyto(pinned_BT.numpy(), tokens_BT.numpy())  # (numpy's one-thread copy: torch's wakes its thread
            tokens_BT = pinned_BT  # pool, whose spinning slowed the data process reading ahead, prefetch.py)
        return tokens_BT.to(dev, non_blocking=True)

    def write_into(self, ring_ND: Tensor, context_N: Tensor, position_N: Tensor, slots_N: Tensor) -> int:
        """Runs the LM on the next token batch and writes its n vectors, and their provenance, to the ring's rows
        `slots_N[:n]` itself (the capture's `write`: lm.capture.GPTCapture stores from its last kernel), the same
        values and order as __next__ would give; returns n. Returns 0 and writes nothing when it cannot: no
        `write` on the capture, the ring not on the LM's device in the stream's dtype and width, positions
        sampled, the batch's vectors more than `slots_N` holds (the batch then waits for the next call), the
        stream at its end. ShuffleBuffer fills its free slots this way first."""
        if not (hasattr(self.capture, "write") and self.cfg.positions_per_context is None
                and ring_ND.device == self.lm_device == self.device and ring_ND.dtype == self.dtype
                and ring_ND.shape[1] == self.d_in):
            return 0
        try:
            tokens_BT = next(self._batches)
        except StopIteration:
            return 0
        B, T = tokens_BT.shape
        start, _ = self._span(T)
        if B * (T - start) > len(slots_N):
            self._batches.pending.insert(0, tokens_BT)  # (__next__ takes it)
            return 0
        slots_N = slots_N[:B * (T - start)]
        context_n, position_n = self._produce(self._to_lm(tokens_BT), start, ring_ND, slots_N)
        context_N.index_copy_(0, slots_N, context_n)
        position_N.index_copy_(0, slots_N, position_n)
        return len(slots_N)

    def __next__(self) -> ActivationChunk:
        tokens_BT = self._to_lm(next(self._batches))
        B, T = tokens_BT.shape
        start, sampled = self._span(T)
        if not sampled and hasattr(self.capture, "write"):  # the LM writes the chunk as write_into does the ring
            acts_ND = torch.empty(B * (T - start), self.d_in, dtype=self.dtype, device=self.lm_device)
            rows_N = torch.arange(len(acts_ND), device=self.lm_device)
            chunk = ActivationChunk(acts_ND, *self._produce(tokens_BT, start, acts_ND, rows_N))
        else:
            chunk = self._chunk(tokens_BT)
        return chunk if self.device == self.lm_device else ActivationChunk(*(t.to(self.device) for t in chunk))

    def _produce(self, tokens_BT: Tensor, start: int, out_RD: Tensor, rows_N: Tensor) -> tuple[Tensor, Tensor]:
        """The vectors of positions start.. of a token batch (on the LM's device) written by the capture to rows
        `rows_N` of `out_RD`; returns the rows' provenance (context_N int64, position_N int32)."""
        dev, (B, T) = self.lm_device, tokens_BT.shape
        with torch.inference_mode(), _autocast(dev):
            self.capture.write(tokens_BT, start, out_RD, rows_N)
        return self._contexts(B, T - start), torch.arange(start, T, dtype=torch.int32, device=dev).repeat(B)

    def _contexts(self, B: int, K: int) -> Tensor:
        """[B·K] the stream indices of the next B contexts, K rows each; they count as seen."""
        self.contexts_seen += B
        return (torch.arange(B, device=self.lm_device) + self.contexts_seen - B).repeat_interleave(K)

    def _chunk(self, tokens_BT: Tensor) -> ActivationChunk:
        """A token batch's vectors (every usable position's, or those sampled) from the capture's output."""
        dev, (B, T) = self.lm_device, tokens_BT.shape
        start, pos_BK = self._positions(B, T)
        with torch.inference_mode(), _autocast(dev):
            acts_BTD = self.capture(tokens_BT)
            if pos_BK is None:
                acts_BKD = acts_BTD[:, start:]
                pos_BK = torch.arange(start, T, dtype=torch.int32, device=dev).expand(B, T - start)
            else:
                pos_BK = pos_BK.to(dev, torch.int32, non_blocking=True)
                acts_BKD = acts_BTD.gather(1, pos_BK.long()[:, :, None].expand(-1, -1, acts_BTD.shape[-1]))
            acts_ND = acts_BKD.to(self.dtype).reshape(-1, acts_BKD.shape[-1])
        return ActivationChunk(acts_ND, self._contexts(B, pos_BK.shape[1]), pos_BK.reshape(-1))

    def state_dict(self) -> dict[str, Any]:
        """Stream position (contexts seen, leftover token rows, sampling RNG; the token source's own state if it
        has `state_dict`). Resuming also needs the token source positioned where it was."""
        pending = self._batches.pending
        state: dict[str, Any] = {
            "contexts_seen": self.contexts_seen,
            "rng": self._gen.get_state(),
            "pending_tokens": torch.cat(pending).cpu() if pending else None,
        }
        if hasattr(self._batches.source, "state_dict"):
            state["token_source"] = self._batches.source.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.contexts_seen = int(state["contexts_seen"])
        self._gen.set_state(state["rng"])
        pending = state.get("pending_tokens")
        self._batches.pending = [pending] if pending is not None else []
        if state.get("token_source") is not None and hasattr(self._batches.source, "load_state_dict"):
            self._batches.source.load_state_dict(state["token_source"])
            self._batches._it = iter(self._batches.source)


# ---------------------------------------------------------------------------------------------- provenance
# What a batch's provenance says about how well it is shuffled (ShuffleBuffer.metrics).


def expected_distinct(context_N: Tensor, draws: int) -> Tensor:
    """E[#distinct contexts] in `draws` uniform draws without replacement from vectors tagged `context_N`.

    Hypergeometric: a context with m of the n vectors is missed with probability C(n-m, B) / C(n, B). Without
    data-dependent shapes (no GPU sync): m is each vector's run length in the ids sorted as int32 offsets (exact
    unless a pool spans 2^32 contexts), from running maxima of run starts and ends (scans: cheaper than searches)."""
    n = context_N.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=context_N.device)
    sorted_N = (context_N - context_N.min()).to(torch.int32).sort().values
    i_N = torch.arange(n, device=context_N.device)
    edge_N = sorted_N[1:] != sorted_N[:-1]  # a new run starts at i + 1
    start_N = torch.where(torch.cat([edge_N.new_ones(1), edge_N]), i_N, 0).cummax(0).values
    last_N = torch.where(torch.cat([edge_N, edge_N.new_ones(1)]), n - 1 - i_N, 0).flip(0).cummax(0).values.flip(0)
    m_N = (n - last_N - start_N).double()  # (run end = n - 1 - last, so m = end - start + 1)
    B, rest_N = min(draws, n), n - m_N
    log_miss_N = (torch.lgamma(rest_N + 1) - torch.lgamma((rest_N - B).clamp(min=0) + 1)
                  - math.lgamma(n + 1) + math.lgamma(n - B + 1))
    miss_N = torch.where(rest_N >= B, log_miss_N.exp(), torch.zeros_like(rest_N))
    return ((1 - miss_N) / m_N).sum()


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / den) if den > 0 else 0.0


def shuffle_metrics(samples: Iterable[tuple[int, Tensor, Tensor, Tensor]]) -> dict[str, float]:
    """Shuffle quality from (batch index, context_B, position_B, expected distinct) samples.

    distinct_contexts (mean per batch) vs distinct_contexts_ideal (uniform draws from the same unread pool) and
    their ratio; max_rows_per_context (the most rows one context gave a batch, max over samples);
    position_row_corr (mean Pearson r of row index and position within a batch: ~0 unless rows come in order);
    position_batch_corr (r of batch index and the batch's mean position: drift across batches).
    """
    rows = [(i, c.cpu(), p.cpu(), float(e)) for i, c, p, e in samples]
    rows = [r for r in rows if bool((r[1] >= 0).all())]
    if not rows:
        return {}
    distinct = [float(c.unique().numel()) for _, c, _, _ in rows]
    ideal = [e for *_, e in rows]
    out = {
        "distinct_contexts": sum(distinct) / len(rows),
        "distinct_contexts_ideal": sum(ideal) / len(rows),
        "max_rows_per_context": max(int(c.unique(return_counts=True)[1].max()) for _, c, _, _ in rows),
        "position_row_corr": sum(_pearson(torch.arange(len(p)), p) for _, _, p, _ in rows) / len(rows),
        "shuffle_samples": len(rows),
    }
    out["distinct_ratio"] = out["distinct_contexts"] / max(out["distinct_contexts_ideal"], 1e-9)
    if len(rows) > 2:
        means = torch.tensor([float(p.double().mean()) for _, _, p, _ in rows])
        out["position_batch_corr"] = _pearson(torch.tensor([float(i) for i, *_ in rows]), means)
    return out
