"""Shuffle buffer: exact-once accounting, mixing quality, determinism, resume, storage dtypes and devices.
(The activation stream that feeds it: test_activation_stream.py.)"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sae_stream.activations import ActivationChunk, expected_distinct, shuffle_metrics
from sae_stream.buffer import ShuffleBuffer
from tests._buffer_helpers import _cfg

CUDA = torch.cuda.is_available()


class TaggedSource:
    """Replayable synthetic stream: vector i = [id, context, position, noise...]; chunks of uneven size."""

    def __init__(self, n_contexts: int, ctx_len: int = 9, d_in: int = 8, contexts_per_chunk: int = 7,
                 skip_first: bool = True) -> None:
        self.n_contexts, self.ctx_len, self.d_in, self.per_chunk = n_contexts, ctx_len, d_in, contexts_per_chunk
        self.start = 1 if skip_first else 0
        self.next_context = 0

    @property
    def n_vectors(self) -> int:
        return self.n_contexts * (self.ctx_len - self.start)

    def __iter__(self) -> Iterator[ActivationChunk]:
        return self

    def __next__(self) -> ActivationChunk:
        if self.next_context >= self.n_contexts:
            raise StopIteration
        c0, c1 = self.next_context, min(self.next_context + self.per_chunk, self.n_contexts)
        self.next_context = c1
        k = self.ctx_len - self.start
        context = torch.arange(c0, c1).repeat_interleave(k)
        position = torch.arange(self.start, self.ctx_len).repeat(c1 - c0)
        ids = context * k + position - self.start
        acts = torch.randn(len(ids), self.d_in, generator=torch.Generator().manual_seed(c0))
        acts[:, 0], acts[:, 1], acts[:, 2] = ids.float(), context.float(), position.float()
        return ActivationChunk(acts, context, position.to(torch.int32))

    def state_dict(self) -> dict[str, Any]:
        return {"next_context": self.next_context}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_context = state["next_context"]


def _ids(batches: Any) -> torch.Tensor:
    return torch.cat([b[:, 0].clone() for b in batches]).long()


# ---------------------------------------------------------------------------------------------- ring


@pytest.mark.parametrize("refill_fraction,merge_lag", [(0.5, 2), (0.25, 0), (1.0, 1)])
def test_shuffle_buffer__every_vector_exactly_once(refill_fraction: float, merge_lag: int) -> None:
    src = TaggedSource(n_contexts=700)  # 5600 vectors through a 512-slot ring: many refills
    buf = ShuffleBuffer(src, _cfg(refill_fraction=refill_fraction), d_in=8, drop_last=False, merge_lag=merge_lag)
    batches = list(buf.batches(48, fresh=True))
    assert all(len(b) == 48 for b in batches[:-1]) and 0 < len(batches[-1]) <= 48
    assert torch.equal(_ids(batches).sort().values, torch.arange(src.n_vectors))
    assert buf.refills > 10 and buf.produced == buf.consumed == src.n_vectors


def test_shuffle_buffer__auto_merge_lag_keeps_most_of_the_old_pool() -> None:
    """merge_lag=null: 2 draws inline; with a producer stream (GPU) a quarter of the unread batches, capped at 32,
    so the refill overlaps training but the new vectors still join a large old pool (32 of a 32-batch pool would
    drain it first and alternate ring halves)."""
    buf = ShuffleBuffer(TaggedSource(n_contexts=2000), _cfg(capacity=4096), d_in=8)
    assert buf.merge_lag is None and buf._merge_lag(16) == 2
    batches = buf.batches(16)
    for _ in range(50):
        next(batches)
    unread = buf._unread()
    assert unread > 4 * 32 * 16
    buf._producer = object()  # only its presence is read here
    assert buf._merge_lag(16) == max(2, min(32, unread // 64))
    assert buf._merge_lag(1) == 32 and buf._merge_lag(unread) == 2
    assert ShuffleBuffer(TaggedSource(n_contexts=4), _cfg(merge_lag=5), d_in=8)._merge_lag(16) == 5


def test_shuffle_buffer__drop_last_drops_only_the_final_partial_batch() -> None:
    src = TaggedSource(n_contexts=301)
    buf = ShuffleBuffer(src, _cfg(), d_in=8, drop_last=True)
    ids = _ids(buf.batches(50))  # the yielded tensor is reused: _ids copies each one at once
    assert len(ids) % 50 == 0 and ids.unique().numel() == len(ids)
    assert buf.dropped == src.n_vectors - len(ids) < 50


def test_shuffle_buffer__reuse_two_reads_each_vector_twice() -> None:
    src = TaggedSource(n_contexts=200)
    buf = ShuffleBuffer(src, _cfg(reuse=2), d_in=8, drop_last=False)
    counts = torch.bincount(_ids(buf.batches(64)), minlength=src.n_vectors)
    assert counts.min() == counts.max() == 2


def test_shuffle_buffer__pool_is_disjoint_from_training_and_covers_the_rest() -> None:
    src = TaggedSource(n_contexts=600)
    buf = ShuffleBuffer(src, _cfg(), d_in=8, drop_last=False)
    it = buf.batches(32)
    trained = [next(it)[:, 0].clone() for _ in range(20)]
    pool = buf.sample_pool(1500, dtype=torch.float32)  # more than the ring: needs fresh production
    trained += [b[:, 0].clone() for b in it]
    train_ids, pool_ids = torch.cat(trained).long(), pool[:, 0].long()
    assert len(pool_ids) == 1500 and buf.pool_consumed == 1500
    assert not set(train_ids.tolist()) & set(pool_ids.tolist())
    assert torch.equal(torch.cat([train_ids, pool_ids]).sort().values, torch.arange(src.n_vectors))


def test_shuffle_buffer__pool_in_bf16_on_host_matches_rounded_vectors() -> None:
    buf = ShuffleBuffer(TaggedSource(n_contexts=100, d_in=16), _cfg(), d_in=16)
    pool = buf.sample_pool(300, dtype=torch.bfloat16, device="cpu")
    assert pool.dtype == torch.bfloat16 and pool.shape == (300, 16)
    ids = pool[:, 0].float()
    assert (ids == ids.round()).all() and ids.max() < 800


def test_shuffle_buffer__same_seed_same_batches_other_seed_differs() -> None:
    def run(seed: int) -> torch.Tensor:
        buf = ShuffleBuffer(TaggedSource(n_contexts=300), _cfg(), d_in=8, seed=seed)
        return _ids(buf.batches(40))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA,
                                                                                      reason="needs CUDA"))])
def test_shuffle_buffer__primed_yields_the_batches_it_would_have(device: str) -> None:
    """prime() (train / run read the text before writing their run directory) is the first refill done early: the
    same batches follow, metrics and all; once the ring has been written it does nothing."""
    def run(prime: bool) -> tuple[torch.Tensor, dict]:
        buf = ShuffleBuffer(TaggedSource(n_contexts=300), _cfg(storage="cpu" if device == "cpu" else "cuda"), device,
                            d_in=8, seed=3, metrics_every=1)
        if prime:
            buf.prime()
            assert buf.produced == buf.capacity and buf.refills == 1
        ids = _ids(buf.batches(40))
        produced = buf.produced
        buf.prime()  # (drained: nothing to do)
        assert buf.produced == produced
        return ids, buf.metrics()

    (a, metrics_a), (b, metrics_b) = run(False), run(True)
    assert torch.equal(a, b) and metrics_a == metrics_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shuffle_buffer__batches_gathered_into_out_equal_the_usual_ones(dtype: torch.dtype) -> None:
    """`out=` (a CUDA graph's input): every batch is gathered into that one tensor (the last, shorter one into its
    head), with the same values as the buffer's own alternating outputs; an out of the wrong shape or dtype, or
    with fresh=True, is refused before anything is drawn."""
    def run(out: torch.Tensor | None) -> tuple[list[torch.Tensor], list[bool]]:
        buf = ShuffleBuffer(TaggedSource(n_contexts=100), _cfg(), d_in=8, seed=5, drop_last=False)
        got, into = [], []
        for b in buf.batches(48, dtype=dtype, out=out):
            got.append(b.clone())
            into.append(out is not None and b.data_ptr() == out.data_ptr())
        return got, into

    out = torch.full((48, 8), float("nan"), dtype=dtype)
    (plain, _), (gathered, into) = run(None), run(out)
    assert len(plain) == len(gathered) > 10 and len(plain[-1]) < 48 and all(into)
    assert all(torch.equal(a, b) for a, b in zip(plain, gathered))
    assert torch.equal(out[:len(plain[-1])], plain[-1])
    buf = ShuffleBuffer(TaggedSource(n_contexts=10), _cfg(), d_in=8)
    for bad, fresh in [(torch.empty(48, 9, dtype=dtype), False), (torch.empty(48, 8, dtype=torch.float64), False),
                       (torch.empty(48, 8, dtype=dtype), True)]:
        with pytest.raises(ValueError, match="out .* is not a \\[48, 8\\]"):
            next(buf.batches(48, dtype=dtype, fresh=fresh, out=bad))
    assert buf.consumed == 0


@pytest.mark.parametrize("stop_after", [1, 13, 29])  # inside the first cycle, with a refill in flight, later
@pytest.mark.parametrize("written_later", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
def test_shuffle_buffer__resume_yields_the_identical_sequence(stop_after: int, written_later: bool,
                                                               reuse: bool) -> None:
    """written_later: the state is serialised only after the buffer has run to its end (refills overwriting the
    ring, new orders), as a background checkpoint write may be: state_dict must be a snapshot. reuse: its rows in
    the buffer's kept snapshot memory (valid until the next state_dict call)."""
    cfg = _cfg(capacity=300, refill_fraction=0.4)
    ref_buf = ShuffleBuffer(TaggedSource(n_contexts=400), cfg, d_in=8, seed=1, merge_lag=3)
    ref = [b.clone() for b in ref_buf.batches(24)]
    buf = ShuffleBuffer(TaggedSource(n_contexts=400), cfg, d_in=8, seed=1, merge_lag=3)
    it = buf.batches(24)
    head = [next(it).clone() for _ in range(stop_after)]
    state = buf.state_dict(reuse_host_memory=reuse)
    if written_later:
        for _ in it:
            pass
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    resumed = ShuffleBuffer(TaggedSource(n_contexts=400), cfg, d_in=8, seed=99, merge_lag=3)
    resumed.load_state_dict(torch.load(blob, weights_only=False))
    tail = [b.clone() for b in resumed.batches(24)]
    assert len(head) + len(tail) == len(ref)
    for got, want in zip(head + tail, ref):
        assert torch.equal(got, want)
    assert resumed.metrics() == ref_buf.metrics()  # the shuffle metrics' window came along too


