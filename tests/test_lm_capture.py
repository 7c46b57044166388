"""GPTCapture (the GPT's own forward, fused attention) gives the HookedTransformer's hook activations; its Triton
kernels (lm/fused.py) give the torch path's values. The kernels' CPU checks run through Triton's interpreter in
tests/test_fused_ops.py's subprocess (check_* below)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from lm.capture import POINTS, GPTCapture, supported
from lm.fused import block_mlp_in, embed_layer_norm, layer_norm
from lm.hooked import to_hooked
from sae_stream.activations import HookCapture
from sae_stream.fused_ops import triton_available
from tests.test_lm import tiny_gpt

# Triton's interpreter rounds fp32 -> bf16 toward zero (compiled kernels: to nearest even), so interpreted bf16
# outputs are checked to within one bf16 step only
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA + triton")


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
def test_gpt_capture__equals_transformer_lens_hooks(act_fn: str) -> None:
    gpt = tiny_gpt(act_fn, n_layers=2, seed=3)
    hooked = to_hooked(gpt)
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        for point in POINTS:
            name = f"blocks.{layer}.{point}"
            ours = GPTCapture(gpt, [name])(tokens)
            ref = HookCapture(hooked, name)(tokens)
            assert ours.shape == ref.shape, name
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5, msg=name)


def test_gpt_capture__several_hooks_concatenate_in_the_given_order() -> None:
    gpt = tiny_gpt(n_layers=2)
    names = ["blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z"]
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = GPTCapture(gpt, names)(tokens)
    ref = HookCapture(to_hooked(gpt), names)(tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_supported__block_points_of_existing_layers_only() -> None:
    gpt = tiny_gpt(n_layers=1)
    assert supported(gpt, ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"])
    for bad in (["blocks.1.mlp.hook_post"], ["blocks.0.attn.hook_pattern"], ["hook_embed"],
                ["ln_final.hook_normalized"]):
        assert not supported(gpt, bad)
    with pytest.raises(ValueError, match="GPTCapture computes"):
        GPTCapture(gpt, ["blocks.0.attn.hook_pattern"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpt_capture__cuda_bf16_close_to_transformer_lens() -> None:
    gpt = tiny_gpt(n_layers=1, seed=2).cuda()
    hooked = to_hooked(gpt)
    tokens = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = GPTCapture(gpt, ["blocks.0.mlp.hook_post"])(tokens).float()
        ref = HookCapture(hooked, "blocks.0.mlp.hook_post")(tokens).float()
    torch.testing.assert_close(ours, ref, rtol=5e-2, atol=2e-2)


def _within_one_bf16_step(got: torch.Tensor, want: torch.Tensor, exact_fraction: float) -> None:
    """bf16 outputs equal to a reference up to one step (8 significant bits) where fp32 rounding moved a value
    across a tie; compiled, most are exactly equal."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    step = want.float().abs().clamp_min(1e-3) * 2**-7
    assert ((got.float() - want.float()).abs() <= step).all(), (got.float() - want.float()).abs().max()
    if not INTERPRETED:
        assert (got == want).double().mean() > exact_fraction


def check_layer_norm(backend: str, device: str, shapes=((5, 13, 48), (70, 128))) -> None:
    """The LM's LayerNorm: fp32 maths (fp64 reference), written in fp32 or bf16, from fp32 or bf16 x."""
    g = torch.Generator().manual_seed(7)
    for shape in shapes:
        D = shape[-1]
        x = (torch.randn(*shape, generator=g) * 3 + 1).to(device)
        w, b = (torch.randn(D, generator=g) + 1).to(device), torch.randn(D, generator=g).to(device)
        for x_in in (x, x.to(torch.bfloat16)):
            ref = torch.nn.functional.layer_norm(x_in.double(), (D,), w.double(), b.double(), 1e-5)
            y = layer_norm(x_in, w, b, 1e-5, torch.float32, backend)
            assert y.shape == x.shape and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
            _within_one_bf16_step(layer_norm(x_in, w, b, 1e-5, torch.bfloat16, backend), ref.float().bfloat16(), 0.98)


def test_torch_backend__layer_norm_equals_reference() -> None:
    check_layer_norm("torch", "cpu")


