"""Activation stream: equal to run_with_cache at any hook of any model, several hooks, sampled positions, dtype,
exact resume; LM -> stream -> buffer yields exactly the LM's activations. (The shuffle buffer: test_buffer.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_stream.activations import ActivationStream, HookCapture, hook_dim
from sae_stream.analysis.hooks import hook_activations
from sae_stream.buffer import ShuffleBuffer
from sae_stream.config import BufferConfig
from tests._buffer_helpers import _cfg

CUDA = torch.cuda.is_available()


def _tiny_model(**kw: Any) -> HookedTransformer:
    torch.manual_seed(0)
    base = dict(n_layers=1, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, act_fn="relu",
                normalization_type="LN", default_prepend_bos=False)
    return HookedTransformer(HookedTransformerConfig(**(base | kw))).eval()


def _token_batches(sizes: list[int], T: int = 10, vocab: int = 50) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (b, T), generator=g) for b in sizes]


# ---------------------------------------------------------------------------------------------- stream


@pytest.mark.parametrize("stop", ["raise", "layer"])
def test_activation_stream__equals_run_with_cache(stop: str) -> None:
    model = _tiny_model(n_layers=2)
    batches = _token_batches([3, 5, 2, 6])  # re-batched to 4 contexts per forward
    stream = ActivationStream(model, "blocks.0.mlp.hook_post", batches, _cfg(), stop=stop)
    chunks = list(stream)
    assert [len(c.acts) for c in chunks] == [4 * 9] * 4
    tokens = torch.cat(batches)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    ref = cache["blocks.0.mlp.hook_post"][:, 1:].reshape(-1, 64)
    torch.testing.assert_close(torch.cat([c.acts for c in chunks]), ref)
    assert torch.equal(torch.cat([c.context for c in chunks]), torch.arange(16).repeat_interleave(9))
    assert torch.equal(torch.cat([c.position for c in chunks]), torch.arange(1, 10, dtype=torch.int32).repeat(16))


@pytest.mark.parametrize("hook,width", [
    ("hook_embed", 24), ("blocks.1.hook_resid_pre", 24), ("blocks.0.attn.hook_z", 3 * 8),
    ("blocks.2.attn.hook_pattern", 3 * 10), ("ln_final.hook_normalized", 24), ("blocks.2.mlp.hook_pre", 40),
])
def test_activation_stream__any_hook_of_another_model(hook: str, width: int) -> None:
    model = _tiny_model(n_layers=3, d_model=24, n_heads=3, d_head=8, d_mlp=40, d_vocab=30, act_fn="gelu")
    batches = _token_batches([5], vocab=30)
    cfg = _cfg(skip_first_position=False)
    stream = ActivationStream(model, hook, batches, cfg, context_len=10)
    assert stream.d_in == width == hook_dim(model, hook, context_len=10)
    acts = torch.cat([c.acts for c in stream])
    _, cache = model.run_with_cache(batches[0], names_filter=hook)
    ref = cache[hook]
    if hook.endswith("hook_pattern"):
        ref = ref.permute(0, 2, 1, 3)
    torch.testing.assert_close(acts, ref.reshape(50, width))


def test_activation_stream__auto_dtype_is_what_the_hook_gives() -> None:
    model = _tiny_model()
    cfg = BufferConfig(hook_name="blocks.0.mlp.hook_post", lm_batch_size=2)  # dtype auto
    stream = ActivationStream(model, cfg.hook_name, _token_batches([3]), cfg)
    assert stream.dtype == torch.float32 and next(stream).acts.dtype == torch.float32  # CPU: fp32
    hooks = HookCapture(model, cfg.hook_name)
    stream = ActivationStream(model, cfg.hook_name, _token_batches([3]), cfg, capture=lambda t: hooks(t).bfloat16())
    assert stream.dtype == torch.bfloat16 and stream.d_in == 64
    assert next(stream).acts.dtype == torch.bfloat16
    assert ShuffleBuffer(stream, _cfg(capacity=64), d_in=64).dtype == torch.bfloat16
    stream = ActivationStream(model, cfg.hook_name, _token_batches([3]), BufferConfig(dtype="float16"))
    assert stream.dtype == torch.float16 and next(stream).acts.dtype == torch.float16


def test_activation_stream__several_hooks_concatenate() -> None:
    model = _tiny_model()
    names = ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"]
    stream = ActivationStream(model, names, _token_batches([4]), _cfg())
    assert stream.d_in == 32 + 64
    acts = next(stream).acts
    _, cache = model.run_with_cache(_token_batches([4])[0])
    ref = torch.cat([cache[n][:, 1:] for n in names], dim=-1).reshape(-1, 96)
    torch.testing.assert_close(acts, ref)


def test_hook_dim__unknown_hook_is_one_line_error_with_the_closest_names() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"hook 'blocks.1.mlp.hook_post' is not in the model \(1 layer\(s\)\): did "
                                         "you mean 'blocks.0.mlp.hook_post'") as e:
        hook_dim(model, "blocks.1.mlp.hook_post")
    assert "\n" not in str(e.value) and "`sae-stream hooks --lm LM` lists" in str(e.value)
    with pytest.raises(ValueError, match=r"\(1 layer\(s\)\): `sae-stream hooks"):  # nothing close: no guess
        hook_dim(model, "zzz")


def test_activation_stream__optional_hooks_switch_themselves_on_and_hold_what_they_should() -> None:
    """attn.hook_result and hook_mlp_in fire only with transformer-lens switches that asking for them turns on: the
    heads' results (+ b_O) sum to hook_attn_out, and hook_mlp_in is hook_resid_mid, of a model never switched."""
    plain, model = _tiny_model(), _tiny_model()
    batches = _token_batches([3])
    _, cache = plain.run_with_cache(batches[0])
    for hook, want in (("blocks.0.attn.hook_result", None), ("blocks.0.hook_mlp_in", "blocks.0.hook_resid_mid")):
        assert hook not in cache  # (off by default)
        stream = ActivationStream(model, hook, batches, _cfg(skip_first_position=False))
        acts = torch.cat([c.acts for c in stream])
        if want is None:
            heads = acts.view(30, 4, 32)
            got, want_BTD = heads.sum(1) + model.blocks[0].attn.b_O, cache["blocks.0.hook_attn_out"]
            assert stream.d_in == 4 * 32
        else:
            got, want_BTD = acts, cache[want]
        torch.testing.assert_close(got, want_BTD.reshape(30, -1), rtol=1e-5, atol=1e-5)
        fresh = _tiny_model()  # the analysis reads switch it on too (eval, dashboard, steering on a loaded LM)
        torch.testing.assert_close(hook_activations(fresh, hook, batches[0]).reshape(30, -1), acts)


