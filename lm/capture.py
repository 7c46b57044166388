"""Activations of our own GPT at transformer-lens hook names, computed by the GPT's forward itself.

transformer-lens materialises every attention pattern ([B, H, T, T] in fp32); the GPT uses fused (flash)
attention, which at context 1024 makes producing activations several times faster on a GPU. The values are the
same as the HookedTransformer's hooks (tests: within float tolerance), so `sae-stream` uses this path whenever
the LM is an `lm train` run dir and every hook is one of SUPPORTED (blocks.L.<point>); other hooks go through
transformer-lens.

    capture = GPTCapture(gpt, ["blocks.0.mlp.hook_post"], kernels="triton")
    acts_BTD = capture(tokens_BT)        # like sae_stream.activations.HookCapture
    capture.write(tokens_BT, 1, ring_RD, slots_N)   # positions 1.. of each context into a ring's rows

kernels="triton" (what `train.kernels` resolves to on CUDA) runs the kernels of lm/fused.py under autocast: each
LayerNorm one pass that writes the dtype the next matmul runs in (the first one with the embedding: x and ln_1(x)
from one read of the embedding rows), and when the last point asked for is a block's mlp.hook_post (or hook_pre)
and nothing earlier in that block is, the block from the heads' output to it as one kernel. The same values up to
fp32 rounding (tested against the torch path); if the kernels fail on first use the capture warns once and
continues with torch's. `write` has that kernel store each row straight into its slot of the buffer's ring, which
saves the two copies a chunk cost before (positions 1.. out of [B, T, d], then into the slots: ~4 KB per token of a
512-wide bf16 hook, about a third of the 1-layer forward's memory traffic); into a chunk, it stores positions 1..
only (ActivationStream: the same kernel both ways, so the same roundings).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from lm.fused import block_mlp_in, dest_fits, embed_layer_norm, layer_norm, mlp_in_fits
from lm.model import GPT

# the points of a block, in the order the forward reaches them
POINTS = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
          "hook_mlp_out", "hook_resid_post")
_NAME = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(p) for p in POINTS) + r")$")


def supported(gpt: GPT, hook_names: Sequence[str]) -> bool:
    """True when every name is a block point GPTCapture computes, in a layer the GPT has."""
    for name in hook_names:
        m = _NAME.match(name)
        if m is None or int(m.group(1)) >= gpt.cfg.n_layers:
            return False
    return True


class GPTCapture:
    """Runs the GPT up to the last point needed and returns the points' activations, concatenated along the last
    dimension in the order given ([B, T, Σ widths])."""

    def __init__(self, gpt: GPT, hook_names: Sequence[str], kernels: str = "torch") -> None:
        if not supported(gpt, hook_names):
            raise ValueError(f"GPTCapture computes blocks.<layer>.<{'|'.join(POINTS)}>, not {list(hook_names)}")
        self.gpt, self.names, self.kernels = gpt, list(hook_names), kernels
        parsed = [_NAME.match(n) for n in self.names]
        self._wanted = {(int(m.group(1)), m.group(2)) for m in parsed}
        self._last = max((int(m.group(1)), POINTS.index(m.group(2))) for m in parsed)
        last_layer, last_point = self._last[0], POINTS[self._last[1]]
        # the fused tail: only the last point of the last layer is wanted there, and it is an MLP point
        tail = {p for layer, p in self._wanted if layer == last_layer} == {last_point}
        relu_ok = last_point == "mlp.hook_pre" or gpt.cfg.act_fn == "relu"
        self._tail = tail and last_point in ("mlp.hook_pre", "mlp.hook_post") and relu_ok
        self._tried = False  # the Triton path has run once without failing
        self._dest: tuple[Tensor, Tensor] | None = None  # (out, dest rows) while write() runs
        self._stores: bool | None = None  # the fused block's stores into write()'s rows: worked, failed, untried

    @torch.inference_mode()
    def write(self, tokens_BT: Tensor, start: int, out_RD: Tensor, slots_N: Tensor) -> None:
        """Writes the activations of positions start..T-1 of every context, in (context, position) order, to rows
        `slots_N` of `out_RD` (a ring): the values __call__ gives, cast to out's dtype. When the fused block computes
        the last point in out's dtype, its kernel stores them there itself; otherwise they are computed and copied."""
        B, T = tokens_BT.shape
        if len(slots_N) != B * (T - start):
            raise ValueError(f"{len(slots_N)} slots for {B} contexts x {T - start} positions")
        stores = (self.kernels == "triton" and self._tail and self._stores is not False
                  and out_RD.dtype == _autocast_dtype(tokens_BT))
        acts_BTD = self._stored(tokens_BT, start, out_RD, slots_N) if stores else self(tokens_BT)
        if acts_BTD is not None:  # (not stored by the kernel)
            out_RD.index_copy_(0, slots_N, acts_BTD[:, start:].reshape(len(slots_N), -1).to(out_RD.dtype))

    def _stored(self, tokens_BT: Tensor, start: int, out_RD: Tensor, slots_N: Tensor) -> Tensor | None:
        """A forward whose fused block stores write()'s rows (None), or, if that kernel fails on its first use, one
        without (its activations; a warning, and no stores from then on)."""
        B, T = tokens_BT.shape
        dest_BT = torch.full((B, T), -1, dtype=torch.int64, device=slots_N.device)
        dest_BT[:, start:] = slots_N.reshape(B, T - start)
        self._dest = (out_RD, dest_BT.view(-1))
        try:
            acts_BTD = self(tokens_BT)
        except Exception as exc:  # noqa: BLE001 — as __call__'s: the kernel without the stores gives the same
            if self._stores:
                raise
            warnings.warn(f"the LM's Triton kernel storing into the ring failed ({_first_line(exc)}); copying its "
                          "output there instead", stacklevel=4)
            self._stores = False
            self._dest = None
            return self(tokens_BT)
        finally:
            self._dest = None
        self._stores = True
        return acts_BTD

    @torch.inference_mode()
    def __call__(self, tokens_BT: Tensor) -> Tensor | None:
        if tokens_BT.shape[1] > self.gpt.cfg.n_ctx:
            raise ValueError(f"sequence length {tokens_BT.shape[1]} exceeds lm.n_ctx={self.gpt.cfg.n_ctx}: use "
                             "shorter contexts")
        if self.kernels != "triton" or self._tried:
            return self._forward(tokens_BT)
        try:
            out = self._forward(tokens_BT)
        except Exception as exc:  # noqa: BLE001 — a kernel that fails to build or run: torch's ops give the same
            warnings.warn(f"the LM's Triton kernels failed ({_first_line(exc)}); producing activations with "
                          "torch's ops", stacklevel=3)
            self.kernels = "torch"
            return self._forward(tokens_BT)
        self._tried = True
        return out

    def _forward(self, tokens_BT: Tensor) -> Tensor | None:
        gpt, got = self.gpt, {}
        T = tokens_BT.shape[1]
        u_BTD = None  # block 0's ln_1(x), when computed with the embedding
        if self.kernels == "triton" and self._last > (0, 0):
            dtype = _autocast_dtype(tokens_BT) or torch.float32
            x_BTD, u_BTD = embed_layer_norm(tokens_BT, gpt.wte, gpt.wpe, gpt.blocks[0].ln_1, dtype, "triton")
        else:
            x_BTD = gpt.wte(tokens_BT) + gpt.wpe(torch.arange(T, device=tokens_BT.device))
        for layer in range(self._last[0] + 1):
            x_BTD = self._block(layer, x_BTD, got, u_BTD if layer == 0 else None)
            if x_BTD is None:
                break
        if not got:  # the fused block wrote the one point into write()'s rows
            return None
        return torch.cat([got[n] for n in self.names], dim=-1) if len(self.names) > 1 else got[self.names[0]]

    def _block(self, layer: int, x_BTD: Tensor, got: dict[str, Tensor], u_BTD: Tensor | None) -> Tensor | None:
        """Block `layer`, recording the wanted points; None once the last wanted point has been computed. `u_BTD`:
        its ln_1(x) if already computed."""
        b = self.gpt.blocks[layer]
        dtype = _autocast_dtype(x_BTD)
        if (layer == self._last[0] and self._tail and self.kernels == "triton" and dtype is not None
                and mlp_in_fits(x_BTD, b, dtype)):  # heads' output -> MLP point in one kernel
            z_BTD = b.attn.heads(self._ln(b.ln_1, x_BTD) if u_BTD is None else u_BTD)
            point = POINTS[self._last[1]]
            relu = point == "mlp.hook_post"
            dest = self._dest
            if dest is not None and dest_fits(*dest, x_BTD, b.mlp.c_fc.out_features, dtype):
                block_mlp_in(z_BTD, x_BTD, b, relu, "triton", *dest)
            else:
                got[f"blocks.{layer}.{point}"] = block_mlp_in(z_BTD, x_BTD, b, relu, "triton")
            return None
        stop = self._last[1] if layer == self._last[0] else len(POINTS)
        for i, value in enumerate(_points(b, x_BTD, self._ln, u_BTD)):  # lazily: stops computing at `stop`
            if (layer, POINTS[i]) in self._wanted:
                got[f"blocks.{layer}.{POINTS[i]}"] = value
            if i >= stop:
                return None
        return value  # hook_resid_post: the next block's input

    def _ln(self, ln: torch.nn.LayerNorm, x_BTD: Tensor) -> Tensor:
        """ln(x), or with kernels='triton' the fused LayerNorm that writes the dtype the next linear computes in
        (autocast's; else x's): the same values as the module's fp32 output cast there, up to fp32 rounding."""
        if self.kernels != "triton":
            return ln(x_BTD)
        return layer_norm(x_BTD, ln.weight, ln.bias, ln.eps, _autocast_dtype(x_BTD) or x_BTD.dtype, "triton")


