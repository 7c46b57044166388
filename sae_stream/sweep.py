"""Several SAEs trained on one stream: every batch the LM and the buffer produce feeds all of them.

    trainers = [Trainer(sae_k, cfg_k, run_dir / name_k, ...) for ...]     # cfg.sweep_members()
    fit_together(trainers, buffer.batches(batch_size), save_stream=..., pool=SharedPool(buffer.sample_pool))

The K trainers see the same batches in the same order, so each ends exactly where a separate run fed those
batches would. The LM forward, the text stream and the ring buffer are paid once instead of K times; the SAE
steps themselves are not shared (they run one after the other on the same device).

Checkpoints: at every `train.checkpoint_every` step each member writes `<run>/<name>/checkpoints/step_X`, and then
the stream (buffer, LM and text position) writes `<run>/checkpoints/step_X`, last. A resume takes the newest stream
checkpoint whose members all have a valid checkpoint at that step (`common_resume_step`; data parallel: on every
rank, each rank's parts being in `rank_<r>/` of each of those directories), so the K SAEs and the one buffer always
restart from the same point.

Resampling: members that resample at the same step share one pool (`SharedPool`, drawn once per step; pool_size
and pool_dtype are shared settings), so with one resampling schedule a sweep consumes the stream exactly as one
run does; members with schedules of their own draw a pool at each of their steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from sae_stream.checkpoint import newest_common_step
from sae_stream.process import TrainingInterrupted, signals_to
from sae_stream.step import priority_stream
from sae_stream.trainer import Trainer


class SharedPool:
    """A pool_fn whose draw is shared by every caller until `clear()` (called by the driver once per step)."""

    def __init__(self, pool_fn: Callable[[int], Tensor]) -> None:
        self.pool_fn = pool_fn
        self._cache: dict[int, Tensor] = {}

    def __call__(self, n: int) -> Tensor:
        if n not in self._cache:
            self._cache[n] = self.pool_fn(n)
        return self._cache[n]

    def clear(self) -> None:
        self._cache.clear()


def fit_together(trainers: Sequence[Trainer], batches: Iterator[Tensor], save_stream: Callable[[int], None],
                 pool: SharedPool | None = None, run_dir: Path | None = None) -> list[dict]:
    """Train every trainer on each batch in turn until train.total_steps; returns each one's final metrics.

    SIGTERM/SIGINT: all members finish the step, checkpoint it (then the stream), and TrainingInterrupted is raised.
    All members share the stream settings (config.SWEEP_SHARED_TRAIN), so they step and checkpoint in lockstep.
    """
    lead, t = trainers[0], trainers[0].cfg.train
    saved = {"step": lead.saved_step}  # resumed: the stream has that step's checkpoint too (a finished sweep
    # resumed writes nothing)

    def checkpoint_stream() -> None:
        if saved["step"] != lead.step:
            save_stream(lead.step)
            saved["step"] = lead.step

    def request_stop(signum: int) -> None:
        for tr in trainers:
            tr.request_stop(signum)

    it = iter(batches)
    for tr in trainers:
        tr.begin()
    try:
        with signals_to(request_stop), priority_stream(lead.device, t.stream_priority):
            while lead.step < lead.total_steps:
                try:
                    x_BD = next(it)
                except StopIteration:
                    for tr in trainers:
                        tr.warn_stream_ended()
                    break
                if pool is not None:
                    pool.clear()
                stepped = [tr.advance(x_BD) for tr in trainers]
                if any(stepped) and lead.step % t.checkpoint_every == 0:
                    checkpoint_stream()
                signum = lead.stop_requested()
                if signum is not None:
                    for tr in trainers:
                        tr.save_unless_saved()
                    checkpoint_stream()
                    for tr in trainers:  # (their writers: the stream's checkpoint may share one with them)
                        tr.writer.wait()
                    raise TrainingInterrupted(signum, lead.step, run_dir)
            for tr in trainers:
                tr.finish()
            checkpoint_stream()
            for tr in trainers:  # the stream's last checkpoint, still under the signal handlers
                tr.writer.wait()
    finally:
        for tr in trainers:
            tr.close()
    return [tr.last_metrics for tr in trainers]


def common_resume_step(ckpt_dirs: Sequence[Path], dist: Any = None) -> int:
    """The newest step with a valid checkpoint in each of `ckpt_dirs`, the stream's (`RUN_DIR/checkpoints`, first)
    and every member's (data parallel: on every rank; a collective)."""
    step = newest_common_step(ckpt_dirs, dist)
    if step is None:
        raise ValueError(f"no step under {ckpt_dirs[0].parent} has a valid checkpoint of the stream and of every SAE "
                         "of the sweep: start the sweep again")
    return step
