"""What `lm train`, `train` and `run` do, wired from the parts: the composition root behind `cli.py`
(`eval` and `analyze` are report.py's).

Our LM is reached only through lm_bridge.py; the buffer, trainer, SAE and evaluation never import `lm`, so each
can be swapped or tested alone.

Run directory of `train` / `run`:
    config.yaml  metrics.jsonl  training_curves.png  checkpoints/  sae/ (SAELens format)  eval.json  eval_ce.safetensors
    density_histogram.png  feature_density.safetensors  dashboard/index.html  [`run`'s: job.json, lm/ if it trained]
A sweep (`sweep.saes`, sweep.py) keeps the shared config.yaml and the stream's checkpoints/ at the top and one
such directory per SAE, `RUN_DIR/<name>/`. Under torchrun (distributed.py) every rank streams its own shard and
trains its share of each batch; rank 0 alone logs and evaluates; each rank checkpoints its own part (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_stream.activations import ActivationStream
from sae_stream.buffer import ShuffleBuffer
from sae_stream.checkpoint import any_checkpoint, drop_newer, list_checkpoints, load_own_part, own_dir, rank_state
from sae_stream.checkpoint_writer import CheckpointWriter
from sae_stream.config import Config, load_config, save_config, to_dict
from sae_stream.data import keep_pinned_revision, pin_hf_revision
from sae_stream.distributed import Distributed, shard_size
from sae_stream.export import export_saelens, load_saelens
from sae_stream.lm_bridge import load_lm, native_capture, train_lm, untrained_lm
from sae_stream.prefetch import training_batches
from sae_stream.process import continued_by, resolve_device
from sae_stream.report import (
    LM_DIR,
    SAE_DIR,
    analyze_run,
    check_sae_inputs,
    current_eval,
    evaluate_run,
    load_for_lm,
    own_lm,
    plot_sae_curves,
    summarize_sweep,
    sweep_of,
)
from sae_stream.rundir import (
    UserError,
    check_shared,
    fresh_out_dir,
    is_main_process,
    lm_outside,
    lock_run,
    mark_job,
    read_job,
    require_run_dir,
    resume_command,
)
from sae_stream.sae import build_sae
from sae_stream.sweep import SharedPool, common_resume_step, fit_together
from sae_stream.tracking import NullTracker, Tracker
from sae_stream.trainer import Trainer


def batch_dtype(ring: torch.dtype, trainers: list[Trainer]) -> torch.dtype:
    """The dtype batches are drawn in: the ring's when every SAE's step reads it (a bf16 ring: no cast, half the
    traffic), else fp32."""
    return ring if all(t.input_dtype(ring) == ring for t in trainers) else torch.float32


# ---------------------------------------------------------------------------------------------- LM


def lm_train(config: str | None, overrides: list[str], out: str | None, resume: bool = False,
             overwrite: bool = False) -> Path:
    if resume:
        if not out and config is not None and Path(config).is_dir():
            out, config = config, None  # `lm train --resume DIR`, as `train --resume RUN_DIR`: its own config
        if not out:
            raise UserError(f"--resume {config!r}: no such directory" if config else "--resume needs the LM run "
                            "to continue: `sae-stream lm train --resume DIR`")
        out_dir = Path(out)
        if not (out_dir / "checkpoints").is_dir():
            raise UserError(f"{out!r} has no checkpoints/ to resume from")
        # no CONFIG: the run's own (the packaged default would change its schedule silently)
        if config is None and not (out_dir / "config.yaml").is_file():
            raise UserError(f"{str(out_dir / 'config.yaml')!r} is missing: pass the CONFIG the LM was trained with")
        saved = out_dir / "config.yaml"
        cfg = load_config(config if config is not None else saved, overrides)
        if config is not None:  # (the commit the LM began on, from its config.yaml; that file has it already)
            cfg = keep_pinned_revision(cfg, saved)
        with contextlib.ExitStack() as locks:  # (one process trains a directory at a time, as for `train`)
            if _lm_stage_of_a_run(out_dir):  # its lock, which `train --resume RUN_DIR` takes to finish this LM too
                locks.enter_context(lock_run(out_dir.parent))
            locks.enter_context(lock_run(out_dir))
            _train_lm(cfg, out_dir, resume=True)
        return out_dir
    cfg = pin_hf_revision(load_config(config, overrides))
    with fresh_out_dir(out, "lm", overwrite) as staged, lock_run(staged.path):
        _train_lm(cfg, staged.path, started=staged.commit)
    return staged.path


def _lm_stage_of_a_run(lm_dir: Path) -> bool:
    """Whether `lm_dir` is RUN_DIR/lm of a `run` (job.json says so; a run from before job.json: RUN_DIR is a run
    directory, as `train_resume` infers it)."""
    if lm_dir.name != LM_DIR:
        return False
    job = read_job(lm_dir.parent)
    return job.get("job") == "run" if job else (lm_dir.parent / "config.yaml").is_file()


def _train_lm(cfg: Config, out_dir: Path, resume: bool = False, started: Any = None) -> None:
    result = train_lm(cfg, out_dir, resume=resume, started=started)
    print(f"LM: held-out loss {result.get('heldout_loss', float('nan')):.4f} "
          f"(unigram baseline {result.get('unigram_loss', float('nan')):.4f}) -> {out_dir}")


# ---------------------------------------------------------------------------------------------- SAE training


@dataclass
class Member:
    """One SAE of a session: its config, run directory (the run's own, or `RUN_DIR/<name>` in a sweep) and trainer."""

    name: str | None
    cfg: Config
    run_dir: Path
    trainer: Trainer
    tracker: Any


class Session:
    """The live parts of one training run: LM, text stream, activation stream, ring buffer, and its SAEs (one, or
    the K of a sweep), each with a trainer. Under torchrun, this rank's shard of all of it."""

    def __init__(self, cfg: Config, run_dir: Path, prime: bool = False) -> None:
        if not cfg.lm.path:
            raise UserError("no LM given: pass --lm PATH_OR_NAME "
                            "(an `sae-stream lm train` dir or a transformer-lens name)")
        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.train.device)
        self.dist = Distributed.from_env(self.device)
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
        self.device = self.dist.device if self.dist else self.device
        check_shared(run_dir, self.dist)
        self.is_main = rank == 0
        self._lock = lock_run(run_dir) if self.is_main else None  # one process trains a run directory at a time
        self.batch_size = shard_size(cfg.train.batch_size, world)
        if self.dist is not None and cfg.train.nan_policy == "skip":
            raise UserError("train.nan_policy=skip is not supported under torchrun (ranks would drop different "
                            "numbers of rows and fall out of step): use nan_policy=stop")
        self.model = load_lm(cfg.lm.path, self.device)
        hook = cfg.buffer.hook_name
        self.d_in = check_sae_inputs(self.model, cfg)
        self.tokens = training_batches(cfg.data, cfg.buffer.lm_batch_size, self.device, rank, world)
        seed = cfg.train.seed + rank
        self.stream = ActivationStream(self.model, [hook], self.tokens, cfg.buffer, self.device, seed=seed,
                                       context_len=cfg.data.context_len, capture=native_capture(cfg, self.device))
        self.buffer = ShuffleBuffer(self.stream, cfg.buffer, self.device, d_in=self.d_in, seed=seed)
        if prime:  # the first text read, the ring filled once, before trackers and --out's files: a data error
            try:  # leaves --out as it was (ShuffleBuffer.prime)
                self.buffer.prime()
            except BaseException:
                self.close()
                raise
        # one writer (per rank) for every SAE and the stream: checkpoints land in the order written
        self.sweep = bool(cfg.sweep.saes)
        self.writer = CheckpointWriter(background=cfg.train.background_checkpoints, dist=self.dist,
                                       protect_common=self.sweep or self.dist is not None)
        self.pool = SharedPool(self._pool) if self.sweep else self._pool
        members = cfg.sweep_members() or [(None, cfg)]
        self.members = [self._member(name, mcfg) for name, mcfg in members]
        self.sae = self.members[0].trainer.sae  # the SAE of a single run
        self.trainer = self.members[0].trainer

    def _pool(self, n: int) -> Any:
        """Resampling pool: this rank's share from its buffer, gathered from every rank under torchrun."""
        dtype = getattr(torch, self.cfg.resample.pool_dtype)
        if self.dist is None:
            return self.buffer.sample_pool(n, dtype=dtype)
        return self.dist.all_gather_rows(self.buffer.sample_pool(math.ceil(n / self.dist.world_size), dtype=dtype))

    def _member(self, name: str | None, cfg: Config) -> Member:
        run_dir = self.run_dir / name if name else self.run_dir
        tracker = Tracker(run_dir, cfg.wandb, to_dict(cfg)) if self.is_main else NullTracker()
        sae = build_sae(cfg.sae, self.d_in, seed=cfg.train.seed).to(self.device)
        # a single run checkpoints its buffer with the SAE; a sweep checkpoints the stream once (save_stream)
        extra_state = None if name else (lambda: {"buffer": self._buffer_state()})
        trainer = Trainer(sae, cfg, run_dir, tracker, pool_fn=self.pool, extra_state=extra_state,
                          extra_metrics=self.buffer.metrics, dist=self.dist, writer=self.writer)
        return Member(name, cfg, run_dir, trainer, tracker)

    def save_configs(self) -> None:
        """config.yaml of the run, and of each SAE of a sweep (so `sae-stream eval RUN_DIR/NAME` works alone)."""
        if self.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            for m in self.members:
                if m.name:
                    save_config(m.cfg, m.run_dir / "config.yaml")

    def resume(self) -> int:
        """Every SAE and the stream from the newest checkpoint they all have; returns its step. Once all of it has
        loaded, this rank's newer checkpoints (a crash's leftovers) are removed: none may win a later resume."""
        dirs = [self.run_dir / "checkpoints", *(m.run_dir / "checkpoints" for m in self.members if m.name)]
        if not self.sweep:
            extra = self.trainer.resume(self.run_dir)
            if "buffer" in extra:
                self.buffer.load_state_dict(extra["buffer"])
            step = self.trainer.step
        else:
            step = common_resume_step(dirs, self.dist)
            for m in self.members:
                m.trainer.resume(m.run_dir / "checkpoints" / f"step_{step:08d}", verified=True)
            stream = load_own_part(self.run_dir / "checkpoints" / f"step_{step:08d}", self.dist, verify=False)
            self.buffer.load_state_dict(stream["extra"]["buffer"])
        drop_newer(dirs, step, self.dist)
        for m in self.members:  # records logged after the checkpoint (before a kill) are logged again from here
            m.tracker.drop_after(m.trainer.records_kept_through())
        return step

    def _buffer_state(self) -> dict[str, Any]:
        """The buffer's snapshot for a checkpoint. Written in the background, it goes into the buffer's kept host
        memory (no page faults at each checkpoint), once no write is in flight that could still be reading it (so
        also at most one step's snapshots in memory)."""
        if not self.writer.background:
            return self.buffer.state_dict()
        self.writer.wait()
        return self.buffer.state_dict(reuse_host_memory=True)

    def _save_stream(self, step: int) -> None:
        """A sweep's stream checkpoint (after every member's at this step); under torchrun, this rank's part."""
        state = {"step": step, "members": [m.name for m in self.members], "extra": {"buffer": self._buffer_state()}}
        self.writer.save(own_dir(self.run_dir / "checkpoints", self.dist), step, rank_state(state, self.dist),
                         keep=self.cfg.train.keep_checkpoints)

    def fit(self) -> list[dict[str, Any]]:
        """Train (every SAE on the same batches), export each from rank 0; the final metrics of each SAE."""
        dtype = batch_dtype(self.buffer.dtype, [m.trainer for m in self.members])
        out = None if self.sweep else self.trainer.batch_input(self.batch_size, dtype)  # the step's graph's input
        batches = self.buffer.batches(self.batch_size, dtype=dtype, out=out)
        try:
            if self.sweep:
                metrics = fit_together([m.trainer for m in self.members], batches, self._save_stream,
                                       pool=self.pool, run_dir=self.run_dir)
            else:
                metrics = [self.trainer.fit(batches)]  # (both wait for their last checkpoint)
        except BaseException:
            self.writer.drain()  # a stop's checkpoint still lands; a failed write is reported, not raised over this
            raise
        finally:
            for m in self.members:
                m.tracker.close()
        if self.is_main:
            for m in self.members:
                export_saelens(m.trainer.sae, m.run_dir / SAE_DIR, self.cfg.buffer.hook_name,
                               log10_density=m.trainer.log10_density(), model_name=str(self.cfg.lm.path),
                               extra_cfg={"context_size": self.cfg.data.context_len,
                                          "dataset_path": self.cfg.data.source,
                                          # the positions trained on (SAELens's slice of each context)
                                          "seqpos_slice": [1, None] if self.cfg.buffer.skip_first_position
                                          else [None]}, n_layers=self.model.cfg.n_layers)
                plot_sae_curves(m.run_dir, m.cfg)
        return metrics

    def close(self) -> None:
        for part in (self.tokens, self._lock, self.dist):  # the text reader, the run's lock, the process group
            if part is not None:
                part.close()


