"""The SAE training loop. It only sees an iterator of activation batches, so tests feed it synthetic data.

    trainer = Trainer(sae, cfg, run_dir, tracker, pool_fn=buffer.sample_pool,
                      extra_state=buffer.state_dict, extra_metrics=buffer.metrics)
    extra = trainer.resume(run_dir)      # optional: latest valid checkpoint; restore your buffer from `extra`
    final = trainer.fit(buffer.batches(cfg.train.batch_size))

fit() is begin() + advance(x) per batch + finish(), so a driver can feed several trainers the same batches
(sweep.py). Data parallel (distributed.py): pass `dist`; each rank feeds its own shard of every global batch,
gradients are averaged right after backward (`grad_sync`), firing state, metrics and resampling are made
identical across ranks at log / resample / checkpoint steps (never per step); rank 0 logs, and each rank writes
its own part of every checkpoint (checkpoint.py).

Checkpoints go through `writer` (checkpoint_writer.CheckpointWriter): written before save() returns by default; with a
background writer (what `sae-stream train` passes) training goes on while they are written, so `extra_state` must
then return copies (ShuffleBuffer.state_dict does), and a stop or the end waits for the write.

Device: the batches' device (the SAE and optimizer move there on the first batch). The hot loop never syncs
with the host except every log_every steps (metrics are summed on device), at resampling steps, and per step
under nan_policy='skip' (dropping rows needs their count). Non-finite inputs under nan_policy='stop' are
detected on device and reported, with the step they first appeared in, at the next log step or checkpoint
(before any checkpoint is written), so the run stops at most log_every steps after the bad batch. On CUDA the
loop runs on a high-priority stream (train.stream_priority, step.priority_stream): ahead of the LM's refills.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from sae_stream.checkpoint_writer import CheckpointWriter
from sae_stream.config import Config, ConfigError
from sae_stream.fused_ops import FLOATS, firing_counts
from sae_stream.metrics import RunningMetrics
from sae_stream.process import TrainingInterrupted, signals_to, tune_cpu_allocator
from sae_stream.resample import FiringTracker, resample_dead_, resample_steps
from sae_stream.sae import SAE
from sae_stream.schedule import l1_coeff_at, lr_at
from sae_stream.step import (
    DeviceScalar,
    GraphedStep,
    anthropic_grads_,
    priority_stream,
    resolve_kernels,
    supports_fused,
)
from sae_stream.trainer_state import TrainerState

if TYPE_CHECKING:
    from sae_stream.distributed import Distributed

MAX_EMPTY_BATCHES = 100  # consecutive all-non-finite batches under nan_policy=skip before giving up


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...


class Trainer(TrainerState):
    """Adam + schedules + decoder constraints + resampling + metrics; exact-resume checkpoints from TrainerState."""

    def __init__(self, sae: SAE, cfg: Config, run_dir: Path | str | None, tracker: MetricsLogger,
                 pool_fn: Callable[[int], Tensor] | None = None,
                 extra_state: Callable[[], dict] | None = None,
                 extra_metrics: Callable[[], dict] | None = None, dist: Distributed | None = None,
                 writer: CheckpointWriter | None = None) -> None:
        self.sae, self.cfg, self.tracker, self.dist = sae, cfg, tracker, dist
        self.writer = writer if writer is not None else CheckpointWriter(dist=dist)  # default: synchronous
        if (self.writer.dist is None) != (dist is None):
            raise ValueError("a data-parallel Trainer needs a CheckpointWriter(dist=...) with the same dist")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.pool_fn, self.extra_state, self.extra_metrics = pool_fn, extra_state, extra_metrics
        self.total_steps = cfg.train.total_steps
        self.resampling = cfg.resample.enabled and sae.cfg.architecture == "anthropic"
        if self.resampling and pool_fn is None:
            raise ConfigError("resample.enabled needs a pool_fn (buffer.sample_pool) or set resample.enabled=false")
        self.resample_at = set(resample_steps(cfg.resample, self.total_steps)) if self.resampling else set()
        self.auxk_steps = math.ceil(sae.cfg.dead_tokens_auxk / cfg.train.batch_size)
        self.uses_auxk = sae.cfg.architecture in ("topk", "batchtopk") and sae.cfg.auxk_coeff > 0
        self.generator = torch.Generator().manual_seed(cfg.train.seed)  # resampling picks, CPU on every device
        self.step = 0
        self.initialised = False  # b_dec / input scale set from the first batch (or a checkpoint)
        self.auxk_on = False  # refreshed at log steps: AuxK costs a second decode, so skip it while none is dead
        self.skipped_rows = 0
        self.resampled = 0
        # the hand-written step's layout under Triton on CUDA (fused_ops.step_layout, timed at the first step):
        # checkpointed, so a resumed run computes as the uninterrupted one did, not as a new timing might pick
        self.step_layout: str | None = None
        self.last_metrics: dict[str, Any] = {}
        self._first_in_fit = True
        self._empty_batches = 0  # consecutive batches dropped whole by nan_policy=skip
        self._stop_signum: int | None = None  # set by the signal handler during fit, read once per step
        self._saved_step = -1
        self._lr_now = cfg.train.lr
        self._agreed_stop: int | None = None  # data parallel: a stop every rank has agreed on
        # called right after backward, before the decoder-gradient projection: averages gradients over ranks
        self.grad_sync: Callable[[], None] | None = (lambda: dist.average_grads_(sae.parameters())) if dist else None
        self._build(next(sae.parameters()).device)

    # ------------------------------------------------------------------ device-bound state

    def _build(self, device: torch.device) -> None:
        self.device = device
        t = self.cfg.train
        if device.type == "cpu" and t.cpu_malloc_tuning:
            tune_cpu_allocator()
        cuda = device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.cuda.set_device(device)  # (Triton launches on the current device, not on the tensors')
        # On CUDA the step's scalars live on the device (a graph replays them; filling them needs no sync), and
        # Adam is fused + capturable. On CPU they stay Python numbers: the same bits as a plain eager loop.
        self._lr_d = DeviceScalar(self._lr_now, device) if cuda else None
        self._lam_d = DeviceScalar(0.0, device) if cuda else None
        self._lr_t = self._lr_d.tensor if cuda else None
        self._step_t = torch.zeros((), dtype=torch.long, device=device) if cuda else None
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self._lr_t if cuda else t.lr, betas=t.betas,
                                          fused=True if cuda else None, capturable=cuda)
        self.firing = FiringTracker(self.sae.d_sae, device)
        self.metrics = RunningMetrics(self.sae.d_sae, device, t, self.cfg.eval.histogram_bins,
                                      levels=self.cfg.sae.matryoshka_sizes)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.fused = t.step_impl == "fused" or (t.step_impl == "auto" and supports_fused(self.sae))
        self.kernels = resolve_kernels(t.kernels, device)  # the fused step's passes and the decoder-norm constraint
        self._graph = GraphedStep(self._device_step, before_capture=self._zero_grad)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def input_dtype(self, offered: torch.dtype) -> torch.dtype:
        """The dtype batches are trained in: the hand-written step reads x in any float dtype (as fp32: bf16
        batches from a bf16 ring give bit-identical steps at half the traffic); the other steps take fp32."""
        return offered if self.fused and offered in FLOATS else torch.float32

    def batch_input(self, batch_size: int, dtype: torch.dtype) -> Tensor | None:
        """Where the step's CUDA graph reads its batch: a buffer that gathers each batch into it (`out=`) saves
        the graph a copy of the batch every step. None where steps are not graphed, or take another dtype."""
        if not self._use_graph() or self.input_dtype(dtype) != dtype:
            return None
        return self._graph.input((batch_size, self.sae.d_in), dtype, self.device)

    def _use_graph(self) -> bool:
        t = self.cfg.train
        return (self.device.type == "cuda" and t.cuda_graphs and t.nan_policy == "stop"
                and self.grad_sync is None)

    # ------------------------------------------------------------------ the loop

    def fit(self, batches: Iterator[Tensor]) -> dict:
        """Train until train.total_steps (or the iterator ends); returns the final metrics. SIGTERM/SIGINT (main
        thread) finish the step, checkpoint it and raise TrainingInterrupted; a second signal aborts at once."""
        it = iter(batches)
        self.begin()
        try:
            with signals_to(self.request_stop), priority_stream(self.device, self.cfg.train.stream_priority):
                while self.step < self.total_steps:
                    try:
                        x_BD = next(it)
                    except StopIteration:
                        self.warn_stream_ended()
                        break
                    self.advance(x_BD)
                    signum = self.stop_requested()
                    if signum is not None:
                        self._stop(signum)
                self.finish()
        finally:
            self.close()
        return self.last_metrics

    def begin(self) -> None:
        """Start (or continue) training: progress bar, throughput clock, signal state."""
        self._bar = tqdm(total=self.total_steps, initial=self.step, disable=None, desc="sae", unit="step")
        world = self.dist.world_size if self.dist is not None else 1
        self._t_last, self._tokens_last = time.perf_counter(), self.metrics.tokens * world
        self._first_in_fit = True
        self._stop_signum = self._agreed_stop = None

    def advance(self, x_BD: Tensor) -> bool:
        """One step on the batch and its bookkeeping (resample, log, checkpoint); False if the batch was skipped."""
        t = self.cfg.train
        if not self._train_step(x_BD):
            return False
        self._bar.update(1)
        if self.step in self.resample_at:
            self._resample()
        if self.dist is not None and (self.step % t.log_every == 0 or self.step % t.checkpoint_every == 0):
            self._agree_on_stop()  # ranks must stop at the same step: agreed where they synchronise anyway
        # the last step is logged before its checkpoint: that checkpoint then holds no unlogged steps, and a
        # finished run resumed logs nothing again
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self._log(self._bar)
        if self.step % t.checkpoint_every == 0:
            self.save()
        return True

    def finish(self) -> None:
        """The final log record and checkpoint (unless this step already has them). Resumed at a step whose record
        is already logged (a finished run resumed), the final metrics are that record."""
        if self.metrics.steps > 0:  # steps since the last record (restored with the metrics on a resume)
            self._log(self._bar)
        elif not self.last_metrics and hasattr(self.tracker, "last_record"):
            self.last_metrics = self.tracker.last_record()
        if self._saved_step != self.step:  # (a stream that ended at a checkpoint step: see records_kept_through)
            self.save()
        self.writer.wait()

    def close(self) -> None:
        self._bar.close()

    def warn_stream_ended(self) -> None:
        warnings.warn(f"the activation stream ended at step {self.step} of {self.total_steps} "
                      f"({self.metrics.tokens:,} tokens trained): training stops here", stacklevel=3)

    def stop_requested(self) -> int | None:
        """The signal to stop on after this step, if any (data parallel: only once every rank has agreed)."""
        return self._stop_signum if self.dist is None else self._agreed_stop

    def _agree_on_stop(self) -> None:
        assert self.dist is not None
        flag = torch.tensor([self._stop_signum or 0], dtype=torch.long, device=self.device)
        signum = int(self.dist.all_reduce_(flag, op="max"))
        self._agreed_stop = signum or None

    def request_stop(self, signum: int) -> None:
        if self._stop_signum is not None:  # a second signal: stop now, without waiting for the step/checkpoint
            raise KeyboardInterrupt
        self._stop_signum = signum  # a plain attribute: the loop checks it once per step, without a sync

    def _stop(self, signum: int) -> None:
        """Checkpoint the finished step (no log: that would reset the metric window and break exact resume)."""
        self.save_unless_saved()
        self.writer.wait()
        raise TrainingInterrupted(signum, self.step, self.run_dir)

    def _prepare(self, x_BD: Tensor) -> Tensor | None:
        """Device/dtype placement, first-batch init, and the non-finite policy; None means skip this batch."""
        if self._first_in_fit and x_BD.device != self.device:
            self._move_to(x_BD.device)  # the first batch decides the device
        self._first_in_fit = False
        x_BD = x_BD.to(self.device, self.input_dtype(x_BD.dtype), non_blocking=True)
        if self.cfg.train.nan_policy == "skip":
            good_B = torch.isfinite(x_BD).all(dim=1)
            n_bad = x_BD.shape[0] - int(good_B.sum())  # host sync: the kept rows decide the batch shape
            if n_bad:
                self.skipped_rows += n_bad
                x_BD = x_BD[good_B]
                if x_BD.shape[0] == 0:
                    self._empty_batches += 1
                    if self._empty_batches >= MAX_EMPTY_BATCHES:  # an endless stream of NaN would spin forever
                        raise ValueError(f"the last {MAX_EMPTY_BATCHES} batches before step {self.step + 1} were "
                                         "entirely non-finite: the activation source is broken (check the LM)")
                    return None
            self._empty_batches = 0
        if not self.initialised:
            sample_ND = self.dist.all_gather_rows(x_BD) if self.dist else x_BD  # data parallel: the global batch
            # one host sync, before b_dec is set from it (every rank sees the same gathered batch and agrees)
            if self.cfg.train.nan_policy == "stop" and not bool(torch.isfinite(sample_ND).all()):
                self.first_bad.fill_(self.step + 1)
                self._raise_if_bad_input()
            self.sae.init_from_sample_(sample_ND)
            self.initialised = True
        return x_BD

    def _train_step(self, x_BD: Tensor) -> bool:
        x_BD = self._prepare(x_BD)
        if x_BD is None:
            return False
        t = self.cfg.train
        self._lr_now = lr_at(self.step, t)
        lam = l1_coeff_at(self.step, self.cfg)
        if self.device.type == "cuda":
            self._lr_d.set(self._lr_now)  # fills are queued kernels: no host sync (these two: when they change)
            self._lam_d.set(lam)
            self._step_t.fill_(self.step + 1)
            self._lam, self._step_no = self._lam_d.tensor, self._step_t
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr_now
            self._lam, self._step_no = lam, self.step + 1
        if self._use_graph():
            self._graph(x_BD, key=self.auxk_on)
        else:
            self._device_step(x_BD)
        self.step += 1
        self.metrics.count_(x_BD.shape[0])
        return True

    def _device_step(self, x_BD: Tensor) -> None:
        """One optimisation step as device work only (no host sync, no Python state that changes from step to
        step): the body a CUDA graph captures. λ and the 1-based step number come from _train_step."""
        sae, opt, t = self.sae, self.optimizer, self.cfg.train
        step_no = self._step_no
        dead_F = self.firing.dead_since(step_no - 1, self.auxk_steps) if self.auxk_on else None
        stats = None
        if self.fused:
            out, stats = anthropic_grads_(sae, x_BD, self._lam, torch.bfloat16 if t.autocast == "bfloat16" else
                                          torch.float32, self.kernels, self.step_layout)
            if x_BD.is_cuda and self.kernels == "triton":
                self.step_layout = stats.layout  # (set in the eager warm-up steps, before any capture)
        else:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.autocast == "bfloat16",
                                cache_enabled=False):
                out = sae(x_BD, l1_coeff=self._lam, dead_F=dead_F)
            out.loss.backward()
        if self.grad_sync is not None:
            self.grad_sync()
        if sae.unit_norm_decoder:
            sae.remove_parallel_grad_(self.kernels)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), t.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sae.unit_norm_decoder:
            sae.normalize_decoder_(self.kernels)
        with torch.no_grad():
            counts_F = firing_counts(out.feats) if stats is None else stats.counts_F
            self.firing.update_(counts_F > 0, step_no)
            var_sq = self.metrics.accumulate_(out, x_BD, counts_F, sae.input_scale,
                                              None if stats is None else stats.var_sq)
            if t.nan_policy == "stop":  # (metrics' var_sq: fp64 sums of x, finite iff the batch is)
                finite = torch.isfinite(var_sq) if stats is None else stats.finite
                self.first_bad.copy_(torch.where(finite | (self.first_bad >= 0), self.first_bad, step_no))

    def log10_density(self) -> Tensor:
        """log10(density + 1e-10) per feature (SAELens's sparsity.safetensors convention), on the CPU."""
        density_F = self.metrics.current_density() if self.dist is None else self.metrics.reduced_density_F
        assert density_F is not None, "data parallel: log (finish()) before reading the densities"
        return torch.log10(density_F.float().cpu() + 1e-10)

    def _resample(self) -> None:
        assert self.pool_fn is not None
        if self.dist is not None:
            self._sync_replicas()  # the same dead mask everywhere; the pool_fn gathers the pool across ranks
        dead_F = self.firing.resample_dead_mask(self.step, self.cfg.resample.dead_window)
        n = resample_dead_(self.sae, self.optimizer, dead_F, self.pool_fn, self.cfg.resample, self.generator)
        if n and self.dist is not None:
            self.dist.broadcast_training_state_(self.sae, self.optimizer)  # rank 0's draw, bit-identical ranks
        self.resampled += n
        self.firing.last_resample_step = self.step
        if n:
            self.metrics.restart_window()  # densities of the resampled SAE, not of the one before

    def _sync_replicas(self) -> None:
        """Data parallel, at log / resample / checkpoint steps: last-fired steps to their max over ranks (what
        resampling and the logged densities use: the same as syncing every step), running thresholds (batchtopk: a
        linear EMA) to their mean, and the first bad step to the earliest on any rank, so every rank raises it.
        Between syncs AuxK's dead mask is each rank's own (an approximation of single-process training)."""
        assert self.dist is not None
        never = torch.iinfo(torch.long).max
        first_bad = torch.where(self.first_bad >= 0, self.first_bad, never)
        self.dist.all_reduce_(first_bad, op="min")
        self.first_bad.copy_(torch.where(first_bad == never, -1, first_bad))
        self.dist.all_reduce_(self.firing.last_fired_F, op="max")
        threshold = getattr(self.sae, "threshold", None)
        if isinstance(threshold, Tensor):
            self.dist.all_reduce_(threshold, op="mean")

    def _raise_if_bad_input(self) -> None:
        bad_step = int(self.first_bad)
        if bad_step >= 0:
            raise ValueError(f"non-finite activations in the batch of step {bad_step}: fix the source, or set "
                             "train.nan_policy=skip to drop such rows")

    def _log(self, bar: tqdm) -> None:
        self.writer.check()  # a failed background checkpoint write stops the run here, not at the next checkpoint
        if self.dist is not None:
            self._sync_replicas()
        self._raise_if_bad_input()
        if self.uses_auxk:
            self.auxk_on = bool(self.firing.dead_since(self.step, self.auxk_steps).any())
        now = time.perf_counter()
        if self.dist is None:
            m, tokens = self.metrics.summary(), self.metrics.tokens
        else:
            m, tokens = self.metrics.summary_across(self.dist)
        m["tokens_per_s"] = (tokens - self._tokens_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._tokens_last = now, tokens
        m["lr"] = self._lr_now
        m["l1_coeff"] = l1_coeff_at(max(self.step - 1, 0), self.cfg)
        m.update(tokens=tokens, skipped_rows=self.skipped_rows, resampled=self.resampled)
        if self.extra_metrics is not None:
            m.update(self.extra_metrics())
        self.tracker.log(self.step, m)
        bar.set_postfix(mse=f"{m['mse']:.3g}", l0=f"{m['l0']:.1f}", fvu=f"{m['fvu']:.3f}", dead=m["dead"],
                        tok_s=f"{m['tokens_per_s']:.3g}", refresh=False)
        self.last_metrics = m