def test_shuffle_buffer__reused_snapshot_memory_is_the_same_rows_in_one_kept_buffer() -> None:
    """state_dict(reuse_host_memory=True): the same values as a fresh snapshot, in one buffer kept and rewritten by
    each call, and saved as the live rows only."""
    buf = ShuffleBuffer(TaggedSource(n_contexts=400), _cfg(capacity=300, refill_fraction=0.4), d_in=8, seed=1)
    it = buf.batches(24)
    for _ in range(5):
        next(it)
    fresh, kept = buf.state_dict(), buf.state_dict(reuse_host_memory=True)
    assert torch.equal(fresh["acts"], kept["acts"]) and torch.equal(fresh["slots"], kept["slots"])
    for _ in range(9):
        next(it)
    again = buf.state_dict(reuse_host_memory=True)
    assert again["acts"].data_ptr() == kept["acts"].data_ptr()  # the same memory, rewritten
    assert torch.equal(again["acts"], buf.state_dict()["acts"])
    assert fresh["acts"].data_ptr() != buf.state_dict()["acts"].data_ptr()
    # saved, it is the live rows only (torch.save writes a view's whole storage: here the kept buffer's)
    assert len(again["acts"]) < buf.capacity
    sizes = []
    for state in (again, buf.state_dict()):
        blob = io.BytesIO()
        torch.save(state["acts"], blob)
        sizes.append(len(blob.getvalue()))
    assert sizes[0] == sizes[1]