def _train_session(session: Session) -> None:
    try:
        metrics = session.fit()
    finally:
        session.close()
    if session.is_main:
        for m, final in zip(session.members, metrics):
            _report_training(final, m.run_dir)


def train(config: str | None, overrides: list[str], lm: str | None = None, out: str | None = None,
          overwrite: bool = False) -> Path:
    if lm:
        overrides = [*overrides, f"--lm.path={_abs_lm(lm)}"]
    cfg = pin_hf_revision(load_for_lm(config, overrides))
    lm_outside(cfg.lm.path, out, overwrite)
    with fresh_out_dir(out, "train", overwrite) as staged:
        session = Session(cfg, staged.path, prime=True)
        session.save_configs()
        staged.commit()  # the inputs checked out: the replaced run (if any) goes now
        _train_session(session)
    return staged.path


def train_resume(run_dir: str | Path) -> Path:
    """Continue a run where it stopped: the LM stage of `sae-stream run` if it had not finished, the SAE from its
    newest checkpoint (from step 0 if it had written none), then, for a run `run` made, eval and the dashboard."""
    t0 = time.perf_counter()
    run_dir = require_run_dir(run_dir)
    parent = sweep_of(run_dir)
    if parent is not None:
        raise UserError(f"{str(run_dir)!r} is one SAE of the sweep in {str(parent)!r}: its SAEs share one stream "
                        f"and resume together, `{resume_command(parent)}`")
    cfg = own_lm(run_dir, load_config(run_dir / "config.yaml"))  # (a moved run: its own lm/, not the old place)
    lm_unfinished = cfg.lm.path is None  # (only `run` saves a config before its LM exists)
    job = read_job(run_dir) or {"job": "run" if lm_unfinished or (run_dir / LM_DIR).is_dir() else "train"}
    if lm_unfinished and is_main_process():  # stopped in `run`'s LM stage: finish it first
        lm_dir = run_dir / LM_DIR
        with continued_by(resume_command(run_dir)), lock_run(run_dir):
            _train_lm(cfg, lm_dir, resume=bool(list_checkpoints(lm_dir / "checkpoints")))
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, path=str(lm_dir.resolve())))
    session = Session(cfg, run_dir)
    if any_checkpoint(run_dir, outside=LM_DIR):  # the SAE's own, a sweep member's or the stream's
        step = session.resume()
        if session.is_main:
            print(f"resuming {run_dir} at step {step}")
    else:  # stopped before the SAE's first checkpoint: it starts from step 0
        session.save_configs()
    _train_session(session)
    if job.get("job") == "run":  # (a run from before job.json: `run` if it trained its own LM)
        _evaluate_session(session, run_dir, analyze=bool(job.get("analyze", True)), t0=t0)
    return run_dir


