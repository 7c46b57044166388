"""A ShuffleBuffer's checkpoints: the snapshot it saves and how it resumes, exactly (live slots' contents and
provenance, the unread order, the refill under way, RNG, leftover chunk, counters, the source's position). A mixin
of ShuffleBuffer (buffer.py), using its attributes.

    state = buffer.state_dict()                          # a snapshot: new CPU tensors, safe to write in the background
    state = buffer.state_dict(reuse_host_memory=True)    # the same, in host memory kept for the next call
    buffer.load_state_dict(state)                        # the identical batch sequence from here on
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae_stream.activations import ActivationChunk

SNAPSHOT_CHUNK_BYTES = 256 << 20  # a GPU ring's rows go to the host in pieces this size at a checkpoint
_COUNTERS = ("produced", "consumed", "pool_consumed", "dropped", "refills", "batches_drawn", "direct_rows")


def _host_tensor(shape: tuple[int, int], dtype: torch.dtype, pin: bool) -> Tensor:
    """An empty host tensor, page-locked if asked, possible, and not wasteful: PyTorch's pinned allocator rounds a
    size up to a power of two, so a size more than 1/8 under one stays pageable (A/1's 4M x 512 bf16 is 2^32 B)."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if pin and nbytes > 0 and (1 << (nbytes - 1).bit_length()) <= nbytes * 9 // 8:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # where locked memory is limited
            pass
    return torch.empty(shape, dtype=dtype)


class BufferState:
    """Checkpoint half of ShuffleBuffer: state_dict / load_state_dict."""

    def state_dict(self, reuse_host_memory: bool = False) -> dict[str, Any]:
        """Everything a resumed buffer needs to yield the identical batch sequence: the live slots' contents,
        the unread order, the refill under way, the RNG, the leftover chunk, counters, and the source's state when
        it has `state_dict` (else the caller must resume the source at the same point). A snapshot: its tensors
        are new CPU tensors (gathers, copies), so it can be written in the background while the buffer goes on.

        reuse_host_memory: the ring's rows go into one host buffer kept for the next call (pinned for a GPU ring:
        no page faults and a full-speed copy at each checkpoint), so a snapshot is only valid until the next call:
        for a caller that is done with the previous one (no checkpoint write in flight) first."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        inflight = self._inflight if self._inflight is not None else self._order[:0]
        unread = self._order[self._cursor:]
        live = torch.cat([unread, inflight]).unique()
        state: dict[str, Any] = {
            "capacity": self.capacity, "d_in": self.d_in, "dtype": self.dtype_name,
            "slots": live.cpu(), "acts": self._rows_to_host(live, reuse_host_memory),
            "context": self._context_N[live].cpu(), "position": self._position_N[live].cpu(),
            "unread": unread.to("cpu", copy=True),
            "inflight": None if self._inflight is None else inflight.to("cpu", copy=True),
            "lag_left": self._lag_left, "reads_since_refill": self._reads_since_refill,
            "rng": self._gen.get_state(), "exhausted": self._exhausted,
            "pending": None if self._pending is None else tuple(t.cpu().clone() for t in self._pending),
            "counters": {k: getattr(self, k) for k in _COUNTERS},
            # the shuffle metrics' window (provenance of the last sampled batches): logged the same after a resume
            "samples": [(b, *(t.to("cpu", copy=True) for t in ts)) for b, *ts in self._samples],
        }
        if hasattr(self._source, "state_dict"):
            state["source"] = self._source.state_dict()
        return state

    def _rows_to_host(self, rows: Tensor, reuse: bool) -> Tensor:
        """ring[rows] on the CPU: a new tensor, or (reuse) the front of the kept snapshot buffer. From a GPU ring in
        chunks of ~SNAPSHOT_CHUNK_BYTES: gathered whole, a checkpoint would need the ring's size again in free GPU
        memory (4.3 GB for A/1's) at every save."""
        cuda = self._ring_device.type == "cuda"
        if not reuse:
            out = torch.empty(len(rows), self.d_in, dtype=self.dtype)
        else:
            if self._snapshot is None:
                self._snapshot = _host_tensor((self.capacity, self.d_in), self.dtype, pin=cuda)
            out = self._snapshot[:len(rows)]
        if not cuda:
            torch.index_select(self._ring_ND, 0, rows, out=out)
        else:
            chunk = max(1, SNAPSHOT_CHUNK_BYTES // (self.d_in * self.dtype.itemsize))
            for i in range(0, len(rows), chunk):  # (chunks freed in stream order: safe while their copy is queued)
                out[i:i + chunk].copy_(self._ring_ND.index_select(0, rows[i:i + chunk]), non_blocking=out.is_pinned())
            torch.cuda.current_stream(self._ring_device).synchronize()
        if not reuse:
            return out
        # torch.save writes a view's whole storage (here the kept buffer's): hand over a tensor on a storage of
        # exactly these rows, sharing the kept memory (the sub-storage holds a reference to the buffer's)
        rows_storage = self._snapshot.untyped_storage()[:out.numel() * out.element_size()]
        return torch.empty(0, dtype=self.dtype).set_(rows_storage, 0, tuple(out.shape))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict. With buffer.dtype=auto the ring takes the saved ring's dtype (a run resumes in
        the dtype it started with, whichever device it resumes on)."""
        other_dtype = state["dtype"] != self.dtype_name
        fixed = self.cfg.dtype != "auto"
        if (state["capacity"], state["d_in"]) != (self.capacity, self.d_in) or (other_dtype and fixed):
            raise ValueError(f"buffer state is for capacity/d_in/dtype {state['capacity']}/{state['d_in']}/"
                             f"{state['dtype']}, this buffer has {self.capacity}/{self.d_in}/{self.dtype_name}")
        if other_dtype:
            self._allocate_ring(getattr(torch, state["dtype"]))
        dev = self._ring_device
        slots = state["slots"].to(dev)
        self._ring_ND[slots] = state["acts"].to(dev)
        self._context_N[slots] = state["context"].to(dev)
        self._position_N[slots] = state["position"].to(dev)
        self._order, self._cursor = state["unread"].to(dev), 0
        self._inflight = None if state["inflight"] is None else state["inflight"].to(dev)
        self._lag_left, self._reads_since_refill = state["lag_left"], state["reads_since_refill"]
        self._gen.set_state(state["rng"])
        self._exhausted = state["exhausted"]
        pending = state["pending"]
        self._pending = None if pending is None else ActivationChunk(*(t.to(dev) for t in pending))
        for k, v in state["counters"].items():
            setattr(self, k, v)
        self._samples.clear()
        self._samples.extend((b, *(t.to(dev) for t in ts)) for b, *ts in state.get("samples", []))
        if state.get("source") is not None and hasattr(self._source, "load_state_dict"):
            self._source.load_state_dict(state["source"])
            self._it = iter(self._source)