def test_shuffle_buffer__bfloat16_storage_rounds_like_bf16() -> None:
    src = TaggedSource(n_contexts=28, d_in=8)  # 224 ids: exact in bf16 (< 256)
    by_id = {int(r[0]): r for c in TaggedSource(n_contexts=28, d_in=8) for r in c.acts}
    buf = ShuffleBuffer(src, _cfg(capacity=64, dtype="bfloat16"), d_in=8, drop_last=False)
    assert buf.memory_bytes == 64 * 8 * 2 + 64 * 12 + 2 * 8 * 64 + 64
    seen = 0
    for b in buf.batches(16):
        assert b.dtype == torch.float32
        for row in b:
            assert torch.equal(row, by_id[int(row[0])].to(torch.bfloat16).float())
            seen += 1
    assert seen == 224


class Bf16Source(TaggedSource):
    """TaggedSource in bf16, saying so (like ActivationStream with buffer.dtype=auto under CUDA autocast)."""
    dtype = torch.bfloat16

    def __next__(self) -> ActivationChunk:
        chunk = super().__next__()
        return chunk._replace(acts=chunk.acts.to(torch.bfloat16))


def test_shuffle_buffer__auto_dtype_stores_what_the_source_gives() -> None:
    by_id = {int(r[0]): r for c in Bf16Source(n_contexts=28) for r in c.acts}  # ids < 256: exact in bf16
    buf = ShuffleBuffer(Bf16Source(n_contexts=28), _cfg(capacity=64), d_in=8, drop_last=False)
    assert buf.dtype == torch.bfloat16 and buf.memory_bytes == 64 * 8 * 2 + 64 * 12 + 2 * 8 * 64 + 64
    rows = [r.clone() for b in buf.batches(16, dtype=torch.bfloat16) for r in b]
    assert len(rows) == 224 and all(r.dtype == torch.bfloat16 and torch.equal(r, by_id[int(r[0])]) for r in rows)
    assert ShuffleBuffer(TaggedSource(n_contexts=1), _cfg(), d_in=8).dtype == torch.float32  # no .dtype: fp32