def test_hook_points__an_attention_only_model_has_no_mlp_input() -> None:
    """transformer-lens asserts on use_hook_mlp_in for an attn-only model: listed hooks skip it, asking is an error."""
    from sae_stream.hook_points import trainable_hooks

    model = _tiny_model(n_layers=2, attn_only=True)
    hooks = trainable_hooks(model)
    assert "blocks.1.attn.hook_result" in hooks and not any(h.endswith("hook_mlp_in") for h in hooks)
    with pytest.raises(ValueError, match="attention-only model has no MLP; train on blocks.0.hook_resid_mid"):
        hook_dim(model, "blocks.0.hook_mlp_in")


def test_activation_stream__positions_per_context_sampled_and_seeded() -> None:
    model = _tiny_model()
    cfg = _cfg(positions_per_context=3)
    hook = "blocks.0.mlp.hook_post"
    runs = [list(ActivationStream(model, hook, _token_batches([8]), cfg, seed=s)) for s in (5, 5, 6)]
    pos = [torch.cat([c.position for c in r]).view(8, 3) for r in runs]
    assert torch.equal(pos[0], pos[1]) and not torch.equal(pos[0], pos[2])
    assert pos[0].min() >= 1 and all(len(set(row.tolist())) == 3 for row in pos[0])
    _, cache = model.run_with_cache(_token_batches([8])[0])
    ref = cache["blocks.0.mlp.hook_post"][torch.arange(8)[:, None], pos[0].long()].reshape(24, 64)
    torch.testing.assert_close(torch.cat([c.acts for c in runs[0]]), ref)
    with pytest.raises(ValueError, match="positions_per_context"):
        next(ActivationStream(model, "blocks.0.mlp.hook_post", _token_batches([2]), _cfg(positions_per_context=10)))