def check_embed_layer_norm(backend: str, device: str, shapes=((3, 16, 32), (2, 37, 48))) -> None:
    """The embedding and its LayerNorm in one pass: x exactly the modules' wte(tokens) + wpe(positions), ln(x) the
    values layer_norm gives for that x (the same sums: bitwise with one backend) in bf16 and fp32; long-int tokens
    only (int32 ones take the torch path, with the same values)."""
    for B, T, D in shapes:
        torch.manual_seed(D)
        wte, wpe, ln = torch.nn.Embedding(97, D), torch.nn.Embedding(T + 3, D), torch.nn.LayerNorm(D)
        with torch.no_grad():
            ln.weight.add_(torch.randn(D) / 4), ln.bias.add_(torch.randn(D) / 4)
        wte, wpe, ln = wte.to(device), wpe.to(device), ln.to(device)
        tokens = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(T)).to(device)
        want_x = wte(tokens) + wpe(torch.arange(T, device=device))
        for dtype in (torch.bfloat16, torch.float32):
            want_y = layer_norm(want_x, ln.weight, ln.bias, ln.eps, dtype, backend)
            for toks in (tokens, tokens.int()):
                x, y = embed_layer_norm(toks, wte, wpe, ln, dtype, backend)
                assert x.dtype == torch.float32 and y.dtype == dtype and x.shape == y.shape == (B, T, D)
                assert torch.equal(x, want_x) and torch.equal(y, want_y), (B, T, D, dtype, toks.dtype)


def test_torch_backend__embed_layer_norm_equals_the_modules() -> None:
    check_embed_layer_norm("torch", "cpu")