def test_shuffle_buffer__auto_dtype_resumes_in_the_saved_dtype() -> None:
    """A run started with a bf16 ring (GPU) resumes with one wherever it resumes; an explicit dtype must match."""
    cfg = _cfg(capacity=120, refill_fraction=0.4)
    ref = [b.clone() for b in ShuffleBuffer(Bf16Source(n_contexts=200), cfg, d_in=8, seed=1).batches(24)]
    buf = ShuffleBuffer(Bf16Source(n_contexts=200), cfg, d_in=8, seed=1)
    it = buf.batches(24)
    head = [next(it).clone() for _ in range(9)]
    state = buf.state_dict()
    assert state["dtype"] == "bfloat16"
    resumed = ShuffleBuffer(TaggedSource(n_contexts=200), cfg, d_in=8)  # this source would give an fp32 ring
    resumed.load_state_dict(state)
    assert resumed.dtype == torch.bfloat16 and resumed.memory_bytes == buf.memory_bytes
    tail = [b.clone() for b in resumed.batches(24)]  # (fp32 batches of the bf16 ring, as before the stop)
    assert len(head) + len(tail) == len(ref) and all(torch.equal(a, b) for a, b in zip(head + tail, ref))
    with pytest.raises(ValueError, match="dtype .*bfloat16, this buffer has .*float32"):
        ShuffleBuffer(TaggedSource(n_contexts=200), _cfg(capacity=120, dtype="float32"), d_in=8).load_state_dict(state)


def test_shuffle_buffer__too_large_is_an_error_before_allocating() -> None:
    cfg = _cfg(capacity=10**12, max_memory_gb=1.0)
    with pytest.raises(ValueError, match=r"buffer.capacity=1,000,000,000,000 .* lower buffer.capacity") as e:
        ShuffleBuffer(TaggedSource(n_contexts=1), cfg, d_in=512)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="free host memory"):
        ShuffleBuffer(TaggedSource(n_contexts=1), _cfg(capacity=10**13), d_in=512)