class ReplayBatches:
    """Token batches with a position that can be saved and restored (like TokenContexts)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.i = batches, 0

    def __iter__(self) -> ReplayBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.i >= len(self.batches):
            raise StopIteration
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


def test_activation_stream__state_dict_resumes_the_same_chunks() -> None:
    model = _tiny_model()
    batches = _token_batches([3, 6, 2, 5, 4, 3])  # re-batched by 4: leftover token rows at every cut
    cfg = _cfg(positions_per_context=3)
    hook = "blocks.0.mlp.hook_post"
    ref = list(ActivationStream(model, hook, ReplayBatches(batches), cfg, seed=2))
    head = ActivationStream(model, hook, ReplayBatches(batches), cfg, seed=2)
    next(head), next(head)
    state = head.state_dict()
    assert state["pending_tokens"] is not None and state["token_source"] == {"i": 2}
    resumed = ActivationStream(model, hook, ReplayBatches(batches), cfg, seed=7)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(tail) == len(ref) - 2
    for got, want in zip(tail, ref[2:]):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------------------------------------- LM -> buffer


def test_stream_into_buffer__yields_exactly_the_lm_activations() -> None:
    model = _tiny_model()
    batches = _token_batches([6, 6, 6, 6, 6])
    cfg = _cfg(capacity=128, dtype="float32")
    stream = ActivationStream(model, "blocks.0.mlp.hook_post", iter(batches), cfg)
    buf = ShuffleBuffer(stream, cfg, "cpu", drop_last=False)
    got = torch.cat([b.clone() for b in buf.batches(32)])
    _, cache = model.run_with_cache(torch.cat(batches), names_filter="blocks.0.mlp.hook_post")
    ref = cache["blocks.0.mlp.hook_post"][:, 1:].reshape(-1, 64)
    assert got.shape == ref.shape
    key = torch.randn(64, dtype=torch.float64)  # match rows as a multiset via a random projection
    torch.testing.assert_close((got.double() @ key).sort().values, (ref.double() @ key).sort().values)
    assert buf.metrics()["distinct_contexts"] > 1


@pytest.mark.parametrize("device, capacity, sampled", [("cpu", 128, None), ("cpu", 150, None), ("cpu", 150, 7),
                                                       ("cuda", 150, None)])
def test_stream_into_buffer__direct_writes_equal_chunks(device: str, capacity: int, sampled: int | None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM writing whole batches into the ring's free slots itself (ActivationStream.write_into) leaves the ring,
    its provenance and every batch as the chunk path does; batches that do not fit the slots left go as chunks, and
    so do all when positions are sampled. On CUDA: the fused block's kernel storing into a bf16 ring (one block
    config: the same roundings both ways)."""
    from lm.capture import GPTCapture
    from lm.hooked import to_hooked
    from tests.test_lm import tiny_gpt

    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    monkeypatch.setenv("SAE_STREAM_TRITON_AUTOTUNE", "0")
    gpt, hook = tiny_gpt(seed=5).to(device), "blocks.0.mlp.hook_post"
    batches = _token_batches([4] * 9 + [3], T=16, vocab=97)  # 4 x 15 = 60 vectors per LM batch, 45 in the last
    cfg = _cfg(capacity=capacity, dtype="float32" if device == "cpu" else "auto", storage=device,
               positions_per_context=sampled)
    kernels = "triton" if device == "cuda" else "torch"
    runs = {}
    for direct in (True, False):
        stream = ActivationStream(to_hooked(gpt), hook, iter(batches), cfg, device,
                                  capture=GPTCapture(gpt, [hook], kernels=kernels))
        buf = ShuffleBuffer(stream, cfg, device, drop_last=False, direct_writes=direct)
        got = [b.clone() for b in buf.batches(32)]
        runs[direct] = got, buf._context_N.clone(), buf._position_N.clone(), buf.produced, buf.direct_rows
    (got, context, position, produced, direct_rows), (ref, *ref_state, none) = runs[True], runs[False]
    assert produced == ref_state[2] == (9 * 4 + 3) * (sampled or 15)
    assert torch.equal(context, ref_state[0]) and torch.equal(position, ref_state[1])
    assert len(got) == len(ref) and all(torch.equal(g, r) for g, r in zip(got, ref))
    assert none == 0  # both paths ran (the last slots of a refill: chunks), or only chunks with sampled positions
    assert 2 * 60 <= direct_rows < produced if sampled is None else direct_rows == 0


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_stream_into_buffer__cuda_lm_on_producer_stream_matches_cpu() -> None:
    model = _tiny_model().to("cuda")
    batches = _token_batches([8] * 6)
    cfg = _cfg(capacity=256, storage="cuda")
    stream = ActivationStream(model, "blocks.0.mlp.hook_post", [b.cuda() for b in batches], cfg, "cuda")
    got = torch.cat([b.clone() for b in ShuffleBuffer(stream, cfg, "cuda", drop_last=False).batches(64)]).cpu()
    _, cache = model.cpu().run_with_cache(torch.cat(batches), names_filter="blocks.0.mlp.hook_post")
    ref = cache["blocks.0.mlp.hook_post"][:, 1:].reshape(-1, 64)
    key = torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close((got.double() @ key).sort().values, (ref.double() @ key).sort().values,
                               atol=0.1, rtol=0.05)  # bf16 autocast on cuda
