"""A fixed ring of activation vectors that turns a stream into well-mixed training batches, in bounded memory.

    stream = ActivationStream(model, cfg.buffer.hook_name, token_batches, cfg.buffer, device)   # activations.py
    buffer = ShuffleBuffer(stream, cfg.buffer, device, seed=cfg.train.seed)
    for x_BD in buffer.batches(cfg.train.batch_size):      # Iterator[Tensor[B, d_in]]: all the trainer sees
        ...
    pool_ND = buffer.sample_pool(819_200, dtype=torch.bfloat16, device="cpu")   # for resampling

How it mixes. The ring holds `capacity` vectors; `order` lists the unread slots in a uniformly random order and
batches are consecutive slices of it, so every batch is a uniform draw without replacement from the unread
entries (with `cfg.reuse` > 1 each slot is `reuse` entries, so a batch may hold one vector twice). Once
`refill_fraction * capacity` vectors have been read, the freed slots are refilled from the stream; the new slots
join the unread ones and `order` is re-permuted: O(capacity) index work per refill, never a copy of the ring
(SAELens's concatenate-and-permute-everything buffer slows as it grows: /work/shared/PERF_NOTES.md).
Each streamed vector is read exactly `cfg.reuse` times (batches and pools together); a finite stream is drained
in full batches, then a final partial batch unless `drop_last`.

Overlap. On a cuda consumer the stream runs on its own CUDA stream: the refill waits (on the GPU) for the reads
already queued, writes the freed slots, and records an event; batches keep coming from the old unread slots for
`merge_lag` more draws (GPU: up to 32, so the refill's LM work overlaps SAE steps), then the consumer stream waits
on the event before the new slots can be drawn. From pinned host memory, batches are gathered on the host into two
alternating pinned buffers and copied to the GPU on a copy stream (non-blocking, double-buffered). On the CPU
everything runs inline: the LM forward costs ~2% of a 512 -> 4096 SAE step there, and a background producer thread
measured no better on 2 cores (LM -> buffer -> step at 1.01x the bare step either way, benchmarks/buffer_throughput.py)
while it would complicate exact resume.

A yielded batch is overwritten two batches later (two alternating output buffers, no allocation per step): use it
before asking for the batch after next, or pass `fresh=True`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from sae_stream.activations import DTYPES, ActivationChunk, expected_distinct, shuffle_metrics
from sae_stream.buffer_state import BufferState
from sae_stream.config import BufferConfig
from sae_stream.process import as_reported


def resolve_storage(storage: str, device: torch.device) -> str:
    """'auto' -> 'cuda' for a cuda consumer, else 'cpu'; 'cuda'/'pinned' need CUDA."""
    if storage == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if storage in ("cuda", "pinned") and not torch.cuda.is_available():
        raise ValueError(f"buffer.storage={storage!r} needs CUDA, which is not available: use 'cpu' or 'auto'")
    if storage == "pinned" and device.type != "cuda":
        raise ValueError("buffer.storage='pinned' is for a cuda consumer: use 'cpu' with train.device=cpu")
    return storage


def available_memory(storage: str, device: torch.device) -> int:
    """Free bytes where the ring would live: free CUDA memory, or the host's available RAM."""
    if storage == "cuda":
        return torch.cuda.mem_get_info(device if device.type == "cuda" else None)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pool_chunks(pool_ND: Tensor, chunk_rows: int, device: str | torch.device,
                dtype: torch.dtype = torch.float32) -> Iterator[Tensor]:
    """A pool kept on the host (or in bf16) as chunks on `device` in `dtype`, for chunkwise loss computation."""
    for i in range(0, len(pool_ND), chunk_rows):
        yield pool_ND[i:i + chunk_rows].to(device=device, dtype=dtype, non_blocking=True)


