"""The fast step: the hand-written Anthropic backward equals autograd; trainers with either implementation agree;
CUDA-graph replay equals eager steps (GPU only)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from sae_stream.buffer import ShuffleBuffer
from sae_stream.config import BufferConfig
from sae_stream.sae import build_sae
from sae_stream.step import anthropic_grads_, supports_fused
from sae_stream.trainer import Trainer
from tests._trainer_helpers import BATCH, ListLogger, _atoms, _cfg, sparse_batches

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sae(seed: int = 0, dtype: torch.dtype = torch.float64):
    sae = build_sae(_cfg().sae, d_in=32, seed=seed).to(dtype)
    with torch.no_grad():  # off-centre biases so that some pre-activations are negative and b_dec matters
        sae.b_dec_D.normal_(generator=torch.Generator().manual_seed(seed + 1))
        sae.b_enc_F.uniform_(-0.3, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    return sae


@pytest.mark.parametrize("seed", [0, 1])
def test_anthropic_grads__equal_autograd(seed: int) -> None:
    x_BD = next(sparse_batches(_atoms(seed), seed=seed)).double()[:200] + 0.05
    lam = 0.37
    ref = _sae(seed)
    out_ref = ref(x_BD, l1_coeff=lam)
    out_ref.loss.backward()
    sae = _sae(seed)
    out, stats = anthropic_grads_(sae, x_BD, lam, torch.float64)
    counts_F = stats.counts_F
    ref_var = ((x_BD - x_BD.mean(0)) ** 2).sum()
    torch.testing.assert_close(stats.var_sq, ref_var, rtol=1e-10, atol=0)
    feats = out_ref.feats
    assert torch.equal(counts_F, (feats > 0).sum(0))
    assert 0.05 < (feats > 0).double().mean() < 0.95  # both branches of the ReLU are exercised
    torch.testing.assert_close(out.mse, out_ref.mse, rtol=1e-12, atol=1e-14)
    for name in ("loss", "l1"):  # SAE.sparsity_loss sums in fp32 even for fp64 inputs
        torch.testing.assert_close(getattr(out, name), getattr(out_ref, name).double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.feats, out_ref.feats, rtol=1e-12, atol=1e-14)
    for (name, p), (_, p_ref) in zip(sae.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-9, msg=name)  # λ term: fp32 in ref


def test_anthropic_grads__replace_not_accumulate() -> None:
    x_BD = next(sparse_batches(_atoms())).double()[:64]
    sae = _sae()
    anthropic_grads_(sae, x_BD, 0.1, torch.float64)
    first = [p.grad.clone() for p in sae.parameters()]
    anthropic_grads_(sae, x_BD, 0.1, torch.float64)
    for g, p in zip(first, sae.parameters()):
        assert torch.equal(g, p.grad)


def test_supports_fused__anthropic_only() -> None:
    assert supports_fused(build_sae(_cfg("anthropic").sae, 32))
    for arch in ("april", "topk", "batchtopk", "jumprelu"):
        assert not supports_fused(build_sae(_cfg(arch).sae, 32))


def _train(impl: str, steps: int = 40, device: str = "cpu", **over) -> tuple[torch.nn.Module, list]:
    cfg = _cfg(steps=steps, train__step_impl=impl, train__log_every=10, **over)
    sae = build_sae(cfg.sae, d_in=32, seed=0).to(device)
    log = ListLogger()
    trainer = Trainer(sae, cfg, None, log)
    trainer.fit(x.to(device) for x in sparse_batches(_atoms()))
    return sae.cpu(), log.rows


def test_trainer__fused_equals_autograd_fp32() -> None:
    fused, rows_f = _train("fused")
    auto, rows_a = _train("autograd")
    for (name, p), (_, q) in zip(fused.named_parameters(), auto.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=name)
    for (_, mf), (_, ma) in zip(rows_f, rows_a):
        assert mf["l0"] == pytest.approx(ma["l0"], rel=1e-3)
        assert mf["mse"] == pytest.approx(ma["mse"], rel=1e-3)


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_trainer__bf16_batches_train_exactly_like_their_values_in_fp32(impl: str, autocast: str) -> None:
    """A bf16 ring (buffer.dtype=auto under CUDA autocast) holds values that are bf16 already: training on its bf16
    batches must equal training on the same values as fp32, bit for bit (the hand-written step reads x as fp32;
    the others are given fp32)."""
    batches = [x.bfloat16() for x, _ in zip(sparse_batches(_atoms()), range(25))]
    runs = []
    for as_fp32 in (False, True):
        cfg = _cfg(steps=25, train__step_impl=impl, train__autocast=autocast, train__log_every=5)
        log = ListLogger()
        trainer = Trainer(build_sae(cfg.sae, d_in=32, seed=0), cfg, None, log)
        assert trainer.input_dtype(torch.bfloat16) == (torch.bfloat16 if impl == "fused" else torch.float32)
        trainer.fit(x.float() if as_fp32 else x for x in batches)
        runs.append((trainer.sae, log.rows))
    (a, rows_a), (b, rows_b) = runs
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert len(rows_a) == len(rows_b) == 5
    for (_, ma), (_, mb) in zip(rows_a, rows_b):  # (the FVU's fp64 variance may sum in another order)
        assert {k: ma[k] for k in ("loss", "mse", "l0")} == {k: mb[k] for k in ("loss", "mse", "l0")}
        assert ma["fvu"] == pytest.approx(mb["fvu"], rel=1e-9)


def test_batch_dtype__ring_dtype_only_when_every_sae_reads_it() -> None:
    from sae_stream.pipeline import batch_dtype

    fused, other = (Trainer(build_sae(_cfg(arch).sae, d_in=32), _cfg(arch), None, ListLogger())
                    for arch in ("anthropic", "topk"))
    assert batch_dtype(torch.bfloat16, [fused]) == torch.bfloat16
    assert batch_dtype(torch.bfloat16, [fused, other]) == torch.float32  # a sweep with a TopK member
    assert batch_dtype(torch.float32, [fused, other]) == torch.float32


def test_config__fused_step_rejects_other_architectures() -> None:
    from sae_stream.config import ConfigError
    with pytest.raises(ConfigError, match="anthropic only"):
        _cfg("topk", train__step_impl="fused")


@cuda
@pytest.mark.parametrize("arch", ["anthropic", "april", "topk", "batchtopk", "jumprelu", "batchtopk+matryoshka"])
@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_cuda_graphs__equal_eager(arch: str, autocast: str) -> None:
    """40 steps (3 eager warm-ups, a capture, replays) equal eager steps, with lr and λ changing every step (so a
    graph that froze a scalar at capture would drift) and, for topk, AuxK switching on and off (a second graph)."""
    over = {"train__autocast": autocast, "train__log_every": 5, "sae__dead_tokens_auxk": 2 * BATCH,
            "train__lr_schedule": "linear_tail", "train__warmup_steps": 5, "train__l1_warmup_fraction": 0.3}
    arch, _, levels = arch.partition("+")
    if levels:
        over["sae__matryoshka"] = [8, 24]
    runs = {}
    for graphs in (True, False):
        cfg = _cfg(arch, steps=40, train__cuda_graphs=graphs, **over)
        sae = build_sae(cfg.sae, d_in=32, seed=0).cuda()
        log = ListLogger()
        trainer = Trainer(sae, cfg, None, log)
        trainer.fit(x.cuda() for x in sparse_batches(_atoms()))
        runs[graphs] = (sae.cpu(), log.rows, trainer)
    graphed = runs[True][2]._graph
    assert graphed.graphs and not graphed.disabled, "no graph was captured"
    if arch == "topk" and autocast == "none":  # AuxK is on for two 5-step windows here (checked on CPU): its own
        assert set(graphed.graphs) == {False, True}  # graph (in bf16 rounding moves the windows; not asserted)
        assert any(m["aux"] > 0 for _, m in runs[True][1])
    # the same kernels replayed: fp32 agrees to rounding, bf16 to its precision
    tol = dict(rtol=1e-5, atol=1e-6) if autocast == "none" else dict(rtol=2e-2, atol=2e-3)
    for (name, p), (_, q) in zip(runs[True][0].named_parameters(), runs[False][0].named_parameters()):
        torch.testing.assert_close(p, q, **tol, msg=name)
    for (sg, mg), (se, me) in zip(runs[True][1], runs[False][1]):
        assert sg == se and mg["lr"] == me["lr"] and mg["l1_coeff"] == me["l1_coeff"]
        assert mg["mse"] == pytest.approx(me["mse"], rel=1e-4 if autocast == "none" else 5e-2)
        assert mg["dead"] == me["dead"]


@cuda
def test_cuda_graphs__autotuned_kernels_and_the_timed_layout_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `sae-stream train` runs on a GPU, which the tests above fix (conftest: one block config, no tuning):
    the Triton kernels autotuned and the step's layout picked by timing in the first warm-up step, then captured
    and replayed; the same steps as eager ones with those picks."""
    from sae_stream import fused_ops

    monkeypatch.setenv(fused_ops.AUTOTUNE_ENV, "1")
    monkeypatch.delenv(fused_ops.ENCODE_ENV, raising=False)
    monkeypatch.setattr(fused_ops, "_LAYOUT_PICKS", {})
    monkeypatch.setattr(fused_ops, "CONFIGS", fused_ops.CONFIGS[:2])  # (two to tune between: seconds of compiling)
    fused_ops._kernels.cache_clear()
    runs = {}
    try:
        for graphs in (True, False):
            cfg = _cfg("anthropic", steps=30, train__cuda_graphs=graphs, train__autocast="bfloat16",
                       train__kernels="triton")
            sae = build_sae(cfg.sae, d_in=32, seed=0).cuda()
            trainer = Trainer(sae, cfg, None, ListLogger())
            trainer.fit(x.cuda() for x in sparse_batches(_atoms()))
            runs[graphs] = (sae.cpu(), trainer)
        picks = fused_ops.tuned_configs()
    finally:
        fused_ops._kernels.cache_clear()  # (later tests build the kernels with every config again)
    assert runs[True][1]._graph.graphs and not runs[True][1]._graph.disabled, "no graph was captured"
    assert picks["layout"] in fused_ops.LAYOUTS and {"encode", "backward"} <= picks.keys(), picks
    for (name, p), (_, q) in zip(runs[True][0].named_parameters(), runs[False][0].named_parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3, msg=name)


