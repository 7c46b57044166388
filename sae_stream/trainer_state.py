"""A Trainer's checkpoints: what it saves and how it resumes, exactly (weights, Adam, trackers, RNG, the caller's
stream position; data parallel: every rank's own part). A mixin of Trainer (trainer.py), using its attributes.

    state = trainer.state_dict()         # everything needed to continue bit for bit
    trainer.save()                       # -> RUN/checkpoints/step_N (atomic; data parallel: rank r > 0 its own
                                         #    part in RUN/checkpoints/rank_<r>/step_N)
    extra = trainer.resume(run_dir)      # the latest valid checkpoint; returns the caller's extra_state
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_stream.checkpoint import load_own_part, newest_common_step, own_dir, rank_state
from sae_stream.checkpoint_writer import host_copy


class TrainerState:
    """Checkpoint half of Trainer: state_dict / save / resume, and the moves that keep state across devices."""

    @property
    def saved_step(self) -> int:
        """The step of the newest checkpoint written or resumed from (-1: none)."""
        return self._saved_step

    def records_kept_through(self) -> int:
        """After a resume: the last step whose metrics.jsonl record this checkpoint accounts for; later records are
        logged again and must go (Tracker.drop_after). A checkpoint holding unlogged steps came before any record
        of its own step (the stream ended there, or a stop), so that record goes too."""
        return self.step - 1 if self.metrics.steps > 0 else self.step

    def save_unless_saved(self) -> None:
        if self._saved_step != self.step:
            self.save()

    def _restore_lr(self) -> None:
        """After loading optimizer state (which brings the saving run's group options): this device's options
        (fused + capturable on CUDA), this trainer's lr (a device tensor on CUDA), step counters where Adam wants."""
        cuda = self.device.type == "cuda"
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_t if cuda else self._lr_now
            group["capturable"], group["fused"] = cuda, (True if cuda else None)
        for param, state in self.optimizer.state.items():
            if isinstance(state.get("step"), Tensor):
                state["step"] = state["step"].to(param.device if cuda else "cpu", torch.float32)

    def _internal_state(self) -> dict[str, Any]:
        return {"firing": self.firing.state_dict(), "metrics": self.metrics.state_dict(),
                "first_bad": self.first_bad, "initialised": self.initialised, "auxk_on": self.auxk_on,
                "skipped_rows": self.skipped_rows, "resampled": self.resampled,
                "generator": self.generator.get_state(), "step_layout": self.step_layout}

    def _load_internal_state(self, s: dict[str, Any]) -> None:
        self._graph.reset()  # the tensors below are replaced: a captured graph would still use the old ones
        self.firing.load_state_dict(s["firing"])
        self.metrics.load_state_dict(s["metrics"])
        self.first_bad = s["first_bad"].to(self.device)
        self.initialised, self.auxk_on = s["initialised"], s["auxk_on"]
        self.skipped_rows, self.resampled = s["skipped_rows"], s["resampled"]
        self.generator.set_state(s["generator"])
        self.step_layout = s.get("step_layout")  # (checkpoints before session 19 have none: timed again)

    def _move_to(self, device: torch.device) -> None:
        """Move the SAE, the optimizer state and the trackers to `device`, keeping their values."""
        opt_state, internal = self.optimizer.state_dict(), self._internal_state()
        self.sae.to(device)
        self._build(device)
        self.optimizer.load_state_dict(opt_state)  # Adam casts its state to each parameter's device
        self._restore_lr()
        self._load_internal_state(internal)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "architecture": self.sae.cfg.architecture, "d_in": self.sae.d_in, "d_sae": self.sae.d_sae,
            "sae": self.sae.state_dict(),
            "optimizer": self._optimizer_state(),
            "trainer": self._internal_state(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "extra": self.extra_state() if self.extra_state is not None else {},
        }

    def _optimizer_state(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:  # a float, so the checkpoint loads on any device
            group["lr"] = float(group["lr"])
        return state

    def save(self) -> Path | None:
        if self.run_dir is None:
            return None
        if self.dist is not None:
            self._sync_replicas()  # a collective every rank reaches, so a bad batch on one rank stops all of them
        self._raise_if_bad_input()  # never checkpoint weights trained on non-finite data
        self._saved_step = self.step
        self.writer.make_room(self.step)  # one step's snapshots in memory at a time
        state = rank_state(self.state_dict(), self.dist)  # data parallel: rank r > 0 writes its own part only
        if self.writer.background:  # training goes on while it is written: the trainer's part is copied here; the
            # caller's extra_state must already be copies (ShuffleBuffer's are)
            state = {k: v if k == "extra" else host_copy(v) for k, v in state.items()}
        return self.writer.save(own_dir(self.run_dir / "checkpoints", self.dist), self.step, state,
                                keep=self.cfg.train.keep_checkpoints)

    def resume(self, path_or_run_dir: Path | str, verified: bool = False) -> dict:
        """Load the latest valid checkpoint (a run dir, its checkpoints/ dir, or one step_* dir); returns
        the caller's extra_state so it can restore its stream position. fit() continues from the saved step.
        verified: a step_* dir every part of which was just checked (`newest_common_step`)."""
        path = Path(path_or_run_dir)
        if (path / "MANIFEST.json").is_file():
            ckpt = path
        else:  # data parallel: the newest step every rank has (a collective)
            ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            step = newest_common_step([ckpt_dir], self.dist)
            if step is None:
                raise ValueError(f"no valid checkpoint under {str(path)!r}: point at a run dir, or (a run stopped "
                                 "before its first checkpoint) start it again with --out on it and --overwrite")
            ckpt, verified = ckpt_dir / f"step_{step:08d}", True
        state = load_own_part(ckpt, self.dist, verify=not verified)
        got = (state["architecture"], state["d_in"], state["d_sae"])
        want = (self.sae.cfg.architecture, self.sae.d_in, self.sae.d_sae)
        if got != want:
            raise ValueError(f"checkpoint {ckpt} is (architecture, d_in, d_sae)={got}, this SAE is {want}")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._lr_now = float(self.optimizer.param_groups[0]["lr"])
        if self._lr_d is not None:
            self._lr_d.set(self._lr_now)
        self._restore_lr()
        self._load_internal_state(state["trainer"])
        self.step = int(state["step"])
        self.writer.written = self.step  # on disk in every part: the next checkpoint's pruning keeps it
        self._saved_step = self.step  # (a finished run resumed need not write its last checkpoint again)
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["extra"]
