"""The epilogue-fused kernels of the Anthropic step (sae_stream.fused_ops) against fp64 references.

The Triton kernels run on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported,
so those checks run in a subprocess); on CUDA they run compiled (GPU tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_stream.fused_ops import (
    center,
    encode_relu,
    normalize_rows_,
    project_out_rows_,
    relu_backward,
    residual,
    triton_available,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs the triton package")
ROOT = Path(__file__).resolve().parents[1]
# ragged shapes: B not a multiple of the 64-row block, d_sae not of the 32-column block, d_in not of the 32-wide K step
SHAPES = [(130, 48, 72), (64, 32, 64), (1100, 32, 40)]  # (the last: 18 row blocks of 64, groups of 8, 8, 2)
# fp32 atol grows with the √D rounding of a D-term dot (D = 512: 3e-6 was seen on an H200, ieee dots)
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}


def _tol(dtype: torch.dtype, D: int) -> dict:
    tol = dict(TOL[dtype])
    if dtype == torch.float32:
        tol["atol"] *= max(1.0, D**0.5)
    return tol


def _inputs(B: int, D: int, F: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device, dtype)
    W_enc = (torch.randn(D, F, generator=g) / D**0.5).to(device, dtype)
    b_enc = (torch.randn(F, generator=g) * 0.3).to(device)  # fp32, as the parameter
    g_out = (torch.randn(B, D, generator=g) * 0.1).to(device, dtype)
    W_dec = (torch.randn(F, D, generator=g) / D**0.5).to(device, dtype)
    add = torch.tensor(0.013, device=device)
    return x, W_enc, b_enc, g_out, W_dec, add


def check_against_reference(backend: str, device: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    """Both kernels' outputs against fp64 maths on the same inputs (the backward on the kernel's own f)."""
    x, W_enc, b_enc, g_out, W_dec, add = _inputs(*shape, dtype, device)
    f, fsum, counts = encode_relu(x, W_enc, b_enc, backend)
    assert f.dtype == dtype and counts.dtype == torch.int64
    assert fsum.dtype == torch.promote_types(dtype, torch.float32)
    ref = torch.relu(x.double() @ W_enc.double() + b_enc.double())
    assert 0.2 < (ref > 0).double().mean() < 0.8  # both sides of the ReLU
    torch.testing.assert_close(f.double(), ref, **_tol(dtype, shape[1]))
    # the sums are of the stored (rounded) values
    torch.testing.assert_close(fsum.double(), f.double().sum(0), rtol=1e-5, atol=1e-6 * len(x))
    assert torch.equal(counts, (f > 0).sum(0))

    g_pre, gsum = relu_backward(g_out, W_dec, f, add, backend)
    assert g_pre.dtype == dtype and gsum.dtype == fsum.dtype
    ref_g = torch.where(f > 0, g_out.double() @ W_dec.double().T + add.double(), 0.0)
    torch.testing.assert_close(g_pre.double(), ref_g, **_tol(dtype, shape[1]))
    assert torch.equal(g_pre[f <= 0], torch.zeros_like(g_pre[f <= 0]))  # the mask is exact
    torch.testing.assert_close(gsum.double(), g_pre.double().sum(0), rtol=1e-5, atol=1e-6 * len(x))
    check_split_stats(backend, (x, W_enc, b_enc, g_out, W_dec, add), f, ref, g_pre, gsum, shape[1])


def check_split_stats(backend: str, inputs: tuple, f, ref, g_pre, gsum, D: int) -> None:
    """The step's split: the encoder without stats (either matmul), the backward with f's sums and counts."""
    x, W_enc, b_enc, g_out, W_dec, add = inputs
    ref_rounded_bias = torch.relu(x.double() @ W_enc.double() + b_enc.to(x.dtype).double())
    for impl in ("triton", "cublas"):  # (cuBLAS's epilogue adds a bias rounded to the matmul dtype, as autocast)
        f_i, none_1, none_2 = encode_relu(x, W_enc, b_enc, backend, stats=False, impl=impl)
        assert none_1 is None and none_2 is None and f_i.dtype == f.dtype
        want = ref_rounded_bias if impl == "cublas" or backend == "torch" else ref
        torch.testing.assert_close(f_i.double(), want, **_tol(f.dtype, D))
    g_pre_s, gsum_s, fsum_s, counts_s = relu_backward(g_out, W_dec, f, add, backend, stats=True)
    assert_equal(g_pre_s, g_pre)
    torch.testing.assert_close(gsum_s, gsum, rtol=1e-6, atol=1e-6)
    assert fsum_s.dtype == gsum.dtype and counts_s.dtype == torch.int64
    torch.testing.assert_close(fsum_s.double(), f.double().sum(0), rtol=1e-5, atol=1e-6 * len(x))
    assert torch.equal(counts_s, (f > 0).sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend__equals_reference(dtype: torch.dtype) -> None:
    check_against_reference("torch", "cpu", dtype, SHAPES[0])


def _interpreted_checks() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: the Triton kernels on CPU, then a trainer using them."""
    from sae_stream.sae import build_sae
    from sae_stream.trainer import Trainer
    from tests._trainer_helpers import ListLogger, _atoms, _cfg, sparse_batches

    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            check_against_reference("triton", "cpu", dtype, shape)
    check_rows("triton", "cpu")
    from tests.test_lm_capture import (
        check_block_mlp_in,
        check_embed_layer_norm,
        check_gpt_capture,
        check_gpt_capture_write,
        check_layer_norm,
    )

    check_layer_norm("triton", "cpu")
    check_embed_layer_norm("triton", "cpu")
    check_block_mlp_in("triton", "cpu")
    check_gpt_capture("cpu")
    check_gpt_capture_write("cpu", "triton")
    from sae_stream.fused_ops import ENCODE_ENV, triton_probe
    assert triton_probe(torch.device("cpu")) is None  # the probe's kernel, interpreted
    check_step_encoders(ENCODE_ENV)
    for dtype in (torch.float32, torch.bfloat16):
        check_passes("triton", "cpu", dtype)
    runs = {}
    for kernels in ("triton", "torch"):
        cfg = _cfg(steps=12, train__kernels=kernels, train__step_impl="fused", train__log_every=4)
        sae = build_sae(cfg.sae, d_in=32, seed=0)
        log = ListLogger()
        trainer = Trainer(sae, cfg, None, log)
        assert trainer.kernels == kernels
        trainer.fit(sparse_batches(_atoms()))
        runs[kernels] = (sae, log.rows)
    for (name, p), (_, q) in zip(runs["triton"][0].named_parameters(), runs["torch"][0].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for (_, a), (_, b) in zip(runs["triton"][1], runs["torch"][1]):
        assert a["l0"] == pytest.approx(b["l0"], rel=1e-6) and a["mse"] == pytest.approx(b["mse"], rel=1e-5)
    print("interpreted checks passed")


def check_step_encoders(env: str) -> None:
    """The step with Triton kernels in each layout (f's sums in the encoder's epilogue; in the backward's beside
    Triton's or cuBLAS's encoder) against the step with torch's ops (fp32)."""
    from sae_stream.step import anthropic_grads_
    from tests.test_step import _sae

    x_BD = torch.randn(130, 32, generator=torch.Generator().manual_seed(7)) + 0.05
    grads = {}
    for kernels, encoder in (("torch", "auto"), ("triton", "triton"), ("triton", "cublas"), ("triton", "stats")):
        os.environ[env] = encoder
        sae = _sae(0, torch.float32)
        out, stats = anthropic_grads_(sae, x_BD, 0.3, torch.float32, kernels)
        grads[kernels, encoder] = (out, stats, [p.grad for p in sae.parameters()])
    os.environ.pop(env)
    out_ref, stats_ref, grads_ref = grads["torch", "auto"]
    for key in (("triton", "triton"), ("triton", "cublas"), ("triton", "stats")):
        out, stats, g = grads[key]
        assert torch.equal(stats.counts_F, stats_ref.counts_F), key
        for name in ("loss", "mse", "l1"):
            torch.testing.assert_close(getattr(out, name), getattr(out_ref, name), rtol=1e-5, atol=1e-7)
        for a, b in zip(g, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_layout__environment_then_pin_pick_it_a_bad_value_is_a_one_line_error(monkeypatch) -> None:
    from sae_stream.fused_ops import ENCODE_ENV, step_layout

    x, W_enc, b_enc, _, W_dec, _ = _inputs(8, 4, 6, torch.float32, "cpu")
    assert step_layout(x, W_enc, b_enc, W_dec) == "stats"  # off CUDA: session 15's layout (interpreted Triton)
    assert step_layout(x, W_enc, b_enc, W_dec, pin="cublas") == "cublas"  # a resumed run's checkpointed layout
    monkeypatch.setenv(ENCODE_ENV, "cublas")
    assert step_layout(x, W_enc, b_enc, W_dec) == "cublas"
    assert step_layout(x, W_enc, b_enc, W_dec, pin="stats") == "cublas"  # the environment overrides it
    monkeypatch.setenv(ENCODE_ENV, "cutlass")
    with pytest.raises(ValueError, match=f"{ENCODE_ENV}='cutlass': use auto, stats, triton or cublas"):
        step_layout(x, W_enc, b_enc, W_dec)


@needs_triton
def test_triton_kernels__interpreted_equal_reference_and_train_as_torch() -> None:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    code = "import tests.test_fused_ops as t; t._interpreted_checks()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "interpreted checks passed" in proc.stdout


def test_kernels_config__triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from sae_stream.config import ConfigError
    from sae_stream.step import resolve_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="train.kernels=triton"):
        resolve_kernels("triton", torch.device("cpu"))


@cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels__cuda_equal_reference(dtype: torch.dtype) -> None:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checked at full precision (ieee dots)
    try:
        for shape in [*SHAPES, (8192 + 7, 512, 4096 + 32)]:
            check_against_reference("triton", "cuda", dtype, shape)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def check_passes(backend: str, device: str, dtype: torch.dtype, B: int = 130, D: int = 48) -> None:
    """The [B, d_in] passes against fp64 maths: centring + the batch variance, the residual and its sums."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(B, D, generator=g) * 2 + 3).to(device)  # off-centre: the variance must not cancel badly
    b = (torch.randn(D, generator=g) + 3).to(device)
    xc, var_sq, finite = center(x, b, dtype, backend)
    assert xc.dtype == dtype and var_sq.dtype == torch.float64 and bool(finite)
    torch.testing.assert_close(xc.double(), x.double() - b.double(), **_tol(dtype, 1))
    ref_var = ((x.double() - x.double().mean(0)) ** 2).sum()
    torch.testing.assert_close(var_sq, ref_var, rtol=1e-6, atol=0)
    for bad in (float("nan"), float("inf"), -float("inf")):  # the flag judges x alone, any row, any column
        x_bad = x.clone()
        x_bad[B - 1, D - 1] = bad
        assert not bool(center(x_bad, b, dtype, backend)[2])
        assert bool(center(x, b.new_full(b.shape, float("nan")), dtype, backend)[2])
    recon = (x + 0.1 * torch.randn(B, D, generator=g).to(device)).to(dtype)
    c = 2.0 / (B * D)
    g_BD, sq, col_D = residual(recon, x, c, dtype, backend)
    r = recon.double() - x.double()
    torch.testing.assert_close(g_BD.double(), c * r, rtol=TOL[dtype]["rtol"], atol=1e-6 * c)
    torch.testing.assert_close(sq.double(), (r * r).sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(col_D.double(), r.sum(0), rtol=1e-5, atol=1e-5)
    # x from a bf16 ring: read as fp32, so every output equals that of x.float(): the elementwise ones exactly, the
    # sums up to their order: per-block fp32 sums whose reduction tree Triton may lay out differently for a bf16
    # load than for an fp32 one (seen on an H200: the variance 1.3e-8 and a column sum 2.4e-7 apart)
    x_lo = x.to(torch.bfloat16)
    sums = {"rtol": 1e-12, "atol": 0} if device == "cpu" else {"rtol": 1e-6, "atol": 1e-6}
    (xc_lo, var_lo, ok_lo), (xc_hi, var_hi, ok_hi) = (center(xx, b, dtype, backend) for xx in (x_lo, x_lo.float()))
    assert_equal(xc_lo, xc_hi)
    assert bool(ok_lo) and bool(ok_hi)
    torch.testing.assert_close(var_lo, var_hi, **sums)
    (g_lo, sq_lo, col_lo), (g_hi, sq_hi, col_hi) = (residual(recon, xx, c, dtype, backend)
                                                    for xx in (x_lo, x_lo.float()))
    assert_equal(g_lo, g_hi)
    torch.testing.assert_close(sq_lo, sq_hi, **sums)  # (and the same dtypes)
    torch.testing.assert_close(col_lo, col_hi, **sums)


def assert_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend__passes_equal_reference(dtype: torch.dtype) -> None:
    check_passes("torch", "cpu", dtype)


def check_rows(backend: str, device: str, F: int = 37, D: int = 48) -> None:
    """Projection and normalisation against fp64 maths (ragged F and D: masked rows and columns)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(F, D, generator=g).to(device)
    grad = torch.randn(F, D, generator=g).to(device)
    ref = grad.double() - ((grad.double() * W.double()).sum(1, keepdim=True)
                           / (W.double() ** 2).sum(1, keepdim=True)) * W.double()
    project_out_rows_(grad, W, backend)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)
    cos = (grad * W).sum(1) / (grad.norm(dim=1) * W.norm(dim=1))
    assert cos.abs().max() < 1e-5  # orthogonal to every row
    ref_w = W.double() / W.double().norm(dim=1, keepdim=True)
    normalize_rows_(W, backend)
    torch.testing.assert_close(W.double(), ref_w, rtol=1e-6, atol=1e-7)