@cuda
def test_cuda_graphs__resume_and_resample(tmp_path) -> None:
    """A graphed run with resampling, interrupted by a checkpoint + resume, equals the uninterrupted graphed run."""
    over = dict(resample__enabled=True, resample__at_steps=[20], train__checkpoint_every=15, train__log_every=5)
    cfg = _cfg(steps=40, **over)

    def pool(n: int) -> torch.Tensor:
        return torch.cat([next(sparse_batches(_atoms(), seed=9)) for _ in range(n // BATCH + 1)])[:n].cuda()

    def run(run_dir, stop_after=None, resume=False):
        sae = build_sae(cfg.sae, d_in=32, seed=0).cuda()
        trainer = Trainer(sae, cfg, run_dir, ListLogger(), pool_fn=pool)
        start = 0
        if resume:
            trainer.resume(run_dir)
            start = trainer.step
        batches = (x.cuda() for x in sparse_batches(_atoms(), start=start))
        if stop_after is not None:
            batches = (x for _, x in zip(range(stop_after), batches))
        trainer.fit(batches)
        return sae.cpu()

    full = run(tmp_path / "a")
    with pytest.warns(UserWarning, match="stream ended"):
        run(tmp_path / "b", stop_after=15)
    resumed = run(tmp_path / "b", resume=True)
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@cuda
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_anthropic_grads__cuda_equals_cpu(dtype: torch.dtype, kernels: str) -> None:
    """The CUDA paths (cuBLASLt epilogues, or the Triton kernels) compute what the CPU path does."""
    if kernels == "triton":
        pytest.importorskip("triton")
    x_BD = next(sparse_batches(_atoms())).float()[:256] + 0.05
    outs, grads = [], []
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a Trainer built earlier may have turned it on (train.tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            sae = _sae(dtype=torch.float32).to(device)
            out, _ = anthropic_grads_(sae, x_BD.to(device), 0.3, dtype, kernels if device == "cuda" else "torch")
            outs.append(out.loss.cpu())
            grads.append([p.grad.cpu() for p in sae.parameters()])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tol = dict(rtol=1e-3, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for g_cuda, g_cpu in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_cuda, g_cpu, **tol)


@cuda
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "batchtopk+matryoshka"])
def test_cuda_graphs__sparse_topk_kernels_equal_dense(arch: str) -> None:
    """sae.topk_kernels=sparse on CUDA (gather / index_add backward) is capturable and trains as the dense path."""
    runs = {}
    arch, _, levels = arch.partition("+")
    over = {"sae__matryoshka": [8, 24]} if levels else {}
    for kernels in ("sparse", "dense"):
        cfg = _cfg(arch, steps=30, sae__topk_kernels=kernels, train__log_every=10, train__tf32=False, **over)
        sae = build_sae(cfg.sae, d_in=32, seed=0).cuda()
        trainer = Trainer(sae, cfg, None, ListLogger())
        trainer.fit(x.cuda() for x in sparse_batches(_atoms()))
        assert trainer._graph.graphs and not trainer._graph.disabled, kernels
        runs[kernels] = sae.cpu()
    for (name, p), (_, q) in zip(runs["sparse"].named_parameters(), runs["dense"].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_graphed_step__warms_up_each_key_before_capturing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per key: GRAPH_WARMUP_STEPS eager (side-stream) calls, then one capture, then replays (CUDA parts stubbed)."""
    from sae_stream import step as step_mod

    events: list[tuple[str, object]] = []
    graphed = step_mod.GraphedStep(body=lambda x: None, before_capture=lambda: None)

    class FakeGraph:
        def __init__(self, key: object) -> None:
            self.key = key

        def replay(self) -> None:
            events.append(("replay", self.key))

    def capture(x: torch.Tensor, key: object) -> None:
        events.append(("capture", key))
        graphed.static_x = torch.empty_like(x)
        graphed.graphs[key] = FakeGraph(key)

    monkeypatch.setattr(graphed, "_on_side_stream", lambda x: events.append(("eager", current[0])))
    monkeypatch.setattr(graphed, "_capture_and_run", capture)
    current = [False]
    x = torch.zeros(4, 2)
    for key in [False] * 5 + [True] * 5 + [False]:
        current[0] = key
        graphed(x, key=key)
    warm = step_mod.GRAPH_WARMUP_STEPS
    expected = ([("eager", False)] * warm + [("capture", False)] + [("replay", False)] * (4 - warm)
                + [("eager", True)] * warm + [("capture", True)] + [("replay", True)] * (4 - warm)
                + [("replay", False)])
    assert events == expected


def test_graphed_step__a_batch_in_its_input_is_not_copied_other_batches_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replays read the static input: a batch gathered there already (Trainer.batch_input) is not copied onto
    itself, any other batch is copied in. Before a capture the input follows a batch of another shape; after
    one, such a batch runs eagerly (CUDA parts stubbed)."""
    from sae_stream import step as step_mod

    eager: list[torch.Tensor] = []
    graphed = step_mod.GraphedStep(body=eager.append, before_capture=lambda: None, warmup=0)
    copies: list[int] = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, src, *a, **k: copies.append(1) or real_copy(t, src, *a, **k))

    class FakeGraph:
        def replay(self) -> None:
            eager.append(graphed.static_x.clone())

    def capture(x: torch.Tensor, key: object) -> None:
        graphed.input(x.shape, x.dtype, x.device)
        graphed._load(x)
        graphed.graphs[key] = FakeGraph()

    monkeypatch.setattr(graphed, "_capture_and_run", capture)
    x = graphed.input((4, 2), torch.float32, torch.device("cpu"))
    assert graphed.input((4, 2), torch.float32, torch.device("cpu")) is x  # (asked again: the same one)
    x.copy_(torch.arange(8.0).view(4, 2))
    copies.clear()
    graphed(x)  # capture, from the input itself: nothing copied
    graphed(x)
    assert copies == [] and len(eager) == 1 and torch.equal(eager[0], torch.arange(8.0).view(4, 2))
    y = torch.ones(4, 2)
    graphed(y)
    assert copies == [1] and torch.equal(eager[-1], y) and graphed.static_x is x
    graphed(torch.zeros(3, 2))  # another shape after a capture: eager, the input untouched
    assert eager[-1].shape == (3, 2) and graphed.static_x is x and torch.equal(x, y)
    with pytest.raises(AssertionError, match="reset"):
        graphed.input((3, 2), torch.float32, torch.device("cpu"))
    graphed.reset()  # graphs gone, the input kept (a buffer may be gathering into it)
    assert graphed.static_x is x and not graphed.graphs
    graphed(torch.zeros(3, 2))  # nothing captured: the input follows the batch
    assert graphed.static_x.shape == (3, 2) and graphed.static_x is not x


def test_device_scalar__fills_only_when_the_value_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from sae_stream.step import DeviceScalar

    fills: list[float] = []
    real_fill = torch.Tensor.fill_
    monkeypatch.setattr(torch.Tensor, "fill_", lambda t, v: fills.append(v) or real_fill(t, v))
    s = DeviceScalar(1e-4, torch.device("cpu"))
    assert s.tensor.item() == torch.tensor(1e-4).item() and s.tensor.dtype == torch.float32
    for v in [1e-4, 1e-4, 2e-4, 2e-4, 1e-4]:
        s.set(v)
        assert s.tensor.item() == torch.tensor(v).item()
    assert fills == [2e-4, 1e-4]


@cuda
def test_priority_stream__cuda_steps_run_on_it_and_equal_the_default_stream() -> None:
    """train.stream_priority: the batches are drawn and the (graphed) steps run on a high-priority stream, the
    caller's stream waits for them at the end, and the result is bit-identical to training on the default stream."""
    runs = {}
    for on in (True, False):
        cfg = _cfg("anthropic", steps=30, train__stream_priority=on)
        sae = build_sae(cfg.sae, d_in=32, seed=0).cuda()
        seen: list[int] = []

        def batches(seen: list[int] = seen):
            for x in sparse_batches(_atoms()):
                seen.append(torch.cuda.current_stream().priority)
                yield x.cuda()
        Trainer(sae, cfg, None, ListLogger()).fit(batches())
        assert torch.cuda.current_stream().priority == 0  # the caller's stream is back
        runs[on] = ([p.detach().cpu() for p in sae.parameters()], set(seen))  # (.cpu() on the caller's stream)
    assert max(runs[True][1]) < 0 and runs[False][1] == {0}  # (lower is higher; torch maps -1 into CUDA's range)
    for p, q in zip(runs[True][0], runs[False][0]):
        assert torch.equal(p, q)


@cuda
def test_graphed_training__batches_gathered_into_the_graph_input_equal_copied_ones() -> None:
    """`sae-stream train`'s loop: the buffer gathers each batch into the step graph's input (Trainer.batch_input),
    so replays copy nothing in; the trained SAE is bit-identical to the same run with the batches copied in."""
    runs = {}
    for into in (True, False):
        cfg = _cfg("anthropic", steps=40)
        sae = build_sae(cfg.sae, d_in=32, seed=0).cuda()
        trainer = Trainer(sae, cfg, None, ListLogger())
        source = [x.cuda() for x in itertools.islice(sparse_batches(_atoms()), 60)]
        buffer = ShuffleBuffer(iter(source), BufferConfig(capacity=4 * BATCH, storage="cuda"), "cuda", d_in=32)
        out = trainer.batch_input(BATCH, torch.float32) if into else None
        seen: list[bool] = []

        def batches(it: Iterator[torch.Tensor], out: torch.Tensor | None, seen: list[bool]) -> Iterator[torch.Tensor]:
            for x in it:
                seen.append(out is not None and x.data_ptr() == out.data_ptr())
                yield x
        trainer.fit(batches(buffer.batches(BATCH, out=out), out, seen))
        assert trainer._graph.graphs and not trainer._graph.disabled
        assert all(seen) if into else not any(seen)
        assert (trainer._graph.static_x is out) == into
        runs[into] = [p.detach().cpu() for p in sae.parameters()]
    for p, q in zip(runs[True], runs[False]):
        assert torch.equal(p, q)
