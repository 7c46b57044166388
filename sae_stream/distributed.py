"""Data-parallel training across processes (torchrun): the process group and the few collectives the trainer needs.

    torchrun --nproc_per_node=4 -m sae_stream train CONFIG --lm PATH --out RUN_DIR

`Distributed.from_env()` joins the group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
nccl on GPUs, gloo on CPU; it returns None in a plain single process. Each rank streams its own shard of the
text (context i -> rank i % world) into its own ring buffer and trains on `train.batch_size / world_size` rows per
step, so `train.batch_size` stays the global batch and a run matches single-process training on the same batches.

Gradients are averaged by one all-reduce over a flat copy of the SAE's gradients right after backward: simpler than
wrapping the SAE in nn.parallel.DistributedDataParallel (whose bucketing and overlap buy little for four tensors
and a single backward), and it leaves the decoder-gradient projection, clipping and Adam as they are. Small objects
(which checkpoints each rank has) travel over a gloo group; checkpoints themselves never travel: each rank writes
its own part (its ring, RNG, stream position) beside rank 0's (checkpoint.py), so the run directory must be one
that every rank sees (a shared filesystem across machines).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

_OPS = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}


class Distributed:
    """This process's place in the group (rank, world_size, device) and the collectives used by the trainer."""

    def __init__(self, rank: int, world_size: int, device: torch.device, object_group: Any = None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.object_group = object_group  # a gloo group for pickled objects (None: the default group is gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device | None = None, timeout_s: float = 1800.0) -> Distributed | None:
        """Join the process group torchrun set up; None when WORLD_SIZE is unset or 1. `device`: the training
        device ('cuda' becomes this process's cuda:LOCAL_RANK)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = device if device is not None else torch.device("cpu")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if not tdist.is_initialized():
            tdist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        object_group = tdist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        return cls(rank, world, device, object_group)

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()

    # ------------------------------------------------------------------ tensors

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        """In place over all ranks: 'sum', 'max', 'min' or 'mean'; returns `t`."""
        tdist.all_reduce(t, op=_OPS["sum" if op == "mean" else op])
        if op == "mean":
            t.div_(self.world_size)
        return t

    @torch.no_grad()
    def average_grads_(self, params: Iterable[Tensor]) -> None:
        """Replace every gradient by its mean over ranks: one all-reduce of a flat copy."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_(flat, op="mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_gather_rows(self, x_ND: Tensor) -> Tensor:
        """Rows of every rank's `x_ND` concatenated in rank order (ranks may hold different row counts)."""
        n = torch.tensor([x_ND.shape[0]], dtype=torch.long, device=x_ND.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        tdist.all_gather(sizes, n)
        counts = [int(s) for s in sizes]
        most = max(counts)
        padded = x_ND.new_zeros((most, *x_ND.shape[1:]))
        padded[:x_ND.shape[0]] = x_ND
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @torch.no_grad()
    def broadcast_training_state_(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Rank 0's parameters, buffers and optimizer moments on every rank (after an in-place surgery)."""
        tensors = [*module.parameters(), *module.buffers()]
        for p in module.parameters():
            tensors += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor) and v.ndim > 0]
        for t in tensors:
            tdist.broadcast(t, src=0)

    # ------------------------------------------------------------------ objects

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.object_group)
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (pickled), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj, group=self.object_group)
        return out

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (over the gloo group: no GPU work, no stream sync)."""
        t = torch.tensor([value], dtype=torch.long)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN, group=self.object_group)
        return int(t)

    def barrier(self) -> None:
        tdist.barrier(group=self.object_group)


def shard_size(global_size: int, world_size: int, what: str = "train.batch_size") -> int:
    """Rows per rank of a global size; the global size must split evenly."""
    if global_size % world_size:
        raise ValueError(f"{what}={global_size} is not divisible by the {world_size} data-parallel ranks: "
                         f"use a multiple of {world_size} (it is the global batch, split across ranks)")
    return global_size // world_size