def test_torch_backend__row_ops_equal_reference() -> None:
    check_rows("torch", "cpu")


@cuda
@needs_triton
def test_triton_row_ops__cuda_equal_reference() -> None:
    for F, D in [(37, 48), (4096, 512), (100, 2048)]:
        check_rows("triton", "cuda", F, D)


@cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_passes__cuda_equal_reference(dtype: torch.dtype) -> None:
    for B, D in [(130, 48), (8192, 512), (100, 2048)]:
        check_passes("triton", "cuda", dtype, B, D)


def test_kernels_auto__falls_back_to_torch_when_triton_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importable is not usable (no C compiler for Triton's launcher, an unsupported GPU): auto warns and uses torch."""
    from sae_stream import step as step_mod

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (under the interpreter auto never tries Triton)
    monkeypatch.setattr(step_mod, "triton_available", lambda: True)
    monkeypatch.setattr(step_mod, "triton_probe", lambda device: "RuntimeError: no C compiler")
    with pytest.warns(UserWarning, match="no C compiler"):
        assert step_mod.resolve_kernels("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(step_mod, "triton_probe", lambda device: None)
    assert step_mod.resolve_kernels("auto", torch.device("cuda")) == "triton"


@cuda
@needs_triton
def test_triton_kernels__autotuned_first_call_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuner times every config on the first call per shape, writing the partial-sum buffers each time: the
    call that returns must still give exact sums and counts (a BM=64 trial's rows must not survive a BM=128 pick)."""
    from sae_stream.fused_ops import tuned_configs

    monkeypatch.setenv("SAE_STREAM_TRITON_AUTOTUNE", "1")
    check_against_reference("triton", "cuda", torch.bfloat16, (8192 + 64, 512, 4096))
    if int(tuned_configs()["encode"].split("x")[0]) == 64:  # then no trial left rows the winner does not write
        pytest.skip("the autotuner picked BM=64 here: the stale-row case did not arise")