class ShuffleBuffer(BufferState):
    """Ring buffer of `cfg.capacity` activation vectors fed by `source` (ActivationChunk or Tensor[n, d_in] items).

    `device` is the consumer's device: batches are delivered there. `memory_bytes` is what the ring and its index
    use (checked before any allocation against cfg.max_memory_gb or the free memory where it lives).
    `direct_writes`: let a source with `write_into` write its vectors into the ring's free slots itself (the LM's
    last kernel stores them there; the same contents as from chunks; False: chunks only, to compare).
    """

    def __init__(self, source: Iterable[ActivationChunk | Tensor], cfg: BufferConfig,
                 device: str | torch.device = "cpu", *, d_in: int | None = None, seed: int = 0,
                 drop_last: bool = True, merge_lag: int | None = None, metrics_every: int = 64,
                 metrics_window: int = 64, direct_writes: bool = True) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.storage = resolve_storage(cfg.storage, self.device)
        self.d_in = int(d_in if d_in is not None else getattr(source, "d_in", 0))
        if self.d_in <= 0:
            raise ValueError("ShuffleBuffer needs d_in: pass d_in= or a source with a .d_in attribute")
        self.capacity, self.drop_last, self.direct_writes = cfg.capacity, drop_last, direct_writes
        self.dtype = getattr(source, "dtype", torch.float32) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        self.merge_lag, self.metrics_every = cfg.merge_lag if merge_lag is None else merge_lag, metrics_every
        self._ring_device = torch.device(self.device if self.storage == "cuda" else "cpu")
        self._allocate_ring(self.dtype)
        self._source = source
        self._it: Iterator[ActivationChunk | Tensor] = iter(source)
        self._context_N = torch.full((self.capacity,), -1, dtype=torch.int64, device=self._ring_device)
        self._position_N = torch.full((self.capacity,), -1, dtype=torch.int32, device=self._ring_device)
        self._gen = torch.Generator(device=self._ring_device).manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.int64, device=self._ring_device)  # unread entries from _cursor on
        self._cursor = 0
        self._inflight: Tensor | None = None  # slots written by the refill under way, not yet drawable
        self._lag_left = 0
        self._refill_every = max(1, int(cfg.refill_fraction * self.capacity * cfg.reuse))
        self._reads_since_refill = self._refill_every
        self._pending: ActivationChunk | None = None  # the part of a chunk that did not fit the free slots
        self._exhausted = False
        self.produced = self.consumed = self.pool_consumed = self.dropped = self.refills = self.batches_drawn = 0
        self.direct_rows = 0  # of `produced`, the rows the source wrote into the ring itself (write_into)
        self._samples: deque[tuple[int, Tensor, Tensor, Tensor]] = deque(maxlen=metrics_window)
        cuda = self.device.type == "cuda"
        self._producer = torch.cuda.Stream(self.device) if cuda else None
        self._copier = torch.cuda.Stream(self.device) if cuda and self.storage == "pinned" else None
        self._refill_event = torch.cuda.Event() if cuda else None
        self._turn = 0

    # ------------------------------------------------------------------------------------------ memory

    def _allocate_ring(self, dtype: torch.dtype) -> None:
        """An (empty) ring in `dtype`, its size first checked against the memory free where it lives (with any old
        ring released: resume in another dtype)."""
        self.dtype, self._ring_ND, self._d2h = dtype, None, None  # (and the host / output staging buffers:)
        self._snapshot: Tensor | None = None  # state_dict(reuse_host_memory=True)'s
        self._outs: list[Tensor] = []
        self._stages: list[tuple[Tensor, Tensor, torch.cuda.Event, torch.cuda.Event]] = []
        if self._ring_device.type == "cuda":
            torch.cuda.empty_cache()  # an old ring's memory back from the caching allocator, for the check
        self.memory_bytes = self._ring_bytes()
        self._check_memory(self.memory_bytes)
        self._ring_ND = torch.empty(self.capacity, self.d_in, dtype=dtype, device=self._ring_device,
                                    pin_memory=self.storage == "pinned")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _ring_bytes(self) -> int:
        """Ring + provenance (12 B/slot) + order and its re-permutation (2 x int64 per entry) + free-slot mask."""
        ring = self.capacity * self.d_in * torch.empty(0, dtype=self.dtype).element_size()
        return ring + self.capacity * 12 + 2 * 8 * self.capacity * self.cfg.reuse + self.capacity

    def _check_memory(self, need: int) -> None:
        where = "GPU" if self.storage == "cuda" else "host"
        if self.cfg.max_memory_gb is not None:
            limit, what = int(self.cfg.max_memory_gb * 1e9), "buffer.max_memory_gb"
        else:
            limit, what = available_memory(self.storage, self.device), f"free {where} memory"
        if need > limit:
            raise ValueError(
                f"buffer.capacity={self.capacity:,} x d_in={self.d_in} in {self.dtype_name} needs {need / 1e9:.2f} GB "
                f"of {where} memory but {what} is {limit / 1e9:.2f} GB: lower buffer.capacity"
                + (" or use bfloat16" if self.dtype.itemsize > 2 else ""))

    # ------------------------------------------------------------------------------------------ production

    def _next_chunk(self) -> ActivationChunk | None:
        """The next source chunk on the ring's device in the ring's dtype, or None at the end of the stream."""
        try:
            item = next(self._it)
        except StopIteration:
            return None
        if isinstance(item, Tensor):
            unknown = torch.full((len(item),), -1, dtype=torch.int64)
            item = ActivationChunk(item, unknown, unknown.to(torch.int32))
        acts = item.acts
        if acts.ndim != 2 or acts.shape[1] != self.d_in:
            raise ValueError(f"source gave activations of shape {tuple(acts.shape)}, expected [n, {self.d_in}]")
        dev = self._ring_device
        if acts.device.type == "cuda" and dev.type == "cpu":
            acts = self._to_host(acts.to(self.dtype))
        return ActivationChunk(acts.to(device=dev, dtype=self.dtype), item.context.to(dev, torch.int64),
                               item.position.to(dev, torch.int32))

    def _to_host(self, acts_ND: Tensor) -> Tensor:
        """GPU chunk -> host through a reused pinned buffer (~3x faster than a copy into pageable memory). The
        buffer is rewritten only by the next chunk, which is fetched once any leftover of this one is written."""
        n = len(acts_ND)
        if self._d2h is None or len(self._d2h) < n:
            self._d2h = torch.empty(n, self.d_in, dtype=self.dtype, pin_memory=True)
        self._d2h[:n].copy_(acts_ND, non_blocking=True)
        torch.cuda.current_stream(acts_ND.device).synchronize()  # the producer stream only
        return self._d2h[:n]

    def _write(self, slots: Tensor) -> int:
        """Fill `slots` in order from the stream; returns how many were filled (fewer only at its end). A source with
        `write_into` (ActivationStream) writes whole batches into the ring itself while they fit, the rest comes
        as chunks: the same rows in the same slots either way."""
        filled = 0
        write_into = getattr(self._it, "write_into", None) if self.direct_writes else None
        while filled < len(slots):
            if write_into is not None and self._pending is None:
                n = write_into(self._ring_ND, self._context_N, self._position_N, slots[filled:])
                if n > 0:
                    filled += n
                    self.direct_rows += n
                    continue
            chunk = self._pending if self._pending is not None else self._next_chunk()
            if chunk is None:
                self._exhausted = True
                break
            take = min(len(chunk.acts), len(slots) - filled)
            part = slots[filled:filled + take]
            self._ring_ND.index_copy_(0, part, chunk.acts[:take])
            self._context_N.index_copy_(0, part, chunk.context[:take])
            self._position_N.index_copy_(0, part, chunk.position[:take])
            self._pending = ActivationChunk(*(t[take:] for t in chunk)) if take < len(chunk.acts) else None
            filled += take
        return filled

    def _merge_lag(self, m: int) -> int:
        """Draws of `m` before a refill joins: cfg.merge_lag, or 2 inline, else unread batches / 4 within [2, 32]."""
        if self.merge_lag is not None:
            return self.merge_lag
        return 2 if self._producer is None else max(2, min(32, self._unread() // (4 * m)))

    @torch.no_grad()
    def _refill(self, m: int = 1) -> None:
        """Write the free slots (those no unread entry points at) from the stream; they become drawable at merge."""
        free_N = torch.ones(self.capacity, dtype=torch.bool, device=self._ring_device)
        free_N.index_fill_(0, self._order[self._cursor:], False)  # `x[idx] = False` copies False from host: a sync
        if self.cfg.reuse == 1 and free_N.is_cuda:
            # unread entries are distinct slots, so the free count is known here: no host sync (nonzero() syncs)
            slots = torch.nonzero_static(free_N, size=self.capacity - self._unread()).squeeze(1)
        else:
            slots = free_N.nonzero().squeeze(1)
        if self._producer is not None:
            self._producer.wait_stream(torch.cuda.current_stream(self.device))  # reads of these slots are queued
            with torch.cuda.stream(self._producer):
                filled = self._write(slots)
                self._refill_event.record(self._producer)
        else:
            filled = self._write(slots)
        self._inflight = slots[:filled]
        self.produced += filled
        self.refills += 1
        self._lag_left = self._merge_lag(m)
        self._reads_since_refill = 0

    def prime(self) -> None:
        """The first refill now instead of at the first draw (the same batches follow either way), so that the
        source's errors (a missing text column, unreadable records, an LM that fails) come before the caller
        commits to a run directory. Does nothing once the ring has been written (or restored)."""
        if self.produced == 0 and self._inflight is None and not self._exhausted and self._unread() == 0:
            self._refill()
            self._merge()

    def _merge(self) -> None:
        """Add the refilled slots (cfg.reuse entries each) to the unread ones and re-permute the unread order."""
        assert self._inflight is not None
        if self._refill_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._refill_event)
        new = self._inflight.repeat(self.cfg.reuse) if self.cfg.reuse > 1 else self._inflight
        entries = torch.cat([self._order[self._cursor:], new])
        self._order = entries[torch.randperm(len(entries), generator=self._gen, device=self._ring_device)]
        self._cursor = 0
        self._inflight = None

    def _unread(self) -> int:
        return len(self._order) - self._cursor

    def _take(self, m: int) -> Tensor:
        """Up to `m` unread slot entries, uniformly at random (fewer only once the stream is drained)."""
        if self._inflight is not None and self._lag_left <= 0:
            self._merge()
        if self._inflight is None and not self._exhausted and self._reads_since_refill >= self._refill_every:
            self._refill(m)
            if self._lag_left <= 0:
                self._merge()
        while self._unread() < m:
            if self._inflight is not None:
                self._merge()
            elif not self._exhausted:
                self._refill()
                self._merge()
            else:
                break
        n = min(m, self._unread())
        idx = self._order[self._cursor:self._cursor + n]
        self._cursor += n
        self._reads_since_refill += n
        if self._inflight is not None:
            self._lag_left -= 1
        return idx

    # ------------------------------------------------------------------------------------------ consumption

    def batches(self, batch_size: int, *, dtype: torch.dtype = torch.float32, fresh: bool = False,
                out: Tensor | None = None) -> Iterator[Tensor]:
        """Shuffled batches [batch_size, d_in] on the consumer device until the stream is drained (forever for an
        endless stream). Each yielded tensor is reused two batches later unless `fresh`; with `out` (a
        [batch_size, d_in] tensor there, e.g. Trainer.batch_input: a CUDA graph's input), every batch is gathered
        into it, so each must be used up before the next is drawn."""
        if not 0 < batch_size <= self.capacity:
            raise ValueError(f"batch size {batch_size} must be in [1, buffer.capacity={self.capacity}]")
        if out is not None and (fresh or (out.shape, out.dtype, out.device) != ((batch_size, self.d_in), dtype,
                                                                             as_reported(self.device))):
            raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} is not a [{batch_size}, "
                             f"{self.d_in}] {dtype} tensor on {self.device} (or fresh=True was asked too)")
        while True:
            idx = self._take(batch_size)
            n = len(idx)
            if n == 0 or (n < batch_size and self.drop_last):
                self.dropped += n
                return
            x_BD = self._gather(idx, batch_size, dtype, fresh, out)
            self.consumed += n
            if self.metrics_every > 0 and self.batches_drawn % self.metrics_every == 0:
                self._sample(idx)
            self.batches_drawn += 1
            yield x_BD

    @torch.no_grad()
    def _gather(self, idx: Tensor, batch_size: int, dtype: torch.dtype, fresh: bool, out: Tensor | None) -> Tensor:
        self._turn ^= 1
        if self.device.type == "cuda" and self._ring_device.type == "cpu":
            return self._gather_to_gpu(idx, batch_size, dtype, fresh, out)
        n = len(idx)
        if fresh:
            return self._ring_ND.index_select(0, idx).to(device=self.device, dtype=dtype)
        out = (out if out is not None else self._out(batch_size, dtype))[:n]
        if dtype == self.dtype:
            torch.index_select(self._ring_ND, 0, idx, out=out)
        else:
            out.copy_(self._ring_ND.index_select(0, idx))
        return out

    def _out(self, batch_size: int, dtype: torch.dtype) -> Tensor:
        """This turn's one of two alternating preallocated output buffers."""
        if not self._outs or self._outs[0].shape[0] != batch_size or self._outs[0].dtype != dtype:
            self._outs = [torch.empty(batch_size, self.d_in, dtype=dtype, device=self.device) for _ in range(2)]
        return self._outs[self._turn]

    def _gather_to_gpu(self, idx: Tensor, batch_size: int, dtype: torch.dtype, fresh: bool,
                       out: Tensor | None) -> Tensor:
        """Host ring -> pinned host buffer (CPU gather) -> non-blocking copy on the copy stream, double-buffered
        (into `out` then: the copy a CUDA graph's input would take anyway)."""
        if not self._stages or self._stages[0][0].shape[0] != batch_size:
            self._stages = [(torch.empty(batch_size, self.d_in, dtype=self.dtype, pin_memory=True),
                             torch.empty(batch_size, self.d_in, dtype=self.dtype, device=self.device),
                             torch.cuda.Event(), torch.cuda.Event()) for _ in range(2)]
        host_BD, dev_BD, copied, released = self._stages[self._turn]
        n = len(idx)
        copied.synchronize()  # the copy out of this host buffer two batches ago is done
        torch.index_select(self._ring_ND, 0, idx, out=host_BD[:n])
        main = torch.cuda.current_stream(self.device)
        released.record(main)  # the consumer's work on this device buffer two batches ago is queued before this
        copier = self._copier or main
        with torch.cuda.stream(copier):
            copier.wait_event(released)
            dev_BD[:n].copy_(host_BD[:n], non_blocking=True)
            copied.record(copier)
        main.wait_event(copied)
        if fresh:
            return dev_BD[:n].to(dtype=dtype, copy=True)
        if dtype == self.dtype and out is None:
            return dev_BD[:n]
        return (out if out is not None else self._out(batch_size, dtype))[:n].copy_(dev_BD[:n])

    def _sample(self, idx: Tensor) -> None:
        """Record the batch's provenance and the ideal for the pool it came from (no GPU sync)."""
        pool_context = self._context_N[self._order[self._cursor - len(idx):]]
        self._samples.append((self.batches_drawn, self._context_N[idx], self._position_N[idx],
                              expected_distinct(pool_context, len(idx))))

    def metrics(self) -> dict[str, float]:
        """Shuffle quality over the last sampled batches (see `shuffle_metrics`) and the vector accounting."""
        out: dict[str, float] = dict(shuffle_metrics(self._samples))
        out.update(produced=self.produced, consumed=self.consumed, pool_consumed=self.pool_consumed,
                   dropped=self.dropped, refills=self.refills, unread=self._unread(), memory_bytes=self.memory_bytes,
                   direct_rows=self.direct_rows)
        return out

    @torch.no_grad()
    def sample_pool(self, n: int, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None) -> Tensor:
        """`n` vectors drawn like batches (unread slots first, then fresh production), consumed by the pool: they
        are never trained on, so the exact-once accounting holds. Keep a large pool on the host or in bf16
        (819,200 x 512 fp32 is 1.6 GB) and move it with `pool_chunks`. Fewer than n only if the stream ends."""
        device = torch.device(device) if device is not None else self.device
        pool_ND = torch.empty(n, self.d_in, dtype=dtype, device=device)
        step, filled = max(1, self.capacity // 4), 0
        while filled < n:
            idx = self._take(min(step, n - filled))
            if len(idx) == 0:
                break
            pool_ND[filled:filled + len(idx)] = self._ring_ND.index_select(0, idx).to(device=device, dtype=dtype)
            filled += len(idx)
        self.pool_consumed += filled
        return pool_ND[:filled]