def _first_line(exc: Exception) -> str:
    """`Type: first line of the message`, for a one-line warning."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """bf16 or fp16 if autocast is on in it for x's device (the fused block reproduces autocast's roundings)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _points(b: torch.nn.Module, x_BTD: Tensor, ln: Callable[[torch.nn.LayerNorm, Tensor], Tensor],
            u_BTD: Tensor | None = None) -> Iterator[Tensor]:
    """The block's values at POINTS, in order, each computed only when asked for; `ln(module, x)` applies a
    LayerNorm; `u_BTD`: ln_1(x) if already computed."""
    yield x_BTD
    z_BTD = b.attn.heads(ln(b.ln_1, x_BTD) if u_BTD is None else u_BTD)
    yield z_BTD
    attn_out_BTD = b.attn.c_proj(z_BTD)
    yield attn_out_BTD
    x_BTD = x_BTD + attn_out_BTD
    yield x_BTD
    pre_BTM = b.mlp.c_fc(ln(b.ln_2, x_BTD))
    yield pre_BTM
    post_BTM = b.mlp.act(pre_BTM)  # (not cuBLASLt's ReLU epilogue: its max(NaN, 0) would hide a broken LM's NaN)
    yield post_BTM
    mlp_out_BTD = b.mlp.c_proj(post_BTM)
    yield mlp_out_BTD
    yield x_BTD + mlp_out_BTD