def _emulated_block_mlp_in(z, x, b, relu: bool, truncate: bool) -> torch.Tensor:
    """block_mlp_in's maths step by step in fp64, rounding to bf16 where autocast does: the weights (cast by torch:
    to nearest), the biases, the projection's output, the LayerNorm's output and the pre-activation (in the kernel:
    to nearest compiled, toward zero interpreted: `truncate`)."""
    def r(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        t = (t.view(torch.int32) & -65536).view(torch.float32) if truncate else t.bfloat16().float()
        return t.double()

    W_o, W_fc = (w.bfloat16().double() for w in (b.attn.c_proj.weight, b.mlp.c_fc.weight))
    h = x.double() + r(z.double() @ W_o.T + r(b.attn.c_proj.bias))
    hc = h - h.mean(-1, keepdim=True)
    u = r(hc * torch.rsqrt(hc.square().mean(-1, keepdim=True) + b.ln_2.eps) * b.ln_2.weight + b.ln_2.bias)
    pre = r(u @ W_fc.T + r(b.mlp.c_fc.bias))
    return (torch.where(pre < 0, 0.0, pre) if relu else pre).bfloat16()


def check_block_mlp_in(backend: str, device: str, shapes=((3, 16, 32, 80), (2, 37, 48, 112))) -> None:
    """The block from the heads' output to the MLP neurons (B, T, d_model, d_mlp; d_model 48: masked columns;
    ragged rows) against (a) the module path under bf16 autocast and (b) a step-by-step emulation of its roundings,
    which the kernel must match almost everywhere (a rounding left out or an eps slip changes 1-25% of outputs);
    ReLU'd or not; a NaN passes through as through torch.relu."""
    from lm.fused import mlp_in_fits

    for B, T, d_model, d_mlp in shapes:
        gpt = tiny_gpt(n_layers=1, seed=4, d_model=d_model, d_mlp=d_mlp).to(device)
        b = gpt.blocks[0]
        g = torch.Generator().manual_seed(d_model)
        x = (torch.randn(B, T, d_model, generator=g) * 2).to(device)
        z = torch.randn(B, T, d_model, generator=g).to(device, torch.bfloat16)
        assert mlp_in_fits(x, b, torch.bfloat16)
        for relu in (True, False):
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                want = b.mlp.c_fc(b.ln_2(x + b.attn.c_proj(z)))  # the module path: autocast's casts and roundings
                want = b.mlp.act(want) if relu else want
                got = block_mlp_in(z, x, b, relu, backend)
            assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
            emulated = _emulated_block_mlp_in(z, x, b, relu, truncate=INTERPRETED and backend == "triton")
            assert (got == emulated).double().mean() > 0.999
            if not INTERPRETED:
                assert (got == want).double().mean() > 0.995
            check_dest_rows(z, x, b, relu, backend, got)
    x[0, 1, 3] = float("nan")  # a broken LM's NaN reaches the MLP neurons, as through torch.relu
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        assert block_mlp_in(z, x, b, True, backend)[0, 1].isnan().all()


def check_dest_rows(z, x, b, relu: bool, backend: str, got: torch.Tensor) -> None:
    """block_mlp_in with out_RM / dest_N: row n lands in out row dest[n] with the values it has without them, rows
    with dest -1 and rows no dest names stay as they were."""
    N, M = got.numel() // got.shape[-1], got.shape[-1]
    g = torch.Generator().manual_seed(N)
    dest = torch.randperm(N + 5, generator=g)[:N]
    dest[torch.randperm(N, generator=g)[: N // 3]] = -1
    out = torch.full((N + 5, M), 3.0, dtype=got.dtype, device=got.device)
    with torch.inference_mode():
        assert block_mlp_in(z, x, b, relu, backend, out, dest.to(got.device)) is out
    keep = dest >= 0
    assert torch.equal(out[dest[keep].to(got.device)], got.reshape(N, M)[keep.to(got.device)])
    untouched = torch.ones(N + 5, dtype=torch.bool)
    untouched[dest[keep]] = False
    assert (out[untouched.to(got.device)] == 3).all()


def check_gpt_capture_write(device: str, kernels: str) -> None:
    """GPTCapture.write puts positions start.. of every context into the ring rows given, the values __call__ gives
    (cast to the ring's dtype), and leaves the other rows alone; with the Triton kernels and a ring in the autocast
    dtype it is the fused block's kernel that stores them (no copy after it)."""
    import lm.capture

    gpt = tiny_gpt(n_layers=1, seed=3).to(device)
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1)).to(device)
    stored = []
    fused = lm.capture.block_mlp_in
    lm.capture.block_mlp_in = lambda *args: stored.append(len(args) == 7) or fused(*args)
    try:
        for start, dtype in ((1, torch.bfloat16), (0, torch.bfloat16), (1, torch.float32)):
            capture = GPTCapture(gpt, ["blocks.0.mlp.hook_post"], kernels=kernels)
            n, stored[:] = 3 * (16 - start), []
            ring = torch.full((n + 11, 64), 7.0, dtype=dtype, device=device)
            slots = torch.randperm(n + 11, generator=torch.Generator().manual_seed(start))[:n].to(device)
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                want = capture(tokens)[:, start:].reshape(n, -1).to(dtype)
                capture.write(tokens, start, ring, slots)
            assert torch.equal(ring[slots], want), (kernels, start, dtype)
            untouched = torch.ones(n + 11, dtype=torch.bool, device=device).index_fill_(0, slots, False)
            assert (ring[untouched] == 7).all()
            assert stored == ([False, True] if kernels == "triton" and dtype == torch.bfloat16 else
                              [False, False] if kernels == "triton" else []), (kernels, start, dtype)
    finally:
        lm.capture.block_mlp_in = fused


def test_gpt_capture__write_puts_the_rows_in_the_slots() -> None:
    check_gpt_capture_write("cpu", "torch")


def test_torch_backend__block_mlp_in_equals_module_path() -> None:
    check_block_mlp_in("torch", "cpu")


def check_gpt_capture(device: str) -> None:
    """The native LM's activations with the Triton kernels (kernels='triton') under bf16 autocast equal those of the
    torch path within bf16 rounding, at every block point, alone (mlp.hook_pre / hook_post: the fused block) and
    in combinations (fused in the last layer only; not fused when an earlier point of that layer is asked for)."""
    gpt = tiny_gpt(n_layers=2, seed=2).to(device)
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    cases = [[f"blocks.1.{p}"] for p in POINTS] + [
        ["blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_post"], ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post"],
        ["blocks.1.mlp.hook_post", "blocks.1.mlp.hook_pre"]]
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        for names in cases:
            fast = GPTCapture(gpt, names, kernels="triton")
            ours, ref = fast(tokens), GPTCapture(gpt, names, kernels="torch")(tokens)
            assert fast.kernels == "triton", names  # (not a silent fallback to torch's ops)
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, names
            torch.testing.assert_close(ours.float(), ref.float(), rtol=3e-2, atol=3e-2, msg=str(names))
            if names[-1].endswith("mlp.hook_post") and not INTERPRETED:
                assert (ours == ref).double().mean() > 0.9, names


@pytest.mark.parametrize("broken", ["layer_norm", "embed_layer_norm", "block_mlp_in"])
def test_gpt_capture__triton_kernels_that_fail_fall_back_to_torch(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm.capture

    def fail(*args, **kwargs):
        raise RuntimeError("no C compiler")

    # (this process has no Triton interpreter: the kernels that are not broken run their torch references)
    monkeypatch.setattr(lm.capture, "layer_norm", lambda *args: layer_norm(*args[:-1], "torch"))
    monkeypatch.setattr(lm.capture, "embed_layer_norm", lambda *args: embed_layer_norm(*args[:-1], "torch"))
    monkeypatch.setattr(lm.capture, "block_mlp_in", lambda *args: block_mlp_in(*args[:4], "torch", *args[5:]))
    monkeypatch.setattr(lm.capture, broken, fail)
    gpt = tiny_gpt(n_layers=2, seed=2)  # (block 1's first LayerNorm: layer_norm's)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    capture = GPTCapture(gpt, ["blocks.1.mlp.hook_post"], kernels="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (autocast: the fused block's condition)
        with pytest.warns(UserWarning, match="no C compiler"):
            got = capture(tokens)
        assert capture.kernels == "torch"
        torch.testing.assert_close(got, GPTCapture(gpt, ["blocks.1.mlp.hook_post"])(tokens))


def test_gpt_capture__write_whose_store_kernel_fails_copies_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused block storing into the ring is a kernel variant of its own, first built inside a refill: if it
    fails there, write() warns once, copies the rows instead (the same values), and does not try it again."""
    import lm.capture

    calls = []

    def fused(*args):  # (no Triton interpreter here: torch's reference; the variant with destinations fails)
        calls.append(len(args))
        if len(args) > 5:
            raise RuntimeError("out of shared memory")
        return block_mlp_in(*args[:4], "torch")

    monkeypatch.setattr(lm.capture, "layer_norm", lambda *args: layer_norm(*args[:-1], "torch"))
    monkeypatch.setattr(lm.capture, "embed_layer_norm", lambda *args: embed_layer_norm(*args[:-1], "torch"))
    monkeypatch.setattr(lm.capture, "block_mlp_in", fused)
    gpt = tiny_gpt(n_layers=1, seed=2)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    capture = GPTCapture(gpt, ["blocks.0.mlp.hook_post"], kernels="triton")
    slots = torch.randperm(40)[:30]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = capture(tokens)[:, 1:].reshape(30, -1)  # (the kernels' first use, as the stream's probe)
        for warns in (True, False):
            ring = torch.zeros(40, 64, dtype=torch.bfloat16)
            calls.clear()
            with pytest.warns(UserWarning, match="out of shared memory") if warns else contextlib.nullcontext():
                capture.write(tokens, 1, ring, slots)
            assert torch.equal(ring[slots], want) and capture.kernels == "triton"
            assert calls == ([7, 5] if warns else [5])


@cuda_triton
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_lm_kernels__cuda_equal_torch(autotune: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled, at the paper's shape too (d_model 128, d_mlp 512, 64 contexts of 1024), with the fixed block config
    and with every autotuned one tried."""
    monkeypatch.setenv("SAE_STREAM_TRITON_AUTOTUNE", autotune)
    check_layer_norm("triton", "cuda", shapes=((5, 13, 48), (64, 1024, 128), (300, 768)))
    check_embed_layer_norm("triton", "cuda", shapes=((3, 16, 32), (2, 37, 48), (64, 1024, 128)))
    check_block_mlp_in("triton", "cuda", shapes=((3, 37, 48, 112), (64, 1024, 128, 512)))
    if autotune == "0":
        check_gpt_capture("cuda")
        check_gpt_capture_write("cuda", "triton")