def _abs_lm(lm: str) -> str:
    """A local LM dir is stored absolute in config.yaml so the run can be resumed from anywhere."""
    return str(Path(lm).resolve()) if Path(lm).exists() else lm


def _report_training(metrics: dict[str, Any], run_dir: Path) -> None:
    keys = ("mse", "fvu", "l0", "dead", "tokens_per_s")
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
    print(f"SAE trained (its last log interval; eval: the final SAE): {shown} -> {run_dir / SAE_DIR}")
    if (run_dir / "eval.json").is_file() and current_eval(run_dir) is None:
        print(f"note: {run_dir / 'eval.json'} describes the SAE before this training: run `sae-stream eval "
              f"{run_dir}` (and `analyze`) again")


# ---------------------------------------------------------------------------------------------- the main job


def run(config: str | None, overrides: list[str], lm: str | None = None, out: str | None = None,
        overwrite: bool = False, analyze: bool = True) -> Path:
    """Text -> LM (trained here unless given) -> streamed SAE -> eval -> dashboard, in one run directory."""
    t0 = time.perf_counter()
    if lm:
        overrides = [*overrides, f"--lm.path={_abs_lm(lm)}"]
    cfg = pin_hf_revision(load_for_lm(config, overrides))  # validate everything before touching the disk
    if not is_main_process() and not cfg.lm.path:
        raise UserError("under torchrun pass --lm PATH: train the LM first (`sae-stream lm train`, one process)")
    lm_outside(cfg.lm.path, out, overwrite)
    with fresh_out_dir(out, "run", overwrite) as staged:
        run_dir = staged.path
        if cfg.lm.path:
            lm_path = _abs_lm(cfg.lm.path)
        elif "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            raise UserError("under torchrun pass --lm PATH: train the LM first (`sae-stream lm train`, one process)")
        else:
            # the SAE side is checked on the untrained LM first: a bad hook must not wait for (or cost) a trained LM
            check_sae_inputs(untrained_lm(cfg), cfg)
            save_config(cfg, run_dir / "config.yaml")  # a run directory from here on (--overwrite can replace it)
            mark_job(run_dir, "run", analyze=analyze)
            lm_dir = run_dir / LM_DIR
            # a stop names `train --resume`, which finishes the LM, then the rest; the lock as in the SAE stage
            with continued_by(resume_command(run_dir)), lock_run(run_dir):
                _train_lm(cfg, lm_dir, started=staged.commit)
            lm_path = str(lm_dir.resolve())
        # (not read again from `config`: it may be a file in the directory that --overwrite moved aside)
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, path=lm_path))
        session = Session(cfg, run_dir, prime=True)
        session.save_configs()
        mark_job(run_dir, "run", analyze=analyze)
        staged.commit()
        _train_session(session)
    _evaluate_session(session, run_dir, analyze, t0)
    return run_dir


def _evaluate_session(session: Session, run_dir: Path, analyze: bool, t0: float) -> None:
    """`run`'s last stage: eval (and the dashboard) of each trained SAE, with the LM already loaded; rank 0 only."""
    if not session.is_main:
        return
    model, device, sweep = session.model, session.device, session.sweep
    members = [(m.name, m.cfg, m.run_dir) for m in session.members]
    del session
    results = {}
    for name, member_cfg, member_dir in members:
        loaded = (member_cfg, model, load_saelens(member_dir / SAE_DIR, device=device))
        results[name] = evaluate_run(member_dir, loaded=loaded)
        if analyze:
            analyze_run(member_dir, loaded=loaded)
    if sweep:
        summarize_sweep(run_dir, results)
    print(f"done in {time.perf_counter() - t0:.0f}s: run directory {run_dir.resolve()}")