def test_shuffle_buffer__source_of_wrong_width_is_an_error() -> None:
    buf = ShuffleBuffer(iter([torch.zeros(10, 7)]), _cfg(), d_in=8)
    with pytest.raises(ValueError, match=r"shape \(10, 7\), expected \[n, 8\]"):
        next(buf.batches(4))


# ---------------------------------------------------------------------------------------------- shuffle quality


def test_expected_distinct__hand_computed_and_simulated() -> None:
    # 2 contexts x 2 vectors, 2 draws: one context only with prob 2/6, so E = 1/3 + 2 * 2/3 = 5/3
    assert math.isclose(float(expected_distinct(torch.tensor([0, 0, 1, 1]), 2)), 5 / 3, rel_tol=1e-9)
    ctx = torch.arange(40).repeat_interleave(torch.arange(1, 41))  # uneven contexts
    g = torch.Generator().manual_seed(0)
    sim = sum(ctx[torch.randperm(len(ctx), generator=g)[:60]].unique().numel() for _ in range(2000)) / 2000
    assert abs(float(expected_distinct(ctx, 60)) - sim) < 0.1


def test_expected_distinct__run_lengths_by_scans_equal_binary_searches() -> None:
    """Each vector's context count from scans of the sorted int32 offsets: the same bits as counting it with two
    binary searches in the sorted int64 ids, for ids far above 2^32, single contexts, one vector, no vectors."""
    def by_search(ctx: torch.Tensor, draws: int) -> torch.Tensor:
        n, s = ctx.numel(), ctx.sort().values
        m = (torch.searchsorted(s, s, right=True) - torch.searchsorted(s, s)).double()
        B, rest = min(draws, n), n - m
        log_miss = (torch.lgamma(rest + 1) - torch.lgamma((rest - B).clamp(min=0) + 1) - math.lgamma(n + 1)
                    + math.lgamma(n - B + 1))
        return ((1 - torch.where(rest >= B, log_miss.exp(), torch.zeros_like(rest))) / m).sum()

    g = torch.Generator().manual_seed(0)
    pools = [torch.randint(0, 50, (1000,), generator=g) + 2**40, torch.tensor([3, 3, 3]), torch.tensor([9]),
             torch.arange(40).repeat_interleave(torch.arange(1, 41))[torch.randperm(820, generator=g)]]
    for ctx in pools:
        for draws in (1, 2, 60, 5000):
            assert torch.equal(expected_distinct(ctx, draws), by_search(ctx, draws)), (ctx[:5], draws)
    assert float(expected_distinct(torch.zeros(0, dtype=torch.long), 4)) == 0.0


