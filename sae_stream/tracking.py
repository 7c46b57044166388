"""Metrics sink: JSON lines always, Weights & Biases when enabled, behind one small interface.

`wandb.init` with an API key but no network hangs for ~100 s, so it runs in a daemon thread with a
bounded wait; past it we fall back to offline mode with a warning instead of blocking training.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from sae_stream.checkpoint import atomic_write_text
from sae_stream.config import WandbConfig


def json_safe(value: Any) -> Any:
    """JSON-able value: tensors/arrays to numbers or lists, non-finite floats to None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _complete_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each complete record of a metrics.jsonl (one torn by a kill mid-write is skipped)."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a metrics.jsonl, in order; [] if there is none."""
    return [record for _, record in _complete_lines(Path(path))]


def keep_records_through(path: str | Path, step: int) -> None:
    """Drop the records after `step` (and torn lines) from a metrics.jsonl: an atomic rewrite."""
    path = Path(path)
    if path.is_file():
        atomic_write_text(path, "".join(line + "\n" for line, r in _complete_lines(path) if r.get("step", 0) <= step))


class NullTracker:
    """Does nothing: for tests and library use."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def drop_after(self, step: int) -> None:
        pass

    def last_record(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Tracker(NullTracker):
    """Appends `{"step": ..., **metrics}` to run_dir/metrics.jsonl (flushed per record) and to wandb if enabled."""

    def __init__(self, run_dir: str | Path | None, wandb_cfg: WandbConfig | None = None,
                 config: dict[str, Any] | None = None, filename: str = "metrics.jsonl") -> None:
        self._file = None
        self._path = Path(run_dir) / filename if run_dir is not None else None
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a", buffering=1)
        self._wandb = None
        if wandb_cfg is not None and wandb_cfg.enabled and os.environ.get("WANDB_MODE") != "disabled":
            self._wandb = _init_wandb(wandb_cfg, config, run_dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **json_safe(metrics)}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(_wandb_payload(metrics), step=step)

    def drop_after(self, step: int) -> None:
        """Forget the records after `step` (a resume from that step logs them again): an atomic rewrite."""
        if self._file is None or self._path is None:
            return
        self._file.close()
        keep_records_through(self._path, step)
        self._file = open(self._path, "a", buffering=1)

    def last_record(self) -> dict[str, Any]:
        """The newest complete record in metrics.jsonl ({} if none)."""
        records = read_records(self._path) if self._path is not None else []
        return records[-1] if records else {}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_payload(metrics: dict[str, Any]) -> dict[str, Any]:
    import wandb

    out = {}
    for k, v in metrics.items():
        if k.endswith("_histogram") and isinstance(v, dict) and "counts" in v and "edges" in v:
            out[k] = wandb.Histogram(np_histogram=(json_safe(v["counts"]), json_safe(v["edges"])))
        elif isinstance(v, (int, float)) or hasattr(v, "item"):
            out[k] = v
    return out


def _init_wandb(cfg: WandbConfig, config: dict[str, Any] | None, run_dir: str | Path | None) -> Any:
    """wandb.init with a bounded wait; on timeout or error, retry offline (never blocks for long)."""
    import wandb

    result: dict[str, Any] = {}

    def target(mode: str) -> None:
        try:
            result["run"] = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name, config=config,
                                       dir=str(run_dir) if run_dir else None, mode=mode, reinit=True)
        except Exception as e:  # noqa: BLE001 - any wandb failure falls back to offline
            result["error"] = e

    thread = threading.Thread(target=target, args=("online",), daemon=True)
    thread.start()
    thread.join(cfg.init_timeout_s)
    if "run" in result:
        return result["run"]
    reason = "timed out" if thread.is_alive() else f"failed ({result.get('error')})"
    warnings.warn(f"wandb.init {reason} after {cfg.init_timeout_s:.0f}s; logging to wandb in offline mode",
                  stacklevel=2)
    result.clear()
    target("offline")
    return result.get("run")