def test_shuffle_buffer__metrics_near_ideal_and_detect_an_unshuffled_order() -> None:
    src = TaggedSource(n_contexts=3000, ctx_len=33, contexts_per_chunk=16)  # 32 vectors per context
    buf = ShuffleBuffer(src, _cfg(capacity=8192), d_in=8, metrics_every=4)
    for _ in buf.batches(256):
        pass
    m = buf.metrics()
    assert m["shuffle_samples"] == 64 and m["distinct_ratio"] > 0.95
    assert m["max_rows_per_context"] <= 8  # 256 draws from >= 128 contexts of 32: ideal ~2
    assert abs(m["position_row_corr"]) < 0.05 and abs(m["position_batch_corr"]) < 0.5
    ordered = [(i, torch.arange(i * 8, i * 8 + 8).repeat_interleave(32), torch.arange(32).repeat(8),
                torch.tensor(200.0)) for i in range(10)]
    bad = shuffle_metrics(ordered)
    assert bad["distinct_ratio"] < 0.05 and bad["position_row_corr"] > 0.1 and bad["max_rows_per_context"] == 32


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("storage", ["cuda", "pinned"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shuffle_buffer__gpu_storages_every_vector_exactly_once(storage: str, dtype: str) -> None:
    n_contexts, capacity, batch = (2000, 2048, 100) if dtype == "float32" else (28, 64, 16)  # bf16: ids < 256
    src = TaggedSource(n_contexts=n_contexts, d_in=16)
    cfg = _cfg(capacity=capacity, storage=storage, dtype=dtype)
    buf = ShuffleBuffer(src, cfg, "cuda", d_in=16, drop_last=False, metrics_every=1)
    ids = []
    for b in buf.batches(batch):
        assert b.device.type == "cuda" and b.dtype == torch.float32
        ids.append(b[:, 0].clone())
    assert torch.equal(torch.cat(ids).long().cpu().sort().values, torch.arange(src.n_vectors))
    assert buf.metrics()["distinct_ratio"] > 0.8
    pool_buf = ShuffleBuffer(TaggedSource(n_contexts=n_contexts // 2, d_in=16), cfg, "cuda", d_in=16,
                             drop_last=False)
    pool = pool_buf.sample_pool(capacity // 2 + 7, dtype=torch.float32, device="cpu")
    rest = torch.cat([b[:, 0].cpu().clone() for b in pool_buf.batches(batch)]).long()
    assert torch.equal(torch.cat([pool[:, 0].long(), rest]).sort().values, torch.arange(n_contexts // 2 * 8))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("storage", ["cuda", "pinned"])
def test_shuffle_buffer__gpu_batches_gathered_into_out_equal_the_usual_ones(storage: str) -> None:
    """`out=` on a GPU, from a ring there or in pinned host memory (its staging then copied into out)."""
    def run(out: torch.Tensor | None) -> list[torch.Tensor]:
        cfg = _cfg(capacity=2048, storage=storage)
        buf = ShuffleBuffer(TaggedSource(n_contexts=800, d_in=16), cfg, "cuda", d_in=16, seed=1, drop_last=False)
        got = []
        for b in buf.batches(100, out=out):
            assert out is None or b.data_ptr() == out.data_ptr()
            got.append(b.cpu())
        return got

    plain, gathered = run(None), run(torch.empty(100, 16, device="cuda"))
    assert len(plain) == len(gathered) == 64 and all(torch.equal(a, b) for a, b in zip(plain, gathered))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("reuse", [False, True])
def test_shuffle_buffer__cuda_state_dict_copies_the_ring_in_chunks(dtype: str, reuse: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU ring's live rows reach the checkpoint through chunks (here 7 rows each; reuse: into the kept pinned
    buffer, asynchronously) and resume the identical sequence, like the whole-ring gather they replace. (256 rows
    of 16: a power of two bytes, so the kept buffer is pinned; 300 rows would stay pageable: _host_tensor.)"""
    from sae_stream import buffer_state

    cfg = _cfg(capacity=256, refill_fraction=0.4, storage="cuda", dtype=dtype)
    ref = [b.clone() for b in ShuffleBuffer(TaggedSource(n_contexts=60, d_in=16), cfg, "cuda", d_in=16,
                                            seed=1).batches(24)]
    monkeypatch.setattr(buffer_state, "SNAPSHOT_CHUNK_BYTES", 7 * 16 * torch.empty(0, dtype=getattr(torch, dtype))
                        .element_size())
    buf = ShuffleBuffer(TaggedSource(n_contexts=60, d_in=16), cfg, "cuda", d_in=16, seed=1)
    it = buf.batches(24)
    head = [next(it).clone() for _ in range(5)]
    state = buf.state_dict(reuse_host_memory=reuse)
    assert state["acts"].device.type == "cpu" and len(state["slots"]) > 7 and state["acts"].is_pinned() == reuse
    assert torch.equal(state["acts"], buf._ring_ND[state["slots"].cuda()].cpu())
    resumed = ShuffleBuffer(TaggedSource(n_contexts=60, d_in=16), cfg, "cuda", d_in=16, seed=7)
    resumed.load_state_dict(state)
    tail = [b.clone() for b in resumed.batches(24)]
    assert len(head) + len(tail) == len(ref) and all(torch.equal(a, b) for a, b in zip(head + tail, ref))
